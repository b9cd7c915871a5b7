"""TRL's trainers for deltatune models: :class:`SFTTrainer`, :class:`DPOTrainer`, :class:`GRPOTrainer`.

TRL, ``transformers.Trainer`` and accelerate recognise a PEFT model by one test,
``isinstance(model, peft.PeftModel)``, and take their PEFT branches only then: TRL's fused LM head
patched onto the model under the adapters (not onto the wrapper), input gradients for gradient
checkpointing, the DPO/GRPO reference as the same model with its adapters disabled (not a second
copy), training a quantized base at all, loading adapters to resume. A deltatune model speaks
PEFT's API (``get_base_model``, ``disable_adapter``, ``set_adapter``, ``peft_config``,
``load_adapter``, ``save_pretrained``) but is not that class, so a stock TRL trainer treats it as
a plain model and fails on its first step.

These trainers are TRL's own, unchanged, with that one test also answering yes for a deltatune
model while one of their methods runs (:func:`deltatune.integrations.recognised`: the test's names in TRL's and
transformers' trainer modules are swapped for the call and restored after; other models get the
original answer), and checkpoints written as adapters in PEFT's files (:class:`AdapterSaving`).
A deltatune config can also go to ``peft_config=``.

    from deltatune import LoraConfig, get_peft_model
    from deltatune.trl_trainers import SFTTrainer      # instead of: from trl import SFTTrainer
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import trl

from deltatune.config import PeftConfig
from deltatune.integrations import AdapterSaving, is_deltatune_model, recognising, with_adapter_steps
from deltatune.peft_model import get_peft_model


def _with_deltatune_config(init: Callable[..., Any]) -> Callable[..., Any]:
    """``peft_config=`` takes a deltatune config: the model gets its adapter here, TRL sees a PEFT model."""

    @functools.wraps(init)
    def run(self: Any, model: Any, *args: Any, peft_config: Any = None, **kwargs: Any) -> None:
        if isinstance(peft_config, PeftConfig):
            if is_deltatune_model(model):
                raise ValueError(
                    "model already has deltatune adapters and peft_config= asks for another: pass one of them "
                    "(add a second adapter with model.add_adapter(name, config))"
                )
            if isinstance(model, str):
                from transformers import AutoModelForCausalLM

                config_args = kwargs.get("args") or (args[0] if args else None)
                model = AutoModelForCausalLM.from_pretrained(
                    model, **(getattr(config_args, "model_init_kwargs", None) or {})
                )
            model, peft_config = get_peft_model(model, peft_config), None
        init(self, model, *args, peft_config=peft_config, **kwargs)

    return run


class SFTTrainer(AdapterSaving, trl.SFTTrainer):
    """``trl.SFTTrainer`` for deltatune models (see the module's docstring)."""

    __init__ = recognising(with_adapter_steps(_with_deltatune_config(trl.SFTTrainer.__init__)))
    train = recognising(trl.SFTTrainer.train)
    evaluate = recognising(trl.SFTTrainer.evaluate)
    predict = recognising(trl.SFTTrainer.predict)


class DPOTrainer(AdapterSaving, trl.DPOTrainer):
    """``trl.DPOTrainer`` for deltatune models: the reference is the model with its adapters disabled."""

    __init__ = recognising(with_adapter_steps(_with_deltatune_config(trl.DPOTrainer.__init__)))
    train = recognising(trl.DPOTrainer.train)
    evaluate = recognising(trl.DPOTrainer.evaluate)
    predict = recognising(trl.DPOTrainer.predict)


class GRPOTrainer(AdapterSaving, trl.GRPOTrainer):
    """``trl.GRPOTrainer`` for deltatune models: the KL reference is the model with its adapters disabled."""

    __init__ = recognising(with_adapter_steps(_with_deltatune_config(trl.GRPOTrainer.__init__)))
    train = recognising(trl.GRPOTrainer.train)
    evaluate = recognising(trl.GRPOTrainer.evaluate)
    predict = recognising(trl.GRPOTrainer.predict)
