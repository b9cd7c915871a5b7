"""Data sets: built-in sets (sizes, splits, determinism), user files and their errors, prompts."""

from __future__ import annotations

import json
import logging

import pytest

from deltatune import data
from deltatune.data import BUILTIN_DATASETS, DataError

# ---------------------------------------------------------------- rotten tomatoes


@pytest.fixture(scope="module")
def rt():
    return {split: data.rotten_tomatoes(split) for split in ("train", "validation", "test")}


def test_rotten_tomatoes_split_sizes(rt):
    assert {k: len(v) for k, v in rt.items()} == {"train": 10201, "validation": 1275, "test": 1276}


def test_rotten_tomatoes_splits_are_disjoint_and_complete(rt):
    texts = [r["text"] for split in rt.values() for r in split]
    assert len(texts) == len(set(texts)) == 12752


def test_rotten_tomatoes_labels(rt):
    records = [r for split in rt.values() for r in split]
    assert all(set(r) == {"text", "label"} for r in records)
    assert all(r["label"] in (0, 1) and isinstance(r["label"], int) for r in records)
    assert all(isinstance(r["text"], str) and r["text"] == r["text"].strip() and r["text"] for r in records)
    fresh = sum(r["label"] for r in records)
    assert fresh == 7368
    assert 0.57 < fresh / len(records) < 0.59
    for split in rt.values():  # the shuffle spreads the classes evenly enough over the splits
        assert 0.55 < sum(r["label"] for r in split) / len(split) < 0.60


def test_rotten_tomatoes_is_deterministic(rt):
    assert data.rotten_tomatoes("validation") == rt["validation"]
    # Pinned: a change here means the split changed, and results are no longer comparable.
    assert rt["train"][0] == {"text": "A taut, intelligent psychological drama.", "label": 1}
    assert rt["test"][0]["text"].startswith("'Abandon all hope, ye who enter here'")


def test_rotten_tomatoes_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        data.rotten_tomatoes("dev")


# ---------------------------------------------------------------- chatterbot, general text


def test_chatterbot_sizes_and_determinism():
    train, test = data.chatterbot("train"), data.chatterbot("test")
    assert (len(train), len(test)) == (1058, 118)
    assert data.chatterbot("test") == test
    pairs = [(r["prompt"], r["response"]) for r in train + test]
    assert len(set(pairs)) == len(pairs)  # deduplicated: no test pair is also a training pair
    for r in train + test:
        assert set(r) == {"prompt", "response"}
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert isinstance(r["response"], str) and r["response"].strip()
    assert {"prompt": "What company makes the Butterfinger bar?", "response": "Nestle"} == test[0]


def test_chatterbot_without_dedupe_keeps_repeats():
    train, test = data.chatterbot("train", dedupe=False), data.chatterbot("test", dedupe=False)
    assert (len(train), len(test)) == (2075, 231)
    # YAML numbers ('1984' is quoted in the file, but the loader must cope either way) are strings
    assert all(isinstance(r["response"], str) for r in train + test)


def test_general_text():
    sents = data.general_text()
    assert len(sents) == 200 == len(set(sents))
    assert data.general_text() == sents
    for s in sents:
        assert isinstance(s, str) and 12 <= len(s.split()) <= 40 and s[-1] in ".!?"
    assert len(data.general_text(10)) == 10
    with pytest.raises(ValueError, match="between 1 and"):
        data.general_text(10**6)


# ---------------------------------------------------------------- registry and dispatch


def test_builtin_registry():
    assert set(BUILTIN_DATASETS) == {"rotten-tomatoes", "chatterbot", "general-text"}
    rt = BUILTIN_DATASETS["rotten-tomatoes"]
    assert rt.splits == ("train", "validation", "test") and rt.columns == ("text", "label")
    assert BUILTIN_DATASETS["chatterbot"].splits == ("train", "test")
    for info in BUILTIN_DATASETS.values():
        assert info.description and info.task in ("seq-cls", "causal-lm")


def test_load_dataset_dispatch(tmp_path):
    assert len(data.load_dataset("rotten-tomatoes", "validation")) == 1275
    assert len(data.load_dataset("chatterbot")) == 1058  # default split: train
    assert [r["text"] for r in data.load_dataset("general-text")] == data.general_text()
    f = tmp_path / "d.jsonl"
    f.write_text('{"review": "good", "y": 1}\n')
    assert data.load_dataset(f, columns={"text": "review", "label": "y"}) == [{"text": "good", "label": 1}]
    with pytest.raises(DataError, match="rotten-tomatoes"):
        data.load_dataset("imdb")


