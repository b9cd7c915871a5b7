r"""OFT (Qiu et al. 2023; HF PEFT's v2 layout): config, layer and injection rule.

OFT rotates each adapted layer's input by a block-diagonal orthogonal matrix,
:math:`y = (x R) W^\top + b` with :math:`R = \mathrm{blockdiag}(R_1, \dots, R_r)` of ``r`` blocks
of size ``b = in / r`` (:mod:`~deltatune.methods.orthogonal`). Each block is the Cayley
transform of a skew-symmetric :math:`Q` whose strict upper triangle, row by row, is the trained
vector (:math:`b (b - 1) / 2` numbers per block):

* exact (``use_cayley_neumann=False``): :math:`R = (I - Q)(I + Q)^{-1}`;
* the Cayley-Neumann series (the default, cheaper): with :math:`t` terms and
  :math:`m = \max(3, t - 1)`, :math:`R = I + 2Q + 2Q^2 + \dots + 2Q^{m-1} + Q^m`
  (:math:`I` for :math:`t \le 1`, :math:`I + 2Q` for :math:`t = 2`), which approximates
  :math:`(I + Q)(I - Q)^{-1}`: the exact branch's transpose, as in HF PEFT.

``coft`` (constrained OFT) keeps each block within a Frobenius radius
:math:`\epsilon / \sqrt{r}` of the identity by clipping :math:`Q`'s norm, written back to the
parameter before every forward. ``block_share`` trains one block for all. A block size (or ``r``)
that does not divide a layer's input is moved to the nearest divisor for that layer, with a
warning (PEFT's rule). ``module_dropout`` (multiplicative dropout, Qiu et al.) replaces
``int(p r)`` random blocks by the identity in each training forward; PEFT 0.21 creates the layer
but never calls it. :math:`Q = 0` at the start: the base model exactly.

Tensor names (``oft_R.weight``), config fields and keys are HF PEFT's (0.14+ format), so adapters
cross both ways. Past PEFT: GPT-2's ``Conv1D``, 4-bit/8-bit bases, mixed-adapter batches, and
several merged adapters equal to the same adapters unmerged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune import engine
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.methods import lora
from deltatune.methods.orthogonal import RotationLayer, block_rotate
from deltatune.modules_to_save import trained_biases
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)

logger = logging.getLogger("deltatune")


@dataclasses.dataclass
class OFTConfig(PeftConfig):
    """OFT. Field names and defaults are HF PEFT's.

    Args:
        r: number of blocks per layer (0: derived from ``oft_block_size``). Give one of the two.
        oft_block_size: size of each block (0: derived from ``r``).
        module_dropout: probability of replacing each block by the identity in a training forward.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            which modules, as for LoRA (None: the attention query/value projections).
        fan_in_fan_out: read from the module type (the rotation acts on the input either way).
        bias: ``"none"``, ``"all"`` or ``"oft_only"``: also train biases (saved with the adapter).
        init_weights: True: every rotation starts at the identity; False: ``Q`` drawn from N(0, 0.1²).
        coft: constrained OFT; ``eps`` its radius.
        block_share: one block shared by all of a layer's blocks.
        use_cayley_neumann, num_cayley_neumann_terms: the series in place of the exact inverse.
    """

    described: ClassVar[tuple[str, ...]] = ("r", "oft_block_size", "coft", "block_share", "target_modules")

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + tuple(
        ["r", "oft_block_size", "module_dropout", "target_modules", "bias", "init_weights", "coft", "eps"]
        + ["block_share", "use_cayley_neumann", "num_cayley_neumann_terms", "modules_to_save", "fan_in_fan_out"]
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.OFT
        super().__post_init__()
        if self.peft_type != PeftType.OFT:
            raise ConfigError(f"OFTConfig has peft_type {self.peft_type!r}; it must be 'OFT'")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"OFTConfig.{name} must be a non-negative integer, got {value!r}")
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError("OFTConfig: give r (blocks per layer) or oft_block_size; both are 0")
        if self.r and self.oft_block_size:
            raise ConfigError(
                f"OFTConfig: give r ({self.r}) or oft_block_size ({self.oft_block_size}), not both (r x block size is "
                "the layer's input size); to set r, pass oft_block_size=0"
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise ConfigError(f"OFTConfig.module_dropout must be a probability in [0, 1), got {self.module_dropout!r}")
        if self.bias not in ("none", "all", "oft_only"):
            raise ConfigError(f"OFTConfig.bias must be 'none', 'all' or 'oft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"OFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("OFTConfig: layers_pattern needs layers_to_transform (the layer indices to adapt)")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        if "oft_block_size" not in data:
            raise ConfigError(
                f"{source}: an OFT adapter from HF PEFT before 0.14 (no oft_block_size), whose weights mean something "
                "else; retrain it with a current release"
            )
        return super().from_dict(data, source=source)

    def trained_base_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        return trained_biases(model, adapter_name, self.bias, "oft_only")


def nearest_divisor(size: int, wanted: int) -> int:
    """The divisor of ``size`` nearest ``wanted`` (the lower on a tie); ``size`` when ``wanted >= size``."""
    if wanted >= size:
        return size
    higher = next(d for d in range(wanted, size + 1) if size % d == 0)
    lower = next(d for d in range(wanted, 0, -1) if size % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


def blocks_for(in_features: int, config: OFTConfig) -> tuple[int, int]:
    """``(blocks, block size)`` of one layer, moved to a divisor of ``in_features`` if need be."""
    if config.r == 0:
        size = config.oft_block_size
        if in_features % size or size > in_features:
            size = nearest_divisor(in_features, size)
        return in_features // size, size
    count = config.r
    if in_features % count or count > in_features:
        count = nearest_divisor(in_features, count)
    return count, in_features // count


class OFTRotation(nn.Module):
    """One adapter's rotation: ``weight`` holds each block's strict upper triangle, row by row."""

    def __init__(self, blocks: int, size: int, config: OFTConfig, factory: dict[str, Any]) -> None:
        super().__init__()
        self.blocks, self.size = blocks, size
        self.coft, self.eps, self.block_share = config.coft, config.eps, config.block_share
        self.exact = not config.use_cayley_neumann
        self.terms = config.num_cayley_neumann_terms
        self.dropout = config.module_dropout
        stored = 1 if config.block_share else blocks
        weight = torch.zeros(stored, size * (size - 1) // 2, **factory)
        if not config.init_weights:
            nn.init.normal_(weight, mean=0.0, std=0.1)
        self.weight = nn.Parameter(weight)

    def _skew(self, vectors: torch.Tensor) -> torch.Tensor:
        rows, cols = torch.triu_indices(self.size, self.size, offset=1, device=vectors.device)
        upper = vectors.new_zeros(vectors.shape[0], self.size, self.size)
        upper[:, rows, cols] = vectors
        return upper - upper.transpose(1, 2)

    def _project(self) -> None:
        """COFT: each block's skew matrix clipped to Frobenius norm ``eps / sqrt(stored blocks)``, in place."""
        with torch.no_grad():
            radius = self.eps / math.sqrt(self.weight.shape[0])
            norms = math.sqrt(2.0) * torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)  # ||Q||_F
            self.weight.mul_(torch.where(norms > radius, radius / norms.clamp_min(1e-30), torch.ones_like(norms)))

    def blocks_matrices(self) -> torch.Tensor:
        """Every block's rotation, ``(blocks, size, size)`` (shared blocks repeated)."""
        if self.coft:
            self._project()
        Q = self._skew(self.weight)
        if self.exact:
            eye = torch.eye(self.size, dtype=torch.float32, device=Q.device)
            R = torch.linalg.solve(eye + Q.float(), eye - Q.float(), left=False).to(Q.dtype)
        else:
            R = _neumann(Q, self.terms)
        return R.expand(self.blocks, -1, -1) if self.block_share else R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R = self.blocks_matrices()
        if self.training and self.dropout > 0:
            keep = torch.ones(self.blocks, device=R.device, dtype=R.dtype)
            keep[torch.randperm(self.blocks, device=R.device)[: int(self.dropout * self.blocks)]] = 0
            eye = torch.eye(self.size, device=R.device, dtype=R.dtype)
            R = keep[:, None, None] * R + (1 - keep[:, None, None]) * eye
        return block_rotate(x.to(R.dtype), R).to(x.dtype)


