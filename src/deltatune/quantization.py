"""Quantized frozen bases (QLoRA, Dettmers et al. 2023): loading a model in 4 or 8 bits, preparing it to train.

QLoRA keeps the base weights in 4-bit NormalFloat (``nf4``: the 16 quantiles of a standard normal,
so that normally distributed weights use every code equally), blockwise with one absmax per 64
weights, the absmaxes themselves quantized to 8 bits (double quantization); the forward dequantizes
each weight to the compute dtype and the adapters train in float32 on top. ``int8`` is LLM.int8()
(one absmax per row). The layers are bitsandbytes'; deltatune reads them through
:mod:`deltatune.base_layers`, so every layer method runs on them unchanged.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

QUANTIZE_CHOICES = ("none", "nf4", "fp4", "int8")


class QuantizationUnavailableError(RuntimeError):
    """The quantization backend is missing or has no kernels on this device."""


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            "quantized bases need bitsandbytes, which is not installed: pip install 'deltatune[quant]' "
            "(or pip install bitsandbytes)"
        )


def bitsandbytes_config(kind: str, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``kind`` (``nf4``, ``fp4``, ``int8``); None for ``none``."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {kind!r}")
    if kind == "none":
        return None
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def check_device(kind: str, device: torch.device) -> None:
    """bitsandbytes runs on CUDA, and (0.50+) on x86 CPUs; refuse other devices with the reason."""
    if kind == "none" or device.type in ("cuda", "cpu"):
        return
    raise QuantizationUnavailableError(
        f"--quantize {kind}: bitsandbytes has no kernels for {device.type} devices; use --device cpu or cuda, "
        "or --quantize none"
    )


def is_quantized_model(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)) or any(
        type(m).__module__.startswith("bitsandbytes") for m in model.modules()
    )


def quantization_of(model: nn.Module) -> str:
    """``nf4``, ``fp4``, ``int8`` or ``none``: what the model's linear layers are stored in."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None:
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("load_in_4bit", False):
            return str(get("bnb_4bit_quant_type", "fp4"))
        if get("load_in_8bit", False):
            return "int8"
    return "none"


def quantize_round_trip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (out, in) quantized as bitsandbytes stores it and dequantized again: nf4 in blocks of
    64 with float32 absmax (``bits=4``), or LLM.int8()'s one absmax per row (``bits=8``)."""
    require_bitsandbytes()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    dense = weight.detach().float().to("cpu")
    if bits == 4:
        packed = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        restored = bnbF.dequantize_4bit(packed.data, packed.quant_state)
    elif bits == 8:
        codes = bnb.nn.Int8Params(dense, requires_grad=False).to("cpu")
        restored = bnbF.int8_vectorwise_dequant(codes.data, codes.SCB)
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return restored.float().reshape(weight.shape).to(weight.device)


