r"""LoRA (Hu et al. 2021) with rsLoRA, DoRA and PiSSA: config, layers and injection rule.

A frozen weight :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}` gets a trained low-rank update

.. math::  h = W x + s \, B A x, \qquad A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r}

with :math:`s = \alpha / r`, or :math:`s = \alpha / \sqrt{r}` for rsLoRA (Kalajdzievski 2023), which
keeps the update's scale stable as the rank grows. ``B = 0`` at initialisation, so training starts
from the base model exactly.

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a trained magnitude
:math:`m \in \mathbb{R}^{d_{out}}` (initialised to the row norms of :math:`W`):

.. math::  W' = m \odot \frac{W + s B A}{\lVert W + s B A \rVert_{row}}

The norm is treated as a constant in the backward pass (the paper's section 4.3), which saves the
memory of differentiating through it. In the forward pass, with ``k = m / ||W + sBA||``,
:math:`W' x = W x + (k - 1) \odot W x + k \odot s B A x`, so the base layer's output is reused.

PiSSA (Meng et al. 2024) initialises ``A`` and ``B`` from the top-r singular triplets of ``W``
(:math:`s B A = U_r S_r V_r^\top`) and leaves the residual :math:`W - s B A` in the base layer, so the
adapter trains the principal directions. ``"pissa_niter_K"`` uses a K-iteration randomised SVD.

Merging folds :math:`s B A` (or DoRA's :math:`W'`) into the base weight, so inference costs nothing
extra; unmerging subtracts it again.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import base_layers, engine
from deltatune.adapter_layer import AdapterLayer, RowRouting
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.methods.lora_combine import add_weighted_adapter
from deltatune.methods.lora_kernel import FusedLoraLinear
from deltatune.modules_to_save import trained_biases
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    """LoRA and its variants. Field names and defaults are HF PEFT's.

    Args:
        r: rank of the update.
        lora_alpha: numerator of the scale ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the adapter's input; 0 skips the dropout entirely.
        target_modules: module names (list: exact path or path suffix), a regex on the full path
            (string), or ``"all-linear"``. None picks the attention query/value projections.
        exclude_modules: modules to leave alone, same matching rule.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's ``Conv1D`` does.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"`` (biases of
            adapted layers). Trained biases are saved with the adapter.
        use_rslora: scale by ``lora_alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
        init_lora_weights: True (A Kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r)),
            False (both random: the adapter changes outputs from the start; for tests),
            ``"pissa"`` or ``"pissa_niter_K"``, or ``"loftq"`` (with ``loftq_config``).
        loftq_config: LoftQ's settings, HF PEFT's keys: ``loftq_bits`` (4: nf4, or 8) and
            ``loftq_iter`` (alternations, default 1). LoftQ (Li et al. 2023) starts from the float
            weight :math:`W` and alternates :math:`Q_t = q(W - s B_{t-1} A_{t-1})` and
            :math:`s B_t A_t = \\mathrm{SVD}_r(W - Q_t)`; the base weight becomes the dequantized
            :math:`Q_T` (quantizing it again in that format gives :math:`Q_T` back), so that the
            quantized base plus the initial adapter approximates :math:`W`. Run it on the float model.
            A layer that a quantized load keeps in float (the output embeddings and tied weights, a
            model's ``_keep_in_fp32_modules``) is never quantized: it keeps :math:`W` and the plain start.
        layers_to_transform, layers_pattern: restrict to these layer indices.
        rank_pattern, alpha_pattern: per-module overrides of ``r`` / ``lora_alpha``; keys are regexes
            matched against the end of the module path.
        use_dora: weight-decomposed LoRA.
        lora_bias: give ``B`` a trained bias.
    """

    described: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "use_dora", "use_rslora", "target_modules")

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    loftq_config: dict[str, int] = dataclasses.field(default_factory=dict)

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "fan_in_fan_out",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.LORA
        super().__post_init__()
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if any(not isinstance(v, int) or v <= 0 for v in self.rank_pattern.values()):
            raise ConfigError(f"rank_pattern values must be positive integers, got {self.rank_pattern}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if not (
            isinstance(init, bool)
            or init in ("gaussian", "pissa", "loftq")
            or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))
        ):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; use True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<K>' or 'loftq'"
            )
        if init == "loftq":
            bits, iters = self.loftq_config.get("loftq_bits", 4), self.loftq_config.get("loftq_iter", 1)
            if bits not in (4, 8) or not isinstance(iters, int) or iters < 1:
                raise ConfigError(
                    f"loftq_config={self.loftq_config!r}: loftq_bits must be 4 (nf4) or 8 and loftq_iter at least 1"
                )
            if self.use_dora:
                raise ConfigError("LoftQ initialisation with DoRA is not defined; choose one of them")
        if self.use_dora and self.lora_bias:
            raise ConfigError("lora_bias=True cannot be combined with DoRA (its magnitude would rescale the bias)")
        if self.use_dora and str(init).startswith("pissa"):
            raise ConfigError("PiSSA initialisation with DoRA is not defined; choose one of them")

    def for_loading(self) -> PeftConfig:
        # The base a LoftQ adapter is loaded onto already holds the quantized weights (float or 4-bit).
        if self.init_lora_weights == "loftq":
            return dataclasses.replace(self, init_lora_weights=True)
        return self

    def trained_base_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        """The base biases ``bias`` trains, by parameter path: ``"all"`` every bias of the model,
        ``"lora_only"`` those of the layers this adapter wraps, ``"none"`` none (PEFT's meaning)."""
        return trained_biases(model, adapter_name, self.bias, "lora_only")

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """``r`` and ``lora_alpha`` for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        return (
            engine.pattern_value(self.rank_pattern, module_path, self.r),
            engine.pattern_value(self.alpha_pattern, module_path, self.lora_alpha),
        )


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraLinear(AdapterLayer):
    """LoRA around an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored transposed)."""

    containers = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_dropout")
    per_adapter = ("scaling", "_merged_dora_norms")

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s (A, B) as (r, in) and (out, r) tensors."""
        return self.lora_A[name].weight, self.lora_B[name].weight

    # Use the fused autograd function where it applies; set False to run the plain graph.
    fused = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        view = base_layers.linear_base(base_layer)
        self.fan_in_fan_out = view.transposed  # Conv1D stores (in, out)
        self.in_features, self.out_features = view.in_features, view.out_features
        # DoRA's row norms at merge time, needed to unmerge exactly.
        self._merged_dora_norms: dict[str, torch.Tensor] = {}

    # -- construction ---------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PeftConfig, module_path: str, plain_start: bool = False) -> None:
        """``plain_start``: the default start (B = 0) whatever ``init_lora_weights`` says."""
        assert isinstance(config, LoraConfig)
        r, alpha = config.rank_and_alpha(module_path)
        view = self.base
        factory = {"device": view.device, "dtype": view.adapter_dtype}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=config.lora_bias, **factory)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[name] = lora_scale(alpha, r, config.use_rslora)
        self._init_weights(name, True if plain_start else config.init_lora_weights, config.loftq_config)
        if config.use_dora:
            with torch.no_grad():
                norm = self._row_norm(self._weight(), self._delta(name))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(factory["dtype"]))

    def _init_weights(self, name: str, init: bool | str, loftq_config: dict[str, int] | None = None) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        with torch.no_grad():
            if B.bias is not None:
                B.bias.zero_()
            if init is False:
                return  # nn.Linear's own random init for both: a non-zero update (useful in tests)
            if init == "gaussian":
                nn.init.normal_(A.weight, std=1.0 / A.out_features)
            elif isinstance(init, str) and init.startswith("pissa"):
                self._pissa_init(name, init)
                return
            elif init == "loftq":
                self._loftq_init(name, {"loftq_bits": 4, "loftq_iter": 1, **(loftq_config or {})})
                return
            else:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)

    def _pissa_init(self, name: str, init: str) -> None:
        A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        r = A.out_features
        weight = self._weight().float()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            niter = int(init.rsplit("_", 1)[-1])
            U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S / scale)
        A.weight.copy_((root[:, None] * Vh).to(A.weight.dtype))
        B.weight.copy_((U * root[None, :]).to(B.weight.dtype))
        residual = weight - scale * (B.weight.float() @ A.weight.float())
        self._set_weight(residual)

    def _loftq_init(self, name: str, config: dict[str, int]) -> None:
        from deltatune.quantization import quantize_round_trip

        if self.base.quantized:
            raise ConfigError(
                f"init_lora_weights='loftq' starts from the float weights, but this layer is {self.base.describe()}: "
                "call get_peft_model on the model loaded without quantization_config, save it, and load that in "
                "4 bits to train"
            )
        A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        r = A.out_features
        weight = self._weight().float()
        if r > min(weight.shape):
            raise ConfigError(f"LoftQ rank r={r} exceeds this layer's smaller side ({min(weight.shape)}); lower r")
        residual = weight
        for step in range(config["loftq_iter"]):
            quantized = quantize_round_trip(residual, config["loftq_bits"])
            U, S, Vh = torch.linalg.svd(weight - quantized, full_matrices=False)
            root = torch.sqrt(S[:r] / scale)  # s * B @ A = U_r S_r Vh_r
            low_B, low_A = U[:, :r] * root[None, :], root[:, None] * Vh[:r]
            if step + 1 < config["loftq_iter"]:
                residual = weight - scale * (low_B @ low_A)
        A.weight.copy_(low_A.to(A.weight.dtype))
        B.weight.copy_(low_B.to(B.weight.dtype))
        self._set_weight(quantized)

    # -- weights in (out, in) orientation -------------------------------------------------------
    @property
    def base(self) -> base_layers.LinearBase:
        """The frozen layer through :mod:`deltatune.base_layers` (dense, Conv1D, 4-bit or 8-bit)."""
        return base_layers.linear_base(self._modules["base_layer"])

    def _weight(self) -> torch.Tensor:
        return self.base.dense_weight()

    def _set_weight(self, weight: torch.Tensor) -> float:
        error = self.base.set_dense_weight(weight)
        self.rounding_error = max(self.rounding_error, error)
        return error

    def _delta(self, name: str) -> torch.Tensor:
        """``s * B @ A`` in (out, in) orientation."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    @staticmethod
    def _row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=1)

    def _full_delta(self, name: str) -> torch.Tensor:
        """What adapter ``name`` adds to the base weight, in (out, in) orientation (DoRA included)."""
        delta = self._delta(name)
        if name in self.lora_magnitude_vector:
            weight = self._weight().to(delta.dtype)
            k = self.lora_magnitude_vector[name] / self._row_norm(weight, delta)
            delta = k[:, None] * (weight + delta) - weight
        return delta

    def weight_delta(self, name: str) -> torch.Tensor | None:
        return None if self.lora_B[name].bias is not None else self._full_delta(name).detach()

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to the base weight, in the base weight's layout."""
        delta = self._full_delta(name)
        return delta.T if self.fan_in_fan_out else delta

    # -- forward --------------------------------------------------------------------------------
    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(names) == 1 and self.fused and not (args or kwargs or self.merged_adapters):
            fused = self._fused_forward(x, names[0])
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.weight.dtype))
            scale = self.scaling[name]
            if name in self.lora_magnitude_vector:
                result = result + self._dora_update(name, x, h, result).to(result.dtype)
            else:
                update = F.linear(A(h) * scale, B.weight)
                if B.bias is not None:
                    update = update + B.bias * scale
                result = result + update.to(result.dtype)
        return result

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """One adapter on a plain Linear/Conv1D: :class:`FusedLoraLinear` (None when it does not apply).

        This runs once per adapted layer per forward pass (hundreds of times per token when
        decoding), so it reads submodules from ``_modules`` rather than through ``nn.Module``'s
        attribute fallback, and without gradients it skips the autograd function.
        """
        modules = self._modules
        A_module = modules["lora_A"]._modules.get(name)
        base = modules["base_layer"]
        if (
            A_module is None
            or base._forward_hooks
            or base._forward_pre_hooks  # e.g. a parallel bottleneck adapter reading this layer's input
        ):
            return None
        B_module = modules["lora_B"]._modules[name]
        if B_module.bias is not None or name in modules["lora_magnitude_vector"]._parameters:
            return None
        if type(base) not in _FUSABLE:
            return self._fused_dequantizing(x, base, A_module.weight, B_module.weight, name)
        A, B, weight, bias = A_module.weight, B_module.weight, base.weight, base.bias
        if type(weight) not in _PLAIN_TENSORS:  # a quantized tensor subclass (torchao): the generic path
            return None
        device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type  # x.device costs a microsecond
        if torch.is_autocast_enabled(device_type):
            # Autocast does not reach into an autograd function's backward: cast here, as autocast
            # would for F.linear, and run the function with it off, every tensor in one dtype.
            if not (x.dtype in _AUTOCAST_INPUTS and weight.dtype in _AUTOCAST_INPUTS and A.dtype in _AUTOCAST_INPUTS):
                return None
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                cast_bias = None if bias is None else bias.to(dtype)
                return self._fused(x.to(dtype), weight.to(dtype), cast_bias, A.to(dtype), B.to(dtype), name)
        if x.dtype != weight.dtype or A.dtype != B.dtype or not (A.dtype == x.dtype or _half_base(x.dtype, A.dtype)):
            return None
        return self._fused(x, weight, bias, A, B, name)

    def _fused_dequantizing(
        self, x: torch.Tensor, base: nn.Module, A: torch.Tensor, B: torch.Tensor, name: str
    ) -> torch.Tensor | None:
        """Training on a base that dequantizes its weight to multiply (bitsandbytes 4-bit): the fused
        function, given the dequantization to run in forward and again in backward. Without gradients
        the layer's own forward runs (bitsandbytes' 4-bit inference kernels skip the dense weight),
        except under training dropout: a checkpointed block's first, gradient-free pass must draw the
        same mask as its recomputation, so both go through the function."""
        dropout = self._modules["lora_dropout"]._modules[name]
        drops = self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0
        if not drops and not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)):
            return None
        if self.fan_in_fan_out or not (x.dtype == A.dtype == B.dtype):
            return None
        if torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type):
            return None
        try:
            dequantize = base_layers.linear_base(base).dequantizer(x.dtype)
        except TypeError:  # not a linear layer deltatune reads (an embedding's LoRA has its own class)
            return None
        return None if dequantize is None else self._fused(x, dequantize, base.bias, A, B, name)

    def _fused(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | Callable[[], torch.Tensor],
        bias: torch.Tensor | None,
        A: torch.Tensor,
        B: torch.Tensor,
        name: str,
    ) -> torch.Tensor:
        """:class:`FusedLoraLinear` (or, when nothing needs a gradient, its products alone).

        ``x`` and ``weight`` share a dtype; ``A`` and ``B`` have it too, or float32 on a half base.
        ``weight`` is a function for a base that dequantizes (see :class:`FusedLoraLinear`).
        """
        dropout = self._modules["lora_dropout"]._modules[name]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        weight = weight.T if self.fan_in_fan_out else weight
        scale = self.scaling[name]
        if p == 0 and not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)):
            out, _ = FusedLoraLinear.products(x, weight, bias, A, B, scale)  # nothing to differentiate
            return out
        mask = torch.rand_like(x) >= p if p > 0 else None
        keep_scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        return FusedLoraLinear.apply(x, weight, bias, A, B, scale, mask, keep_scale)

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row gets its own adapter's update: stacked factors, gathered per row, two bmm calls.

        Entry 0 of every stack is zero (base rows); adapters of lower rank are zero-padded to the
        largest rank, which changes nothing in ``B A``.
        """
        result = self.base_layer(x, *args, **kwargs)
        present = [n for n in routing.names if n in self.lora_A]
        if not present:
            return result
        if self.training and any(not isinstance(self.lora_dropout[n], nn.Identity) for n in present):
            raise RuntimeError("mixed-adapter batches do not apply LoRA dropout; call eval() or use lora_dropout=0")
        ref = self.lora_A[present[0]].weight
        rank = max(self.lora_A[n].out_features for n in present)
        zero_A, zero_B, zero_bias = (
            ref.new_zeros(rank, self.in_features),
            ref.new_zeros(self.out_features, rank),
            ref.new_zeros(self.out_features),
        )
        A_rows, B_rows, bias_rows, k_rows = [zero_A], [zero_B], [zero_bias], [ref.new_ones(self.out_features)]
        for name in routing.names:
            if name not in self.lora_A:
                A_rows.append(zero_A), B_rows.append(zero_B), bias_rows.append(zero_bias)
                k_rows.append(k_rows[0])
                continue
            A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
            A_rows.append(_pad_rows(A.weight, rank))
            B_rows.append(_pad_cols(B.weight * scale, rank))
            bias_rows.append(B.bias * scale if B.bias is not None else zero_bias)
            if name in self.lora_magnitude_vector:
                weight = self._weight().to(ref.dtype)
                with torch.no_grad():
                    norm = self._row_norm(weight, self._delta(name))
                k_rows.append(self.lora_magnitude_vector[name] / norm)
            else:
                k_rows.append(k_rows[0])
        index = routing.for_batch(x.shape[0])
        h = x.to(ref.dtype)
        lead = h.shape[:-1]
        h = h.reshape(h.shape[0], -1, self.in_features)
        low = torch.bmm(h, torch.stack(A_rows)[index].transpose(1, 2))
        update = torch.bmm(low, torch.stack(B_rows)[index].transpose(1, 2)) + torch.stack(bias_rows)[index][:, None]
        if any(n in self.lora_magnitude_vector for n in present):
            k = torch.stack(k_rows)[index][:, None]
            base_out = result.to(ref.dtype).reshape(update.shape)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - bias.to(ref.dtype)
            update = (k - 1) * base_out + k * update
        return result + update.reshape(*lead, self.out_features).to(result.dtype)

    def _dora_update(self, name: str, x: torch.Tensor, h: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B, scale = self.lora_A[name], self.lora_B[name], self.scaling[name]
        weight = self._weight().to(A.weight.dtype)
        with torch.no_grad():  # the norm is a constant for the backward pass (DoRA, section 4.3)
            norm = self._row_norm(weight, self._delta(name))
        k = self.lora_magnitude_vector[name] / norm
        if h is x or isinstance(self.lora_dropout[name], nn.Identity):
            base_out = result.to(A.weight.dtype)
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - bias.to(base_out.dtype)
        else:
            base_out = F.linear(h, weight)
        return (k - 1) * base_out + k * B(A(h) * scale)

    # -- merging --------------------------------------------------------------------------------
    def merge_one(self, name: str, safe_merge: bool) -> float:
        weight = self._weight()
        if name in self.lora_magnitude_vector:
            self._merged_dora_norms[name] = self._row_norm(weight, self._delta(name)).detach()
        new_weight = weight + self._full_delta(name).to(weight.dtype)
        if safe_merge:
            self.check_finite(name, new_weight)
        error = self._set_weight(new_weight.detach())
        self._merge_bias(name, +1)
        return error

    def unmerge_one(self, name: str) -> float:
        weight = self._weight()
        delta = self._delta(name).to(weight.dtype)
        if name in self.lora_magnitude_vector:
            norm = self._merged_dora_norms.pop(name)
            k = (self.lora_magnitude_vector[name] / norm).to(weight.dtype)
            original = weight / k[:, None] - delta
        else:
            original = weight - delta
        error = self._set_weight(original.detach())
        self._merge_bias(name, -1)
        return error

    def _merge_bias(self, name: str, sign: int) -> None:
        lora_bias = self.lora_B[name].bias
        if lora_bias is None:
            return
        base = self.base_layer
        if base.bias is None:  # a bias-free layer gets one for the merge, and loses it on unmerge
            base.bias = self.base.new_bias()
            self._created_bias = True
        with torch.no_grad():
            base.bias.add_(sign * self.scaling[name] * lora_bias.to(base.bias.dtype))
        still_merged = any(self.lora_B[a].bias is not None for a in self.merged_adapters if a != name)
        if sign < 0 and getattr(self, "_created_bias", False) and not still_merged:
            base.register_parameter("bias", None)
            self._created_bias = False


class LoraEmbedding(AdapterLayer):
    r"""LoRA around an ``nn.Embedding``: :math:`E' = E + s (B A)^\top`, looked up row by row.

    ``lora_embedding_A`` is (r, vocab) and ``lora_embedding_B`` is (dim, r), as in HF PEFT; ``A``
    starts at zero (not ``B``), because the lookup reads ``A``'s columns.
    """

    containers = ("lora_embedding_A", "lora_embedding_B")
    per_adapter = ("scaling",)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s (A, B) as (r, in) and (out, r) tensors."""
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, LoraConfig)
        if config.use_dora:
            raise ConfigError(
                f"DoRA is implemented for linear layers; {module_path} is an embedding. "
                "Exclude it (exclude_modules) or train it with plain LoRA in a second adapter"
            )
        r, alpha = config.rank_and_alpha(module_path)
        weight = self.base_layer.weight
        vocab, dim = weight.shape
        factory = {"device": weight.device, "dtype": _adapter_dtype(weight.dtype)}
        A = torch.empty(r, vocab, **factory)
        B = torch.empty(dim, r, **factory)
        init = config.init_lora_weights
        if init is False:
            nn.init.normal_(A)
            nn.init.normal_(B)
        elif init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
            nn.init.zeros_(B)
        elif init is True:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            raise ConfigError(f"init_lora_weights={init!r} is not available for embedding layers ({module_path})")
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)
        self.scaling[name] = lora_scale(alpha, r, config.use_rslora)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def adapted_forward(self, names: list[str], ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(ids, *args, **kwargs)
        for name in names:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            result = result + (self._lookup(ids, A.T) @ (B.T * self.scaling[name])).to(result.dtype)
        return result

    def mixed_forward(self, routing: RowRouting, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(ids, *args, **kwargs)
        present = [n for n in routing.names if n in self.lora_embedding_A]
        if not present:
            return result
        ref = self.lora_embedding_A[present[0]]
        rank = max(self.lora_embedding_A[n].shape[0] for n in present)
        vocab, dim = self.base_layer.weight.shape
        zero_A, zero_B = ref.new_zeros(rank, vocab), ref.new_zeros(dim, rank)
        A_rows, B_rows = [zero_A], [zero_B]
        for name in routing.names:
            present_here = name in self.lora_embedding_A
            A_rows.append(_pad_rows(self.lora_embedding_A[name], rank) if present_here else zero_A)
            B_rows.append(_pad_cols(self.lora_embedding_B[name] * self.scaling[name], rank) if present_here else zero_B)
        index = routing.for_batch(ids.shape[0])
        rows = index.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
        low = torch.stack(A_rows).transpose(1, 2)[rows, ids]  # (batch, ..., rank): each row's own table
        flat = low.reshape(ids.shape[0], -1, rank)
        update = torch.bmm(flat, torch.stack(B_rows)[index].transpose(1, 2)).reshape(*ids.shape, dim)
        return result + update.to(result.dtype)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def merge_one(self, name: str, safe_merge: bool) -> float:
        weight = self.base_layer.weight
        new_weight = weight + self.get_delta_weight(name).to(weight.dtype)
        if safe_merge:
            self.check_finite(name, new_weight)
        with torch.no_grad():
            weight.copy_(new_weight)
        return 0.0

    def unmerge_one(self, name: str) -> float:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.sub_(self.get_delta_weight(name).to(weight.dtype))
        return 0.0


_FUSABLE = base_layers.fusable_types()
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)  # dense weights the fused kernel can read as they are
_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (not float64)


def _half_base(base_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """A half-precision base with float32 adapters (see :func:`_adapter_dtype`)."""
    return base_dtype in (torch.float16, torch.bfloat16) and adapter_dtype == torch.float32


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, 0, rows - tensor.shape[0]))


