r"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization").

BOFT builds a dense orthogonal rotation of a layer's input from a product of sparse ones, as the
butterfly structure of the fast Fourier transform does, and scales each output:

.. math::  y = \big((x M) W^\top\big) \odot s + b, \qquad
           M = B_{m-1} \cdots B_1 B_0, \qquad B_i = P_i\, \mathrm{blockdiag}(Q_{i,1}, \dots, Q_{i,n})\, P_i^\top

with ``n`` blocks of size ``b`` (``n b = in``), :math:`m` = ``boft_n_butterfly_factor``, each
:math:`Q_{i,j} = (I - S)(I + S)^{-1}` for :math:`S = (R_{i,j} - R_{i,j}^\top) / 2` (the exact
Cayley transform of the trained square :math:`R`), and :math:`P_i` the butterfly permutation that
interleaves groups of ``b / 2`` indices within chunks of ``in n / 2^i``, so that after
:math:`m` factors every input reaches every output. :math:`P_0 = I`: with one factor BOFT is
block-diagonal OFT plus the scale. ``boft_dropout`` (multiplicative dropout) replaces
``int(p n)`` random blocks of one random factor by the identity in each training forward.
:math:`R = 0`, :math:`s = 1` at the start: the base model exactly.

Tensor names (``boft_R``, ``boft_s``), shapes, fields and keys are HF PEFT's. HF PEFT 0.21 computes
several butterfly factors only with its CUDA extension and silently uses one factor without it
(always on a CPU); here every factor count works on every device, and a checkpoint made with one
factor says so by its shape. Past PEFT: GPT-2's ``Conv1D``, 4-bit/8-bit bases, mixed batches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune import engine
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.methods import lora
from deltatune.methods.orthogonal import RotationLayer, block_rotate, cayley
from deltatune.modules_to_save import trained_biases
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)


