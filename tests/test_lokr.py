"""LoKr: Kronecker-product updates with HF PEFT's factorisation, shapes, numbers and init modes."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
from peft.utils import get_peft_model_state_dict

import deltatune as dt
from deltatune import checkpoint
from deltatune.methods.lokr import factorization

from conftest import sgd_losses, tiny_inputs, tiny_model


@pytest.mark.parametrize("factor", [-1, 2, 3, 4, 8, 64])
def test_factorization_splits_every_dimension_as_peft_does(factor):
    for dimension in [1, 2, 7, 12, 16, 32, 64, 96, 127, 128, 768, 2304, 4096, 11008]:
        assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


CONFIGS = {
    "default": {},
    "decompose-both": {"r": 2, "decompose_both": True},
    "factor-2": {"r": 1, "decompose_factor": 2},
    "lycoris": {"r": 2, "decompose_both": True, "init_weights": "lycoris"},
}


@pytest.mark.parametrize("fields", list(CONFIGS.values()), ids=list(CONFIGS))
def test_tensor_names_and_shapes_are_peft_s(fields):
    kwargs = {"target_modules": "all-linear", **fields}
    ours = dt.get_peft_model(tiny_model("llama"), dt.LoKrConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoKrConfig(**kwargs))
    our_shapes = {k: tuple(v.shape) for k, v in checkpoint.adapter_state_dict(ours.get_base_model(), "default").items()}
    their_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert our_shapes == their_shapes
    with torch.no_grad():  # every init mode starts at the base model
        base = tiny_model("llama")(**tiny_inputs("llama")).logits
        torch.testing.assert_close(ours(**tiny_inputs("llama")).logits, base)


def test_the_update_is_the_scaled_kronecker_product_and_its_rank_the_product_of_ranks():
    config = dt.LoKrConfig(r=2, alpha=6, decompose_both=True, target_modules=["up_proj"], init_weights=False)
    model = dt.get_peft_model(tiny_model("llama"), config)
    layer = model.get_base_model().model.layers[0].mlp.up_proj  # 32 -> 64: out (8, 8), in (4, 8)
    w1 = layer.lokr_w1_a["default"] @ layer.lokr_w1_b["default"]
    w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]
    assert w1.shape == (8, 4) and w2.shape == (8, 8)
    delta = layer.delta_weight("default").detach()
    i, j, a, b = 5, 3, 2, 6  # the element formula, Delta[i*u2 + j, a*v2 + b] = s * W1[i, a] * W2[j, b]
    assert delta[i * 8 + j, a * 8 + b].item() == pytest.approx(3.0 * (w1[i, a] * w2[j, b]).item(), rel=1e-5)
    assert torch.linalg.matrix_rank(delta) == torch.linalg.matrix_rank(w1) * torch.linalg.matrix_rank(w2) == 4
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_training_steps_equal_peft_from_the_same_weights(tmp_path):
    torch.manual_seed(0)
    config = {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoKrConfig(**config))
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    losses = {name: sgd_losses(model, "llama", lr=1.0) for name, model in (("theirs", theirs), ("ours", ours))}
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]


def test_rank_dropout_rescales_only_with_rank_dropout_scale():
    x = torch.randn(4, 32)
    for scale in (False, True):
        config = dt.LoKrConfig(r=2, rank_dropout=0.5, rank_dropout_scale=scale, init_weights=False)
        model = dt.get_peft_model(tiny_model("llama"), config)
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        full = (x @ layer.delta_weight("default").T).detach()
        model.train()
        torch.manual_seed(1)
        update = (layer(x) - layer.base_layer(x)).detach()
        kept = update.abs().sum(0) > 0
        assert 0 < kept.sum() < 32
        factor = 32 / kept.sum() if scale else 1.0
        torch.testing.assert_close(update[:, kept], factor * full[:, kept], atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_and_merging_there():
    config = dt.LoKrConfig(r=2, target_modules=["c_attn", "c_fc"], init_weights=False)
    model = dt.get_peft_model(tiny_model("gpt2"), config)
    layer = model.get_base_model().transformer.h[0].attn.c_attn  # 32 -> 96: out (8, 12), in (4, 8)
    assert layer.lokr_w1["default"].shape == (8, 4) and layer.lokr_w2_a["default"].shape == (12, 2)
    model.eval()
    before = model(**tiny_inputs("gpt2")).logits.detach()
    model.merge_adapter()
    torch.testing.assert_close(model(**tiny_inputs("gpt2")).logits.detach(), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_weights": "gaussian"}, "init_weights must be True, False or 'lycoris'"),
        ({"decompose_factor": 0}, "decompose_factor must be -1 or a positive integer"),
        ({"r": -1}, "r must be a positive integer"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoKrConfig(**fields)
