"""The frozen linear layer a method wraps, seen through one small interface, whatever stores its weight.

A layer method (LoRA and its variants, IA3, bottleneck adapters) needs six things of the layer under
it, and no more:

* ``in_features`` / ``out_features``: the map :math:`y = x W^\\top + b` from ``(.., in)`` to ``(.., out)``;
* the layer's own forward (a quantized layer dequantizes on the fly);
* :meth:`LinearBase.dense_weight`: :math:`W` as a float tensor in ``(out, in)`` orientation
  (dequantized where it is quantized), for merging, DoRA's column norms and PiSSA/LoftQ starts;
* :meth:`LinearBase.set_dense_weight`: write a changed :math:`W` back (requantized), returning the
  largest rounding error that introduced, so a merge into a quantized base can say what it cost;
* the dtype and device that adapter parameters next to it are created in;
* whether the weight is a plain tensor (LoRA's fused kernel reads it directly) or quantized.

Plain ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored ``(in, out)``) and bitsandbytes' ``Linear4bit``
(nf4 and fp4, with or without double quantization) and ``Linear8bitLt`` implement it here; a method
asks :func:`linear_base` and never looks at how a weight is stored, so every method runs on every
backend with no per-backend code in the methods. bitsandbytes is imported only when a model holds
its layers (importing it is slow and prints warnings), so deltatune works without it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

QUANTIZED_LAYER_HINT = (
    "supported: nn.Linear, transformers' Conv1D, bitsandbytes Linear4bit (nf4/fp4) and Linear8bitLt "
    "(load the model with transformers' BitsAndBytesConfig), and nn.Linear with torchao's int8 weight-only weights"
)


class LinearBase:
    """A plain ``nn.Linear``: the weight is already a dense ``(out, in)`` tensor."""

    quantized = False
    fusable = True  # LoRA's fused autograd function may use the weight tensor as it is
    transposed = False  # the stored weight is (in, out): GPT-2's Conv1D

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        out_features, in_features = self._stored_shape()
        self.in_features, self.out_features = in_features, out_features

    def _stored_shape(self) -> tuple[int, int]:
        weight = self.module.weight
        return tuple(weight.shape[::-1]) if self.transposed else tuple(weight.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of :meth:`dense_weight` (a quantized layer: the float dtype it was quantized from)."""
        return self.module.weight.dtype

    @property
    def adapter_dtype(self) -> torch.dtype:
        """Adapters train in float32 on a half-precision or quantized base (small tensors, stable updates)."""
        dtype = self.weight_dtype
        return torch.float32 if self.quantized or dtype in (torch.float16, torch.bfloat16) else dtype

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def dense_weight(self) -> torch.Tensor:
        """``W`` in ``(out, in)`` orientation: the parameter itself (a view) where it is stored densely."""
        weight = self.module.weight
        return weight.T if self.transposed else weight

    def set_dense_weight(self, weight: torch.Tensor) -> float:
        """Store ``weight`` (``(out, in)``); returns the largest absolute rounding error (0 for a dense layer)."""
        target = self.module.weight
        with torch.no_grad():
            target.copy_((weight.T if self.transposed else weight).to(target.dtype))
        return 0.0

    def dequantizer(self, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
        """For a base whose forward multiplies by a dequantized weight, the function that makes it
        (see :class:`Bnb4bitBase`); None for the others."""
        return None

    def new_bias(self) -> nn.Parameter:
        """A zero bias for a bias-free layer (a merge that adds one)."""
        return nn.Parameter(torch.zeros(self.out_features, dtype=self.weight_dtype, device=self.device), False)

    def describe(self) -> str:
        return type(self.module).__name__


class Conv1DBase(LinearBase):
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored ``(in, out)``."""

    transposed = True


class Bnb4bitBase(LinearBase):
    """bitsandbytes ``Linear4bit``: blockwise nf4/fp4 codes plus absmax scales (themselves 8-bit with
    double quantization); dequantized in the forward to ``compute_dtype``.

    On a CPU with AVX512-BF16, bitsandbytes repacks the weight the first time the layer runs in eval
    mode without gradients, and keeps it repacked: a kernel that has no backward (gradients through
    the layer are silently wrong in every later training step: measured, first-layer LoRA gradients
    off by a third) and absmax scales rounded to bfloat16 (outputs off by up to 0.02 on a tiny
    Llama). A layer under an adapter is kept in its original layout (:func:`keep_trainable_layout`).
    """

    quantized = True
    fusable = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        keep_layer_trainable(module)

    def _stored_shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features

    @property
    def weight_dtype(self) -> torch.dtype:
        state = self.module.weight.quant_state
        return state.dtype if state is not None else torch.float32

    def dense_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        weight = self.module.weight
        return bnbF.dequantize_4bit(weight.data, weight.quant_state).reshape(self.out_features, self.in_features)

    def set_dense_weight(self, weight: torch.Tensor) -> float:
        import bitsandbytes as bnb

        old = self.module.weight
        state = old.quant_state
        dense = weight.detach().to(dtype=state.dtype).reshape(self.out_features, self.in_features)
        device = old.device
        new = bnb.nn.Params4bit(
            dense.to("cpu") if device.type == "cpu" else dense,
            requires_grad=False,
            blocksize=state.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=state.quant_type,
            quant_storage=old.quant_storage,
            module=self.module,
        ).to(device)
        self.module.weight = new
        return float((self.dense_weight().float() - dense.float()).abs().max())

    def dequantizer(self, dtype: torch.dtype) -> Callable[[], torch.Tensor] | None:
        """The layer's forward as a function of its dense weight: ``x W^T + b`` with ``W`` this
        function's result (bitsandbytes' training path dequantizes to the compute dtype and
        multiplies); None when inputs of ``dtype`` would be cast first."""
        module = self.module
        if module.compute_dtype not in (None, dtype) or (module.bias is not None and module.bias.dtype != dtype):
            return None
        import bitsandbytes.functional as bnbF

        weight, shape = module.weight, (self.out_features, self.in_features)
        state = copy.copy(weight.quant_state)
        state.dtype = dtype  # straight to the compute dtype, as bitsandbytes' forward dequantizes
        return lambda: bnbF.dequantize_4bit(weight.data, state).reshape(shape)

    def describe(self) -> str:
        state = self.module.weight.quant_state
        double = " double-quantized" if getattr(self.module.weight, "compress_statistics", False) else ""
        return f"Linear4bit ({state.quant_type if state is not None else '4-bit'}{double})"


class Bnb8bitBase(LinearBase):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8()): int8 rows with one absmax scale per output row."""

    quantized = True
    fusable = False

    def _stored_shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.float32 if self.module.bias is None else self.module.bias.dtype

    def _row_scales(self) -> torch.Tensor:
        weight, state = self.module.weight, self.module.state
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
        if scales is None:
            raise RuntimeError(f"{self.describe()} holds float weights (has_fp16_weights=True): not quantized")
        return scales

    def dense_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        codes = self.module.weight.data
        return bnbF.int8_vectorwise_dequant(codes, self._row_scales()).to(self.weight_dtype)

    def set_dense_weight(self, weight: torch.Tensor) -> float:
        import bitsandbytes as bnb

        device = self.module.weight.device
        dense = weight.detach().reshape(self.out_features, self.in_features)
        # Int8Params quantizes when moved off the CPU (or to it): start from the CPU on every device.
        new = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False)
        self.module.weight = new.to(device)  # int8 codes and row scales
        old_state = self.module.state
        state = bnb.MatmulLtState()
        state.threshold, state.use_pool = old_state.threshold, old_state.use_pool  # LLM.int8()'s outlier split
        state.has_fp16_weights = False
        self.module.state = state
        return float((self.dense_weight().float() - dense.float()).abs().max())

    def describe(self) -> str:
        return "Linear8bitLt (int8)"


