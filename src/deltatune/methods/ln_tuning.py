r"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train only the normalisation layers.

A normalisation layer :math:`y = \gamma \odot \hat{x} + \beta` (LayerNorm; RMSNorm has no
:math:`\beta`) holds :math:`d` or :math:`2d` numbers, a few thousandths of a percent of a
transformer; the paper finds tuning them alone a strong baseline for adapting a language model to
new inputs, at a fraction of LoRA's parameters. Each adapter is a trainable copy of each adapted
norm that *replaces* it in the forward (nothing is added), so an adapter starts as the base model
exactly, and several adapters are copies side by side; one is active at a time.

Merging swaps the copy in for the original (there is no arithmetic), unmerging swaps back. Unlike
HF PEFT 0.21, saving while merged writes the trained copy, not the original it swapped out.

When no ``target_modules`` are given, every normalisation module of the model is adapted, found by
type (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` or a class named ``...Norm`` with
parameters): Llama's ``input_layernorm``, ``post_attention_layernorm`` and ``norm``, GPT-2's
``ln_1``, ``ln_2``, ``ln_f``, T5's ``layer_norm`` and ``final_layer_norm`` (HF PEFT's per-model
table, reached without one) and BERT's ``LayerNorm`` (which PEFT's table lacks). The tensor name
``ln_tuning_layers``, the config fields and checkpoint keys are HF PEFT's, so adapters cross.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune import engine
from deltatune.adapter_layer import AdapterLayer
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.registry import Method, TrainingDefaults, register_method, register_training_defaults

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


@dataclasses.dataclass
class LNTuningConfig(PeftConfig):
    """LN tuning. Field names are HF PEFT's.

    Args:
        target_modules: module names (list: exact path or path suffix) or a regex on the full path
            (string). None: every normalisation module of the model (see the module docstring).
        exclude_modules: modules to leave alone, same matching rule.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
    """

    described: ClassVar[tuple[str, ...]] = ("target_modules",)

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "target_modules",
        "exclude_modules",
        "modules_to_save",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.LN_TUNING
        super().__post_init__()
        if self.peft_type != PeftType.LN_TUNING:
            raise ConfigError(f"LNTuningConfig has peft_type {self.peft_type!r}; it must be 'LN_TUNING'")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"LNTuningConfig.{name} must be a list of module names or a regex, got {value!r}")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with trained parameters (its affine scale, and shift where it has one)."""
    kind = type(module)
    named_norm = kind.__name__.endswith("Norm") or isinstance(module, NORM_TYPES)
    return named_norm and any(True for _ in module.parameters(recurse=False))


class LNTuningLayer(AdapterLayer):
    """A normalisation module plus one trainable copy of it per adapter."""

    containers = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        original = self.base_layer
        if self.merged_adapters:  # the merged copy sits in base_layer; copy the original it swapped out
            original = self.ln_tuning_layers[self.merged_adapters[-1]]
        replica = copy.deepcopy(original)
        replica.requires_grad_(True)
        self.ln_tuning_layers[name] = replica

    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if len(names) > 1:
            raise ValueError(
                f"LN tuning replaces each norm by one adapter's copy; {names} are active: set_adapter one of them"
            )
        return self.ln_tuning_layers[names[0]](x, *args, **kwargs)

    def merge_one(self, name: str, safe_merge: bool) -> float:
        if self.merged_adapters:
            raise ValueError(
                f"LN tuning merges one adapter at a time ({self.merged_adapters[0]!r} is merged); unmerge it first"
            )
        replica = self.ln_tuning_layers[name]
        if safe_merge:
            self.check_finite(name, *replica.parameters())
        self._swap(name)
        return 0.0

    def unmerge_one(self, name: str) -> float:
        self._swap(name)
        return 0.0

    def _swap(self, name: str) -> None:
        replica = self.ln_tuning_layers[name]
        self.ln_tuning_layers[name] = self.base_layer
        self.base_layer = replica

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        # Merged, the trained copy is the base layer (and the original sits in the container).
        if name in self.merged_adapters:
            yield from self.base_layer.parameters()
        else:
            yield from super().adapter_parameters(name)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.merged_adapters:
            return super().adapter_state_dict(name)
        # Merged, the trained copy is the base layer: save it, not the original it swapped out.
        return {f"ln_tuning_layers.{key}": t for key, t in self.base_layer.state_dict().items()}


def default_targets(model: nn.Module) -> list[str]:
    """The leaf names of every normalisation module of ``model``."""
    visible = engine.visible_modules(model)  # a norm another adapter tunes already is seen through its wrapper
    names = sorted({path.rsplit(".", 1)[-1] for path, module in visible if is_norm(engine.innermost(module))})
    if not names:
        raise engine.TargetModuleError(
            "target_modules was not given and the model has no normalisation layers (LayerNorm, RMSNorm, ...); "
            "name the modules to tune, e.g. target_modules=['...']"
        )
    return names


def attach_ln_tuning(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with LN-tuning adapter ``adapter_name``; return their paths."""
    assert isinstance(config, LNTuningConfig)
    if config.target_modules is None:
        config.target_modules = default_targets(model)
    paths = engine.find_targets(
        model,
        config.target_modules,
        wrappable=(nn.Module,),  # as in PEFT, any module named is copied (norms are what it is for)
        exclude_modules=config.exclude_modules,
        skip=config.modules_to_save or (),
        method="LN tuning",
    )
    engine.wrap_targets(model, paths, LNTuningLayer, lambda layer, p: layer.add_adapter(adapter_name, config, p))
    return paths


LN_TUNING = register_method(Method(peft_type=PeftType.LN_TUNING, config_class=LNTuningConfig, attach=attach_ln_tuning))

register_training_defaults(
    "ln-tuning",
    TrainingDefaults(
        uses=("targets", "exclude_modules", "modules_to_save"),
        lr=5e-3,
        options={"targets": None},
        source="every norm layer; lr as (IA)^3's (a vector per layer): Rotten Tomatoes validation 0.828 at 5e-3",
        config=lambda options, common: LNTuningConfig(
            task_type=common["task_type"],
            target_modules=common["target_modules"] if common["target_modules"] != "all-linear" else None,
            exclude_modules=common["exclude_modules"],
            modules_to_save=common["modules_to_save"],
        ),
    ),
)