def quantize_frozen_linear_layers(
    model: nn.Module,
    kind: str,
    kept_in_float: Collection[str],
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
) -> int:
    """Store ``model``'s frozen linear layers in ``kind`` (``nf4``, ``fp4``, ``int8``) in place; how many.

    The layers a quantized ``from_pretrained`` would convert are converted, on the device each sits
    on: every frozen ``nn.Linear`` except those ``kept_in_float`` names (:func:`kept_in_float` of the
    model before adapters were attached; an adapter's wrapper, ``base_layer``, is looked through);
    trained layers (a head saved with the adapter) stay float. This is how a LoftQ start (which needs
    the float weights) ends on the quantized base it was computed for: a weight already rounded to
    ``kind``'s grid keeps its codes, so with one LoftQ alternation the base equals the one a quantized
    load of the float model gives.
    """
    if kind not in QUANTIZE_CHOICES or kind == "none":
        raise ValueError(f"kind must be one of nf4, fp4, int8, got {kind!r}")
    require_bitsandbytes()
    import bitsandbytes as bnb

    settings = bitsandbytes_config(kind, compute_dtype=compute_dtype, double_quant=double_quant)
    inner = getattr(model, "get_base_model", lambda: model)()
    names = [
        name
        for name, module in inner.named_modules()
        if type(module) is nn.Linear
        and not module.weight.requires_grad
        and not stays_float(re.sub(r"\.base_layer(?=\.|$)", "", name), kept_in_float)
    ]
    on_meta = [name for name in names if inner.get_submodule(name).weight.is_meta]
    if on_meta:
        raise ValueError(
            f"{len(on_meta)} layers to quantize have no weights yet (the meta device), e.g. {on_meta[0]}: load the "
            "model's weights (from_pretrained without device_map='meta', or load_state_dict) before quantizing"
        )
    for name in names:
        linear = inner.get_submodule(name)
        weight, bias = linear.weight.data, linear.bias
        if kind == "int8":
            layer: nn.Module = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias is not None,
                has_fp16_weights=False,
                threshold=settings.llm_int8_threshold,
                device="meta",
            )
            # bitsandbytes quantizes 8-bit weights on their way from the CPU to the device
            layer.weight = bnb.nn.Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias is not None,
                compute_dtype,
                compress_statistics=double_quant,
                quant_type=kind,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight.float(), requires_grad=False, compress_statistics=double_quant, quant_type=kind
            )
        if bias is not None:
            layer.bias = bias  # the same parameter: a bias the adapter trains (bias="all") stays trained
        layer.to(weight.device)  # bitsandbytes quantizes a weight when it is moved onto its device
        layer.train(linear.training)
        inner.set_submodule(name, layer)
    config = getattr(inner, "config", None)
    if names and config is not None:
        config.quantization_config = settings
    return len(names)


def check_quantizable_in_place(model: nn.Module, kept_in_float: Collection[str]) -> None:
    """Refuse a model whose layers a quantized load converts but :func:`quantize_frozen_linear_layers`
    does not: GPT-2-style ``Conv1D`` (its weight stored transposed)."""
    conv1d = [
        name
        for name, module in model.named_modules()
        if type(module).__name__ == "Conv1D" and not stays_float(name, kept_in_float)
    ]
    if conv1d:
        raise ValueError(
            f"--init-lora-weights loftq quantizes the float model's nn.Linear layers in place, and this model's "
            f"GPT-2-style Conv1D layers ({', '.join(conv1d[:3])}{', ...' if len(conv1d) > 3 else ''}) would stay "
            "float; train them with --init-lora-weights true (a quantized load converts them)"
        )


def kept_in_float(model: nn.Module) -> list[str]:
    """Module names (transformers' patterns) a quantized load of ``model`` leaves in float: the output
    embeddings, tied weights, the last layer and ``_keep_in_fp32_modules``."""
    kept: set[str] = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        kept |= set(get_keys_to_not_convert(model))
    except (ImportError, AttributeError):
        output = getattr(model, "get_output_embeddings", lambda: None)()
        kept |= {name for name, module in model.named_modules() if output is not None and module is output}
    return sorted(name for name in kept if name)


def stays_float(name: str, kept: Collection[str]) -> bool:
    """Whether a quantized load leaves module ``name`` in float, given :func:`kept_in_float`'s names."""
    kept = list(kept)
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return any(name == key or name.startswith(key + ".") or name.endswith("." + key) for key in kept)
    return not should_convert_module(name, kept)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a quantized model ready for adapter training (HF PEFT's function of the same name and meaning).

    * every parameter is frozen (the adapters added next are the only trainable ones);
    * 16-bit parameters that are not quantized (norms, embeddings, the LM head) are cast to float32,
      so the small updates a float32 adapter makes are not lost to their rounding;
    * with gradient checkpointing, the embeddings' output requires a gradient: reentrant
      checkpointing recomputes a block only if one of its inputs does, and a frozen model's do not.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.to(torch.float32)
    if use_gradient_checkpointing and is_quantized_model(model):
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                embeddings = model.get_input_embeddings()

                def output_requires_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                    output.requires_grad_(True)

                embeddings.register_forward_hook(output_requires_grad)
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    return model
