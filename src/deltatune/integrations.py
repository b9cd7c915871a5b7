"""Training deltatune models with ``transformers.Trainer``.

A stock ``Trainer`` recognises only its own model classes and HF PEFT's, and saves anything else
as one full ``model.safetensors``. :class:`AdapterTrainer` saves a :class:`~deltatune.PeftModel`
as what it is, an adapter (``adapter_config.json`` + ``adapter_model.safetensors``), in every
checkpoint and at the end; :class:`SaveAdapterCallback` does the same for an unchanged ``Trainer``.
Either keeps the right data columns: ``PeftModel.forward`` shows the base model's signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from deltatune.peft_model import PeftModel


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and not isinstance(model, PeftModel):
        model = model.module
    return model


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` that saves a deltatune model's adapters instead of the whole model."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _unwrap(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output = Path(output_dir or self.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output, is_main_process=self.args.should_save)
        if self.processing_class is not None and self.args.should_save:
            self.processing_class.save_pretrained(output)


class SaveAdapterCallback(TrainerCallback):
    """Writes the adapters into each ``checkpoint-N`` folder and the output folder of a stock Trainer."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = _unwrap(model)
        if isinstance(model, PeftModel) and state.is_world_process_zero:
            model.save_pretrained(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model = _unwrap(model)
        if isinstance(model, PeftModel) and state.is_world_process_zero:
            model.save_pretrained(args.output_dir)
