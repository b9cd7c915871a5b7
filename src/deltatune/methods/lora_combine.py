r"""Combining LoRA adapters into one (HF PEFT's ``add_weighted_adapter``): the factor arithmetic.

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

import math

import torch

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