# ---------------------------------------------------------------- user files


def test_load_jsonl_json_csv_tsv(tmp_path):
    rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in rows))  # JSON lines in .json
    (tmp_path / "a.csv").write_text('text,label\ngood film,1\n"bad film",0\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood film\t1\nbad film\t0\n")
    for name in ("a.jsonl", "a.json", "b.json"):
        assert data.load_records(tmp_path / name) == rows
    as_strings = [{"text": "good film", "label": "1"}, {"text": "bad film", "label": "0"}]
    for name in ("a.csv", "a.tsv"):
        assert data.load_records(tmp_path / name) == as_strings
    assert data.load_records(tmp_path / "a.csv", columns=["text"]) == [{"text": "good film"}, {"text": "bad film"}]


def test_csv_with_bom_and_multiline_field(tmp_path):
    f = tmp_path / "a.csv"
    f.write_bytes('\ufefftext,label\n"line one\nline two",1\n'.encode())
    assert data.load_records(f, columns=["text", "label"]) == [{"text": "line one\nline two", "label": "1"}]


def test_missing_column_names_file_and_lists_columns(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("review,stars\ngood,5\n")
    with pytest.raises(DataError) as err:
        data.load_records(f, columns=["text", "stars"])
    msg = str(err.value)
    assert "reviews.csv" in msg and "'text'" in msg and "'review', 'stars'" in msg

    g = tmp_path / "reviews.jsonl"
    g.write_text('{"review": "good"}\n{"review": "bad", "stars": 1}\n')
    with pytest.raises(DataError, match=r"reviews\.jsonl: missing required column.*'text'.*'review', 'stars'"):
        data.load_records(g, columns=["text"])


def test_header_only_csv_has_no_records(tmp_path):
    f = tmp_path / "empty.csv"
    f.write_text("review\n")
    with pytest.raises(DataError, match=r"empty\.csv: no records"):
        data.load_records(f, columns=["text"])


def test_empty_text_names_file_and_row(tmp_path, caplog):
    f = tmp_path / "reviews.csv"
    f.write_text("text,label\ngood,1\n   ,0\nbad,0\n")
    with pytest.raises(DataError) as err:
        data.load_records(f, columns=["text", "label"])
    assert "reviews.csv: row 2:" in str(err.value) and "empty" in str(err.value) and "'text'" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        out = data.load_records(f, columns=["text", "label"], on_bad_row="skip")
    assert out == [{"text": "good", "label": "1"}, {"text": "bad", "label": "0"}]
    assert "skipped 1 of 3" in caplog.text


def test_jsonl_row_missing_field_and_null(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"other": 1}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"d\.jsonl: row 2 \(line 3\): missing value in column\(s\) 'text'"):
        data.load_records(f, columns=["text"])
    assert data.load_records(f, columns=["text"], on_bad_row="skip") == [{"text": "a"}]


def test_structured_or_infinite_required_values_are_bad_rows(tmp_path, caplog):
    f = tmp_path / "typed.jsonl"
    rows = [
        {"text": "a", "label": 1},
        {"text": ["a", "b"], "label": 1},
        {"text": "c", "label": {"name": "pos"}},
        {"text": "d", "label": float("inf")},
        {"text": "e", "label": True, "extra": [1, 2]},  # only required columns must hold one value
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"typed\.jsonl: row 2 \(line 2\): column 'text' holds a list \(\['a', 'b'\]\)"):
        data.load_records(f, columns=["text", "label"])
    for bad in (1, 2, 3):
        only = tmp_path / f"one{bad}.jsonl"
        only.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[bad]) + "\n")
        with pytest.raises(DataError, match=r"row 2 .*column '(text|label)' holds .*--on-bad-row skip"):
            data.load_records(only, columns=["text", "label"])
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        out = data.load_records(f, columns=["text", "label"], on_bad_row="skip")
    assert out == [{"text": "a", "label": 1}, {"text": "e", "label": True}]
    assert "skipped 3 of 5" in caplog.text
    assert data.load_records(f)[1]["text"] == ["a", "b"]  # no columns required: every field as it is


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b",\n')
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2 \(line 2\): malformed JSON"):
        data.load_records(f)