@dataclasses.dataclass
class BOFTConfig(PeftConfig):
    """BOFT. Field names and defaults are HF PEFT's.

    Args:
        boft_block_size: size of each block (0: derived from ``boft_block_num``). Give one of the two.
        boft_block_num: blocks per factor (0: derived from ``boft_block_size``).
        boft_n_butterfly_factor: butterfly factors :math:`m` (1: block-diagonal).
        boft_dropout: probability of replacing each block of one random factor by the identity in training.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save:
            which modules, as for LoRA (None: the attention query/value projections).
        fan_in_fan_out: read from the module type (the rotation acts on the input either way).
        bias: ``"none"``, ``"all"`` or ``"boft_only"``: also train biases (saved with the adapter).
        init_weights: True: identity rotations and unit scales; False: ``R ~ N(0, 0.1²)``, ``s ~ N(1, 0.1²)``.
    """

    described: ClassVar[tuple[str, ...]] = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor")

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + tuple(
        ["boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules", "boft_dropout"]
        + ["bias", "init_weights", "modules_to_save", "fan_in_fan_out"]
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.BOFT
        super().__post_init__()
        if self.peft_type != PeftType.BOFT:
            raise ConfigError(f"BOFTConfig has peft_type {self.peft_type!r}; it must be 'BOFT'")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        for name in ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"BOFTConfig.{name} must be a non-negative integer, got {value!r}")
        if self.boft_n_butterfly_factor < 1:
            raise ConfigError("BOFTConfig.boft_n_butterfly_factor must be at least 1 (1: block-diagonal)")
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ConfigError("BOFTConfig: give boft_block_size or boft_block_num; both are 0")
        if self.boft_block_size and self.boft_block_num:
            raise ConfigError(
                f"BOFTConfig: give boft_block_size ({self.boft_block_size}) or boft_block_num ({self.boft_block_num}), "
                "not both (their product is the layer's input size); to set the number, pass boft_block_size=0"
            )
        if not 0.0 <= self.boft_dropout < 1.0:
            raise ConfigError(f"BOFTConfig.boft_dropout must be a probability in [0, 1), got {self.boft_dropout!r}")
        if self.bias not in ("none", "all", "boft_only"):
            raise ConfigError(f"BOFTConfig.bias must be 'none', 'all' or 'boft_only', got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("BOFTConfig: layers_pattern needs layers_to_transform (the layer indices to adapt)")

    def trained_base_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        return trained_biases(model, adapter_name, self.bias, "boft_only")


def butterfly_blocks(in_features: int, config: BOFTConfig, where: str) -> tuple[int, int]:
    """``(blocks, block size)`` for a layer, checked against the butterfly's divisibility rules."""
    extra = config.boft_n_butterfly_factor - 1
    if config.boft_block_size == 0:
        count = config.boft_block_num
        if in_features % count:
            raise ConfigError(f"{where}: its {in_features} inputs are not divisible by boft_block_num {count}")
        if extra and (extra > int(math.log2(count)) or count % 2**extra):
            raise ConfigError(
                f"{where}: boft_block_num {count} must be a multiple of 2^(boft_n_butterfly_factor - 1) = {2**extra}"
            )
        size = in_features // count
    else:
        size = config.boft_block_size
        if in_features % size:
            raise ConfigError(f"{where}: its {in_features} inputs are not divisible by boft_block_size {size}")
        if extra and in_features % (size * 2**extra):
            raise ConfigError(
                f"{where}: {in_features} inputs do not fit boft_n_butterfly_factor {extra + 1} with blocks of {size} "
                f"(the input size must be a multiple of block size x 2^(factor - 1) = {size * 2**extra})"
            )
        count = in_features // size
    if extra and (count % 2 or size % 2):
        raise ConfigError(f"{where}: butterfly factors need an even block size and count, got {size} x {count}")
    return count, size


def butterfly_permutation(size: int, chunks: int, group: int) -> torch.Tensor:
    """Within each of ``chunks`` equal chunks of ``range(size)``, groups of ``group`` indices reordered
    evens first, then odds (the identity for two groups per chunk)."""
    length = size // chunks
    order = []
    for chunk in range(chunks):
        start = chunk * length
        groups = [list(range(start + g * group, start + (g + 1) * group)) for g in range(length // group)]
        order += [i for g in groups[0::2] + groups[1::2] for i in g]
    return torch.tensor(order)


class BOFTLinear(RotationLayer):
    """BOFT around a linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit/8-bit)."""

    containers = ("boft_R", "boft_s")
    per_adapter = ("boft_dropout", "boft_P")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_dropout: dict[str, float] = {}
        # Per adapter, each butterfly factor's permutation of the input indices, as buffers (they follow
        # .to()) that no checkpoint holds: they follow from the sizes.
        self.boft_P = nn.ModuleDict()

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, BOFTConfig)
        count, size = butterfly_blocks(self.in_features, config, module_path)
        factors = config.boft_n_butterfly_factor
        view = self.base
        factory = {"device": view.device, "dtype": view.adapter_dtype}
        R = torch.zeros(factors, count, size, size, **factory)
        s = torch.ones(self.out_features, 1, **factory)
        if not config.init_weights:
            nn.init.normal_(R, mean=0.0, std=0.1)
            nn.init.normal_(s, mean=1.0, std=0.1)
        self.boft_R[name], self.boft_s[name] = nn.Parameter(R), nn.Parameter(s)
        self.boft_dropout[name] = float(config.boft_dropout)
        permutations = nn.Module()
        for i in range(1, factors):  # factor 0's is the identity
            order = butterfly_permutation(self.in_features, count // 2**i, size // 2).to(view.device)
            permutations.register_buffer(f"factor{i}", order, persistent=False)
            permutations.register_buffer(f"inverse{i}", torch.argsort(order), persistent=False)
        self.boft_P[name] = permutations

    def _blocks(self, name: str, dropout: bool) -> torch.Tensor:
        """Every factor's orthogonal blocks, ``(factors, blocks, size, size)``."""
        R = self.boft_R[name]
        Q = cayley(0.5 * (R - R.transpose(-1, -2)))
        p = self.boft_dropout[name]
        if dropout and p > 0:
            factors, count, size = Q.shape[0], Q.shape[1], Q.shape[-1]
            chosen = int(torch.randint(0, factors, (1,)))
            hit = int(p * count)
            mask = torch.cat([torch.ones(hit), torch.zeros(count - hit)])[torch.randperm(count)].to(Q)
            eye = torch.eye(size, dtype=Q.dtype, device=Q.device)
            blend = (1 - mask)[:, None, None] * Q[chosen] + mask[:, None, None] * eye
            Q = torch.cat([Q[:chosen], blend[None], Q[chosen + 1 :]])
        return Q

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._butterfly(name, x, dropout=self.training)

    def _butterfly(self, name: str, x: torch.Tensor, dropout: bool) -> torch.Tensor:
        Q = self._blocks(name, dropout)
        h = x.to(Q.dtype)
        permutations = self.boft_P[name]
        # x M = x B_{m-1} ... B_0, and x B_i = ((x P_i) blockdiag) P_i^T: a gather, the blocks, a gather back.
        for i in reversed(range(Q.shape[0])):
            if i == 0:
                h = block_rotate(h, Q[i])
            else:
                order, inverse = getattr(permutations, f"factor{i}"), getattr(permutations, f"inverse{i}")
                h = block_rotate(h[..., inverse], Q[i])[..., order]
        return h.to(x.dtype)

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        saved, own = state.get("boft_R"), self.boft_R.get(name)
        if saved is not None and own is not None and saved.shape[0] == 1 and own.shape[0] > 1:
            raise ValueError(
                f"{where}.boft_R holds one butterfly factor, and the config asks for {own.shape[0]}: HF PEFT without "
                "its CUDA extension (on a CPU) trains one factor whatever boft_n_butterfly_factor says; load it "
                "with a config whose boft_n_butterfly_factor is 1"
            )
        super().load_adapter_state_dict(name, state, where)

    def rotation_matrix(self, name: str) -> torch.Tensor:
        R = self.boft_R[name]
        return self._butterfly(name, torch.eye(self.in_features, dtype=R.dtype, device=R.device), dropout=False)

    def output_scale(self, name: str) -> torch.Tensor | None:
        return self.boft_s[name].flatten()


def attach_boft(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with BOFT adapter ``adapter_name``; return their paths."""
    assert isinstance(config, BOFTConfig)
    config.fan_in_fan_out = False  # the rotation is on the input whatever the storage; PEFT records False
    return engine.attach_to_linear_layers(model, adapter_name, config, BOFTLinear, "BOFT", lora.default_targets)


BOFT = register_method(Method(peft_type=PeftType.BOFT, config_class=BOFTConfig, attach=attach_boft))


def _config(options: dict[str, Any], common: dict[str, Any]) -> BOFTConfig:
    dropout = options.get("dropout") or 0.0
    return BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=dropout, **common)


register_training_defaults(
    "boft",
    TrainingDefaults(
        uses=("dropout", *MODULE_OPTIONS),
        lr=2e-3,
        options={"targets": "all-linear"},
        source="blocks of 4, two butterfly factors, all-linear; lr measured: Rotten Tomatoes validation 0.863 at 2e-3",
        config=_config,
    ),
)
