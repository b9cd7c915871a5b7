"""Modules trained in full and saved with an adapter (``modules_to_save``), e.g. a classifier head.

Each adapter gets its own trainable copy of the module; the original stays untouched so that
disabling the adapter, or switching to another, restores it. A copy's tensors are saved under the
original module's path (``base_model.model.score.weight``), as HF PEFT does.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune import engine
from deltatune.adapter_layer import AdapterLayer, RowRouting
from deltatune.config import PeftConfig


class ModulesToSaveWrapper(AdapterLayer):
    """``base_layer`` is the original module; ``modules_to_save[name]`` is adapter ``name``'s copy."""

    containers = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        replica = copy.deepcopy(self.base_layer)
        replica.requires_grad_(True)
        self.modules_to_save[name] = replica

    def checkpoint_key(self, container: str, key: str) -> str:
        return key

    def load_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor], where: str) -> None:
        # HF PEFT with bias="all" also saves "<path>.modules_to_save.bias" and "<path>.original_module.bias".
        own: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key.startswith("original_module."):
                continue  # the frozen original: it is the base model's, unchanged by training
            own[key.removeprefix("modules_to_save.")] = tensor
        super().load_adapter_state_dict(name, own, where)

    def forward(self, *args, **kwargs):
        routing = self.mixed_rows()
        if routing is not None:
            return self.mixed_forward(routing, *args, **kwargs)
        routed = self.routed_adapters()
        if not routed:
            return self.base_layer(*args, **kwargs)
        # A replaced module cannot be summed like a low-rank update: the last active copy wins.
        return self.modules_to_save[routed[-1]](*args, **kwargs)

    def __getattr__(self, name: str):
        # Attribute reads (e.g. `model.score.weight`) go to the module currently in use.
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            copies = self._modules.get("modules_to_save")
            routed = [a for a in self.active_adapters if a in copies] if copies is not None else []
            if routed and not self.disabled:
                return getattr(copies[routed[-1]], name)
            base = self._modules.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args, **kwargs):
        """Each row through its adapter's copy (or the original): one call per adapter in the batch."""
        index = routing.for_batch(x.shape[0])
        result = self.base_layer(x, *args, **kwargs)
        for j, name in enumerate(routing.names, start=1):
            rows = (index == j).nonzero().squeeze(1)
            if name in self.modules_to_save and rows.numel():
                result = result.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return result

    def routed_adapters(self) -> list[str]:
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a in self.modules_to_save]

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Merging means the copy becomes the module: done in :meth:`unwrap`."""
        self.merged_adapters = list(names)

    def unmerge(self) -> None:
        self.merged_adapters = []

    def unwrap(self) -> nn.Module:
        chosen = [a for a in self.merged_adapters if a in self.modules_to_save]
        return self.modules_to_save[chosen[-1]] if chosen else self.base_layer


def trained_biases(model: nn.Module, adapter_name: str, bias: str, adapted_only: str) -> dict[str, nn.Parameter]:
    """The base biases a ``bias`` field trains, by parameter path (HF PEFT's meaning, for LoRA and VeRA):
    ``"none"`` none; ``"all"`` every bias of the model outside adapters and the originals of trained
    copies; ``adapted_only`` (``"lora_only"``, ``"vera_only"``) those of the layers this adapter wraps."""
    if bias == "none":
        return {}
    layers = engine.adapter_layers(model)
    # A ModulesToSaveWrapper's copies are saved whole; its original module stays as it was.
    copied = [layer for _, layer in layers if isinstance(layer, ModulesToSaveWrapper)]
    frozen_originals = {id(p) for layer in copied for p in layer.base_layer.parameters()}
    adapter_params = {
        id(p) for _, layer in layers for name in layer.adapter_names for p in layer.adapter_parameters(name)
    }
    if bias == "all":
        return {
            name: p
            for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1] == "bias" and id(p) not in adapter_params and id(p) not in frozen_originals
        }
    if bias != adapted_only:
        raise ValueError(f"bias must be 'none', 'all' or {adapted_only!r}, got {bias!r}")
    found: dict[str, nn.Parameter] = {}
    for path, layer in layers:
        if isinstance(layer, ModulesToSaveWrapper):
            continue
        base = engine.innermost(layer)
        if adapter_name in layer.adapter_names and getattr(base, "bias", None) is not None:
            found[f"{engine.checkpoint_path(path)}.base_layer.bias"] = base.bias
    return found
