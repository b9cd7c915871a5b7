"""PeftModel: a frozen base model with named adapters, HF PEFT's API.

``PeftModel.base_model.model`` is the user's model with adapter layers injected, as in HF PEFT, so
parameter paths (``base_model.model.model.layers.0...``) and checkpoint keys agree with PEFT's. The
class keeps the adapter registry (``peft_config``) and the routing state (which adapters are
active, disabled or merged), and pushes that state into every adapter layer. It knows no method by
name: methods come from :mod:`deltatune.registry`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import base_layers, checkpoint, engine, shared_state
from deltatune.adapter_layer import AdapterLayer, RowRouting
from deltatune.config import CONFIG_NAME, TASK_HEADS, ConfigError, PeftConfig
from deltatune.losses import CausalLMLoss
from deltatune.methods.lora_export import LoraExport, save_as_lora
from deltatune.modules_to_save import ModulesToSaveWrapper
from deltatune.prompt_learning import InputAdapter
from deltatune.registry import get_method

logger = logging.getLogger("deltatune")

BASE_ROW = "__base__"
# HF PEFT's checkpoint keys for modules trained next to a prompt-learning adapter start one level up.
PROMPT_LEARNING_PREFIX = "base_model."


class Stack(tuple):
    """Active adapters applied in sequence: each bottleneck adapter reads the previous one's output."""

    def __new__(cls, *names: str) -> Stack:
        return super().__new__(cls, names)


class Parallel(tuple):
    """Active adapters applied side by side: each reads the same input and their updates add.

    This is also what a plain list of names means. (Running different adapters on different rows
    of one batch is the ``adapter_names=`` argument of ``forward`` and ``generate``.)
    """

    def __new__(cls, *names: str) -> Parallel:
        return super().__new__(cls, names)


