"""The run folder: what ``deltatune train`` leaves behind, and how the other commands read it back.

A run folder (``train --output``) holds::

    summary.json         every option the run used, its status, the task spec, and the results
    adapter/             the trained adapter in HF PEFT's layout, plus deltatune_task.json
    model/               instead of adapter/ for --method full: a transformers model folder
                         (config, tokenizer, weights once), plus deltatune_task.json
    best/                the same as adapter/ (or model/) at the best validation metric
    checkpoint-N/        the latest --save-total-limit resumable checkpoints
    checkpoint-latest    the name of the newest checkpoint
    metrics.jsonl        one line per step and per evaluation
    curves.png           training loss and validation metric against the step

``deltatune_task.json`` (:class:`TaskSpec`) is what makes an adapter usable on its own: the task,
the base model, the data columns, the longest input and, for classification, the label set in
index order with the label words, instruction and system turn of label generation. Every command
builds its task from it, so class indices never depend on which file is being evaluated.

One run at a time writes a run folder: :func:`run_lock` holds an advisory lock on
``.<name>.lock`` beside it for the whole run. The kernel drops the lock when the process ends, so a
run that crashed or was killed never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no run lock either
    fcntl = None  # type: ignore[assignment]

from deltatune.atomic import atomic_write_bytes
from deltatune.config import CONFIG_NAME
from deltatune.data import DataError

logger = logging.getLogger("deltatune")

TASK_FILE = "deltatune_task.json"
SUMMARY_FILE = "summary.json"
LATEST = "checkpoint-latest"
ADAPTER_DIR, MODEL_DIR, BEST_DIR = "adapter", "model", "best"
# What a run writes; --overwrite removes these and nothing else.
RUN_ENTRIES = (ADAPTER_DIR, MODEL_DIR, BEST_DIR, SUMMARY_FILE, LATEST, "metrics.jsonl", "curves.png")
RUN_PATTERNS = ("checkpoint-*", ".checkpoint-*.tmp")

# The options that decide what a run computes: --resume refuses a command that changes any of them.
# Evaluation, checkpointing, logging and device options may change between the parts of a run, and
# so may its length (--max-steps, --epochs: training on, or stopping sooner, is a common wish).
TRAJECTORY_OPTIONS = (
    "model",
    "method",
    "loraplus_ratio",
    "r",
    "alpha",
    "dropout",
    "model_dropout",
    "targets",
    "use_rslora",
    "init_lora_weights",
    "modules_to_save",
    "exclude_modules",
    "layers_to_transform",
    "virtual_tokens",
    "prefix_projection",
    "encoder_hidden_size",
    "encoder_type",
    "prompt_init_text",
    "reduction_factor",
    "placement",
    "adapter_input",
    "data",
    "text_column",
    "label_column",
    "prompt_column",
    "response_column",
    "task",
    "max_length",
    "on_long",
    "on_bad_row",
    "label_words",
    "instruction",
    "system",
    "lr",
    "min_lr",
    "schedule",
    "warmup",
    "batch_size",
    "grad_accum",
    "clip",
    "weight_decay",
    "optim",
    "betas",
    "seed",
    "max_train",
    "precision",
    "quantize",
)


@dataclasses.dataclass
class TaskSpec:
    """How records become a task's inputs: saved with every adapter, read by every command."""

    kind: str  # label-generation | seq-cls | causal-lm | seq2seq
    base_model: str | None
    max_length: int
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str | None = "prompt"
    response_column: str = "response"
    labels: list[str] | None = None  # class names in index order
    label_words: list[str] | None = None  # what a causal LM answers for each class
    instruction: str | None = None  # label generation: the user turn, with {text}
    system: str | None = None  # label generation: the system turn (None: the model's default)

    @property
    def num_labels(self) -> int | None:
        return len(self.labels) if self.labels else None

    @property
    def is_classification(self) -> bool:
        return self.kind in ("label-generation", "seq-cls")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "num_labels": self.num_labels}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> TaskSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            spec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise ValueError(f"{source}: not a deltatune task file ({err})") from err
        if spec.kind not in ("label-generation", "seq-cls", "causal-lm", "seq2seq"):
            raise ValueError(f"{source}: unknown task kind {spec.kind!r}")
        if spec.is_classification and not spec.labels:
            raise ValueError(f"{source}: a {spec.kind} task file must list its labels")
        return spec

    def save(self, folder: Path) -> None:
        atomic_write_bytes(Path(folder) / TASK_FILE, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> TaskSpec | None:
        """The spec saved in ``folder``, or None for an adapter saved outside ``deltatune train``."""
        path = Path(folder) / TASK_FILE
        data = read_json_object(path)
        return None if data is None else cls.from_dict(data, source=str(path))


def parse_label_words(text: str | None, labels: list[str]) -> list[str] | None:
    """``--label-words``: ``negative,positive`` (in label order) or ``0=negative,1=positive``."""
    if not text:
        return None
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if all("=" in e for e in entries):
        mapping = {k.strip(): v.strip() for k, v in (e.split("=", 1) for e in entries)}
        unknown = [k for k in mapping if k not in labels]
        missing = [label for label in labels if label not in mapping]
        if unknown or missing:
            raise DataError(
                f"--label-words {text!r}: "
                + (f"labels {unknown} are not in the training data; " if unknown else "")
                + (f"no word for labels {missing}; " if missing else "")
                + f"the labels are: {', '.join(labels)}"
            )
        return [mapping[label] for label in labels]
    if len(entries) != len(labels):
        raise DataError(
            f"--label-words {text!r} names {len(entries)} words for {len(labels)} labels "
            f"({', '.join(labels)}, in this order); give one word per label, or label=word pairs"
        )
    return entries


# -- finding what a run trained ------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    """An adapter folder or a fully fine-tuned model folder, with the run it came from."""

    folder: Path
    full: bool
    run: Path | None
    spec: TaskSpec | None

    @property
    def base_model(self) -> str | None:
        """The model to load the adapter onto (for a full fine-tune, the folder itself)."""
        if self.full:
            return str(self.folder)
        if self.spec is not None and self.spec.base_model:
            return self.spec.base_model
        from deltatune.config import PeftConfig

        return PeftConfig.from_pretrained(self.folder).base_model_name_or_path


def resolve_trained(path: str | Path) -> Trained:
    """What ``--adapter PATH`` names: a run folder, its ``adapter/``/``model/``/``best/``, or any adapter."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    for name in (ADAPTER_DIR, MODEL_DIR):
        inner = path / name
        if (inner / CONFIG_NAME).is_file() or (inner / "config.json").is_file():
            return _trained_at(inner, run=path)
    if (path / SUMMARY_FILE).is_file() and (path / LATEST).is_file():
        raise ValueError(
            f"{path} is a run that has not finished (no adapter/ or model/ yet); finish it with "
            "deltatune train ... --resume, or name one of its checkpoint folders' trained/ folder"
        )
    if (path / CONFIG_NAME).is_file() or (path / "config.json").is_file():
        run = path.parent if (path.parent / SUMMARY_FILE).is_file() else None
        return _trained_at(path, run=run)
    raise ValueError(
        f"{path} is neither a run folder (with adapter/ or model/) nor an adapter folder "
        f"(with {CONFIG_NAME}) nor a model folder (with config.json)"
    )


def _trained_at(folder: Path, run: Path | None) -> Trained:
    full = not (folder / CONFIG_NAME).is_file()
    return Trained(folder=folder, full=full, run=run, spec=TaskSpec.load(folder))


# -- writing into a run folder -------------------------------------------------------------------
def _run_entries(folder: Path) -> list[Path]:
    found = [folder / name for name in RUN_ENTRIES]
    for pattern in RUN_PATTERNS:
        found += sorted(folder.glob(pattern))
    return [path for path in dict.fromkeys(found) if path.exists() or path.is_symlink()]


class RunFolderBusy(ValueError):
    """Another live process is writing the run folder."""


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold the run folder for this process; another holder makes it raise :class:`RunFolderBusy`."""
    folder = Path(folder).absolute()
    lock = folder.parent / f".{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunFolderBusy(
                    f"--output {folder} is in use by another deltatune run (process {holder}); wait for it to "
                    "finish or stop it, or choose another --output"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_output(folder: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check the run folder before anything is loaded (every process; nothing is removed here).

    Returns True when the folder does not exist yet (the caller removes it again on failure).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file, not a folder")
    if resume:
        if not (folder / LATEST).is_file():
            where = "does not exist" if not folder.exists() else f"holds no checkpoint ({LATEST} is missing)"
            raise ValueError(f"--resume: {folder} {where}; check the --output path, or drop --resume to start a run")
        return False
    if not folder.exists():
        return True
    entries = sorted(p.name for p in folder.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ValueError(
            f"--output {folder} is not empty ({shown}); pass --overwrite to replace the run there, "
            "--resume to continue it, or choose another --output"
        )
    return False


def clear_run(folder: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote into ``folder``, and nothing else."""
    for entry in _run_entries(Path(folder)):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(Path(folder) / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when there is no such file; a corrupt file is an error naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt (not valid JSON: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object)")
    return data


def read_summary(folder: Path) -> dict[str, Any] | None:
    return read_json_object(Path(folder) / SUMMARY_FILE)


def recorded_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as summary.json keeps them (JSON types: tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in options.items() if not k.startswith("_")}, default=str))


# Trajectory options newer than some run folders, with what runs before them did.
ADDED_LATER = {"adapter_input": "sublayer"}


def check_resume(folder: Path, options: dict[str, Any]) -> None:
    """``--resume`` continues the run only with the options it started with; name each that differs."""
    summary = read_summary(folder) or {}
    saved = summary.get("options")
    if not isinstance(saved, dict):
        logger.warning("%s: summary.json records no options; cannot check that --resume repeats the run", folder)
        return
    saved = {**ADDED_LATER, **saved}
    now = recorded_options(options)
    differ = [
        f"--{key.replace('_', '-')} {now.get(key)!r} (the run used {saved[key]!r})"
        for key in TRAJECTORY_OPTIONS
        if key in saved and saved[key] != now.get(key)
    ]
    for key in ("max_steps", "epochs"):
        if key in saved and saved[key] != now.get(key):
            logger.warning(
                "--resume with --%s %s (the run started with %s): the learning-rate schedule follows the new length",
                key.replace("_", "-"),
                now.get(key),
                saved[key],
            )
    if differ:
        raise ValueError(
            f"--resume: this command differs from the run in {folder}: {'; '.join(differ)}. "
            "Resume with the run's own options, or start a new run in another --output"
        )


def remove_failed_output(folder: Path, created: bool) -> None:
    """A failed run leaves no folder behind that it created and never checkpointed into."""
    if created and folder.is_dir() and not (folder / LATEST).is_file():
        shutil.rmtree(folder, ignore_errors=True)


def make_task(spec: TaskSpec, tokenizer: Any, on_long: str = "truncate") -> Any:
    """The :class:`deltatune.tasks.Task` a spec describes, for ``tokenizer``."""
    from deltatune import tasks

    common = {"max_length": spec.max_length, "on_long": on_long}
    if spec.is_classification:
        labels = tasks.LabelSpace(list(spec.labels or []))
        columns = {"text_column": spec.text_column, "label_column": spec.label_column}
        if spec.kind == "seq-cls":
            return tasks.SequenceClassification(tokenizer, labels, **common, **columns)
        return tasks.LabelGeneration(
            tokenizer,
            labels,
            **common,
            **columns,
            words=spec.label_words,
            instruction=spec.instruction,
            system=spec.system,
        )
    columns = {"prompt_column": spec.prompt_column, "response_column": spec.response_column}
    if spec.kind == "seq2seq":
        return tasks.Seq2Seq(tokenizer, **common, **columns)
    return tasks.CausalLM(tokenizer, **common, **columns)
