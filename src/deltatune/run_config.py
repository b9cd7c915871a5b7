"""``deltatune train``'s options as one typed value, built once from the flags and ``--config``.

:class:`RunConfig` holds every option of the main job with its type and default (the command
line's), and checks on construction what each option alone allows: an unknown name is refused with
the nearest known one, a value of the wrong type or outside its range or choices with the option's
flag and what it accepts. What options mean together (an option for another method, validation
flags without validation data, ...) is :func:`deltatune.run_options.check_options`'s.

It is also a read-only mapping by option name (``config["lr"]``), for the helpers that the other
commands share with the main job (data loading reads the column options of both).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

CHOICES: dict[str, tuple[str, ...]] = {
    "quantize": ("none", "nf4", "fp4", "int8"),
    "task": ("auto", "label-generation", "causal-lm", "seq-cls", "seq2seq"),
    "on_long": ("truncate", "skip", "error"),
    "on_bad_row": ("error", "skip"),
    "on_nan": ("stop", "skip"),
    "schedule": ("linear", "cosine", "constant"),
    "optim": ("adamw", "sgd", "adafactor", "adamw8bit", "paged_adamw8bit"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "placement": ("houlsby", "pfeiffer", "parallel"),
    "adapter_input": ("sublayer", "normed", "auto"),
    "virtual_init": ("task", "vocab", "random"),
    "encoder_type": ("MLP", "LSTM"),
}
# (lowest, highest, the lowest excluded) for numeric options; None: unbounded on that side.
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "r": (1, None, False),
    "alpha": (0, None, True),
    "dropout": (0, 1, False),
    "model_dropout": (0, 1, False),
    "virtual_tokens": (1, None, False),
    "encoder_hidden_size": (1, None, False),
    "reduction_factor": (1, None, False),
    "max_length": (1, None, False),
    "lr": (0, None, True),
    "min_lr": (0, None, False),
    "warmup": (0, None, False),
    "epochs": (0, None, True),
    "max_steps": (0, None, False),
    "batch_size": (1, None, False),
    "grad_accum": (1, None, False),
    "clip": (0, None, False),
    "weight_decay": (0, None, False),
    "loraplus_ratio": (0, None, True),
    "eval_every": (0, None, False),
    "early_stopping_patience": (0, None, False),
    "save_every": (0, None, False),
    "save_total_limit": (1, None, False),
    "eval_batch_size": (1, None, False),
    "max_train": (0, None, False),
    "max_eval": (0, None, False),
    "max_test": (0, None, False),
    "val_split": (0, 0.5, False),
}


# Fields that are not options: what the user set, and what the run resolves.
NOT_OPTIONS = frozenset({"given", "total_steps"})


class RunConfigError(ValueError):
    """An option of ``deltatune train`` that cannot hold the value given; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class RunConfig(Mapping[str, Any]):
    """Every ``deltatune train`` option; the defaults are the command line's (None: the method's or task's)."""

    # the model and the method
    model: str = "smollm2-135m-instruct"
    quantize: str = "none"
    method: str = "lora"
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    model_dropout: float | None = None
    use_rslora: bool = False
    init_lora_weights: str = "true"
    targets: str | None = None
    exclude_modules: str | None = None
    layers_to_transform: str | None = None
    modules_to_save: str | None = None
    virtual_tokens: int | None = None
    virtual_init: str | None = None
    prefix_projection: bool | None = None
    encoder_hidden_size: int | None = None
    encoder_type: str | None = None
    prompt_init_text: str | None = None
    reduction_factor: int | None = None
    placement: str = "houlsby"
    adapter_input: str | None = None
    # the data and the task
    data: str = "rotten-tomatoes"
    eval_data: str | None = None
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str | None = "prompt"
    response_column: str = "response"
    task: str = "auto"
    max_length: int = 256
    on_long: str = "truncate"
    on_bad_row: str = "error"
    label_words: str | None = None
    instruction: str | None = None
    system: str | None = None
    # the optimisation
    lr: float | None = None
    min_lr: float = 0.0
    schedule: str = "linear"
    warmup: float | None = None
    optim: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: float = 1.0
    max_steps: int = 70
    batch_size: int = 8
    grad_accum: int = 1
    clip: float = 1.0
    on_nan: str = "stop"
    weight_decay: float = 0.0
    loraplus_ratio: float | None = None
    seed: int = 0
    # evaluation and checkpoints
    eval_every: float = 0
    metric_for_best: str | None = None
    early_stopping_patience: int = 0
    save_every: int = 25
    save_total_limit: int = 1
    eval_batch_size: int = 32
    max_train: int = 0
    max_eval: int = 128
    max_test: int = 0
    val_split: float = 0.1
    report_to: tuple[str, ...] = ()
    packing: bool = False
    # the run
    output: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    gradient_checkpointing: bool = False
    compile_blocks: bool = False
    device: str = "auto"
    precision: str = "auto"
    fsdp: bool = False
    forgetting: bool = True
    test_eval: bool = True
    # the options the user set (flags or --config), not left at their defaults
    given: frozenset[str] = frozenset()
    # resolved once the data is read, not an option: the run's optimizer steps (AdaLoRA's schedule spans them)
    total_steps: int | None = None

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            if field.name not in NOT_OPTIONS:
                object.__setattr__(self, field.name, _checked(field.name, getattr(self, field.name), hints[field.name]))
        from deltatune.registry import trainable_methods

        methods = trainable_methods()
        if self.method not in methods:
            raise RunConfigError(f"--method {self.method!r}: choose one of {', '.join(methods)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], given: Collection[str] = ()) -> RunConfig:
        """The config of ``options`` (names as the flags', underscores for dashes); unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls)} - NOT_OPTIONS
        unknown = sorted(set(options) - known - {"config"})
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RunConfigError(f"unknown train option {unknown[0]!r}{hint}")
        values = {k: v for k, v in options.items() if k in known}
        return cls(**values, given=frozenset(given) & frozenset(known))

    def changed(self) -> frozenset[str]:
        """The options whose value is not the command line's default (a config built in code sets these)."""
        defaults = RunConfig()
        return frozenset(name for name in self if getattr(self, name) != getattr(defaults, name))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_options(self) -> dict[str, Any]:
        """The options by name, as summary.json records them and ``--resume`` compares them."""
        return {name: getattr(self, name) for name in self}

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    # -- the read-only mapping ----------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if name in NOT_OPTIONS and name != "total_steps" or name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in dataclasses.fields(self) if f.name not in NOT_OPTIONS)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__) - len(NOT_OPTIONS)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _checked(name: str, value: Any, hint: Any) -> Any:
    """``value`` as option ``name``'s type (numbers widened, sequences to tuples), or a RunConfigError."""
    args = typing.get_args(hint)
    optional = type(None) in args and (typing.get_origin(hint) in (typing.Union, types.UnionType))
    if value is None:
        if optional:
            return None
        raise RunConfigError(f"{_flag(name)} needs a value")
    kind = next(a for a in args if a is not type(None)) if optional else hint
    origin = typing.get_origin(kind)
    if origin is tuple:
        items = [value] if isinstance(value, str) and name == "report_to" else value
        if isinstance(items, str):
            items = [p.strip() for p in items.split(",")]
        try:
            result = tuple(float(v) for v in items) if name == "betas" else tuple(str(v) for v in items)
        except (TypeError, ValueError):
            raise RunConfigError(f"{_flag(name)} {value!r}: expected a list") from None
        if name == "betas" and (len(result) != 2 or not all(0 <= b < 1 for b in result)):
            raise RunConfigError(f"{_flag(name)} {value!r}: expected two numbers in [0, 1) such as 0.9,0.999")
        return result
    if kind is bool:
        if not isinstance(value, bool):
            raise RunConfigError(f"{_flag(name)} {value!r}: expected true or false")
        return value
    if kind in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or (kind is int and value != int(value))
        ):
            raise RunConfigError(f"{_flag(name)} {value!r}: expected {'an integer' if kind is int else 'a number'}")
        value = kind(value)
        low, high, open_low = RANGES.get(name, (None, None, False))
        if (low is not None and (value < low or (open_low and value == low))) or (high is not None and value > high):
            bounds = f"{'above' if open_low else 'at least'} {low}" if low is not None else ""
            bounds += f"{' and ' if bounds else ''}at most {high}" if high is not None else ""
            raise RunConfigError(f"{_flag(name)} {value!r}: must be {bounds}")
        return value
    if kind is str:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str):
            raise RunConfigError(f"{_flag(name)} {value!r}: expected text")
        if name in CHOICES and value not in CHOICES[name]:
            raise RunConfigError(f"{_flag(name)} {value!r}: choose one of {', '.join(CHOICES[name])}")
        return value
    return value
