"""The wrapper every layer method builds on: a frozen base module plus named adapters.

An :class:`AdapterLayer` owns ``base_layer`` (the module it replaced) and, for each method-specific
tensor kind, a ``ModuleDict`` or ``ParameterDict`` keyed by adapter name (``lora_A["default"]``).
That layout is what makes several adapters coexist, and it is also HF PEFT's module tree, so a
checkpoint key is the module path plus the container name with the adapter name left out
(``...q_proj.lora_A.weight``).

The wrapper keeps its own routing state, set by :class:`~deltatune.peft_model.PeftModel`:
``active_adapters`` (their outputs add up), ``disabled`` (the base module alone) and
``merged_adapters`` (folded into the base weight, so the forward skips them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

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
        raise NotImplementedError(f"{self.method_name} cannot be merged into its base layer")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{self.method_name} cannot be unmerged")

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def unwrap(self) -> nn.Module:
        """The base module to put back in the model once every adapter is gone or merged."""
        return self.base_layer

    # -- routing --------------------------------------------------------------------------------
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
        return [a for a in self.active_adapters if a not in self.merged_adapters and a in self.adapter_names]

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"