def keep_layer_trainable(module: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference repacking of a ``Linear4bit`` and undo it if it happened."""
    if getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbF

        # The codes come back exactly; the absmax scales stay as the packing rounded them.
        weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, state)


def keep_trainable_layout(model: nn.Module) -> None:
    """Every 4-bit layer of ``model`` in the layout its backward needs (see :class:`Bnb4bitBase`)."""
    if "bitsandbytes" not in sys.modules:
        return
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            keep_layer_trainable(module)


class TorchaoInt8Base(LinearBase):
    """An ``nn.Linear`` whose weight torchao replaced with a weight-only int8 tensor (``quantize_(model,
    Int8WeightOnlyConfig())``): one scale per output row; the weight tensor dequantizes itself."""

    quantized = True
    fusable = False

    def dense_weight(self) -> torch.Tensor:
        return self.module.weight.dequantize()

    def set_dense_weight(self, weight: torch.Tensor) -> float:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        dense = weight.detach().to(self.weight_dtype).reshape(self.out_features, self.in_features)
        holder = nn.Sequential(nn.Linear(self.in_features, self.out_features, bias=False))
        holder[0].weight = nn.Parameter(dense.clone(), requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        self.module.weight = holder[0].weight
        return float((self.dense_weight().float() - dense.float()).abs().max())

    def describe(self) -> str:
        return f"torchao {type(self.module.weight).__name__} (int8 weight-only)"


def _torchao_weight(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__module__.startswith("torchao")


# (type, view class), most specific first; bitsandbytes' entries are added once it is imported.
_KINDS: list[tuple[type[nn.Module], type[LinearBase]]] = [(nn.Linear, LinearBase)]


def register_linear_base(module_type: type[nn.Module], view: type[LinearBase]) -> None:
    """Teach every layer method a new kind of frozen linear layer (a quantization backend)."""
    _KINDS.insert(0, (module_type, view))


# Each returns the kinds it adds, or None while it cannot tell yet (bitsandbytes not imported).
_Loader = Callable[[], "list[tuple[type[nn.Module], type[LinearBase]]] | None"]


def _conv1d() -> list[tuple[type[nn.Module], type[LinearBase]]]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # the core works on plain torch models
        return []
    return [(Conv1D, Conv1DBase)]


def _bitsandbytes() -> list[tuple[type[nn.Module], type[LinearBase]]] | None:
    # Only once the process imported it: a model that holds its layers did.
    if "bitsandbytes" not in sys.modules:
        return None
    import bitsandbytes as bnb

    return [(bnb.nn.Linear4bit, Bnb4bitBase), (bnb.nn.Linear8bitLt, Bnb8bitBase)]


_PENDING: list[_Loader] = [_conv1d, _bitsandbytes]


def _kinds() -> list[tuple[type[nn.Module], type[LinearBase]]]:
    for loader in list(_PENDING):
        found = loader()
        if found is not None:
            _PENDING.remove(loader)
            _KINDS[-1:-1] = found  # ahead of the nn.Linear catch-all (Linear4bit subclasses it), behind registered ones
    return _KINDS


def linear_types() -> tuple[type[nn.Module], ...]:
    """Every module type a layer method can wrap as a linear layer (torchao's int8 layers are ``nn.Linear``)."""
    return tuple(t for t, _ in _kinds())


def fusable_types() -> tuple[type[nn.Module], ...]:
    """Linear types whose weight is a plain dense tensor (LoRA's fused function reads it directly)."""
    return tuple(t for t, v in _kinds() if v.fusable)


def linear_base(module: nn.Module) -> LinearBase:
    """The :class:`LinearBase` view of a frozen linear layer; a clear error for any other module."""
    if isinstance(module, nn.Linear) and _torchao_weight(module):
        if type(module.weight).__name__ != "Int8Tensor":
            raise TypeError(
                f"a Linear with a torchao {type(module.weight).__name__} weight: deltatune reads torchao's int8 "
                f"weight-only tensors; {QUANTIZED_LAYER_HINT}"
            )
        return TorchaoInt8Base(module)
    for module_type, view in _kinds():
        if isinstance(module, module_type):
            return view(module)
    raise TypeError(f"{type(module).__name__} is not a linear layer a method can wrap; {QUANTIZED_LAYER_HINT}")


def parameter_count(param: torch.Tensor) -> int:
    """Weights a parameter holds: a packed 4-bit tensor holds two per byte of its storage."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def unquantized_bytes(param: torch.Tensor) -> int:
    """What a parameter takes unquantized, as a full float32 checkpoint stores a 4-bit or int8 weight."""
    quantized = type(param).__name__ in ("Params4bit", "Int8Params")
    return parameter_count(param) * (4 if quantized else param.element_size())


def is_quantized(module: nn.Module) -> bool:
    try:
        return linear_base(module).quantized
    except TypeError:
        return False


def looks_like_unsupported_quantized_linear(module: nn.Module) -> bool:
    """A linear layer of a quantization library deltatune cannot wrap (GPTQ, AWQ, HQQ, EETQ, fp8, ...).

    Such a layer has ``in_features``/``out_features`` but no float weight to read; an ``all-linear``
    target must refuse it rather than leave it silently unadapted.
    """
    if isinstance(module, linear_types()) or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
        return False
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return False
    name = type(module).__name__.lower()
    return any(hint in name for hint in ("quant", "linear", "gptq", "awq", "hqq", "eetq", "fp8", "int4", "int8"))