class _ForwardWithBaseSignature:
    """``PeftModel.forward`` as instances show it: the base model's forward parameters plus ``adapter_names``.

    ``transformers.Trainer`` keeps only the data columns that ``inspect.signature(model.forward)``
    names (it looks through HF PEFT's own classes alone), so a bare ``**kwargs`` would make it drop
    every column. The bound forward carries the base model's signature instead.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.function
        bound = functools.partial(self.function, instance)
        bound.__signature__ = instance._forward_signature()
        return bound


class AdapterHost(nn.Module):
    """Holds the adapted model as ``.model`` (PEFT's ``LoraModel`` role, for every method)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def update_and_allocate(self, global_step: int) -> None:
        """Run each training adapter's per-step work (``Method.step_hook``: AdaLoRA's rank allocation) for
        ``global_step``; call it after ``loss.backward()`` and before ``optimizer.zero_grad()`` (HF PEFT's
        ``model.base_model.update_and_allocate``; :meth:`PeftModel.update_and_allocate` is the same)."""
        hooks = self.__dict__.setdefault("_step_hooks", {})
        for name, config in self.training_configs.items():
            build = get_method(config.peft_type).step_hook
            if build is None:
                continue
            if name not in hooks:
                hooks[name] = build(self.model, name, config)
            hooks[name].step(global_step)

    @property
    def training_configs(self) -> dict[str, PeftConfig]:
        """The active adapters that train, with their configs (set by the PeftModel on every change)."""
        return self.__dict__.get("_training", {})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A base model plus adapters. Build one with :func:`get_peft_model` or :meth:`from_pretrained`.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model or a plain torch model). Its parameters
            are frozen; only adapter parameters (and any ``modules_to_save``) train.
        peft_config: the first adapter's config.
        adapter_name: the first adapter's name; it becomes the active adapter.
    """

    # A causal LM's loss from labels made by the fused LM head (deltatune.losses.CausalLMLoss): the
    # same loss, gradients and logits, without the vocabulary-sized intermediates. False: the model's own.
    fused_loss = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = AdapterHost(model)
        self._causal_lm_loss = CausalLMLoss()
        # Input methods' trained tensors (prompt tuning, P-tuning, prefix tuning), by adapter name.
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._composition = "parallel"
        self._disabled = False
        flags = [(param, param.requires_grad) for param in model.parameters()]
        for param, _ in flags:
            param.requires_grad_(False)
        # Gradients reach every adapter through the frozen 4-bit layers (prompt tuning's too).
        base_layers.keep_trainable_layout(model)
        try:
            self.add_adapter(adapter_name, peft_config)
        except Exception:
            for param, flag in flags:  # leave the user's model as it was
                param.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)

    # -- attribute access like the wrapped model --------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        code = getattr(getattr(value, "__func__", value), "__code__", None)  # functools.wraps hides the name
        if name == "forward" and "add_fused_lm_head" in getattr(code, "co_qualname", ""):
            raise TypeError(
                "TRL's trainers recognise only HF PEFT's PeftModel class, so a stock trl trainer patched its fused "
                "LM head onto this deltatune model instead of the model under the adapters. Use deltatune's "
                "subclasses, TRL's own code with that test answered: from deltatune.trl_trainers import "
                "SFTTrainer (or DPOTrainer, GRPOTrainer)"
            )
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers injected)."""
        return self.base_model.model

    @property
    def _model(self) -> nn.Module:
        return self.base_model.model

    def _forward_signature(self) -> inspect.Signature:
        signature = self.__dict__.get("_base_forward_signature")
        if signature is None:
            try:
                base = inspect.signature(self._model.forward)
            except (TypeError, ValueError):  # a builtin or C forward: say nothing beyond **kwargs
                base = inspect.Signature([inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
            params = [p for p in base.parameters.values() if p.name != "adapter_names"]
            at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
            extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
            signature = base.replace(parameters=[*params[:at], extra, *params[at:]])
            self.__dict__["_base_forward_signature"] = signature
        return signature

    # -- the adapter registry -------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active, as in PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self._active[0]]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Attach a new adapter, inactive (use :meth:`set_adapter` to train or use it)."""
        _check_adapter_name(adapter_name, self.peft_config)
        config = copy.deepcopy(peft_config)
        model = self._model
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _model_name(model)
        heads = TASK_HEADS.get(str(config.task_type), [])
        present_heads = [h for h in heads if _find_paths(model, [h])]
        if present_heads and hasattr(config, "modules_to_save"):
            config.modules_to_save = list(dict.fromkeys(list(config.modules_to_save or []) + present_heads))
        method = get_method(config.peft_type)
        try:
            if method.input_adapter is not None:
                self.prompt_encoder[adapter_name] = method.input_adapter(model, config)
            elif method.shared_state is not None:
                shared = shared_state.add(self.base_model, model, adapter_name, method, config)
                method.attach(model, adapter_name, config, shared=shared)
            else:
                method.attach(model, adapter_name, config)
            self._attach_modules_to_save(adapter_name, config.modules_to_save)
        except Exception:
            self._detach(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        for _, layer in engine.adapter_layers(model):  # new modules (dropouts) follow their layer's train/eval mode
            for module in layer.adapter_modules(adapter_name):
                module.train(layer.training)
        self._sync_layers()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        **options: Any,
    ) -> None:
        """Add a new adapter that combines existing ones (see the method's ``combine``, e.g. LoRA's)."""
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"no adapters named {missing}; adapters: {', '.join(self.peft_config)}")
        method = get_method(self.peft_config[adapters[0]].peft_type)
        if method.combine is None:
            raise ValueError(f"{method.peft_type} adapters cannot be combined with add_weighted_adapter")
        method.combine(self, adapters, weights, adapter_name, combination_type=combination_type, **options)

    def _attach_modules_to_save(self, adapter_name: str, names: list[str] | None) -> None:
        if not names:
            return
        model = self._model
        paths = _find_paths(model, names)
        if not paths:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in engine.visible_modules(model)})
            raise engine.TargetModuleError(
                f"modules_to_save {names} matched no module of the model; module names: {', '.join(leaves[:30])}"
            )
        for path in paths:
            engine.wrap_targets(
                model, [path], ModulesToSaveWrapper, lambda layer, p: layer.add_adapter(adapter_name, None, p)
            )

    def _detach(self, adapter_name: str) -> None:
        self.base_model.__dict__.get("_step_hooks", {}).pop(adapter_name, None)
        shared_state.remove(self.base_model, adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        for _, layer in engine.adapter_layers(self._model):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        engine.remove_empty_wrappers(self._model)

    def set_adapter(self, adapter_name: str | list[str] | Stack | Parallel) -> None:
        """Make these adapters active and the only trainable ones.

        A list (or :class:`Parallel`) adds their updates; :class:`Stack` chains bottleneck adapters,
        each reading the previous one's output.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._composition = "stack" if isinstance(adapter_name, Stack) else "parallel"
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(self.peft_config) or 'none'}")
        inputs = [n for n in names if n in self.prompt_encoder]
        if len(inputs) > 1:
            raise ValueError(f"only one prompt/prefix adapter can be active at a time, got {inputs}")
        if isinstance(adapter_name, Stack):
            plain = [
                layer for layer in self._layers() if not layer.stackable and not isinstance(layer, ModulesToSaveWrapper)
            ]
            flat = sorted({n for n in names for layer in plain if n in layer.adapter_names} | set(inputs))
            if flat:
                raise ValueError(
                    f"Stack chains bottleneck adapters, each reading the previous one's output; {flat} "
                    "cannot be stacked: give a list (their updates add) instead"
                )
        self._active = names
        self._sync_layers()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and every module it added; the base model is as before."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r}; adapters: {', '.join(self.peft_config)}")
        self._detach(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self._active:
            self._active = [a for a in self._active if a != adapter_name]
            if not self._active and self.peft_config:
                self._active = [next(iter(self.peft_config))]
                logger.warning("deleted the active adapter; %r is active now", self._active[0])
        self._sync_layers()

    def _sync_layers(self) -> None:
        """Push the active set into every layer and make exactly the active adapters trainable."""
        model = self._model
        self.base_model.__dict__["_training"] = {
            n: self.peft_config[n] for n in self._active if not self.peft_config[n].inference_mode
        }
        for name, adapter in self.prompt_encoder.items():
            adapter.set_trainable(name in self._active and not self.peft_config[name].inference_mode)
        for _, layer in engine.adapter_layers(model):
            layer.active_adapters = list(self._active)
            layer.composition = self._composition
            for name in layer.adapter_names:
                config = self.peft_config.get(name)
                layer.set_trainable(name, name in self._active and config is not None and not config.inference_mode)
        trained_bias: dict[str, nn.Parameter] = {}
        for name in self._active:
            config = self.peft_config[name]
            if not config.inference_mode:
                trained_bias.update(config.trained_base_parameters(model, name))
        adapter_ids = {
            id(p)
            for _, layer in engine.adapter_layers(model)
            for n in layer.adapter_names
            for p in layer.adapter_parameters(n)
        }
        trained_ids = {id(p) for p in trained_bias.values()}
        for param in model.parameters():
            if id(param) not in adapter_ids:
                param.requires_grad_(id(param) in trained_ids)

    def _layers(self) -> Iterator[AdapterLayer]:
        for _, layer in engine.adapter_layers(self._model):
            yield layer

    # -- switching adapters off and on ----------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's outputs.

        Bit for bit when no adapter is merged; merged adapters are unmerged for the block (and merged
        again after), which leaves float rounding of about 1e-7 in the weights.
        """
        merged = {id(layer): list(layer.merged_adapters) for layer in self._layers()}
        if any(merged.values()):
            self.unmerge_adapter()
        self.disable_adapter_layers()
        try:
            yield
        finally:
            self.enable_adapter_layers()
            for layer in self._layers():
                if merged.get(id(layer)):
                    layer.merge(merged[id(layer)])

    def disable_adapter_layers(self) -> None:
        self._disabled = True
        for layer in self._layers():
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        self._disabled = False
        for layer in self._layers():
            layer.disabled = False

    # -- merging --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights; forward skips them after."""
        names = list(adapter_names) if adapter_names is not None else list(self._active)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(self.peft_config) or 'none'}")
            if name in self.prompt_encoder:
                raise ValueError(
                    f"adapter {name!r} is a {self.peft_config[name].peft_type} adapter: it changes the "
                    "model's inputs and has no weights to merge"
                )
        layers = [layer for layer in self._layers() if any(n in layer.adapter_names for n in names)]
        _untie_shared_weights(self._model, layers)
        touched = []
        try:
            for layer in layers:
                if safe_merge:  # what to put back if a later layer turns out broken
                    touched.append((layer, list(layer.merged_adapters), layer.tensor_snapshot()))
                layer.merge([n for n in names if n in layer.adapter_names], safe_merge=safe_merge)
        except ValueError:
            # safe_merge refused a layer: the layers merged before it are put back, so the model
            # is exactly as it was, not half merged
            for layer, merged_before, snapshot in touched:
                layer.restore_tensors(snapshot)
                layer.merged_adapters[:] = merged_before
            raise
        _warn_rounding(layers, "merging")

    def unmerge_adapter(self) -> None:
        layers = [layer for layer in self._layers() if layer.merged_adapters]
        for layer in layers:
            layer.unmerge()
        _warn_rounding(layers, "unmerging")

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, progressbar: bool = False
    ) -> nn.Module:
        """Merge the adapters and return the plain base model, with no adapter modules left in it."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unwrap()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; returns the original base model."""
        self.unmerge_adapter()
        for layer in self._layers():
            layer.merged_adapters = []
        return self._unwrap()

    def _unwrap(self) -> nn.Module:
        model = self._model
        engine.unwrap_all(model)
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config.clear()
        self._active = []
        return model

    # -- running --------------------------------------------------------------------------------
    def _active_input_adapter(self) -> InputAdapter | None:
        if self._disabled:
            return None
        for name in self._active:
            if name in self.prompt_encoder:
                return self.prompt_encoder[name]
        return None

    def start_virtual_tokens_from(self, ids: list[int], adapter_name: str | None = None) -> None:
        """Start an input adapter's virtual tokens (prompt, P-tuning, prefix) from real tokens ``ids``."""
        name = adapter_name or next((n for n in self._active if n in self.prompt_encoder), None)
        if name is None or name not in self.prompt_encoder:
            raise ValueError("start_virtual_tokens_from needs an active prompt, P-tuning or prefix adapter")
        self.prompt_encoder[name].start_from_tokens(self._model, ids)

    @_ForwardWithBaseSignature
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapters (its signature is the base model's).

        ``adapter_names`` (one name per batch row, or ``"__base__"``) runs each row through its own
        adapter in the same batched call, as if it were alone in the batch.
        """
        if self.fused_loss and "labels" in kwargs and hasattr(self._model, "get_output_embeddings"):
            kwargs = _bind_arguments(self._model.forward, args, kwargs)
            out = self._causal_lm_loss(self._model, kwargs, lambda given: self._forward((), given, adapter_names))
        else:
            out = self._forward(args, kwargs, adapter_names)
        loss = getattr(out, "loss", None)
        if isinstance(loss, torch.Tensor) and self.training:
            extra = self.adapter_loss()
            if extra is not None:
                out.loss = loss + extra.to(loss.dtype)
        return out

    def adapter_loss(self) -> torch.Tensor | None:
        """The regularisers of the adapters that train (``Method.loss_term``: AdaLoRA's), summed; None if none."""
        total = None
        for name, config in self.base_model.training_configs.items():
            term = get_method(config.peft_type).loss_term
            if term is not None:
                value = term(self._model, name, config)
                total = value if total is None else total + value
        return total

    def update_and_allocate(self, global_step: int) -> None:
        """Each training adapter's per-step work after the backward (AdaLoRA's rank allocation), as in HF PEFT."""
        self.base_model.update_and_allocate(global_step)

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str] | None) -> Any:
        if adapter_names is not None:
            with self._rows_routed(adapter_names):
                return self._model(*args, **kwargs)
        adapter = self._active_input_adapter()
        if adapter is None:
            return self._model(*args, **kwargs)
        kwargs = _bind_arguments(self._model.forward, args, kwargs)
        return self._model(**adapter.prepare_forward(self._model, kwargs))

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``transformers``' ``generate``, with the active prompt or prefix in front of the input.

        ``adapter_names`` gives each prompt of the batch its own adapter (or ``"__base__"``).
        """
        if adapter_names is not None:
            with self._rows_routed(adapter_names):
                return self._model.generate(*args, **kwargs)
        adapter = self._active_input_adapter()
        if adapter is None:
            return self._model.generate(*args, **kwargs)
        if args:
            if len(args) > 1 or "input_ids" in kwargs:
                raise TypeError("pass generate's arguments by keyword (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        kwargs, cut = adapter.prepare_generate(self._model, dict(kwargs))
        output = self._model.generate(**kwargs)
        if not cut:
            return output
        if isinstance(output, torch.Tensor):
            return output[:, cut:]
        output.sequences = output.sequences[:, cut:]
        return output

    @contextlib.contextmanager
    def _rows_routed(self, adapter_names: list[str]) -> Iterator[None]:
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names has unknown adapters {unknown}; adapters: {', '.join(self.peft_config)} "
                f"(or {BASE_ROW!r} for the base model)"
            )
        inputs = sorted({n for n in names if n in self.prompt_encoder})
        if inputs:
            raise ValueError(f"mixed-adapter batches take layer adapters only; {inputs} are prompt/prefix adapters")
        unique = list(dict.fromkeys(n for n in names if n != BASE_ROW))
        index = torch.tensor([0 if n == BASE_ROW else unique.index(n) + 1 for n in names])
        layers = list(self._layers())
        device = next(self._model.parameters()).device
        routing = RowRouting(unique, index.to(device))
        for layer in layers:
            layer.row_routing = routing
        try:
            yield
        finally:
            for layer in layers:
                layer.row_routing = None

    # -- counting -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, each shared tensor counted once; a 4-bit weight counts
        its weights, not the bytes that pack two of them (as HF PEFT counts)."""
        trainable = total = 0
        for param in self.parameters():
            count = base_layers.parameter_count(param)
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # -- saving and loading ---------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each adapter in HF PEFT's layout; adapters not named ``default`` go in a subfolder.

        ``safe_serialization=False`` is accepted for API compatibility but still writes safetensors.
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"{directory} is a file; save_pretrained needs a directory")
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"no adapter named {name!r}; adapters: {', '.join(self.peft_config)}")
            target = directory if name == "default" else directory / name
            config = dataclasses.replace(self.peft_config[name], inference_mode=True)
            prefix = PROMPT_LEARNING_PREFIX if config.is_prompt_learning else checkpoint.PREFIX
            trained_base = config.trained_base_parameters(self._model, name)
            state = checkpoint.adapter_state_dict(self._model, name, trained_base, prefix)
            if name in self.prompt_encoder:
                state.update(self.prompt_encoder[name].adapter_state_dict())
            state.update(shared_state.state_dict(self.base_model, name))
            if not is_main_process:  # it still took part in gathering sharded tensors above
                continue
            checkpoint.save_adapter(state, config, target)

    def save_as_lora(self, save_directory: str | os.PathLike, rank: int, adapter_name: str = "default") -> LoraExport:
        """Write a weight-delta adapter (any method) as a rank-``rank`` LoRA adapter, for servers that
        load LoRA only; returns each layer's relative approximation error (:mod:`deltatune.methods.lora_export`)."""
        return save_as_lora(self, save_directory, rank, adapter_name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Load a saved adapter (deltatune's or HF PEFT's) onto ``model``."""
        directory = _resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        saved, state = checkpoint.read_adapter_folder(directory, allow_pickle) if config is None else (config, None)
        config = dataclasses.replace(saved, inference_mode=not is_trainable).for_loading()
        with checkpoint.loading_guard(model, directory, config):
            peft_model = cls(model, config, adapter_name)
            try:
                peft_model._load_weights(directory, adapter_name, allow_pickle, state)
            except Exception:
                peft_model.unload()  # give the user's model back unwrapped
                raise
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter next to the existing ones (inactive until :meth:`set_adapter`).

        Into an adapter of that name that exists already, as in HF PEFT (``transformers.Trainer``
        resumes a run this way), the saved weights replace its own: same method and shapes only.
        """
        directory = _resolve_adapter_dir(model_id, kwargs.get("subfolder"))
        saved, state = checkpoint.read_adapter_folder(directory, allow_pickle)
        config = dataclasses.replace(saved, inference_mode=not is_trainable)
        if adapter_name in self.peft_config:
            own = self.peft_config[adapter_name]
            if type(own) is not type(config):
                raise ValueError(
                    f"{directory} holds a {config.peft_type} adapter; adapter {adapter_name!r} here is "
                    f"{own.peft_type}: load it under another name"
                )
            self._load_weights(directory, adapter_name, allow_pickle, state)
            return
        with checkpoint.loading_guard(self.base_model, directory, config):
            self.add_adapter(adapter_name, config.for_loading())
            try:
                self._load_weights(directory, adapter_name, allow_pickle, state)
            except Exception:
                self.delete_adapter(adapter_name)
                raise

    def _load_weights(self, directory: Path, adapter_name: str, allow_pickle: bool, state: dict | None = None) -> None:
        state = state if state is not None else checkpoint.load_tensors(directory, allow_pickle=allow_pickle)
        state = shared_state.load(self.base_model, state, adapter_name, directory)
        if adapter_name in self.prompt_encoder:
            own = {k: v for k, v in state.items() if not k.startswith(PROMPT_LEARNING_PREFIX)}
            try:
                self.prompt_encoder[adapter_name].load_adapter_state_dict(own, where=str(directory))
            except (KeyError, ValueError) as err:
                raise checkpoint.CheckpointError(f"{directory}: {err.args[0]}") from err
            state = {
                checkpoint.PREFIX + k.removeprefix(PROMPT_LEARNING_PREFIX): v
                for k, v in state.items()
                if k.startswith(PROMPT_LEARNING_PREFIX)
            }
        checkpoint.load_adapter_state_dict(self._model, adapter_name, state, source=str(directory))
        self._sync_layers()


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap ``model`` with one trainable adapter; the base model's own weights are frozen."""
    return PeftModel(model, peft_config, adapter_name)


def _bind_arguments(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional forward arguments by name, so that input methods can rewrite them."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    bound = dict(zip(names, args))
    overlap = set(bound) & set(kwargs)
    if overlap or len(args) > len(names):
        raise TypeError(f"forward got arguments twice or too many positional arguments: {sorted(overlap)}")
    return {**bound, **kwargs}


def _untie_shared_weights(model: nn.Module, layers: list[AdapterLayer]) -> None:
    """Give modules that share a to-be-merged weight (a tied LM head) their own copy first.

    Otherwise merging an embedding adapter would silently change the tied output layer too, and the
    merged model would no longer compute what the adapted one did.
    """
    merged_ids = {id(p) for layer in layers for p in layer.base_layer.parameters(recurse=False)}
    inside = {id(m) for layer in layers for m in layer.modules()}
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in inside:
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) in merged_ids:
                setattr(module, pname, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
                config = getattr(model, "config", None)
                if config is not None and getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False
                logger.warning("untied %s.%s from a merged adapter layer so its outputs stay unchanged", path, pname)


def _check_adapter_name(name: str, existing: dict[str, PeftConfig]) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ROW:
        raise ValueError(f"invalid adapter name {name!r}: use a non-empty name without '.' (and not {BASE_ROW!r})")
    if name in existing:
        raise ValueError(f"an adapter named {name!r} exists already; delete it first or pick another name")


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _find_paths(model: nn.Module, names: list[str]) -> list[str]:
    """Module paths equal to, or ending in, one of ``names`` (outermost match only)."""
    found: list[str] = []
    for path, _ in engine.visible_modules(model):
        if any(path == n or path.endswith("." + n) for n in names):
            if not any(path.startswith(f + ".") for f in found):
                found.append(path)
    return found


def _resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None) -> Path:
    directory = Path(model_id)
    if subfolder:
        directory = directory / subfolder
    if directory.is_dir():
        run_adapter = directory / "adapter"  # a `deltatune train` run folder holds its adapter there
        if not (directory / CONFIG_NAME).is_file() and (run_adapter / CONFIG_NAME).is_file():
            return run_adapter
        return directory
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes"):
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(model_id), allow_patterns=[f"{subfolder or ''}*"]))
            return local / subfolder if subfolder else local
        except Exception as err:  # network, auth, missing repo: one clear message
            raise ConfigError(f"{model_id} is neither a local adapter directory nor a downloadable one: {err}") from err
    raise ConfigError(f"{model_id} is not a directory (HF_HUB_OFFLINE is set, so hub ids are not fetched)")


