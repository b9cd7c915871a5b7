"""LN tuning: every norm found by type (PEFT's table without one), copies that replace the norms,
PEFT's training steps, and merging as a swap that still saves the trained copy."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from deltatune import checkpoint
from deltatune.methods.ln_tuning import LNTuningLayer

from conftest import sgd_losses, tiny_inputs, tiny_model


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LNTuningLayer))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_the_default_targets_are_the_norms_peft_s_per_model_table_names(kind):
    ours = dt.get_peft_model(tiny_model(kind), dt.LNTuningConfig())
    theirs = peft.get_peft_model(tiny_model(kind), peft.LNTuningConfig())
    their_paths = sorted(n for n, m in theirs.named_modules() if hasattr(m, "ln_tuning_layers"))
    assert their_paths == _wrapped(ours)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_bert_gets_its_layer_norms_where_peft_has_no_default():
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(tiny_model("bert"), peft.LNTuningConfig())
    model = dt.get_peft_model(tiny_model("bert"), dt.LNTuningConfig(task_type="SEQ_CLS"))
    assert model.peft_config["default"].target_modules == ["LayerNorm"]
    assert len(_wrapped(model)) == 5  # embeddings + two per block
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "ln_tuning_layers" in n]
    assert len(trainable) == 10 and all(n.endswith(("weight", "bias")) for n in trainable)


def test_a_copy_replaces_the_norm_and_only_the_copies_train():
    model = dt.get_peft_model(tiny_model("llama"), dt.LNTuningConfig())
    layer = model.get_base_model().model.norm
    with torch.no_grad():
        layer.ln_tuning_layers["default"].weight.mul_(2.0)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), 2.0 * layer.base_layer(x))
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    model.add_adapter("other", dt.LNTuningConfig())
    assert torch.all(layer.ln_tuning_layers["other"].weight == 1)  # a copy of the original, not of the trained one
    model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter's copy"):
        layer(x)


def test_training_steps_equal_peft_from_the_same_weights(tmp_path):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LNTuningConfig())
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    losses = {name: sgd_losses(model, "llama", lr=5.0) for name, model in (("theirs", theirs), ("ours", ours))}
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]


def test_merging_swaps_the_copy_in_and_saving_while_merged_keeps_the_trained_weights(tmp_path):
    model = dt.get_peft_model(tiny_model("llama"), dt.LNTuningConfig())
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.fill_(1.5)
    model.eval()
    expected = model(**tiny_inputs("llama")).logits.detach()
    model.merge_adapter()
    torch.testing.assert_close(model(**tiny_inputs("llama")).logits.detach(), expected)
    model.save_pretrained(tmp_path)
    saved = checkpoint.load_tensors(tmp_path)
    assert all(torch.all(t == 1.5) for t in saved.values())  # PEFT 0.21 writes the swapped-out 1.0 here
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("other", dt.LNTuningConfig())
        model.merge_adapter(["other"])
    model.unmerge_adapter()
    torch.testing.assert_close(model.get_base_model().model.norm.base_layer.weight, torch.ones(32))
    plain = model.merge_and_unload(adapter_names=["default"])
    assert not _wrapped(plain) and torch.all(plain.model.norm.weight == 1.5)


def test_copies_keep_a_half_precision_bases_dtype():
    model = dt.get_peft_model(tiny_model("llama").to(torch.bfloat16), dt.LNTuningConfig())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    model(**tiny_inputs("llama")).logits.float().sum().backward()


def test_switching_adapters_while_merged_keeps_the_copy_trainable():
    model = dt.get_peft_model(tiny_model("llama"), dt.LNTuningConfig())
    model.merge_adapter()
    model.set_adapter("default")
    model.unmerge_adapter()
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained and all("ln_tuning_layers" in n for n in trained)
