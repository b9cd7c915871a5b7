r"""Combining LoRA adapters into one (HF PEFT's ``add_weighted_adapter``): the factor arithmetic,
and :func:`add_weighted_adapter`, which applies it to every LoRA layer (``lora_factors``) of a model.

For adapters :math:`(A_i, B_i)` with scales :math:`s_i` and user weights :math:`w_i`, and
:math:`w'_i = w_i s_i`:

* ``"cat"``: exact, :math:`\Delta W = \sum_i w'_i B_i A_i`, rank :math:`\sum_i r_i`.
* ``"svd"``: the same sum, cut to rank ``rank`` by SVD.
* ``"linear"``: :math:`A = \sum_i \mathrm{sgn}(w'_i)\sqrt{|w'_i|} A_i`,
  :math:`B = \sum_i \sqrt{|w'_i|} B_i` (all ranks equal). Cheaper but not the weighted sum of
  updates: cross terms :math:`B_i A_j` enter, as in PEFT.
* ``"ties"``: TIES-merging (Yadav et al. 2023) of the ``A`` and of the ``B`` factors: keep each
  factor's ``density`` fraction of largest-magnitude entries, weight them, elect each entry's sign
  by the weighted sum (``"total"``) or by count (``"frequency"``), average the entries that agree.
* ``"ties_svd"``: TIES on the full updates :math:`w'_i B_i A_i`, then SVD to rank ``rank``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from deltatune import engine
from deltatune.config import ConfigError, PeftType

COMBINATIONS = ("linear", "ties", "cat", "svd", "ties_svd")


def combine_factors(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    scales: list[float],
    weights: list[float],
    kind: str,
    rank: int,
    density: float | None,
    sign_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(A, B)`` pair, (rank, in) and (out, rank), combining ``factors`` as ``kind`` says."""
    scaled = [w * s for w, s in zip(weights, scales)]
    if kind == "cat":
        return torch.cat([w * A for w, (A, _) in zip(scaled, factors)]), torch.cat([B for _, B in factors], 1)
    device = factors[0][0].device
    if kind in ("linear", "ties"):
        root = [math.sqrt(abs(w)) for w in scaled]
        weights_A = torch.tensor([r if w >= 0 else -r for r, w in zip(root, scaled)], device=device)
        weights_B = torch.tensor(root, device=device)
        As, Bs = torch.stack([A for A, _ in factors]), torch.stack([B for _, B in factors])
        if kind == "linear":
            return weighted_sum(As, weights_A), weighted_sum(Bs, weights_B)
        return ties_merge(As, weights_A, density, sign_method), ties_merge(Bs, weights_B, density, sign_method)
    deltas = torch.stack([s * (B @ A) for s, (A, B) in zip(scales, factors)])
    weights_delta = torch.tensor(weights, device=device)
    delta = (
        weighted_sum(deltas, weights_delta)
        if kind == "svd"
        else ties_merge(deltas, weights_delta, density, sign_method)
    )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    return Vh[:rank], U[:, :rank] * S[:rank]


def weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * stacked[i]``."""
    return (stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))).sum(0)


def ties_merge(
    stacked: torch.Tensor, weights: torch.Tensor, density: float, sign_method: str = "total"
) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023) of tensors stacked on dim 0, in HF PEFT's variant.

    Trim each tensor to its ``density`` fraction of largest magnitudes; elect each entry's sign from
    the trimmed tensors (their sum for ``"total"``, their sign count for ``"frequency"``); average the
    weighted entries whose sign agrees with the elected one.
    """
    trimmed = []
    for tensor in stacked:
        mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
        mask[tensor.abs().reshape(-1).topk(int(density * tensor.numel())).indices] = True
        trimmed.append(tensor * mask.view(tensor.shape))
    trimmed = torch.stack(trimmed)
    if sign_method == "total":
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    elif sign_method == "frequency":
        elected = torch.where(trimmed.sign().sum(0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    agree = trimmed.sign() == elected
    weighted = trimmed * weights.view(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def add_weighted_adapter(
    peft_model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name`` combining LoRA ``adapters`` with ``weights`` (HF PEFT's API).

    ``combination_type``: ``"cat"``, ``"svd"``, ``"linear"``, ``"ties"`` or ``"ties_svd"``, as
    :func:`combine_factors` defines them. The new adapter has
    ``lora_alpha = r`` (scale 1): the weights and scales are folded into it.
    """
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("give one weight per adapter, and at least one adapter")
    configs = []
    for name in adapters:
        config = peft_model.peft_config.get(name)
        if config is None or config.peft_type != PeftType.LORA:
            raise ValueError(f"{name!r} is not a LoRA adapter; add_weighted_adapter combines LoRA adapters")
        if config.use_dora:
            raise ValueError(f"{name!r} uses DoRA, whose magnitude vector does not combine linearly")
        configs.append(config)
    if combination_type.startswith("ties") and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    layers = [
        (path, layer)
        for path, layer in engine.adapter_layers(peft_model.get_base_model())
        if hasattr(layer, "lora_factors") and any(a in layer.adapter_names for a in adapters)
    ]
    ranks = {_rank(layer, a) for _, layer in layers for a in adapters if a in layer.adapter_names}
    if combination_type in ("linear", "ties") and len(ranks) > 1:
        raise ValueError(
            f"combination_type={combination_type!r} needs equal ranks, got {sorted(ranks)}; use 'svd' or 'cat'"
        )
    if combination_type == "cat":
        new_rank = sum(max(_rank(layer, a) for _, layer in layers if a in layer.adapter_names) for a in adapters)
    elif combination_type in ("linear", "ties"):
        new_rank = ranks.pop()
    else:
        new_rank = svd_rank or max(ranks)
    new_config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=[engine.checkpoint_path(p) for p, _ in layers],
        exclude_modules=None,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        init_lora_weights=True,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        lora_bias=False,
    )
    peft_model.add_adapter(adapter_name, new_config)
    for _, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        A, B = combine_factors(
            [tuple(t.detach().float() for t in layer.lora_factors(a)) for a, _ in present],
            [layer.scaling[a] for a, _ in present],
            [w for _, w in present],
            combination_type,
            new_rank,
            density,
            majority_sign_method,
        )
        target_A, target_B = layer.lora_factors(adapter_name)
        with torch.no_grad():
            target_A.zero_()[: A.shape[0]] = A.to(target_A.dtype)
            target_B.zero_()[:, : B.shape[1]] = B.to(target_B.dtype)


def _rank(layer: Any, name: str) -> int:
    return layer.lora_factors(name)[0].shape[0]
