r"""LoKr (Edalati et al. 2022, KronA; LyCORIS): config, layer and injection rule.

LoKr's update is a Kronecker product of a small left factor and a larger right one:

.. math::  \Delta W = s \, (W_1 \otimes W_2), \qquad W_1 \in \mathbb{R}^{u_1 \times v_1},\;
           W_2 \in \mathbb{R}^{u_2 \times v_2},\; u_1 u_2 = d_{out},\; v_1 v_2 = d_{in},
           \qquad s = \alpha / r

so :math:`\Delta W[i u_2 + j,\, a v_2 + b] = s\, W_1[i, a]\, W_2[j, b]` and
:math:`\mathrm{rank}(\Delta W) = \mathrm{rank}(W_1)\,\mathrm{rank}(W_2)`: a full-rank update from
:math:`u_1 v_1 + u_2 v_2` parameters. Each dimension is split by :func:`factorization` (the
divisor pair closest to its square root, or ``decompose_factor`` when it divides it). A factor
whose larger side exceeds ``2 r`` is itself low-rank, :math:`W_2 = W_{2a} W_{2b}` (and
:math:`W_1` too with ``decompose_both``). One factor starts at zero, so training starts from the
base model exactly (:math:`W_1 = 0` by default; ``init_weights="lycoris"``: :math:`W_2 = 0`).

Tensor names (``lokr_w1``, ``lokr_w2_a`` ...), shapes, config fields and checkpoint keys are HF
PEFT's, so adapters cross both ways. Past PEFT: GPT-2's ``Conv1D`` layers (PEFT 0.21 refuses them),
4-bit and 8-bit bases, and mixed-adapter batches (:class:`~deltatune.delta_layer.DeltaLayer`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from deltatune import engine
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.methods import lora
from deltatune.methods.lycoris import LycorisConfig, LycorisLayer, config_options
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    """LoKr. HF PEFT's fields and defaults; the shared ones are :class:`~deltatune.methods.lycoris.LycorisConfig`'s.

    Args:
        decompose_both: make the left factor low-rank too (when its larger side exceeds ``2 r``).
        decompose_factor: split each dimension as ``(decompose_factor, dim / decompose_factor)`` when
            it divides it; -1: the divisor pair closest to the square root.
        rank_dropout_scale: divide the rows rank dropout keeps by the share kept.
        init_weights: True (left factor zero), ``"lycoris"`` (right factor zero), False (both random).
    """

    described: ClassVar[tuple[str, ...]] = ("r", "alpha", "decompose_both", "decompose_factor", "target_modules")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    always_written: ClassVar[tuple[str, ...]] = LycorisConfig.always_written + (
        "decompose_both",
        "decompose_factor",
        "rank_dropout_scale",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.LOKR
        super().__post_init__()
        if self.peft_type != PeftType.LOKR:
            raise ConfigError(f"LoKrConfig has peft_type {self.peft_type!r}; it must be 'LOKR'")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(f"LoKrConfig.init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or not (factor == -1 or factor > 0):
            raise ConfigError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, got {factor!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``: ``(factor, dimension // factor)`` when ``factor`` divides
    it (in that order, as PEFT and LyCORIS), else the divisor pair closest to the square root with
    ``m <= n`` and ``m`` at most ``factor``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for candidate in range(2, dimension + 1):
        if candidate > limit or candidate > dimension // candidate:
            break
        if dimension % candidate == 0:
            m, n = candidate, dimension // candidate
    return (n, m) if m > n else (m, n)


class LoKrLinear(LycorisLayer):
    """LoKr around a linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit/8-bit)."""

    containers = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    per_adapter = LycorisLayer.per_adapter + ("scales_rank_dropout",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.containers:
            setattr(self, container, nn.ParameterDict())
        self.scales_rank_dropout: dict[str, bool] = {}

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, LoKrConfig)
        r, alpha = config.rank_and_alpha(module_path)
        out_left, out_right = factorization(self.out_features, config.decompose_factor)
        in_left, in_right = factorization(self.in_features, config.decompose_factor)
        # A factor is low-rank only where r is well below its size (LyCORIS's rule, PEFT's shapes).
        left_full = not (config.decompose_both and r < max(out_left, in_left) / 2)
        right_full = not (r < max(out_right, in_right) / 2)
        zero_left = config.init_weights is True  # "lycoris" zeroes the right factor, False neither
        zero_right = config.init_weights == "lycoris"
        if left_full:
            self._new(name, "lokr_w1", (out_left, in_left), zero_left)
        else:
            self._new(name, "lokr_w1_a", (out_left, r), zero_left)
            self._new(name, "lokr_w1_b", (r, in_left), False)
        if right_full:
            self._new(name, "lokr_w2", (out_right, in_right), zero_right)
        else:
            self._new(name, "lokr_w2_a", (out_right, r), False)
            self._new(name, "lokr_w2_b", (r, in_right), zero_right)
        self.add_dropouts(name, config, alpha / r)
        self.scales_rank_dropout[name] = bool(config.rank_dropout_scale)

    def _new(self, name: str, container: str, shape: tuple[int, int], zero: bool) -> None:
        tensor = torch.empty(shape, **self.factory())
        if zero:
            nn.init.zeros_(tensor)
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        getattr(self, container)[name] = nn.Parameter(tensor)

    def _factor(self, name: str, side: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{side}")
        if name in full:
            return full[name]
        return getattr(self, f"lokr_{side}_a")[name] @ getattr(self, f"lokr_{side}_b")[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        return torch.kron(self._factor(name, "w1"), self._factor(name, "w2")) * self.scaling[name]

    def rescale_rows(self, name: str) -> bool:
        return self.scales_rank_dropout[name]


def attach_lokr(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with LoKr adapter ``adapter_name``; return their paths."""
    assert isinstance(config, LoKrConfig)
    return engine.attach_to_linear_layers(model, adapter_name, config, LoKrLinear, "LoKr", lora.default_targets)


LOKR = register_method(Method(peft_type=PeftType.LOKR, config_class=LoKrConfig, attach=attach_lokr))

register_training_defaults(
    "lokr",
    TrainingDefaults(
        uses=("r", "alpha", "dropout", *MODULE_OPTIONS),
        lr=2e-3,
        options={"targets": "all-linear", "r": 8, "alpha": 8},
        source="all-linear, PEFT's r=8, alpha=8; lr measured: Rotten Tomatoes validation 0.855 at 2e-3 "
        "(0.16 % of the weights), 0.836 at 1e-2",
        config=lambda options, common: LoKrConfig(**config_options(options, common)),
    ),
)
