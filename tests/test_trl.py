"""TRL's trainers (SFT, DPO, GRPO) train a deltatune model as they train an HF PEFT one.

Same initial adapter weights, data, seed and optimizer (plain SGD, so that float rounding in two
correct implementations cannot be amplified the way Adam's first steps amplify it): the same loss
at every step, adapter-only checkpoints in PEFT's files that PEFT loads, the base untouched, and
for DPO/GRPO the reference is the model with its adapters disabled, never a second copy.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune import integrations  # noqa: E402
from deltatune.trl_trainers import DPOTrainer, GRPOTrainer, SFTTrainer  # noqa: E402
from tiny_assets import adapter_tensors, make_tiny_llama  # noqa: E402

LORA = {"r": 4, "target_modules": "all-linear", "task_type": "CAUSAL_LM", "lora_dropout": 0.0}
# float32 for exact comparisons (TRL's configs default to bf16 autocast; the "bf16" case runs that).
COMMON = {
    "report_to": [], "seed": 0, "use_cpu": True, "logging_steps": 1, "optim": "sgd", "save_strategy": "no",
    "bf16": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(folder)
    return folder


def _pair(folder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """An HF PEFT model and a deltatune model on the same base with the same (non-zero) adapter weights."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder), peft.LoraConfig(init_lora_weights=False, **LORA)
    )
    ours = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), dt.LoraConfig(**LORA))
    state = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert not ours.load_state_dict(state, strict=False).unexpected_keys
    return theirs, ours


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "lora_" not in n}


def _chat_rows(n: int = 12) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
                {"role": "user", "content": "And doubled?"},
                {"role": "assistant", "content": f"{4 * i}."},
            ]
        }
        for i in range(n)
    ]


# ChatML (SmolLM2's format) with the `{% generation %}` markers TRL's assistant_only_loss needs.
CHATML_WITH_GENERATION_MARKERS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SFT_CASES = {
    "conversational": ({}, _chat_rows),
    "assistant only": ({"assistant_only_loss": True}, _chat_rows),
    "packed": ({"packing": True, "max_length": 96}, _chat_rows),
    "bf16 autocast": ({"bf16": True}, _chat_rows),
    "prompt-completion": (
        {},
        lambda n=12: [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(n)],
    ),
}


@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_sft_trainer_trains_a_deltatune_model_as_it_trains_a_peft_one(tiny, tmp_path, case):
    options, rows = SFT_CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    if options.get("assistant_only_loss"):
        tokenizer.chat_template = CHATML_WITH_GENERATION_MARKERS
    data = datasets.Dataset.from_list(rows())
    theirs, ours = _pair(tiny)
    base_before = _base_weights(ours)
    results = {}
    for name, model, trainer_class in (("peft", theirs, trl.SFTTrainer), ("deltatune", ours, SFTTrainer)):
        args = trl.SFTConfig(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, learning_rate=0.5,
            **{**COMMON, **options},
        )  # fmt: skip
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        trainer.save_model(str(tmp_path / name / "final"))
        results[name] = _losses(trainer)
    assert len(results["deltatune"]) == 3 and all(math.isfinite(x) for x in results["deltatune"])
    assert results["deltatune"][-1] < results["deltatune"][0]  # it learned
    close = {"rel": 1e-3, "abs": 1e-4} if options.get("bf16") else {"rel": 1e-5, "abs": 1e-6}
    for got, want in zip(results["deltatune"], results["peft"]):
        assert got == pytest.approx(want, **close)
    # Adapter-only checkpoints in PEFT's files, equal to PEFT's after the same steps; the base untouched.
    final = tmp_path / "deltatune" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    assert not any(p.name.startswith("model") for p in final.iterdir())
    ours_saved, theirs_saved = adapter_tensors(final), adapter_tensors(tmp_path / "peft" / "final")
    assert sorted(ours_saved) == sorted(theirs_saved)
    for key in ours_saved:
        if options.get("bf16"):  # bf16 rounding, amplified by the large rate: compare whole tensors
            assert (ours_saved[key] - theirs_saved[key]).norm() <= 1e-2 * theirs_saved[key].norm(), key
        else:
            torch.testing.assert_close(ours_saved[key], theirs_saved[key], rtol=1e-4, atol=1e-6)
    for name, weight in _base_weights(ours).items():
        assert torch.equal(weight, base_before[name]), name
    # PEFT loads the checkpoint to the model deltatune loads from it (the live model's forward may
    # carry accelerate's autocast wrapper after a bf16 run: fresh loads compare the files alone).
    by_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(final))
    by_us = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(final))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(by_peft(input_ids=ids).logits, by_us(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_sft_trainer_takes_a_deltatune_config_through_peft_config(tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, **COMMON)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    trainer = SFTTrainer(
        model=base, args=args, train_dataset=datasets.Dataset.from_list(_chat_rows(4)),
        processing_class=tokenizer, peft_config=dt.LoraConfig(**LORA),
    )  # fmt: skip
    assert isinstance(trainer.model, dt.PeftModel)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    with pytest.raises(ValueError, match="already has deltatune adapters"):
        SFTTrainer(model=trainer.model, args=args, train_dataset=trainer.train_dataset, peft_config=dt.LoraConfig())


def test_a_stock_trl_trainer_says_what_to_use_instead(tiny, tmp_path):
    _, ours = _pair(tiny)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, **COMMON)
    data = datasets.Dataset.from_list(_chat_rows(2))
    with pytest.raises(TypeError, match="from deltatune.trl_trainers import SFTTrainer"):
        trl.SFTTrainer(model=ours, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(tiny))


def _preference_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(n)]


