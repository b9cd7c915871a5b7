"""Training deltatune models with ``transformers.Trainer`` (and, in :mod:`deltatune.trl_trainers`, TRL's).

A stock ``Trainer`` recognises only its own model classes and HF PEFT's (``isinstance`` against
``peft.PeftModel``), and saves anything else as one full ``model.safetensors``; TRL and
accelerate use the same test. :func:`recognised` answers it for deltatune models too while a
deltatune trainer runs. :class:`AdapterTrainer` saves a :class:`~deltatune.PeftModel`
as what it is, an adapter (``adapter_config.json`` + ``adapter_model.safetensors``), in every
checkpoint and at the end; :class:`SaveAdapterCallback` does the same for an unchanged ``Trainer``.
Either keeps the right data columns: ``PeftModel.forward`` shows the base model's signature.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from deltatune.model_info import unwrap_parallel
from deltatune.peft_model import PeftModel

# Modules whose module-level PEFT test (and TRL's adapter switch) the trainers answer for deltatune.
_MODULES = (
    "transformers.trainer",
    "transformers.trainer_utils",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.grpo_trainer",
)
_TESTS = ("is_peft_model", "_is_peft_model")
_depth = 0


def is_deltatune_model(model: Any) -> bool:
    """Whether ``model`` (possibly inside DDP / ``torch.compile`` wrappers) is a deltatune PeftModel."""
    return isinstance(unwrap_parallel(getattr(model, "_orig_mod", model)), PeftModel)


def _test_also_for_deltatune(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    @functools.wraps(original)
    def test(model: Any) -> bool:
        return is_deltatune_model(model) or original(model)

    return test


def _switch_also_for_deltatune(original: Callable[..., Any]) -> Callable[..., Any]:
    """TRL's ``use_adapter(model, name)``; for a deltatune model, its own API (PEFT need not be installed)."""

    @contextlib.contextmanager
    def use_adapter(model: Any, adapter_name: str | None) -> Iterator[None]:
        if not is_deltatune_model(model):
            with original(model, adapter_name):
                yield
            return
        model = unwrap_parallel(model)
        if adapter_name is None:
            with model.disable_adapter():
                yield
            return
        previous = model.active_adapter
        model.set_adapter(adapter_name)
        try:
            yield
        finally:
            model.set_adapter(previous)

    return use_adapter


@contextlib.contextmanager
def recognised() -> Iterator[None]:
    """Within the block, TRL and transformers treat deltatune models as PEFT models (re-entrant)."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    swapped: list[tuple[Any, str, Any]] = []
    for module_name in _MODULES:
        module = sys.modules.get(module_name)  # one not imported yet has no caller to answer
        if module is None:
            continue
        for name in _TESTS:
            if hasattr(module, name):
                swapped.append((module, name, getattr(module, name)))
                setattr(module, name, _test_also_for_deltatune(getattr(module, name)))
        if hasattr(module, "use_adapter"):
            swapped.append((module, "use_adapter", module.use_adapter))
            module.use_adapter = _switch_also_for_deltatune(module.use_adapter)
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        for module, name, original in reversed(swapped):
            setattr(module, name, original)


def recognising(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run within :func:`recognised`."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with recognised():
            return method(self, *args, **kwargs)

    return run


class AdapterStepCallback(TrainerCallback):
    """Runs :meth:`~deltatune.PeftModel.update_and_allocate` after every optimizer step, before the
    gradients are cleared (AdaLoRA's rank allocation), as HF PEFT's examples do by hand.
    :class:`AdapterTrainer` and the TRL trainers add it; add it to an unchanged ``Trainer`` yourself."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = unwrap_parallel(model)
        if isinstance(model, PeftModel):
            model.update_and_allocate(state.global_step + 1)  # the step being taken (global_step counts done ones)


def with_adapter_steps(init: Callable[..., Any]) -> Callable[..., Any]:
    """A Trainer ``__init__`` that also adds :class:`AdapterStepCallback`."""

    @functools.wraps(init)
    def run(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.add_callback(AdapterStepCallback())

    return run


class AdapterSaving:
    """A Trainer mixin: a deltatune model is saved as its adapters, in PEFT's files, with the tokenizer."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = unwrap_parallel(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output, is_main_process=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output)
            torch.save(self.args, output / "training_args.bin")  # as Trainer does: its own arguments, for the record


class AdapterTrainer(AdapterSaving, Trainer):
    """``transformers.Trainer`` that treats a deltatune model as the PEFT model it is (see :func:`recognised`).

    Saved as adapters; trains on a quantized base (a stock Trainer refuses one without PEFT's class);
    resumes and loads the best checkpoint through the model's ``load_adapter``.
    """

    __init__ = recognising(with_adapter_steps(Trainer.__init__))
    train = recognising(Trainer.train)
    evaluate = recognising(Trainer.evaluate)
    predict = recognising(Trainer.predict)


class SaveAdapterCallback(TrainerCallback):
    """Writes the adapters into each ``checkpoint-N`` folder and the output folder of a stock Trainer."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = unwrap_parallel(model)
        if isinstance(model, PeftModel) and state.is_world_process_zero:
            model.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = unwrap_parallel(model)
        if isinstance(model, PeftModel) and state.is_world_process_zero:
            model.save_pretrained(args.output_dir)
