r"""The layer every weight-delta method builds on: an adapter is a change :math:`\Delta W` to a linear weight.

A weight-delta method (LoHa, LoKr, VeRA, ...) adapts a linear layer :math:`y = x W^\top + b`,
:math:`W \in \mathbb{R}^{d_{out} \times d_{in}}`, by adding a structured matrix built from its
trained tensors:

.. math::  y = x (W + \sum_a \Delta W_a)^\top + b = \mathrm{base}(x) + \sum_a x \Delta W_a^\top

so the method supplies :math:`\Delta W` alone (:meth:`DeltaLayer.delta_weight`, in ``(out, in)``
orientation) and, where it has a cheaper way to compute :math:`x \Delta W^\top` than forming the
matrix, :meth:`DeltaLayer.delta_output`. Everything else follows from the delta and is here, once:

* the forward over the active adapters, in the adapters' dtype (float32 next to a half-precision or
  quantized base), with the base layer computed once;
* mixed-adapter batches: each adapter's update is added to its own rows only (``index_add``), the
  base rows get none, so every weight-delta method batches adapters with no code of its own;
* merging (:math:`W \leftarrow W + \Delta W`, requantized on a 4-bit/8-bit base with the rounding
  error reported) and unmerging (:math:`W \leftarrow W - \Delta W`), ``safe_merge``'s check;
* ``get_delta_weight`` in the base weight's own layout (GPT-2's ``Conv1D`` stores ``(in, out)``),
  which ``save_as_lora`` and merging read.

The frozen layer is seen through :mod:`deltatune.base_layers`, so ``nn.Linear``, ``Conv1D`` and
bitsandbytes' 4-bit and 8-bit layers are all bases for every method built on this class.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import base_layers
from deltatune.adapter_layer import AdapterLayer, RowRouting


class DeltaLayer(AdapterLayer):
    """A linear layer (or ``Conv1D``, or a quantized linear layer) plus weight-delta adapters.

    Subclasses implement ``add_adapter`` and :meth:`delta_weight`, list their per-adapter tensors in
    ``containers``, and may override :meth:`delta_output` (a faster form, or training-only dropout).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        view = base_layers.linear_base(base_layer)
        self.fan_in_fan_out = view.transposed  # Conv1D stores (in, out)
        self.in_features, self.out_features = view.in_features, view.out_features

    @property
    def base(self) -> base_layers.LinearBase:
        """The frozen layer through :mod:`deltatune.base_layers` (dense, Conv1D, 4-bit or 8-bit)."""
        return base_layers.linear_base(self._modules["base_layer"])

    def factory(self) -> dict[str, Any]:
        """``device`` and ``dtype`` for a new adapter tensor next to this base layer."""
        view = self.base
        return {"device": view.device, "dtype": view.adapter_dtype}

    # -- what a method supplies -----------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s :math:`\\Delta W`, ``(out, in)``, differentiable, in the adapter's dtype."""
        raise NotImplementedError

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """:math:`x \\Delta W^\\top` for ``x`` of shape ``(..., in)`` in the adapter's dtype; None when the
        adapter adds nothing to this forward (a training step that drops it)."""
        return F.linear(x, self.delta_weight(name))

    def adapter_dtype(self, name: str) -> torch.dtype:
        """The dtype adapter ``name``'s tensors are stored and computed in."""
        for container in self.containers:
            entry = self._modules[container]._parameters.get(name) if container in self._modules else None
            if entry is not None:
                return entry.dtype
        return self.base.adapter_dtype

    # -- the dispatch, from the delta -----------------------------------------------------------
    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            update = self.delta_output(name, x.to(self.adapter_dtype(name)))
            if update is not None:
                result = result + update.to(result.dtype)
        return result

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer on the whole batch, then each adapter's update added to its own rows."""
        result = self.base_layer(x, *args, **kwargs)
        index = routing.for_batch(x.shape[0])
        present = set(self.adapter_names)
        for position, name in enumerate(routing.names, start=1):
            if name not in present:
                continue
            rows = (index == position).nonzero().squeeze(1)
            if rows.numel():
                update = self.delta_output(name, x.index_select(0, rows).to(self.adapter_dtype(name)))
                if update is not None:
                    result = result.index_add(0, rows, update.to(result.dtype))
        return result

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter ``name`` makes to the base weight, in the base weight's layout."""
        delta = self.delta_weight(name)
        return delta.T if self.fan_in_fan_out else delta

    def weight_delta(self, name: str) -> torch.Tensor | None:
        return self.delta_weight(name).detach()

    def merge_one(self, name: str, safe_merge: bool) -> float:
        view = self.base
        weight = view.dense_weight()
        with torch.no_grad():
            merged = weight + self.delta_weight(name).to(weight.dtype)
        if safe_merge:
            self.check_finite(name, merged)
        return view.set_dense_weight(merged)

    def unmerge_one(self, name: str) -> float:
        view = self.base
        weight = view.dense_weight()
        with torch.no_grad():
            return view.set_dense_weight(weight - self.delta_weight(name).to(weight.dtype))
