r"""LoRA+ (Hayou et al. 2024): a larger learning rate for LoRA's ``B`` than for its ``A``.

With the same rate for both factors, LoRA's update :math:`BA` learns inefficiently at large width:
``B`` starts at zero and its useful step size scales differently from ``A``'s. LoRA+ sets
:math:`\eta_B = \lambda \eta_A` with a ratio :math:`\lambda` around 16 (the paper's recommendation
for most tasks), which it finds speeds up fine-tuning by up to 2x and improves accuracy by 1-2 %.

The parameter groups follow HF PEFT's ``create_loraplus_optimizer``, so a PEFT user's script means
the same: tensors named ``lora_B`` and every one-dimensional tensor (biases, DoRA magnitudes,
VeRA's vectors, norm weights) get :math:`\lambda \eta`; LoRA's embedding factors get
``loraplus_lr_embedding``; the rest :math:`\eta`. Weight decay (``loraplus_weight_decay``) applies
to every group except one-dimensional tensors inside ``nn.LayerNorm`` modules and biases. Each
group carries ``lr_scale``, its rate as a multiple of :math:`\eta`, so a learning-rate schedule
(``deltatune train``'s) scales every group alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` in LoRA+'s groups (empty groups left out)."""
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be positive (LoRA+ recommends 16), got {loraplus_lr_ratio!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    in_layer_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_embedding_" in name:
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            decays = id(param) not in in_layer_norm and "bias" not in name
            groups["B" if decays else "B_no_decay"].append(param)
        else:
            groups["A"].append(param)
    ratio = loraplus_lr_ratio
    scales = {"A": 1.0, "embedding": loraplus_lr_embedding / lr, "B": ratio, "B_no_decay": ratio}
    return [
        {
            "params": params,
            "lr": lr * scales[kind],
            "lr_scale": scales[kind],
            "weight_decay": 0.0 if kind == "B_no_decay" else loraplus_weight_decay,
            "loraplus_group": kind,
        }
        for kind, params in groups.items()
        if params
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over ``model``'s trainable parameters in LoRA+'s groups (HF PEFT's signature).

    ``loraplus_lr_embedding`` (1e-6) and ``loraplus_weight_decay`` (0) may be given in ``kwargs``; the
    rest (``betas``, ``eps``, ...) go to the optimizer.
    """
    groups = loraplus_param_groups(
        model,
        lr,
        loraplus_lr_ratio,
        loraplus_lr_embedding=kwargs.pop("loraplus_lr_embedding", 1e-6),
        loraplus_weight_decay=kwargs.pop("loraplus_weight_decay", 0.0),
    )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return optimizer_cls(groups, lr=lr, **kwargs)
