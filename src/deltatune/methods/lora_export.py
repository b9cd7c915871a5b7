r"""Any weight-delta adapter written as a plain LoRA adapter (``PeftModel.save_as_lora``).

vLLM, LoRAX and most PEFT-format servers load LoRA only. Every adapter whose effect on each
layer is a change :math:`\Delta W` of a linear weight (LoRA, DoRA, LoHa, LoKr, VeRA, (IA)³ on
bias-free layers, ...) can be written as one: the truncated SVD

.. math::  \Delta W = U \Sigma V^\top \approx \underbrace{U_r \Sigma_r^{1/2}}_{B}\,
           \underbrace{\Sigma_r^{1/2} V_r^\top}_{A}

is the best rank-:math:`r` approximation in the Frobenius norm (Eckart-Young), saved with
``lora_alpha = r`` so that LoRA's scale :math:`\alpha / r` is 1. A layer whose delta has rank at
most :math:`r` is reproduced exactly; otherwise the report gives each layer's relative error
:math:`\lVert \Delta W - BA \rVert_F / \lVert \Delta W \rVert_F`. A layer smaller than :math:`r`
is zero-padded to rank :math:`r`, which changes nothing in :math:`BA`.

Modules trained in full next to the adapter (``modules_to_save``, e.g. a classifier head) are
written as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltatune import base_layers, checkpoint, engine
from deltatune.config import ConfigError
from deltatune.methods.lora import LoraConfig
from deltatune.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

logger = logging.getLogger("deltatune")


@dataclasses.dataclass
class LoraExport:
    """What :func:`save_as_lora` wrote: the folder, the rank, and each layer's relative error."""

    path: Path
    rank: int
    errors: dict[str, float]

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors) if self.errors else 0.0


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, error)``: A ``(rank, in)`` and B ``(out, rank)`` with ``B @ A`` the best rank-``rank``
    approximation of ``delta`` ``(out, in)``, and its relative Frobenius error."""
    delta = delta.detach().float()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(rank, S.shape[0])
    root = S[:kept].sqrt()
    A = torch.zeros(rank, delta.shape[1], dtype=delta.dtype, device=delta.device)
    B = torch.zeros(delta.shape[0], rank, dtype=delta.dtype, device=delta.device)
    A[:kept] = root[:, None] * Vh[:kept]
    B[:, :kept] = U[:, :kept] * root[None, :]
    norm = torch.linalg.matrix_norm(delta)
    error = float(torch.linalg.matrix_norm(delta - B @ A) / norm) if norm > 0 else 0.0
    return A, B, error


def save_as_lora(
    peft_model: PeftModel,
    save_directory: str | os.PathLike,
    rank: int,
    adapter_name: str = "default",
) -> LoraExport:
    """Write adapter ``adapter_name`` of ``peft_model`` to ``save_directory`` as a rank-``rank`` LoRA adapter."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(peft_model.peft_config)}")
    source = peft_model.peft_config[adapter_name]
    if source.is_prompt_learning:
        raise ConfigError(
            f"adapter {adapter_name!r} is {source.peft_type}: virtual tokens are not a change of any weight, "
            "so it has no LoRA form"
        )
    model = peft_model.get_base_model()
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    targets: list[str] = []
    orientations: set[bool] = set()
    for path, layer in engine.adapter_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        key = engine.checkpoint_path(path)
        if isinstance(layer, ModulesToSaveWrapper):
            for name, tensor in layer.adapter_state_dict(adapter_name).items():
                state[f"{checkpoint.PREFIX}{key}.{name}"] = tensor
            continue
        if adapter_name in layer.merged_adapters:
            raise ConfigError(
                f"{key}: adapter {adapter_name!r} is merged into the base weights, so its change can no longer be "
                "read off them; unmerge_adapter() first"
            )
        delta = layer.weight_delta(adapter_name)
        if delta is None:
            raise ConfigError(
                f"{key}: this {layer.method_name} adapter does more than change a linear weight (a nonlinear "
                "module, an embedding, or a bias it also trains), so it has no exact LoRA form; save it with "
                "save_pretrained"
            )
        A, B, errors[key] = low_rank_factors(delta, rank)
        dtype = layer.base.adapter_dtype if hasattr(layer, "base") else torch.float32
        state[f"{checkpoint.PREFIX}{key}.lora_A.weight"] = A.to(dtype).contiguous()
        state[f"{checkpoint.PREFIX}{key}.lora_B.weight"] = B.to(dtype).contiguous()
        targets.append(key)
        orientations.add(base_layers.linear_base(engine.innermost(layer)).transposed)
    for name, tensor in source.trained_base_parameters(model, adapter_name).items():
        state[checkpoint.PREFIX + name] = tensor.detach()
    if not targets:
        raise ConfigError(f"adapter {adapter_name!r} changes no linear layer; nothing to save as LoRA")
    if len(orientations) > 1:
        logger.warning("the adapter spans nn.Linear and Conv1D layers; LoRA reads each layer's orientation itself")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(targets),
        fan_in_fan_out=orientations == {True},
        modules_to_save=getattr(source, "modules_to_save", None),
        bias=source.bias if isinstance(source, LoraConfig) else "none",  # base biases it trained, saved above
        task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
        inference_mode=True,
    )
    directory = Path(save_directory)
    checkpoint.save_adapter(state, config, directory)
    report = LoraExport(path=directory, rank=rank, errors=errors)
    logger.info(
        "saved %s adapter %r as rank-%d LoRA in %s: relative error mean %.2e, largest %.2e (%s)",
        source.peft_type,
        adapter_name,
        rank,
        directory,
        report.mean_error,
        report.max_error,
        max(errors, key=errors.get),
    )
    return report