# PEFT exposes one class per task; here one class serves every task, so the names are aliases.
PeftModelForCausalLM = PeftModel
PeftModelForSequenceClassification = PeftModel
PeftModelForSeq2SeqLM = PeftModel
PeftModelForTokenClassification = PeftModel
PeftModelForQuestionAnswering = PeftModel
PeftModelForFeatureExtraction = PeftModel

__all__ = ["PeftModel", "get_peft_model"]


def _warn_rounding(layers: list[AdapterLayer], action: str) -> None:
    """Say what requantizing a 4-bit or 8-bit base cost when adapters were folded into (or out of) it."""
    quantized = [layer for layer in layers if base_layers.is_quantized(engine.innermost(layer))]
    if not quantized:
        return
    worst = max(getattr(layer, "rounding_error", 0.0) for layer in quantized)
    kinds = sorted({base_layers.linear_base(engine.innermost(layer)).describe() for layer in quantized})
    logger.warning(
        "%s adapters into %d quantized layers (%s) requantized their weights: rounding changed them by up to "
        "%.3g beyond the adapters' own update. To keep the update exact, merge into the float base instead: "
        "load it without quantization_config, then PeftModel.from_pretrained(base, adapter).merge_and_unload()",
        action.capitalize(),
        len(quantized),
        ", ".join(kinds),
        worst,
    )
