"""``save_as_lora``: any weight-delta adapter as a plain LoRA adapter, read by deltatune and HF PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.lora_export import low_rank_factors

from conftest import perturb_trainable, tiny_inputs, tiny_model


def _adapted(kind, config):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model(kind), config)
    perturb_trainable(model)
    return model.eval()


def _logits(model, kind):
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def test_low_rank_factors_are_the_truncated_svd():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 4, generator=generator) @ torch.randn(4, 9, generator=generator)
    A, B, error = low_rank_factors(delta, 4)
    assert A.shape == (4, 9) and B.shape == (12, 4) and error < 1e-5
    torch.testing.assert_close(B @ A, delta, atol=1e-5, rtol=1e-5)
    A, B, error = low_rank_factors(delta, 2)
    singular = torch.linalg.svdvals(delta)
    assert error == pytest.approx(float(singular[2:].norm() / singular.norm()), rel=1e-4)  # Eckart-Young
    A, B, _ = low_rank_factors(delta, 16)  # more than the layer has: zero-padded
    assert A.shape == (16, 9) and B.shape == (12, 16) and A[9:].abs().sum() == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_lora_saved_at_its_own_rank_is_exact_and_peft_reads_it(kind, tmp_path):
    model = _adapted(kind, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = _logits(model, kind)
    report = model.save_as_lora(tmp_path, rank=4)
    assert report.max_error < 1e-5 and len(report.errors) > 4
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 4
    ours = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    torch.testing.assert_close(_logits(ours, kind), expected, atol=1e-5, rtol=1e-4)
    theirs = peft.PeftModel.from_pretrained(tiny_model(kind).eval(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, kind), expected, atol=1e-5, rtol=1e-4)


def test_dora_and_ia3_become_lora_with_the_error_reported(tmp_path):
    for name, config in {
        "dora": dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
        "ia3": dt.IA3Config(),
    }.items():
        model = _adapted("llama", config)
        expected = _logits(model, "llama")
        cut = model.save_as_lora(tmp_path / f"{name}-4", rank=4)
        assert 0 < cut.max_error < 1  # a full-rank change cut to rank 4
        full = model.save_as_lora(tmp_path / f"{name}-64", rank=64)  # every layer's full rank
        assert full.max_error < 1e-4, name
        loaded = peft.PeftModel.from_pretrained(tiny_model("llama").eval(), str(tmp_path / f"{name}-64")).eval()
        torch.testing.assert_close(_logits(loaded, "llama"), expected, atol=1e-4, rtol=1e-4)
        rough = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / f"{name}-4")
        assert not torch.allclose(_logits(rough, "llama"), expected, atol=1e-5)


def test_a_classifier_head_trained_next_to_the_adapter_is_kept(tmp_path):
    model = _adapted("bert", dt.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    expected = _logits(model, "bert")
    model.save_as_lora(tmp_path, rank=4)
    loaded = dt.PeftModel.from_pretrained(tiny_model("bert"), tmp_path)
    torch.testing.assert_close(_logits(loaded, "bert"), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (lambda: dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), "virtual tokens"),
        (lambda: dt.BottleneckConfig(reduction_factor=4), "nonlinear module"),
    ],
)
def test_adapters_that_are_not_weight_changes_are_refused_with_the_reason(config, message, tmp_path):
    model = _adapted("llama", config())
    with pytest.raises(dt.ConfigError, match=message):
        model.save_as_lora(tmp_path, rank=4)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(dt.ConfigError, match="positive integer"):
        model.save_as_lora(tmp_path, rank=0)


def test_a_merged_adapter_is_refused_with_the_fix(tmp_path):
    model = _adapted("llama", dt.IA3Config())
    model.merge_adapter()
    with pytest.raises(dt.ConfigError, match="unmerge_adapter"):
        model.save_as_lora(tmp_path, rank=4)
