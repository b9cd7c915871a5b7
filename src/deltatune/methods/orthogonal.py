r"""What OFT and BOFT share: an orthogonal rotation of a linear layer's input, optionally a per-output scale.

Orthogonal fine-tuning (Qiu et al. 2023) keeps the angles between a layer's neurons (its
hyperspherical energy) and changes only their orientation: the adapted weight is

.. math::  W' = \mathrm{diag}(s)\, W R^\top, \qquad y = x W'^\top + b = \big((x R) W^\top\big) \odot s + b

with :math:`R \in \mathbb{R}^{d_{in} \times d_{in}}` orthogonal (a Cayley transform of a trained
skew-symmetric matrix, :func:`cayley`) and :math:`s` a trained per-output scale (BOFT's; OFT has
none). The rotation acts on the input, so the forward is the base layer on rotated inputs, one call,
on any base (dense, ``Conv1D``, 4-bit, 8-bit); the bias is neither rotated nor scaled. With several
active adapters the last one rotates first, :math:`x R_n \cdots R_1`, which is what merging them
one after another (:math:`W \leftarrow W R_1^\top`, then :math:`R_2^\top`, ...) computes, so merged
and unmerged models agree (HF PEFT 0.21's OFT applies them in the other order and its merge then
differs from its forward).

A subclass supplies :meth:`RotationLayer.rotate` (``x R``, efficiently: block by block),
:meth:`RotationLayer.rotation_matrix` (:math:`R` whole, for merging) and optionally
:meth:`RotationLayer.output_scale`; the forward, mixed-adapter rows, merge, unmerge and the weight
change ``save_as_lora`` reads follow here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune import base_layers
from deltatune.adapter_layer import AdapterLayer, RowRouting


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """:math:`(I - S)(I + S)^{-1}` for a batch of skew-symmetric ``(..., b, b)`` matrices: orthogonal."""
    eye = torch.eye(skew.shape[-1], dtype=torch.float32, device=skew.device)
    solved = torch.linalg.solve(eye + skew.float(), eye - skew.float(), left=False)
    return solved.to(skew.dtype)


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` for ``blocks`` of shape ``(n, b, b)`` and ``x`` of shape ``(..., n * b)``."""
    count, size = blocks.shape[0], blocks.shape[-1]
    shaped = x.reshape(*x.shape[:-1], count, size)
    return torch.einsum("...rk,rkc->...rc", shaped, blocks).reshape(x.shape)


class RotationLayer(AdapterLayer):
    """A linear layer whose input each adapter rotates (and whose output it may scale)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        view = base_layers.linear_base(base_layer)
        self.fan_in_fan_out = view.transposed
        self.in_features, self.out_features = view.in_features, view.out_features

    @property
    def base(self) -> base_layers.LinearBase:
        return base_layers.linear_base(self._modules["base_layer"])

    # -- what a method supplies -----------------------------------------------------------------
    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ R`` for adapter ``name`` (``x`` of shape ``(..., in)``), training-time dropout included."""
        raise NotImplementedError

    def rotation_matrix(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s whole :math:`R`, ``(in, in)``, without dropout."""
        raise NotImplementedError

    def output_scale(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s per-output scale ``(out,)``, or None."""
        return None

    # -- the dispatch -----------------------------------------------------------------------------
    def _rotated(self, names: list[str], x: torch.Tensor) -> torch.Tensor:
        for name in reversed(names):  # the last adapter rotates first: merging in order computes the same
            x = self.rotate(name, x)
        return x

    def _scaled(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return (y * scale).to(y.dtype)
        return ((y - bias) * scale + bias).to(y.dtype)

    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(self._rotated(names, x), *args, **kwargs)
        scales = [s for s in (self.output_scale(n) for n in names) if s is not None]
        if not scales:
            return y
        scale = scales[0]
        for other in scales[1:]:
            scale = scale * other
        return self._scaled(y, scale)

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row rotated by its own adapter (base rows as they are), one base call, each row's scale."""
        index = routing.for_batch(x.shape[0])
        present = set(self.adapter_names)
        rotated, scales = x, None
        for position, name in enumerate(routing.names, start=1):
            rows = (index == position).nonzero().squeeze(1)
            if name not in present or not rows.numel():
                continue
            rotated = rotated.index_copy(0, rows, self.rotate(name, x.index_select(0, rows)))
            scale = self.output_scale(name)
            if scale is not None:
                if scales is None:
                    scales = torch.ones(x.shape[0], self.out_features, dtype=scale.dtype, device=scale.device)
                scales = scales.index_copy(0, rows, scale.expand(rows.numel(), -1))
        y = self.base_layer(rotated, *args, **kwargs)
        if scales is None:
            return y
        return self._scaled(y, scales.view(x.shape[0], *([1] * (y.dim() - 2)), self.out_features))

    # -- merging ----------------------------------------------------------------------------------
    def _merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """:math:`\\mathrm{diag}(s) W R^\\top` in float32."""
        merged = weight.float() @ self.rotation_matrix(name).float().T
        scale = self.output_scale(name)
        return merged if scale is None else merged * scale.float()[:, None]

    def weight_delta(self, name: str) -> torch.Tensor | None:
        with torch.no_grad():
            weight = self.base.dense_weight()
            return self._merged_weight(name, weight) - weight.float()

    def merge_one(self, name: str, safe_merge: bool) -> float:
        view = self.base
        with torch.no_grad():
            weight = view.dense_weight()
            merged = self._merged_weight(name, weight).to(weight.dtype)
        if safe_merge:
            self.check_finite(name, merged)
        return view.set_dense_weight(merged)

    def unmerge_one(self, name: str) -> float:
        view = self.base
        with torch.no_grad():
            weight = view.dense_weight().float()
            scale = self.output_scale(name)
            if scale is not None:
                weight = weight / scale.float()[:, None]
            # A true inverse: OFT's truncated Cayley-Neumann series is only nearly orthogonal.
            restored = weight @ torch.linalg.inv(self.rotation_matrix(name).float().T)
        return view.set_dense_weight(restored.to(view.weight_dtype))
