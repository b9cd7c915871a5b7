r"""What LoHa and LoKr share (the LyCORIS family, Yeh et al. 2024): config fields, dropouts, injection.

Both build :math:`\Delta W` from small factors, scaled by :math:`s = \alpha / r`, and regularise it
in training two ways, as LyCORIS and HF PEFT do:

* **module dropout** (probability :math:`p_m`): each training forward skips the adapter entirely
  with probability :math:`p_m`;
* **rank dropout** (probability :math:`p_r`): despite the name, it zeroes whole *output rows* of
  :math:`\Delta W`, each with probability :math:`p_r`, and (LoHa always, LoKr with
  ``rank_dropout_scale``) divides the kept rows by the share kept, so the expected delta is unchanged.

Neither applies in eval mode, to merging, or to ``save_as_lora``: :meth:`DeltaLayer.delta_weight`
is always the whole delta. Field names, defaults and per-module patterns are HF PEFT's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import engine
from deltatune.config import ConfigError, PeftConfig
from deltatune.delta_layer import DeltaLayer


@dataclasses.dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share. HF PEFT's names and defaults.

    Args:
        r: rank of the factors.
        alpha: numerator of the scale ``s = alpha / r``.
        rank_dropout: probability of dropping each output row of the delta in training.
        module_dropout: probability of skipping the whole adapter in a training forward.
        use_effective_conv2d: a convolution option of PEFT's; deltatune adapts linear layers, where it
            has no effect (kept so PEFT's files read back the same).
        target_modules: module names (list: exact path or path suffix), a regex on the full path
            (string), or ``"all-linear"``. None: the attention query/value projections (LoRA's rule).
        exclude_modules: modules to leave alone, same matching rule.
        init_weights: True: the delta starts at zero (one factor zero); False: every factor random
            (the adapter changes outputs from the start; for tests).
        layers_to_transform, layers_pattern: restrict to these layer indices.
        rank_pattern, alpha_pattern: per-module overrides of ``r`` / ``alpha``; keys are regexes matched
            against the end of the module path.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
    """

    described: ClassVar[tuple[str, ...]] = ("r", "alpha", "target_modules")

    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "r",
        "alpha",
        "rank_dropout",
        "module_dropout",
        "target_modules",
        "init_weights",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            if isinstance(value, (set, tuple)):
                setattr(self, field, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name}.{field} must be a list of module names or a regex string, got {value!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"{name}.r must be a positive integer, got {self.r!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"{name}.rank_pattern values must be positive integers, got {self.rank_pattern}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ConfigError(f"{name}.alpha must be a number, got {self.alpha!r}")
        for field in ("rank_dropout", "module_dropout"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}.{field} must be a probability in [0, 1), got {value!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}: layers_pattern needs layers_to_transform (the layer indices to adapt)")

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """``r`` and ``alpha`` for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            engine.pattern_value(self.rank_pattern, module_path, self.r),
            engine.pattern_value(self.alpha_pattern, module_path, self.alpha),
        )


class LycorisLayer(DeltaLayer):
    """A :class:`DeltaLayer` with LyCORIS's training-time module and rank dropout."""

    per_adapter = ("scaling", "rank_dropout", "module_dropout")
    # LoHa rescales the kept rows always; LoKr only when asked (``rank_dropout_scale``).
    rescales_rank_dropout: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}

    def add_dropouts(self, name: str, config: LycorisConfig, scale: float) -> None:
        self.scaling[name] = scale
        self.rank_dropout[name] = float(config.rank_dropout)
        self.module_dropout[name] = float(config.module_dropout)

    def rescale_rows(self, name: str) -> bool:
        return self.rescales_rank_dropout

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training:
            return F.linear(x, self.delta_weight(name))
        if self.module_dropout[name] > 0 and float(torch.rand(1)) < self.module_dropout[name]:
            return None  # this step trains without the adapter
        delta = self.delta_weight(name)
        p = self.rank_dropout[name]
        if p > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) >= p).to(delta.dtype)
            if self.rescale_rows(name):
                keep = keep / keep.mean().clamp_min(1.0 / delta.shape[0])  # all dropped: zeros, not NaN
            delta = delta * keep[:, None]
        return F.linear(x, delta)


def config_options(options: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """The LyCORIS fields ``deltatune train``'s options set (``--r``, ``--alpha``, ``--dropout`` as rank dropout)."""
    return {"r": options["r"], "alpha": options["alpha"], "rank_dropout": options.get("dropout") or 0.0, **common}
