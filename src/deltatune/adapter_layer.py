"""The wrapper every layer method builds on: a frozen base module plus named adapters.

An :class:`AdapterLayer` owns ``base_layer`` (the module it replaced) and, for each method-specific
tensor kind, a ``ModuleDict`` or ``ParameterDict`` keyed by adapter name (``lora_A["default"]``).
That layout is what makes several adapters coexist, and it is also HF PEFT's module tree, so a
checkpoint key is the module path plus the container name with the adapter name left out
(``...q_proj.lora_A.weight``).

The wrapper keeps its own routing state, set by :class:`~deltatune.peft_model.PeftModel`:
``active_adapters`` (their outputs add up), ``disabled`` (the base module alone) and
``merged_adapters`` (folded into the base weight, so the forward skips them).

The base class owns the dispatch every method would otherwise repeat. :meth:`AdapterLayer.forward`
picks the mixed-rows form when a batch carries one adapter per row and otherwise the adapters that
are active, present here and not merged; :meth:`AdapterLayer.merge` and :meth:`AdapterLayer.unmerge`
walk the adapters in order and keep the rounding error a quantized base reports. A method supplies:

* :meth:`AdapterLayer.adapted_forward`: the output with a given set of adapters (none: the base);
* :meth:`AdapterLayer.mixed_forward`, only where it has a faster form than the default, which
  runs each row group through :meth:`adapted_forward` (one call per adapter in the batch);
* :meth:`AdapterLayer.merge_one` / :meth:`AdapterLayer.unmerge_one`, where its update folds into
  the weight;
* ``containers`` and ``per_adapter``: its per-adapter state, which :meth:`delete_adapter` clears.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune.config import PeftConfig


@dataclasses.dataclass
class RowRouting:
    """One adapter per batch row (mixed-adapter batches).

    ``index[i]`` is 0 for a row that gets the base model and ``j`` for a row that gets ``names[j-1]``.
    Layers build per-adapter tensors stacked along a leading axis (entry 0 all zeros, so base rows get
    no update) and gather them by ``index``: one batched matmul for the whole batch.
    """

    names: list[str]
    index: torch.Tensor

    def for_batch(self, batch: int) -> torch.Tensor:
        """The index for a batch of ``batch`` rows; ``generate`` repeats each row for beams/samples."""
        rows = self.index.shape[0]
        if batch == rows:
            return self.index
        if batch % rows == 0:
            return self.index.repeat_interleave(batch // rows)
        raise ValueError(f"adapter_names has {rows} entries but a layer saw a batch of {batch} rows")


class AdapterLayer(nn.Module):
    """Base class of method wrappers. Subclasses list their per-adapter containers in ``containers``
    (modules and parameters by adapter name) and any plain per-adapter values in ``per_adapter``
    (dicts by adapter name, such as LoRA's scales): :meth:`delete_adapter` clears both."""

    containers: tuple[str, ...] = ()
    per_adapter: tuple[str, ...] = ()
    # How several active adapters combine: "parallel" (their updates add) or "stack" (each reads
    # the previous one's output), set by PeftModel.set_adapter; only stackable layers (bottleneck
    # adapters) read it.
    composition: str = "parallel"
    stackable: bool = False
    # Where this wrapper sits when several methods adapt one module: lower is closer to the base
    # layer. Methods that change the weight (LoRA, IA3) sit innermost, so merging reaches the weight;
    # methods that transform the layer's output (bottleneck adapters) wrap them.
    nesting: int = 0

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_routing: RowRouting | None = None
        # The largest change that requantizing a 4-bit/8-bit base weight made in the last merge or
        # unmerge (0 on a float base): what folding an adapter into a quantized base cost.
        self.rounding_error = 0.0

    def __getattr__(self, name: str):
        # Model code reads attributes of the layer it built (T5 reads `self.wo.weight.dtype`):
        # anything the wrapper lacks comes from the base layer, as if it were not wrapped.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.containers:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        for attr in self.containers + self.per_adapter:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for attr in self.containers:
            container = getattr(self, attr)
            if name in container:
                entry = container[name]
                if isinstance(entry, nn.Parameter):
                    yield entry
                else:
                    yield from entry.parameters()

    def adapter_modules(self, name: str) -> Iterator[nn.Module]:
        """Adapter ``name``'s submodules (its ``ModuleDict`` entries: linear maps, dropouts)."""
        for attr in self.containers:
            container = getattr(self, attr)
            if isinstance(container, nn.ModuleDict) and name in container:
                yield container[name]

    def set_trainable(self, name: str, trainable: bool) -> None:
        for param in self.adapter_parameters(name):
            param.requires_grad_(trainable)

    # -- checkpoint view ------------------------------------------------------------------------
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under their checkpoint names, relative to this layer's path."""
        state: dict[str, torch.Tensor] = {}
        for attr in self.containers:
            container = getattr(self, attr)
            if name not in container:
                continue
            entry = container[name]
            if isinstance(entry, nn.Parameter):
                state[attr] = entry.detach()
            else:
                for key, tensor in entry.state_dict().items():
                    state[self.checkpoint_key(attr, key)] = tensor
        return state

    def checkpoint_key(self, container: str, key: str) -> str:
        return f"{container}.{key}"

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        """Copy ``state`` into adapter ``name``; every tensor must be present with the same shape.

        ``where`` names this layer in error messages (e.g. ``base_model.model.layers.0.q_proj``).
        """
        own = self.adapter_state_dict(name)
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(
                f"checkpoint has no tensor {where}.{missing[0]} for adapter {name!r}; the adapter was saved "
                "for a different base model (e.g. fewer layers) or with other target modules"
            )
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise KeyError(
                f"checkpoint tensor {where}.{unexpected[0]} has no place in this {self.method_name} layer "
                f"(it expects: {', '.join(sorted(own))})"
            )
        for key, tensor in state.items():
            target = own[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {where}.{key}: checkpoint has {tuple(tensor.shape)}, the model "
                    f"needs {tuple(target.shape)}; the adapter was saved for a different base model or rank"
                )
            with torch.no_grad():
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))

    @property
    def method_name(self) -> str:
        return type(self).__name__

    # -- merging --------------------------------------------------------------------------------
    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold adapters ``names`` (those present here and not yet merged) into the base layer, in order."""
        self.rounding_error = 0.0
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            self.rounding_error = max(self.rounding_error, self.merge_one(name, safe_merge))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base layer again, the last merged first."""
        self.rounding_error = 0.0
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.rounding_error = max(self.rounding_error, self.unmerge_one(name))

    def merge_one(self, name: str, safe_merge: bool) -> float:
        """Fold adapter ``name`` into the base layer; return the rounding error a quantized base reports.

        With ``safe_merge`` a result that is not finite raises before anything changes.
        """
        raise ValueError(f"{self.method_name} cannot be merged into its base layer")

    def unmerge_one(self, name: str) -> float:
        raise ValueError(f"{self.method_name} cannot be unmerged")

    def weight_delta(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s whole effect as a change to a linear base weight, ``(out, in)``; None where
        it is not one (a nonlinear module, a bias term, an embedding). ``save_as_lora`` reads it."""
        return None

    @staticmethod
    def check_finite(name: str, *tensors: torch.Tensor | None) -> None:
        """``safe_merge``'s test: every merged tensor finite, else the adapter is named as broken."""
        if not all(t is None or bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(f"merging adapter {name!r} gives non-finite weights; the adapter is broken")

    def tensor_snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of this layer's tensors, base and adapters: ``safe_merge``'s undo (a merge may swap them)."""
        state = self.state_dict(keep_vars=True)
        return {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}

    def restore_tensors(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, tensor in self.state_dict(keep_vars=True).items():
                if key in snapshot:
                    tensor.copy_(snapshot[key])

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unwrap(self) -> nn.Module:
        """The base module to put back in the model once every adapter is gone or merged."""
        return self.base_layer

    # -- routing --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.mixed_rows()
        if routing is not None:
            return self.mixed_forward(routing, x, *args, **kwargs)
        return self.adapted_forward(self.routed_adapters(), x, *args, **kwargs)

    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output with adapters ``names`` applied (an empty list: the base layer's)."""
        raise NotImplementedError

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row with its own adapter: the rows of each adapter through :meth:`adapted_forward`.

        Correct for any method whose base is a plain module reading one input row per output row;
        methods with a batched form (stacked low-rank factors) override it.
        """
        extra_tensors = any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))
        if isinstance(self.base_layer, AdapterLayer) or extra_tensors:
            raise RuntimeError(f"{self.method_name} has no mixed-adapter form for a layer called with extra tensors")
        index = routing.for_batch(x.shape[0])
        present = set(self.adapter_names)
        rows_of, outputs = [], []
        for position, name in enumerate(["__base__", *routing.names]):
            rows = (index == position).nonzero().squeeze(1)
            if rows.numel():
                names = [name] if name in present else []
                rows_of.append(rows)
                outputs.append(self.adapted_forward(names, x.index_select(0, rows), *args, **kwargs))
        if len(outputs) == 1:
            return outputs[0]
        order = torch.argsort(torch.cat(rows_of))
        return torch.cat(outputs).index_select(0, order)

    def mixed_rows(self) -> RowRouting | None:
        """The per-row routing of the current forward, if any (merged adapters cannot be mixed)."""
        routing = self.row_routing
        if routing is None or self.disabled:
            return None
        if self.merged_adapters:
            raise RuntimeError("adapters are merged into the weights; unmerge_adapter() before mixed-adapter batches")
        return routing

    def routed_adapters(self) -> list[str]:
        """Adapters whose update the forward must compute: active, present here and not merged."""
        if self.disabled:
            return []
        active, merged = self.active_adapters, self.merged_adapters
        if len(active) == 1 and not merged:  # the common case, hundreds of times per decoded token
            name = active[0]
            return [name] if any(name in self._modules[c] for c in self.containers if c in self._modules) else []
        present = self.adapter_names
        return [a for a in active if a not in merged and a in present]

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