def _neumann(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """HF PEFT's truncated Cayley-Neumann series ``I + 2Q + ... + 2Q^(m-1) + Q^m``, ``m = max(3, terms - 1)``."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device).expand_as(Q)
    if terms <= 1:
        return eye.clone()
    if terms == 2:
        return eye + 2 * Q
    last = max(3, terms - 1)
    total, power = eye + 2 * Q, Q
    for _ in range(2, last):
        power = power @ Q
        total = total + 2 * power
    return total + power @ Q


class OFTLinear(RotationLayer):
    """OFT around a linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit/8-bit)."""

    containers = ("oft_R",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, OFTConfig)
        blocks, size = blocks_for(self.in_features, config)
        view = self.base
        self.oft_R[name] = OFTRotation(blocks, size, config, {"device": view.device, "dtype": view.adapter_dtype})

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.oft_R[name](x)

    def rotation_matrix(self, name: str) -> torch.Tensor:
        return torch.block_diag(*self.oft_R[name].blocks_matrices())


def attach_oft(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with OFT adapter ``adapter_name``; return their paths."""
    assert isinstance(config, OFTConfig)
    config.fan_in_fan_out = False  # the rotation is on the input whatever the storage; PEFT records False
    paths = engine.attach_to_linear_layers(model, adapter_name, config, OFTLinear, "OFT", lora.default_targets)
    wanted = ("oft_block_size", config.oft_block_size) if config.r == 0 else ("r", config.r)
    moved = {}
    for path in paths:
        rotation = engine.innermost_of(model.get_submodule(path), OFTLinear).oft_R[adapter_name]
        used = rotation.size if config.r == 0 else rotation.blocks
        if used != wanted[1]:
            moved[rotation.size * rotation.blocks] = used
    if moved:
        logger.warning(
            "%s %d does not divide every adapted layer's input; used the nearest divisor: %s",
            *wanted,
            ", ".join(f"{used} for inputs of {size}" for size, used in sorted(moved.items())),
        )
    return paths


OFT = register_method(Method(peft_type=PeftType.OFT, config_class=OFTConfig, attach=attach_oft))

register_training_defaults(
    "oft",
    TrainingDefaults(
        uses=("dropout", *MODULE_OPTIONS),
        lr=2e-4,
        options={"targets": "all-linear"},
        source="PEFT's block size 32 and Cayley-Neumann series, all-linear; lr measured: Rotten Tomatoes "
        "validation 0.844 at 2e-4, 0.801 at 5e-4, 0.820 at 1e-3, diverged at 2e-3",
        config=lambda options, common: OFTConfig(module_dropout=options.get("dropout") or 0.0, **common),
    ),
)