def test_malformed_json_file_and_non_objects(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('[{"text": "a"}, {"text": ]')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 1"):
        data.load_records(f)
    g = tmp_path / "scalars.json"
    g.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(DataError, match=r"scalars\.json: row 2: expected an object"):
        data.load_records(g)
    h = tmp_path / "dict.json"
    h.write_text('{"text": ["a", "b"]}')
    with pytest.raises(DataError, match=r"dict\.json: expected a JSON list"):
        data.load_records(h)


def test_csv_row_with_extra_fields(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\na,1\nb,0,surplus\n")
    with pytest.raises(DataError, match=r"d\.csv: row 2: has 3 fields but the header has 2"):
        data.load_records(f)


def test_unsupported_missing_and_parquet_without_pyarrow(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        data.load_records(tmp_path / "a.txt")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        data.load_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_bad_row"):
        data.load_records(tmp_path / "nope.jsonl", on_bad_row="ignore")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        f = tmp_path / "d.parquet"
        f.write_bytes(b"PAR1")
        with pytest.raises(DataError, match=r"d\.parquet: .*pip install pyarrow"):
            data.load_records(f)


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good", ""], "label": [1, 0]}), f)
    with pytest.raises(DataError, match=r"d\.parquet: row 2: empty"):
        data.load_records(f, columns=["text", "label"])
    assert data.load_records(f, columns=["text", "label"], on_bad_row="skip") == [{"text": "good", "label": 1}]


# ---------------------------------------------------------------- sentiment prompts


class CharTokenizer:
    """One token per character: " positive" and " negative" share their first token (a space)."""

    def __init__(self, chat: bool):
        self.chat_template = "fake" if chat else None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</>\n" for m in messages) + "<assistant>\n"


def test_plain_sentiment_prompt():
    assert data.sentiment_prompt("  A fine film. ") == "Review: A fine film.\nSentiment:"


def test_sentiment_template_picks_distinct_first_tokens():
    # Plain form: " positive" would be preferred after "Sentiment:", but with one token per
    # character both answers start with " ", so the bare words are chosen instead.
    plain = data.sentiment_template(CharTokenizer(chat=False))
    assert not plain.chat and plain.answers == ("negative", "positive")
    assert plain.answer_token_ids == (ord("n"), ord("p"))
    chat = data.sentiment_template(CharTokenizer(chat=True))
    assert chat.chat and chat.answers == ("negative", "positive")
    prompt, answer = data.build_sentiment_example(CharTokenizer(chat=True), "Great.", 1)
    assert prompt.startswith("<user>") and "Review: Great." in prompt and prompt.endswith("<assistant>\n")
    assert answer == "positive"
    assert data.build_sentiment_example(CharTokenizer(chat=False), "Dull.", None) == ("Review: Dull.\nSentiment:", None)
    with pytest.raises(ValueError, match="label"):
        data.build_sentiment_example(CharTokenizer(chat=False), "Dull.", 2)


@pytest.mark.slow
def test_sentiment_tokens_under_smollm2():
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    template = data.sentiment_template(tok)
    assert template.chat and template.answers == ("negative", "positive")
    assert tok.convert_ids_to_tokens(list(template.answer_token_ids)) == ["negative", "positive"]
    for label in (0, 1):
        prompt, answer = data.build_sentiment_example(tok, "A taut, intelligent drama.", label, template)
        assert prompt.endswith("<|im_start|>assistant\n")
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        full = tok(prompt + answer, add_special_tokens=False).input_ids
        assert full[: len(p_ids)] == p_ids and full[len(p_ids) :] == [template.answer_token_ids[label]]

    tok.chat_template = None
    plain = data.sentiment_template(tok)
    assert not plain.chat and plain.answers == (" negative", " positive")
    assert tok.convert_ids_to_tokens(list(plain.answer_token_ids)) == ["Ġnegative", "Ġpositive"]


def test_the_run_reads_a_user_file_once_whether_or_not_it_holds_conversations(tmp_path, monkeypatch):
    from deltatune import data
    from deltatune.run_data import read_records

    reads = []
    real = data._read_text
    monkeypatch.setattr(data, "_read_text", lambda path: reads.append(path) or real(path))
    table = tmp_path / "reviews.csv"
    table.write_text("text,label,extra\ngood,1,x\nbad,0,y\n")
    assert read_records(table, ["text", "label"], "error") == [
        {"text": "good", "label": "1"},
        {"text": "bad", "label": "0"},
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"prompt": "Hi?", "completion": "Hello."}\n')
    assert read_records(chat, ["response"], "error") == [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    ]
    assert reads == [table, chat]
