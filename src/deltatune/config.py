"""Adapter configurations and their JSON form.

Every method's config is a dataclass derived from :class:`PeftConfig`. Field names and meanings are
HF PEFT's, so an ``adapter_config.json`` written by either library is read by the other. Writing
follows one rule: older PEFT releases reject fields they do not know, so a config writes the fields
PEFT always needs (:attr:`PeftConfig.always_written`) plus every field whose value differs from its
default. Reading ignores fields we do not know, with a warning, because newer PEFT releases keep
adding fields that do not change what the saved tensors mean.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from deltatune.atomic import atomic_write_bytes
from deltatune.field_types import wrong_field_types

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("deltatune")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
UNSAFE_WEIGHTS_NAME = "adapter_model.bin"


class PeftType(enum.StrEnum):
    """The method an adapter implements; the value is what ``adapter_config.json`` stores."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    BOTTLENECK = "BOTTLENECK"
    # HF PEFT's names for the methods below: the file format's vocabulary, kept here so that a method
    # module only registers itself (an implemented method's config class is in the registry).
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    LN_TUNING = "LN_TUNING"
    OFT = "OFT"
    BOFT = "BOFT"
    ADALORA = "ADALORA"


class TaskType(enum.StrEnum):
    """What the base model is used for; decides e.g. which head is trained along with the adapter."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Output heads that PEFT trains fully (and saves with the adapter) for each task type.
TASK_HEADS: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


# HF PEFT fields that say nothing about what the saved tensors mean (bookkeeping, defaults of
# features that are off); reading a PEFT config skips them without a warning.
PEFT_BOOKKEEPING_FIELDS = frozenset(
    {"peft_version", "auto_mapping", "megatron_core", "megatron_config", "qalora_group_size", "ensure_weight_tying"}
)


# Fields that hold a regex when they are a string (or, for the patterns, in their keys).
REGEX_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules", "rank_pattern", "alpha_pattern")


class ConfigError(ValueError):
    """A config that cannot describe a valid adapter; the message says which field and why."""


@dataclasses.dataclass
class PeftConfig:
    """Fields shared by every method.

    Args:
        peft_type: set by each subclass; stored in the JSON so a loader knows the method.
        task_type: optional :class:`TaskType`; ``SEQ_CLS`` etc. add the task head to ``modules_to_save``.
        base_model_name_or_path: recorded on save so a user (and ``deltatune inspect``) knows the base.
        revision: the base model's revision, recorded for the same reason.
        inference_mode: True for adapters loaded for inference (their parameters are frozen).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head);
            every method has the field (HF PEFT's name), each documents it for itself.
    """

    peft_type: PeftType | str | None = None
    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    # Fields `deltatune inspect` shows (when set), besides the method, task and sizes.
    described: ClassVar[tuple[str, ...]] = ()
    # Fields written even when they hold the default: PEFT or downstream tools (vLLM) read them.
    always_written: ClassVar[tuple[str, ...]] = (
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    )

    def __post_init__(self) -> None:
        problems = wrong_field_types(self)
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))
        layers = getattr(self, "layers_to_transform", None)
        if layers is not None and any(i < 0 for i in ([layers] if isinstance(layers, int) else layers)):
            raise ConfigError(f"{type(self).__name__}.layers_to_transform: layer indices start at 0, got {layers!r}")
        if getattr(self, "layers_pattern", None) and layers is None:
            raise ConfigError(
                f"{type(self).__name__}: layers_pattern needs layers_to_transform (the layer indices to adapt); "
                "layers_pattern only says where in the module paths those indices are"
            )
        if getattr(self, "target_modules", None) == []:
            raise ConfigError(
                f"{type(self).__name__}.target_modules=[] selects no module; name some, or leave it None "
                "for the method's default"
            )
        if layers is not None and not isinstance(layers, int) and not layers:
            raise ConfigError(
                f"{type(self).__name__}.layers_to_transform=[] selects no layer; leave it None to adapt every layer"
            )
        for name in REGEX_FIELDS:
            value = getattr(self, name, None)
            for pattern in [value] if isinstance(value, str) else value if isinstance(value, dict) else []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(
                        f"{type(self).__name__}.{name}: {pattern!r} is not a valid regex ({err})"
                    ) from None
        if self.peft_type is not None:
            self.peft_type = PeftType(str(self.peft_type))
        if self.task_type is not None:
            try:
                self.task_type = TaskType(str(self.task_type))
            except ValueError:
                choices = ", ".join(t.value for t in TaskType)
                raise ConfigError(f"unknown task_type {self.task_type!r}; choose one of {choices}") from None

    @property
    def is_prompt_learning(self) -> bool:
        """True for methods that change the model's inputs rather than its layers."""
        return False

    def trained_base_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base model's own parameters this adapter trains and saves, by parameter path (none
        unless the method says otherwise, as LoRA's ``bias`` does)."""
        return {}

    def for_loading(self) -> PeftConfig:
        """The config to build an adapter whose trained weights come from a file next (a method whose
        initialisation rewrites the base, such as LoftQ, must not run it again)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict: the always-written fields plus every non-default field."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            default = (
                field.default
                if field.default is not dataclasses.MISSING
                else field.default_factory()  # type: ignore[misc]
                if field.default_factory is not dataclasses.MISSING
                else dataclasses.MISSING
            )
            if field.name in self.always_written or value != default:
                out[field.name] = _jsonable(value)
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``adapter_config.json`` (sorted keys, indent 2, as PEFT) atomically into ``directory``."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, self.to_json_bytes())
        return path

    def to_json_bytes(self) -> bytes:
        """The ``adapter_config.json`` file's bytes (sorted keys, indent 2, as PEFT)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """Build the right config class from a dict, dispatching on ``peft_type``.

        Unknown fields are dropped with one warning naming them: they come from newer PEFT releases.
        """
        if cls is PeftConfig:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ConfigError(f"{source}: no 'peft_type' field, so the adapter's method is unknown")
            config_class = _CONFIG_CLASSES.get(str(peft_type))
            if config_class is None:
                known = ", ".join(sorted(_CONFIG_CLASSES))
                raise ConfigError(f"{source}: unknown peft_type {peft_type!r}; deltatune implements: {known}")
            return config_class.from_dict(data, source=source)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(
            k
            for k, v in data.items()
            if k not in known and k not in PEFT_BOOKKEEPING_FIELDS and v not in (None, {}, [], False)
        )
        if unknown:
            logger.warning("%s: ignoring fields deltatune does not know: %s", source, ", ".join(unknown))
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: invalid adapter config: {err}") from err

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PeftConfig:
        """Read ``adapter_config.json`` from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory?")
        return cls.from_json_bytes(path.read_bytes(), path)

    @classmethod
    def from_json_bytes(cls, raw: bytes, path: Path) -> PeftConfig:
        """Parse the bytes of ``adapter_config.json`` read from ``path`` (named in errors)."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); the file is corrupt") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object")
        return cls.from_dict(data, source=str(path))


def require_positive(config: PeftConfig, *names: str) -> None:
    """Refuse a size field of ``config`` that is set but below 1 (a count, a width, a rank)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{type(config).__name__}.{name} must be at least 1, got {value!r}")


# peft_type -> the config class that reads it; deltatune.registry.register_method fills it, so that
# reading a config needs no import of the registry (which imports this module).
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {}


def register_config_class(peft_type: PeftType | str, config_class: type[PeftConfig]) -> None:
    """``PeftConfig.from_dict`` builds ``config_class`` for configs whose ``peft_type`` is ``peft_type``."""
    _CONFIG_CLASSES[peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)] = config_class


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value
