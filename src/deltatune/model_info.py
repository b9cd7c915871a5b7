"""What the code reads off a model without knowing its architecture.

Naming and structural conventions that transformers models share, in one place, so that methods,
the trainer and the tasks ask the same questions the same way: the repeated transformer blocks,
the text part of a (possibly multimodal) config, the keyword of the KV cache, and the model
inside DistributedDataParallel-style wrappers.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from deltatune import engine
from deltatune.config import ConfigError


def unwrap_parallel(model: Any) -> Any:
    """``model`` without DistributedDataParallel-style wrappers (a module whose own child is
    ``module``; an attribute a model merely forwards, as PeftModel forwards its base's, is not one)."""
    while isinstance(getattr(model, "_modules", {}).get("module"), nn.Module):
        model = model._modules["module"]
    return model


def find_blocks(model: nn.Module) -> list[str]:
    """Paths of the repeated transformer blocks: children of the outermost ``nn.ModuleList``\\ s
    whose members hold linear layers."""
    linear = engine.linear_types()
    blocks: list[str] = []
    for path, module in engine.visible_modules(model):
        if not isinstance(module, nn.ModuleList) or any(path.startswith(b + ".") for b in blocks):
            continue
        children = [f"{path}.{name}" for name, _ in module.named_children()]
        if any(isinstance(engine.innermost(m), linear) for c in module.children() for m in c.modules()):
            blocks.extend(children)
    return blocks


def text_config(model: nn.Module) -> Any:
    """The model's config, or its text part for a multimodal one (``get_text_config``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("input methods need a transformers model (one with a .config)")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def cache_argument(model: nn.Module) -> str:
    """The keyword the installed transformers uses for the KV cache: ``cache`` or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def context_length(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow, where its config says."""
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# Where attention modules keep their rate as a plain float (Llama's ``attention_dropout``, BART's
# and Whisper's ``dropout``) and pass it to a fused attention kernel instead of an nn.Dropout.
_DROPOUT_RATE_ATTRIBUTES = ("attention_dropout", "dropout")


def set_dropout(model: nn.Module, rate: float) -> int:
    """Set every dropout of ``model`` to ``rate``: its ``nn.Dropout`` layers and the float rates its
    attention modules hand to fused kernels. Returns how many were set. Call it before adapters are
    attached: their own dropout (``lora_dropout``) is theirs to keep."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
            count += 1
            continue
        for attribute in _DROPOUT_RATE_ATTRIBUTES:
            if isinstance(vars(module).get(attribute), float):
                setattr(module, attribute, rate)
                count += 1
    return count
