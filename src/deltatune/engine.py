"""Finding the modules an adapter attaches to, and wrapping or unwrapping them.

Matching follows HF PEFT's rules so that a config means the same in both libraries:

* ``target_modules`` as a string is a regular expression that must match a module's full path;
* as a list, an entry matches a path equal to it or ending in ``"." + entry``;
* ``"all-linear"`` means every linear layer except the model's output layer (LM head);
* ``layers_to_transform`` keeps only modules inside the listed layer indices, the index being the
  number after ``layers_pattern`` (or, without one, the first ``<name>.<number>.`` in the path);
* ``exclude_modules`` removes matches, with the same string/list rule.

Nothing here knows a model by name: the rules read module paths and types only.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from deltatune import base_layers
from deltatune.adapter_layer import AdapterLayer

logger = logging.getLogger("deltatune")


class TargetModuleError(ValueError):
    """The config names modules that the model does not have, or that the method cannot wrap."""


def linear_types() -> tuple[type[nn.Module], ...]:
    """Module types that behave as linear layers: ``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes' 4/8-bit
    layers (see :mod:`deltatune.base_layers`)."""
    return base_layers.linear_types()


def _matches(key: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return any(key == entry or key.endswith("." + entry) for entry in spec)


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The transformer-block index in a module path (``model.layers.3.mlp`` -> 3), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", "." + key)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)\.", key)
        if found:
            return int(found.group(1))
    return None


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """A per-module override (``rank_pattern``, ``alpha_pattern``): the value of the first key, a regex,
    that matches the end of ``module_path`` at a name boundary; ``default`` when none does (PEFT's rule)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module_path):
            return value
    return default


def output_layer_names(model: nn.Module) -> set[str]:
    """Paths of the model's output projection (LM head), which ``all-linear`` leaves alone."""
    names: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                names.add(name)
    return names


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    wrappable: tuple[type[nn.Module], ...],
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
    method: str = "this method",
) -> list[str]:
    """Paths of the modules to wrap, in model order; raises :class:`TargetModuleError` if none.

    Modules already wrapped by an :class:`AdapterLayer` are matched by their own path (the wrapper
    replaced them), and their inner ``base_layer`` is never matched again.
    """
    skip = set(skip)
    named = visible_modules(model)
    if target_modules is None:
        raise TargetModuleError(f"{method}: no target_modules (the method resolves its own defaults first)")
    all_linear = isinstance(target_modules, str) and target_modules.lower() in ("all-linear", "all_linear")
    if all_linear:
        skip |= output_layer_names(model)
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]

    found: list[str] = []
    wrong_type: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        inner = innermost(module)
        if all_linear:
            hit = isinstance(inner, linear_types()) or base_layers.looks_like_unsupported_quantized_linear(inner)
        else:
            hit = _matches(name, target_modules)
        if not hit:
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        if layers_to_transform is not None:
            index = layer_index(name, layers_pattern)
            if index is None or index not in layers_to_transform:
                continue
        if isinstance(inner, wrappable):
            found.append(name)
        else:
            wrong_type.append((name, inner))

    if not all_linear and not isinstance(target_modules, str):
        _warn_unmatched(named, target_modules, found + [n for n, _ in wrong_type])
    if found and not wrong_type:
        return found
    if wrong_type:
        name, module = wrong_type[0]
        children = [f"{name}.{child}" for child, sub in module.named_modules() if child and isinstance(sub, wrappable)]
        hint = f"; its wrappable submodules are: {', '.join(children[:8])}" if children else ""
        kinds = ", ".join(t.__name__ for t in wrappable)
        if base_layers.looks_like_unsupported_quantized_linear(module):
            hint = f"; it is a quantized layer deltatune cannot adapt ({base_layers.QUANTIZED_LAYER_HINT})"
        raise TargetModuleError(
            f"target module {name!r} is a {type(module).__name__}, but {method} wraps only {kinds}{hint}"
        )
    raise TargetModuleError(_no_match_message(named, target_modules, layers_to_transform, method))


def attach_to_linear_layers(
    model: nn.Module,
    adapter_name: str,
    config: Any,
    layer_class: type[AdapterLayer],
    method: str,
    default_targets: Callable[[nn.Module, tuple[type[nn.Module], ...]], list[str]],
) -> list[str]:
    """Wrap the linear layers ``config`` selects in ``layer_class`` and add adapter ``adapter_name``.

    ``config`` has HF PEFT's selection fields (``target_modules``, ``layers_to_transform``,
    ``layers_pattern``, ``modules_to_save``, and ``exclude_modules`` where the method has it);
    ``target_modules`` None takes ``default_targets(model, linear types)``. The config is completed
    in place: ``target_modules`` becomes the names found (for ``"all-linear"`` and None), so tools
    that do not resolve them (vLLM) read the same adapter.
    """
    linear = linear_types()
    targets = config.target_modules if config.target_modules is not None else default_targets(model, linear)
    paths = find_targets(
        model,
        targets,
        wrappable=linear,
        exclude_modules=getattr(config, "exclude_modules", None),
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=config.modules_to_save or (),
        method=method,
    )
    if isinstance(targets, str) and targets.lower() in ("all-linear", "all_linear"):
        config.target_modules = sorted({path.rsplit(".", 1)[-1] for path in paths})
    elif config.target_modules is None:
        config.target_modules = list(targets)
    wrap_targets(model, paths, layer_class, lambda layer, path: layer.add_adapter(adapter_name, config, path))
    return paths


