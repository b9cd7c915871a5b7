"""LoHa: the paper's update, HF PEFT's numbers in training, the LyCORIS dropouts, and GPT-2's Conv1D."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt

from conftest import perturb_trainable, sgd_losses, tiny_inputs, tiny_model


def _layer(model, path="model.layers.0.self_attn.q_proj"):
    return model.get_base_model().get_submodule(path)


def test_the_update_is_the_scaled_hadamard_product_of_two_low_rank_products():
    model = dt.get_peft_model(tiny_model("llama"), dt.LoHaConfig(r=3, alpha=5, init_weights=False))
    layer = _layer(model)
    w1a, w1b, w2a, w2b = (getattr(layer, n)["default"] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    assert w1a.shape == (32, 3) and w1b.shape == (3, 32)
    delta = (5 / 3) * (w1a @ w1b) * (w2a @ w2b)
    torch.testing.assert_close(layer.delta_weight("default"), delta)
    x = torch.randn(2, 4, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta.detach()) > 3  # a Hadamard product exceeds its factors' rank r


def test_a_fresh_adapter_is_the_base_model_and_trains_all_four_factors():
    model = dt.get_peft_model(tiny_model("llama"), dt.LoHaConfig(target_modules="all-linear"))
    base = tiny_model("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**tiny_inputs("llama")).logits, base(**tiny_inputs("llama")).logits)
    model.train()
    model(**tiny_inputs("llama"), labels=tiny_inputs("llama")["input_ids"]).loss.backward()
    grads = {n.split(".")[-2] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "hada_w2_b" in grads  # the zero factor gets the gradient first; the other three follow from it
    assert model.get_nb_trainable_parameters()[0] == 2 * sum(4 * 8 * (i + o) // 2 for i, o in _linear_shapes())


def _linear_shapes():
    """(in, out) of every linear layer of the tiny Llama's two blocks (q, k, v, o, gate, up, down)."""
    return [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]


def test_training_steps_equal_peft_from_the_same_weights(tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny_model("llama"), peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    theirs_losses, our_losses = sgd_losses(theirs, "llama", lr=0.5), sgd_losses(ours, "llama", lr=0.5)
    assert our_losses == pytest.approx(theirs_losses, abs=1e-5) and our_losses[-1] < our_losses[0]
    theirs_state = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs_state[name], atol=1e-5, rtol=1e-5)


def test_rank_dropout_drops_output_rows_and_rescales_and_module_dropout_skips_only_in_training():
    model = dt.get_peft_model(tiny_model("llama"), dt.LoHaConfig(r=2, rank_dropout=0.5, init_weights=False))
    layer = _layer(model)
    x = torch.randn(3, 32)
    delta = layer.delta_weight("default").detach()
    model.train()
    torch.manual_seed(3)
    update = (layer(x) - layer.base_layer(x)).detach()
    kept = torch.isclose(update, torch.zeros_like(update), atol=1e-7).all(0).logical_not()
    assert 0 < kept.sum() < 32  # whole output rows of the delta dropped
    scale = 32 / kept.sum()  # the kept rows divided by the share kept
    torch.testing.assert_close(update[:, kept], scale * (x @ delta.T)[:, kept], atol=1e-5, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ delta.T, atol=1e-5, rtol=1e-5)

    skipping = dt.get_peft_model(tiny_model("llama"), dt.LoHaConfig(r=2, module_dropout=0.5, init_weights=False))
    layer = _layer(skipping)
    skipping.train()
    torch.manual_seed(0)
    skipped = [torch.equal(layer(x), layer.base_layer(x)) for _ in range(40)]
    assert 5 < sum(skipped) < 35


def test_gpt2_conv1d_layers_are_adapted_where_peft_refuses_them(tmp_path):
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(tiny_model("gpt2"), peft.LoHaConfig(target_modules=["c_attn"]))
    model = dt.get_peft_model(tiny_model("gpt2"), dt.LoHaConfig(r=2, target_modules=["c_attn"], init_weights=False))
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.hada_w1_a["default"].shape == (96, 2)  # (out, r): c_attn is 32 -> 96
    x = torch.randn(2, 5, 32)
    expected = layer.base_layer(x) + x @ layer.delta_weight("default").T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    before = model.eval()(**tiny_inputs("gpt2")).logits.detach()
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**tiny_inputs("gpt2")).logits.detach(), before, atol=1e-5, rtol=1e-4)


def test_rank_and_alpha_patterns_apply_per_module_as_in_peft(tmp_path):
    config = {"r": 4, "alpha": 4, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 3}}
    ours = dt.get_peft_model(tiny_model("llama"), dt.LoHaConfig(**config, init_weights=False))
    assert _layer(ours, "model.layers.0.self_attn.v_proj").hada_w1_a["default"].shape == (16, 2)
    assert _layer(ours, "model.layers.1.self_attn.q_proj").scaling["default"] == 3 / 4
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(**tiny_inputs("llama")).logits, ours.eval()(**tiny_inputs("llama")).logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r=2.5 is not a 64-bit int"),
        ({"rank_dropout": 1.0}, r"rank_dropout must be a probability in \[0, 1\)"),
        ({"module_dropout": -0.1}, "module_dropout"),
        ({"init_weights": "lycoris"}, "init_weights must be True or False"),
        ({"alpha": "8"}, "alpha=.8. is not a finite float"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"target_modules": 3}, "target_modules=3 is not a list of str"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoHaConfig(**fields)
