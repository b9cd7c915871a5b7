"""The map from ``peft_type`` to the method that implements it.

The engine, the checkpoint code and :class:`~deltatune.peft_model.PeftModel` never name a method;
they look it up here. A method module registers itself when imported; ``deltatune/__init__.py``
imports every built-in method, so the registry is complete once ``deltatune`` is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from deltatune.config import ConfigError, PeftConfig, PeftType, register_config_class

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclasses.dataclass(frozen=True)
class Method:
    """What the engine needs to know about one method.

    Attributes:
        peft_type: the value stored in ``adapter_config.json``.
        config_class: the method's config dataclass.
        attach: for layer methods, ``attach(model, adapter_name, config) -> list[str]`` wraps the
            target modules of ``model`` in place and returns their paths.
        input_adapter: for input methods (prompt, prefix), ``input_adapter(model, config)`` builds
            the :class:`~deltatune.prompt_learning.InputAdapter` that rewrites forward inputs.
        combine: ``combine(peft_model, adapters, weights, adapter_name, **options)`` adds a weighted
            combination of existing adapters (``PeftModel.add_weighted_adapter``), where defined.
        shared_state: for methods with tensors shared by all their layers (VeRA's projections),
            ``shared_state(model, config) -> {kind: SharedTensor}``. The PeftModel keeps them in one
            :class:`~deltatune.shared_state.SharedBuffers` per kind, saves and loads them under
            ``base_model.<kind>``, and calls ``attach(model, adapter_name, config, shared=...)`` with
            those modules by kind.
        loss_term: ``loss_term(model, adapter_name, config)``, a regulariser added to the loss of every
            training forward with labels while the adapter trains (AdaLoRA's orthogonality term).
        step_hook: ``step_hook(model, adapter_name, config)`` builds an object whose
            ``step(global_step)`` runs after each backward (``PeftModel.update_and_allocate``):
            AdaLoRA's rank allocator.
    """

    peft_type: PeftType
    config_class: type[PeftConfig]
    attach: Callable[[nn.Module, str, PeftConfig], list[str]] | None = None
    input_adapter: Callable[[nn.Module, PeftConfig], nn.Module] | None = None
    combine: Callable[..., None] | None = None
    shared_state: Callable[[nn.Module, PeftConfig], dict[str, SharedTensor]] | None = None
    loss_term: Callable[[Any, str, PeftConfig], torch.Tensor] | None = None
    step_hook: Callable[[Any, str, PeftConfig], Any] | None = None


@dataclasses.dataclass(frozen=True)
class SharedTensor:
    """One model-level tensor of an adapter; ``saved=False``: rebuilt from its config on load."""

    tensor: torch.Tensor
    saved: bool = True


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _METHODS[method.peft_type.value] = method
    register_config_class(method.peft_type, method.config_class)
    return method


def get_method(peft_type: PeftType | str) -> Method:
    key = peft_type.value if isinstance(peft_type, PeftType) else str(peft_type)
    if key not in _METHODS:
        known = ", ".join(sorted(_METHODS))
        raise ConfigError(f"unknown peft_type {key!r}; deltatune implements: {known}")
    return _METHODS[key]


@dataclasses.dataclass(frozen=True)
class TrainingDefaults:
    """What ``deltatune train --method NAME`` uses for the options the user does not give.

    Attributes:
        lr: peak learning rate.
        warmup: warmup (a fraction of the steps when < 1).
        options: other ``train`` options by name (``virtual_tokens``, ``targets``, ...).
        tasks: values that differ for one task kind (``{"seq-cls": {"lr": 1e-3}}``): they beat both
            the method's own and the task's (``deltatune.tasks.task_training_defaults``).
        source: where the values come from (paper, measurement), shown by ``--help``'s reader.
        config: ``config(options, common) -> PeftConfig``, the adapter config ``train``'s options
            describe (None: full fine-tuning, no adapter). ``options`` are the command's options by
            name (a ``RunConfig``: ``options.given`` names those the user set); ``common`` the
            generic ones already parsed: ``task_type``, ``target_modules``, ``exclude_modules``,
            ``layers_to_transform``, ``modules_to_save``.
        uses: the method-specific ``train`` options the method reads; given for a method that does
            not, an option is reported unused.
        resumable: whether ``train --resume`` can continue the method's run exactly.
        shardable: whether the method trains under ``--fsdp`` (sharded parameters).
    """

    lr: float
    warmup: float = 0.05
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tasks: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    source: str = ""
    config: Callable[[Mapping[str, Any], Mapping[str, Any]], PeftConfig] | None = None
    uses: tuple[str, ...] = ()
    resumable: bool = True
    shardable: bool = True

    def get(self, option: str, fallback: Any = None) -> Any:
        """The method's own value, whatever the task."""
        if option == "lr":
            return self.lr
        if option == "warmup":
            return self.warmup
        return self.options.get(option, fallback)

    def for_task(self, task: str, option: str) -> tuple[bool, Any]:
        """``(True, value)`` when the method sets ``option`` differently for ``task``, else ``(False, None)``."""
        overrides = self.tasks.get(task, {})
        return (option in overrides, overrides.get(option))


_TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {}


def register_training_defaults(name: str, defaults: TrainingDefaults) -> TrainingDefaults:
    """Declare a ``train --method`` name's defaults (from the method's own module)."""
    _TRAINING_DEFAULTS[name] = defaults
    return defaults


def training_defaults(name: str) -> TrainingDefaults:
    if name not in _TRAINING_DEFAULTS:
        raise ConfigError(f"no training defaults for method {name!r}; known: {', '.join(_TRAINING_DEFAULTS)}")
    return _TRAINING_DEFAULTS[name]


def trainable_methods() -> dict[str, TrainingDefaults]:
    """Every ``train --method`` name with its defaults, in registration order."""
    return dict(_TRAINING_DEFAULTS)


# The train options that pick modules, shared by the methods that adapt named modules.
MODULE_OPTIONS = ("targets", "exclude_modules", "layers_to_transform", "modules_to_save")


def method_options() -> dict[str, tuple[str, ...]]:
    """Each method-specific ``train`` option with the methods that read it (``TrainingDefaults.uses``)."""
    users: dict[str, list[str]] = {}
    for method, defaults in _TRAINING_DEFAULTS.items():
        for option in defaults.uses:
            users.setdefault(option, []).append(method)
    return {option: tuple(methods) for option, methods in users.items()}