def first_present_group(
    model: nn.Module, groups: Sequence[Sequence[str]], wrappable: tuple[type[nn.Module], ...]
) -> list[str] | None:
    """The first of ``groups`` of module names all present (as wrappable leaves) in ``model``, else None."""
    leaves = wrappable_leaf_names(model, wrappable)
    for group in groups:
        if all(entry in leaves for entry in group):
            return list(group)
    return None


def wrappable_leaf_names(model: nn.Module, wrappable: tuple[type[nn.Module], ...]) -> list[str]:
    """The last path component of every module of ``model`` that is one of ``wrappable``, sorted."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in visible_modules(model) if isinstance(innermost(module), wrappable)}
    )


def visible_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, skipping everything inside an :class:`AdapterLayer` (its base and adapters)."""
    visible: list[tuple[str, nn.Module]] = []
    wrapper_prefix = None
    for name, module in model.named_modules():  # pre-order: a wrapper's insides follow it
        if not name or (wrapper_prefix is not None and name.startswith(wrapper_prefix)):
            continue
        visible.append((name, module))
        wrapper_prefix = name + "." if isinstance(module, AdapterLayer) else None
    return visible


def _leaf_names(named: Sequence[tuple[str, nn.Module]]) -> list[str]:
    leaves: list[str] = []
    for name, _ in named:
        leaf = name.rsplit(".", 1)[-1]
        if not leaf.isdigit() and leaf not in leaves:
            leaves.append(leaf)
    return leaves


def _warn_unmatched(named: Sequence[tuple[str, nn.Module]], spec: Sequence[str], found: list[str]) -> None:
    leaves = _leaf_names(named)
    for entry in spec:
        if not any(name == entry or name.endswith("." + entry) for name in found):
            close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.5)
            hint = f" (closest module names: {', '.join(close)})" if close else ""
            logger.warning("target module %r matched no module of the model%s", entry, hint)


def _no_match_message(
    named: Sequence[tuple[str, nn.Module]],
    spec: str | Sequence[str],
    layers_to_transform: Sequence[int] | None,
    method: str,
) -> str:
    leaves = _leaf_names(named)
    entries = [spec] if isinstance(spec, str) else list(spec)
    close: list[str] = []
    for entry in entries:
        for match in difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.4):
            if match not in close:
                close.append(match)
    where = f" within layers {list(layers_to_transform)}" if layers_to_transform is not None else ""
    message = f"target_modules {spec!r} matched no module of the model{where} for {method}."
    if close:
        message += f" Closest module names: {', '.join(close)}."
    message += f" Module names in this model: {', '.join(leaves[:30])}"
    return message


def get_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_parent(model, path)
    setattr(parent, child, new)


def innermost(module: nn.Module) -> nn.Module:
    """The module under every adapter wrapper at one path."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def innermost_of(module: nn.Module, layer_class: type[AdapterLayer]) -> AdapterLayer:
    """The ``layer_class`` wrapper in the chain of wrappers at one path."""
    while not isinstance(module, layer_class):
        if not isinstance(module, AdapterLayer):
            raise TypeError(f"no {layer_class.__name__} at this path")
        module = module.base_layer
    return module


def checkpoint_path(path: str) -> str:
    """A wrapper's path as HF PEFT names it: without the ``base_layer`` steps of nested wrappers."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def wrap_targets(
    model: nn.Module,
    paths: Sequence[str],
    layer_class: type[AdapterLayer],
    add: Callable[[AdapterLayer, str], None],
) -> None:
    """Ensure each path holds a ``layer_class`` wrapper (reusing one already there), then ``add`` to it.

    ``path`` is the module's own path; the wrapper goes into the chain of wrappers already there at
    the place its :attr:`AdapterLayer.nesting` says, and ``add`` gets the module's own path.
    """
    for path in paths:
        holder, module = path, model.get_submodule(path)
        while (
            isinstance(module, AdapterLayer)
            and not isinstance(module, layer_class)
            and module.nesting > layer_class.nesting
        ):
            holder, module = f"{holder}.base_layer", module.base_layer
        if not isinstance(module, layer_class):
            if isinstance(module, AdapterLayer) and module.nesting == layer_class.nesting:
                raise TargetModuleError(
                    f"{path} is already adapted by {module.method_name}; {layer_class.__name__} cannot adapt the "
                    "same module (exclude it from one of the two adapters)"
                )
            module = layer_class(module)
            replace_module(model, holder, module)
        add(module, path)


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every wrapper in the model with its path, outermost first."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, AdapterLayer)]


def remove_empty_wrappers(model: nn.Module) -> None:
    """Put the base module back wherever a wrapper has no adapter left."""
    for path, layer in reversed(adapter_layers(model)):
        if not layer.adapter_names:
            replace_module(model, path, layer.base_layer)


def unwrap_all(model: nn.Module) -> None:
    """Replace every wrapper by the module it should leave behind (see :meth:`AdapterLayer.unwrap`)."""
    for path, layer in reversed(adapter_layers(model)):
        replace_module(model, path, layer.unwrap())
