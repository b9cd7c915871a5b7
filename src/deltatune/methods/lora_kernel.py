r"""The fused LoRA linear layer: base and low-rank products in one autograd node.

For a frozen linear layer :math:`y = x W^\top + b` with a LoRA update, dropout keep-mask :math:`m`
and its rescaling :math:`k = 1 / (1 - p)`:

.. math::  y = x W^\top + b + s\, k\, (m \odot x) A^\top B^\top

:class:`FusedLoraLinear` computes it and its gradients without the intermediate tensors an unfused
graph keeps (a dropped-out copy of the input, a scaled copy of the update, a separate sum).
:class:`~deltatune.methods.lora.LoraLinear` decides when it applies.
"""

from __future__ import annotations

from typing import Any

import torch


class FusedLoraLinear(torch.autograd.Function):
    r"""``y = x W^T + b + s k (m \odot x) A^T B^T`` as one autograd node.

    ``m`` is the dropout keep-mask (boolean, or none) and ``k = 1 / (1 - p)`` its rescaling, applied
    to the rank-r product rather than to an input-sized copy. Forward: the base product, then the
    low-rank product accumulated into it in place (``addmm_`` with ``alpha=s``): no scaled copy, no
    separate sum. Saved for backward: the input (which the caller keeps anyway), the small
    ``k (m \odot x) A^T`` and the one-byte mask, where an unfused dropout keeps a dropped-out float
    copy of the input as well. Backward, with ``u = s k\, g B``: ``dx = g W + (u A) \odot m``
    accumulated in place, ``dA = u^T (m \odot x)``, ``dB = s\, g^T (k (m \odot x) A^T)``; the
    frozen ``W`` gets no gradient. Equal to the unfused graph within float rounding (tested).

    ``weight`` may also be a function that returns the dense weight: a quantized base's
    dequantization (bitsandbytes 4-bit), called in forward and again in backward, so no dense copy
    lives between them (bitsandbytes' own autograd function does the same), and the base and
    low-rank products still share one node.

    On a half-precision base with float32 adapters the low-rank products run in float32, as in HF
    PEFT: ``x`` and ``g`` are cast for them, the update is summed into the base output in float32
    and rounded once, and the float32 copy of ``x`` is made again in backward instead of kept.
    """

    @staticmethod
    def products(x, weight, bias, A, B, scale, mask=None, keep_scale=1.0):  # noqa: ANN001, ANN205
        """The forward's products, shared with the no-gradient path: the output and ``k (m x) A^T``."""
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)  # the adapter's precision (float32 on a half base)
        low = xa @ A.T if mask is None else ((xa * mask.reshape(x2.shape)) @ A.T).mul_(keep_scale)
        out = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
        if out.dtype == low.dtype:
            out.addmm_(low, B.T, alpha=scale)
        else:
            out.add_(low @ B.T, alpha=scale)  # summed in float32, rounded once to the base's dtype
        return out.reshape(*x.shape[:-1], out.shape[-1]), low

    @staticmethod
    def forward(ctx: Any, x, weight, bias, A, B, scale, mask, keep_scale):  # noqa: ANN001, ANN205
        source = weight if callable(weight) else None
        dense = weight if source is None else source()
        out, low = FusedLoraLinear.products(x, dense, bias, A, B, scale, mask, keep_scale)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.weight_source = source
        saved_weight = weight if source is None else None
        ctx.save_for_backward(x2, saved_weight, A, B, low, None if mask is None else mask.reshape(x2.shape))
        ctx.scale, ctx.keep_scale = scale, keep_scale
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001, ANN205
        x2, weight, A, B, low, mask = ctx.saved_tensors
        if ctx.weight_source is not None and ctx.needs_input_grad[0]:
            weight = ctx.weight_source()  # only the input's gradient reads it: not dequantized otherwise
        g = grad.reshape(-1, grad.shape[-1])
        ga = g if g.dtype == B.dtype else g.to(B.dtype)
        scale = ctx.scale
        u = (ga @ B).mul_(scale if mask is None else scale * ctx.keep_scale)  # (N, r)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None and grad_x.dtype == u.dtype:
                grad_x.addmm_(u, A)
            else:
                update = u @ A
                grad_x.add_(update.mul_(mask) if mask is not None else update)
            grad_x = grad_x.reshape(*grad.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = g.T @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        if ctx.needs_input_grad[3]:
            xa = x2 if x2.dtype == A.dtype else x2.to(A.dtype)
            grad_A = u.T @ (xa * mask if mask is not None else xa)
        if ctx.needs_input_grad[4]:
            grad_B = (ga.T @ low).mul_(scale)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None
