"""LoRA+: HF PEFT's parameter groups and rates, and ``deltatune train --loraplus-ratio``."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import deltatune as dt
from deltatune.optimizers import create_loraplus_optimizer
from tiny_assets import check_ok, invoke, session_assets, train_args

from conftest import tiny_model

CASES = {
    "lora-embedding": (
        "llama",
        lambda lib: lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    ),
    "lora-bias": ("gpt2", lambda lib: lib.LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only")),
    "vera": ("llama", lambda lib: lib.VeraConfig(r=8, target_modules=["q_proj", "v_proj"])),
    "ln-tuning": ("gpt2", lambda lib: lib.LNTuningConfig()),
    "loha": ("llama", lambda lib: lib.LoHaConfig(r=2, target_modules=["q_proj"])),
}


def _rates(model, optimizer):
    """Each trainable parameter's (lr, weight decay), by name."""
    group_of = {id(p): (round(g["lr"], 12), g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {n: group_of[id(p)] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_gets_peft_s_rate_and_decay(case):
    kind, config = CASES[case]
    options = {"lr": 1e-3, "loraplus_lr_ratio": 16, "loraplus_weight_decay": 0.01}
    ours = dt.get_peft_model(tiny_model(kind), config(dt))
    theirs = peft.get_peft_model(tiny_model(kind), config(peft))
    our_rates = _rates(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **options))
    their_rates = _rates(theirs, peft_loraplus(theirs, torch.optim.AdamW, **options))
    assert our_rates == their_rates
    boosted = any(lr == pytest.approx(0.016) for lr, _ in our_rates.values())
    assert boosted == (case != "loha")  # PEFT's rule: lora_B and 1-D tensors; LoHa's factors are all 2-D


def test_bad_ratios_are_refused():
    model = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=4))
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def test_train_keeps_b_at_the_ratio_through_the_schedule(assets, tmp_path):
    out = tmp_path / "run"
    args = train_args(assets, out, "--max-steps", "3", "--batch-size", "4", "--loraplus-ratio", "16", "--warmup", "1")
    check_ok(invoke(*args))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    groups = {g["loraplus_group"]: g for g in state["optimizer"]["param_groups"]}
    assert set(groups) == {"A", "B"}
    assert groups["B"]["lr"] == pytest.approx(16 * groups["A"]["lr"]) and groups["A"]["lr"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loraplus_ratio"] == 16
    options = ["--batch-size", "4", "--loraplus-ratio", "16", "--warmup", "1"]
    resumed = train_args(assets, out, "--max-steps", "4", *options, "--resume")
    check_ok(invoke(*resumed))
