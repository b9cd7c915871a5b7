"""Which records a run trains, validates and tests on: the task the data and model make, the split
files (a user file, a built-in set's split, a ``DatasetDict`` folder's), the held-out validation
share, and packing."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from deltatune import conversations
from deltatune import data as datasets
from deltatune.packing import PackingError, pack_examples
from deltatune.tasks import CausalLM, Task


def choose_task(requested: str, family: str, records: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """The task for ``--task auto``: from the model family and the data's columns."""
    if requested != "auto":
        return requested
    columns = set(records[0]) if records else set()
    if "messages" in columns:
        if family != "causal":
            raise datasets.DataError(
                f"{options['data']}: conversations train a causal language model; {options['model']} is not one"
            )
        return "causal-lm"
    if options["label_column"] in columns:
        return "label-generation" if family == "causal" else "seq-cls"
    if options["response_column"] in columns:
        return "seq2seq" if family == "seq2seq" else "causal-lm"
    raise datasets.DataError(
        f"{options['data']}: columns {sorted(columns)} hold neither a label column "
        f"({options['label_column']!r}, for classification) nor a response column ({options['response_column']!r}, "
        "for chat tuning); name them with --label-column / --text-column or --response-column / --prompt-column"
    )


def required_columns(kind: str, options: dict[str, Any], sample: dict[str, Any]) -> list[str]:
    if kind in ("label-generation", "seq-cls"):
        return [options["text_column"], options["label_column"]]
    if kind == "seq2seq":
        return [options["prompt_column"], options["response_column"]]
    if "messages" in sample:
        return ["messages"]
    prompt = [options["prompt_column"]] if options["prompt_column"] and options["prompt_column"] in sample else []
    return prompt + [options["response_column"]]


def load_split(
    options: dict[str, Any], split: str, file_option: str | None, columns: list[str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """A split's records and a name for messages: a user file named by ``file_option``, else the
    built-in set's split (the nearest it has), else nothing."""
    path = options.get(file_option) if file_option else None
    source = options["data"]
    splits = datasets.dataset_dict_splits(source) if not path and Path(source).is_dir() else None
    if splits is not None:  # a DatasetDict folder: its own split, if it has this one
        if split not in splits:
            if split == "train":
                raise datasets.DataError(f"{source}: a DatasetDict folder with splits {', '.join(splits)}, no train")
            return [], ""
        return read_records(Path(source) / split, columns, options["on_bad_row"]), f"{source} ({split})"
    if not path and source in datasets.BUILTIN_DATASETS:
        info = datasets.BUILTIN_DATASETS[source]
        if split not in info.splits:
            split = "test" if "test" in info.splits else info.splits[-1]
        return datasets.load_dataset(source, split), f"{source} ({split})"
    path = path or (source if file_option is None else None)
    if not path:
        return [], ""
    return read_records(path, columns, options["on_bad_row"]), str(path)


VAL_SPLIT_MAX_ROWS = 500


def hold_out(
    records: list[dict[str, Any]], share: float, seed: int, source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """``records`` split into training and a seeded held-out validation share (at most 500 rows).

    The same records, share and seed give the same split (a resumed run sees the one it started
    with); the rows keep their order on both sides. With too few rows for one held-out row and a
    training row, nothing is held out.
    """
    count = min(round(share * len(records)), VAL_SPLIT_MAX_ROWS)
    if count < 1 or count >= len(records):
        return records, [], {"source": None, "note": f"too few training rows ({len(records)}) to hold any out"}
    held = set(random.Random(seed).sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held]
    validation = [r for i, r in enumerate(records) if i in held]
    return train, validation, {"source": f"held out from {source}", "rows": count, "share": share, "seed": seed}


def packed(task: Task, examples: list[Any], options: dict[str, Any], say: Any) -> list[Any]:
    """``--packing``: the training examples packed into rows (deltatune.packing), or why they cannot be."""
    if not isinstance(task, CausalLM):
        raise PackingError(f"--packing applies to causal-LM and chat data, not the {task.kind} task")
    if options["method"] in ("prefix", "prompt", "ptuning"):
        raise PackingError(
            f"--packing puts several examples in a row, and {options['method']} tuning puts its virtual tokens in "
            "front of a row, so only the first example would see them: use a layer method (lora, dora, ia3, "
            "adapter, full) or train without --packing"
        )
    packed = pack_examples(examples, options["max_length"])
    say(f"packing: {len(examples)} examples in {len(packed)} rows of at most {options['max_length']} tokens")
    return packed


def read_records(path: str | Path, columns: list[str] | None, on_bad_row: str) -> list[dict[str, Any]]:
    """A user file's records: conversations (any format of :mod:`deltatune.conversations`) as
    ``{"messages": [...]}``, other data with ``columns`` required and kept."""

    def wanted(first: dict[str, Any]) -> list[str] | None:
        return None if conversations.conversation_format(first) is not None else columns

    records = datasets.load_records(path, columns=wanted, on_bad_row=on_bad_row)
    if conversations.conversation_format(records[0]) is not None:
        return conversations.as_conversations(records, str(path), on_bad_row)
    return records


def limit(records: list[Any], count: int) -> list[Any]:
    return records[:count] if count else records
