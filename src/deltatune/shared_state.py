"""Tensors an adapter shares across all its layers (VeRA's projections): where they live, how they are
saved and loaded.

They live once, on the :class:`~deltatune.peft_model.PeftModel`'s ``base_model`` (its
:class:`~deltatune.peft_model.AdapterHost`), one :class:`SharedBuffers` per kind under the kind's name
(``vera_A``), so a checkpoint names them ``base_model.vera_A`` as HF PEFT does and ``.to()`` moves
them once. A method declares them with ``Method.shared_state``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.checkpoint import CheckpointError
from deltatune.config import PeftConfig

PREFIX = "base_model."  # checkpoint keys: base_model.<kind>, the adapter name left out


class SharedBuffers(nn.Module):
    """Tensors one adapter shares across all its layers, one kind per instance, by adapter name.

    VeRA's frozen random projections are one pair per model, not per layer. They live once, on the
    :class:`~deltatune.peft_model.PeftModel`'s ``base_model`` under the kind's name (``vera_A``), so
    a checkpoint names them ``base_model.vera_A`` as HF PEFT does, and ``.to()`` moves them once.
    Layers keep a reference to this module (not registered as their child: no second copy in the
    state dict) and read ``shared[adapter_name]`` in their forward, so they see moved tensors.
    """

    def add(self, adapter_name: str, tensor: torch.Tensor, saved: bool) -> None:
        """``saved=False``: rebuilt from the config on load rather than written (non-persistent)."""
        self.register_buffer(adapter_name, tensor, persistent=saved)

    def __getitem__(self, adapter_name: str) -> torch.Tensor:
        return self._buffers[adapter_name]

    def __contains__(self, adapter_name: str) -> bool:
        return adapter_name in self._buffers

    def remove(self, adapter_name: str) -> None:
        self._buffers.pop(adapter_name, None)
        self._non_persistent_buffers_set.discard(adapter_name)

    def saved(self, adapter_name: str) -> bool:
        return adapter_name in self._buffers and adapter_name not in self._non_persistent_buffers_set


def containers(host: nn.Module) -> dict[str, SharedBuffers]:
    """The shared-tensor containers on ``host``, by kind."""
    return {k: m for k, m in host._modules.items() if isinstance(m, SharedBuffers)}


def add(
    host: nn.Module, model: nn.Module, adapter_name: str, method: Any, config: PeftConfig
) -> dict[str, SharedBuffers]:
    """Build adapter ``adapter_name``'s shared tensors (``method.shared_state``) into ``host``'s containers."""
    found: dict[str, SharedBuffers] = {}
    for kind, shared in method.shared_state(model, config).items():
        if kind not in host._modules:
            host.add_module(kind, SharedBuffers())
        host._modules[kind].add(adapter_name, shared.tensor, shared.saved)
        found[kind] = host._modules[kind]
    return found


def remove(host: nn.Module, adapter_name: str) -> None:
    for kind, container in containers(host).items():
        container.remove(adapter_name)
        if not container._buffers:
            delattr(host, kind)


def state_dict(host: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's saved shared tensors under their checkpoint keys."""
    return {
        f"{PREFIX}{kind}": c[adapter_name].detach() for kind, c in containers(host).items() if c.saved(adapter_name)
    }


def load(host: nn.Module, state: dict[str, torch.Tensor], adapter_name: str, source: Path) -> dict[str, torch.Tensor]:
    """Copy the checkpoint's ``base_model.<kind>`` tensors into the adapter's shared ones; return the rest."""
    rest = dict(state)
    for kind, container in containers(host).items():
        key = f"{PREFIX}{kind}"
        if adapter_name not in container:
            continue
        if key in rest:
            target, tensor = container[adapter_name], rest.pop(key)
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{source}: shape mismatch for {key}: checkpoint has {tuple(tensor.shape)}, the model needs "
                    f"{tuple(target.shape)}; the adapter was saved for a different base model or rank"
                )
            with torch.no_grad():
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        elif container.saved(adapter_name):
            raise CheckpointError(
                f"{source}: the adapter config says its {kind} tensor is saved, and the checkpoint has no {key}; "
                "the file is incomplete (or save it again with the setting that rebuilds it)"
            )
    return rest