def _pad_cols(tensor: torch.Tensor, cols: int) -> torch.Tensor:
    return F.pad(tensor, (0, cols - tensor.shape[1]))


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 even on a half-precision base (small tensors, stable updates)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


# The attention projections LoRA adapts when the user names none (query and value, as in Hu et al.
# 2021): naming conventions that many architectures share, first match wins, not per-model code.
DEFAULT_TARGET_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("c_attn",),
    ("q", "v"),
    ("qkv_proj",),
    ("query_key_value",),
    ("Wqkv",),
)


def default_targets(model: nn.Module, wrappable: tuple[type[nn.Module], ...]) -> list[str]:
    """LoRA's targets when ``target_modules`` is not given: the model's query/value projections."""
    found = engine.first_present_group(model, DEFAULT_TARGET_CANDIDATES, wrappable)
    if found is None:
        raise engine.TargetModuleError(
            "target_modules was not given and no conventional attention projection names were found; "
            "name them explicitly, e.g. target_modules=['...'] from: "
            + ", ".join(engine.wrappable_leaf_names(model, wrappable)[:20])
        )
    return found


def attach_lora(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with LoRA adapter ``adapter_name``; return their paths."""
    assert isinstance(config, LoraConfig)
    linear = engine.linear_types()
    wrappable = linear + (nn.Embedding,)
    paths = engine.find_targets(
        model,
        config.target_modules if config.target_modules is not None else default_targets(model, wrappable),
        wrappable=wrappable,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=config.modules_to_save or (),
        method="LoRA",
    )
    if isinstance(config.target_modules, str) and config.target_modules.lower() in ("all-linear", "all_linear"):
        # Saved configs name the modules, so tools that do not know "all-linear" (vLLM) can read them.
        config.target_modules = sorted({path.rsplit(".", 1)[-1] for path in paths})
    stay_float = _kept_in_float(model, paths) if config.init_lora_weights == "loftq" else set()
    for path in paths:
        module = model.get_submodule(path)
        inner = module.base_layer if isinstance(module, AdapterLayer) else module
        layer_class = LoraEmbedding if isinstance(inner, nn.Embedding) else LoraLinear
        extra = {"plain_start": True} if path in stay_float and layer_class is LoraLinear else {}
        engine.wrap_targets(
            model,
            [path],
            layer_class,
            lambda layer, p, extra=extra: layer.add_adapter(adapter_name, config, p, **extra),
        )
    return paths


def _kept_in_float(model: nn.Module, paths: list[str]) -> set[str]:
    """The ``paths`` a quantized load of ``model`` leaves in float (no quantization error to start LoftQ from)."""
    from deltatune.quantization import kept_in_float, stays_float

    kept = kept_in_float(model)
    return {path for path in paths if stays_float(path, kept)}


# -- combining adapters ---------------------------------------------------------------------------
LORA = register_method(
    Method(peft_type=PeftType.LORA, config_class=LoraConfig, attach=attach_lora, combine=add_weighted_adapter)
)

# `deltatune train` defaults: all linear layers at r=16, alpha=32 (Dettmers et al. 2023 find all-linear
# LoRA matches full fine-tuning where attention-only does not); 5e-4 measured on rotten-tomatoes.
# Behind MiniLM's fresh classifier head, where most methods gain from the frozen model's dropout off
# (--model-dropout 0), LoRA and DoRA lose by it (LoRA 0.835 against 0.839 over three seeds; DoRA
# 0.824 against 0.842, seed 0), so they keep the model's own.
_LORA_DEFAULTS = {"targets": "all-linear"}  # r=16, alpha=32: the --r/--alpha flags' own defaults


def config_from_options(options: Mapping[str, Any], common: Mapping[str, Any], use_dora: bool = False) -> LoraConfig:
    """The LoRA (or DoRA) config ``deltatune train``'s options describe."""
    init = str(options.get("init_lora_weights") or "true")
    # One alternation: the base LoftQ leaves is then the one a quantized load gives, so the adapter
    # also loads on a plain --quantize base (deltatune.quantization.quantize_frozen_linear_layers).
    loftq = {"loftq_bits": 8 if options.get("quantize") == "int8" else 4, "loftq_iter": 1} if init == "loftq" else {}
    return LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        use_dora=use_dora,
        use_rslora=bool(options.get("use_rslora")),
        init_lora_weights={"true": True, "false": False}.get(init.lower(), init),
        loftq_config=loftq,
        **common,
    )


register_training_defaults(
    "lora",
    TrainingDefaults(
        uses=("r", "alpha", "dropout", "use_rslora", "init_lora_weights", *MODULE_OPTIONS),
        lr=5e-4,
        options=_LORA_DEFAULTS,
        source="all-linear r=16 (QLoRA paper); lr measured",
        config=config_from_options,
    ),
)
register_training_defaults(
    "dora",
    TrainingDefaults(
        uses=("r", "alpha", "dropout", "use_rslora", "init_lora_weights", *MODULE_OPTIONS),
        lr=5e-4,
        options=_LORA_DEFAULTS,
        source="as LoRA (Liu et al. 2024 use LoRA's settings)",
        config=lambda options, common: config_from_options(options, common, use_dora=True),
    ),
)
