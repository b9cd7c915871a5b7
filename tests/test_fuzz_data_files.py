"""Hostile data files: random rows in CSV, TSV, JSON lines, JSON and Parquet, through the steps a
``deltatune train`` run takes (read the file, choose the task, require its columns, read the labels,
encode every row with the tokenizer), in both ``--on-bad-row`` modes.

Rows are empty, huge, binary, of the wrong types (numbers, lists, objects, NaN where text belongs),
conversations with odd roles and contents; files carry BOMs, Latin-1 bytes, CRLF ends, NUL bytes
and stray lines. Every file must either give examples or a ``DataError`` that names the file (and,
for a problem in one row, that row); never any other exception.
"""

from __future__ import annotations

import csv
import io
import json
import math

import hypothesis.strategies as st
import pytest
from hypothesis import given
from transformers import AutoTokenizer

from deltatune.data import DataError
from deltatune.run import build_task
from deltatune.run_data import choose_task, load_split, required_columns
from fuzz_helpers import fuzz_settings, tally, write_report
from tiny_assets import session_assets

pytestmark = pytest.mark.fuzz
COLUMNS = ["text", "label", "prompt", "response", "messages", "conversations", "instruction", "output", "weird"]
ROLES = ["system", "user", "assistant", "tool", "ASSISTANT", "", "bot", None, 3]

text = st.text(max_size=40) | st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=3000)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(ROLES), "content": text | st.none() | st.integers() | st.lists(st.text(max_size=5))}
)
scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text
cell = (
    scalar
    | st.lists(scalar, max_size=3)
    | st.dictionaries(st.text(max_size=5), scalar, max_size=3)
    | st.lists(message, max_size=4)
    | st.sampled_from(["positive", "negative", "1", "0", " 2 ", "Positive"])
)
row = st.dictionaries(st.sampled_from(COLUMNS), cell, max_size=5)
rows = st.lists(row, max_size=12) | st.lists(st.fixed_dictionaries({"text": text, "label": cell}), max_size=12)
QUIRKS = ["none", "bom", "latin1", "crlf", "nul", "stray_line", "truncate", "binary"]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    write_report()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.llama)


def render(records: list[dict], suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r, allow_nan=True) + "\n" for r in records).encode()
    if suffix == ".json":
        return json.dumps(records, allow_nan=True).encode()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(records), sink)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):  # mixed types: as text, as a CSV export
            sink = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in records]), sink)
        return sink.getvalue()
    names = list(dict.fromkeys(k for r in records for k in r))
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t" if suffix == ".tsv" else ",")
    writer.writerow(names)
    for r in records:
        writer.writerow([json.dumps(r[n]) if isinstance(r.get(n), (list, dict)) else r.get(n, "") for n in names])
    return out.getvalue().encode("utf-8", "surrogatepass")


def apply_quirk(data: bytes, quirk: str, rng) -> bytes:
    if quirk == "bom":
        return b"\xef\xbb\xbf" + data
    if quirk == "latin1":
        return data.decode("utf-8", "replace").encode("latin-1", "replace") + "é".encode("latin-1")
    if quirk == "crlf":
        return data.replace(b"\n", b"\r\n")
    if quirk == "nul" and data:
        at = rng.randrange(len(data))
        return data[:at] + b"\x00" + data[at:]
    if quirk == "stray_line":
        return data + rng.choice([b"{not json\n", b'"a","b","c","d"\n', b"[1, 2]\n", b"42\n"])
    if quirk == "truncate" and data:
        return data[: rng.randrange(len(data))]
    if quirk == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return data


def run_steps(path, tokenizer, on_bad_row: str) -> int:
    """What ``deltatune train`` does with a data file before the model sees it; the examples made."""
    options = {
        "data": str(path), "task": "auto", "text_column": "text", "label_column": "label", "prompt_column": "prompt",
        "response_column": "response", "on_bad_row": on_bad_row, "max_length": 64, "model": "tiny",
        "on_long": "truncate",
    }  # fmt: skip
    raw, _ = load_split(options, "train", None)
    kind = choose_task("auto", "causal", raw, options)
    records, _ = load_split(options, "train", None, required_columns(kind, options, raw[0]))
    task = build_task(kind, tokenizer, records, options)
    return len(task.encode(records, source=str(path)))


@given(
    records=rows,
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json", ".parquet"]),
    quirk=st.sampled_from(QUIRKS),
    on_bad_row=st.sampled_from(["error", "skip"]),
    rng=st.randoms(use_true_random=False),
)
@fuzz_settings(150)
def test_a_hostile_data_file_gives_examples_or_a_data_error_naming_it(
    tmp_path_factory, tokenizer, records, suffix, quirk, on_bad_row, rng
):
    path = tmp_path_factory.mktemp("data") / f"train{suffix}"
    path.write_bytes(apply_quirk(render(records, suffix), quirk, rng))
    category = f"data file: {suffix} {quirk}"
    try:
        run_steps(path, tokenizer, on_bad_row)
    except DataError as err:
        named = str(path) in str(err)
        tally(category, bad=not named)
        assert named, f"the error does not name the file: {err}"
        return
    except Exception as err:  # noqa: BLE001 - anything else is what this test exists to catch
        tally(category, bad=True)
        raise AssertionError(f"raw {type(err).__name__} from a hostile data file: {err}") from err
    tally(category, accepted=True)


def test_a_bad_row_names_its_number(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    good = {"text": "fine", "label": "positive"}
    lines = [good, {**good, "label": "negative"}, {"text": math.nan, "label": None}, good]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"row 3 \(line 3\)"):
        run_steps(path, tokenizer, "error")
    assert run_steps(path, tokenizer, "skip") == 3