def test_dpo_trainer_trains_a_deltatune_model_against_its_disabled_adapters(tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = datasets.Dataset.from_list(_preference_rows())
    theirs, ours = _pair(tiny)
    parameters_before = sum(p.numel() for p in ours.parameters())
    results = {}
    for name, model, trainer_class in (("peft", theirs, trl.DPOTrainer), ("deltatune", ours, DPOTrainer)):
        args = trl.DPOConfig(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, learning_rate=0.5, **COMMON
        )
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        assert trainer.ref_model is None  # no second copy of the model: the reference is an adapter switch
        trainer.train()
        results[name] = _losses(trainer)
    assert results["deltatune"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    for got, want in zip(results["deltatune"], results["peft"]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert results["deltatune"][-1] < results["deltatune"][0]
    # TRL keeps the starting adapter as "ref" (PEFT's behaviour for a model that has one): small, not a copy
    assert set(ours.peft_config) == {"default", "ref"}
    adapter_size = sum(p.numel() for n, p in ours.named_parameters() if ".default." in n)
    assert sum(p.numel() for p in ours.parameters()) == parameters_before + adapter_size


def test_grpo_trainer_trains_a_deltatune_model(tiny, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    data = datasets.Dataset.from_list([{"prompt": f"Count to {i}:"} for i in range(8)])
    _, ours = _pair(tiny)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    base_before = _base_weights(ours)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, learning_rate=0.1, beta=0.1, **COMMON,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=ours, reward_funcs=lambda completions, **_: [len(c) / 10 for c in completions],
        args=args, train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.ref_model is None
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls and kls[0] == pytest.approx(0.0, abs=1e-6)  # the reference is where the adapter started
    assert any(not torch.equal(p, before[n]) for n, p in ours.named_parameters() if n in before)
    for name, weight in _base_weights(ours).items():
        assert torch.equal(weight, base_before[name]), name


def test_recognition_lasts_only_while_a_deltatune_trainer_runs(tiny):
    import trl.trainer.dpo_trainer as dpo_module

    original = dpo_module.is_peft_model
    _, ours = _pair(tiny)
    assert not original(ours)
    with integrations.recognised():
        assert dpo_module.is_peft_model(ours) and dpo_module.is_peft_model is not original
        with integrations.recognised():  # re-entrant
            assert dpo_module.is_peft_model(ours)
        assert dpo_module.is_peft_model(ours)
        assert not dpo_module.is_peft_model(copy.deepcopy(ours.get_base_model()))  # other models: the original
    assert dpo_module.is_peft_model is original
