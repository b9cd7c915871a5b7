"""VeRA: HF PEFT's projections bit for bit, the paper's update, model-level tensors in checkpoints,
adapters of different ranks side by side, and PEFT's training steps."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from deltatune import checkpoint
from deltatune.methods.vera import projections

from conftest import perturb_trainable, sgd_losses, tiny_inputs, tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _logits(model, kind="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def test_the_shared_projections_are_peft_s_draw_tensor_for_tensor():
    fields = {"r": 4, "target_modules": TARGETS, "projection_prng_key": 5}
    ours = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(**fields))
    theirs = peft.get_peft_model(tiny_model("llama"), peft.VeraConfig(**fields))
    for kind, shape in (("vera_A", (4, 64)), ("vera_B", (64, 4))):  # the largest in (down: 64) and out (up: 64)
        mine, reference = getattr(ours.base_model, kind)["default"], getattr(theirs.base_model, kind)["default"]
        assert mine.shape == shape and torch.equal(mine, reference)
    A, B = projections(4, 64, 64, seed=5)
    assert torch.equal(A, ours.base_model.vera_A["default"]) and A.abs().max() <= (6 / 64) ** 0.5
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_the_update_is_lambda_b_B_lambda_d_A_on_each_layers_block_of_the_projections():
    model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS, init_weights=False))
    layer = model.get_base_model().model.layers[0].self_attn.v_proj  # 32 -> 16
    A, B = model.base_model.vera_A["default"][:, :32], model.base_model.vera_B["default"][:16]
    b, d = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
    assert b.shape == (16,) and d.shape == (4,)  # what the layer trains: out + r numbers
    delta = torch.diag(b) @ B @ torch.diag(d) @ A
    torch.testing.assert_close(layer.delta_weight("default"), delta)
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    fresh = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS, d_initial=0.3))
    q = fresh.get_base_model().model.layers[0].self_attn.q_proj
    assert q.vera_lambda_b["default"].abs().sum() == 0 and torch.all(q.vera_lambda_d["default"] == 0.3)
    torch.testing.assert_close(_logits(fresh), _logits(tiny_model("llama")))


def test_projections_are_saved_once_at_model_level_or_rebuilt_from_the_seed(tmp_path):
    for save in (True, False):
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS, save_projection=save))
        perturb_trainable(model)
        folder = tmp_path / str(save)
        model.save_pretrained(folder)
        keys = set(checkpoint.load_tensors(folder))
        assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) is save
        assert {k for k in keys if "vera_A" in k or "vera_B" in k} <= {"base_model.vera_A", "base_model.vera_B"}
        loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), folder)
        torch.testing.assert_close(_logits(loaded), _logits(model.eval()), atol=1e-6, rtol=1e-6)


def test_a_checkpoint_that_promises_projections_and_lacks_them_names_the_file(tmp_path):
    model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(tmp_path)
    state = checkpoint.load_tensors(tmp_path)
    del state["base_model.vera_A"]
    checkpoint.save_tensors(state, tmp_path / checkpoint.WEIGHTS_NAME)
    with pytest.raises(dt.CheckpointError, match=r"no base_model\.vera_A"):
        dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    state["base_model.vera_A"] = torch.zeros(4, 12)
    checkpoint.save_tensors(state, tmp_path / checkpoint.WEIGHTS_NAME)
    with pytest.raises(dt.CheckpointError, match=r"shape mismatch for base_model\.vera_A.*\(4, 12\)"):
        dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_adapters_of_different_ranks_and_seeds_coexist_and_mix_in_one_batch(tmp_path):
    model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS, init_weights=False))
    model.add_adapter("wide", dt.VeraConfig(r=8, projection_prng_key=1, target_modules=["q_proj"], init_weights=False))
    model.eval()
    alone = {}
    for name in ("default", "wide"):
        model.set_adapter(name)
        alone[name] = _logits(model)
    mixed = model(**tiny_inputs("llama"), adapter_names=["wide", "default"]).logits.detach()
    torch.testing.assert_close(mixed[0], alone["wide"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], alone["default"][1], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # each adapter in its own folder, each read by PEFT alone
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "wide")).eval()
    torch.testing.assert_close(_logits(theirs), alone["wide"], atol=1e-5, rtol=1e-5)
    model.delete_adapter("wide")
    assert "wide" not in model.base_model.vera_A and model.base_model.vera_A["default"].shape == (4, 64)


def test_training_steps_and_trained_biases_equal_peft(tmp_path):
    torch.manual_seed(0)
    config = {"r": 8, "target_modules": ["c_attn", "c_fc"], "bias": "vera_only"}
    theirs = peft.get_peft_model(tiny_model("gpt2"), peft.VeraConfig(**config))
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path, is_trainable=True)
    assert ours.peft_config["default"].fan_in_fan_out  # Conv1D, recorded as PEFT does
    losses = {
        name: sgd_losses(model, "gpt2", lr=2.0, seed=1) for name, model in (("theirs", theirs), ("ours", ours))
    }  # GPT-2's own dropouts draw the same masks in both
    assert losses["ours"] == pytest.approx(losses["theirs"], abs=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]
    ours.save_pretrained(tmp_path / "ours")
    assert any(k.endswith("c_attn.base_layer.bias") for k in checkpoint.load_tensors(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(tiny_model("gpt2"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(back, "gpt2"), _logits(ours.eval(), "gpt2"), atol=1e-5, rtol=1e-5)


def test_on_a_bf16_base_the_projections_are_rounded_as_peft_rounds_them():
    base = tiny_model("llama").to(torch.bfloat16)
    ours = dt.get_peft_model(base, dt.VeraConfig(r=4, target_modules=TARGETS))
    theirs = peft.get_peft_model(tiny_model("llama").to(torch.bfloat16), peft.VeraConfig(r=4, target_modules=TARGETS))
    mine = ours.base_model.vera_A["default"]
    assert mine.dtype == torch.float32 and torch.equal(mine, theirs.base_model.vera_A["default"])


def test_moving_the_model_moves_the_projections_once():
    model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=TARGETS, init_weights=False))
    expected = _logits(model.eval()).double()
    model.double()
    assert model.base_model.vera_A["default"].dtype == torch.float64
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    assert sum(".vera_A" in n for n, _ in model.named_buffers()) == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"projection_prng_key": -1}, "projection_prng_key must be a non-negative integer"),
        ({"vera_dropout": 1.5}, "vera_dropout must be a probability"),
        ({"bias": "lora_only"}, "bias must be 'none', 'all' or 'vera_only'"),
        ({"save_projection": "yes"}, "save_projection=.yes. is not a bool"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.VeraConfig(**fields)


def test_initialisation_draws_what_peft_draws():
    config = {"r": 4, "target_modules": TARGETS}
    torch.manual_seed(0)
    ours = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(**config, init_weights=False))
    after_ours = torch.rand(1)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.VeraConfig(**config, init_weights=False))
    after_theirs = torch.rand(1)
    ours_d = {n: p for n, p in ours.named_parameters() if "vera_lambda_d" in n}
    theirs_d = {n: p for n, p in theirs.named_parameters() if "vera_lambda_d" in n}
    assert ours_d.keys() == theirs_d.keys() and all(torch.equal(ours_d[n], theirs_d[n]) for n in ours_d)
    assert torch.equal(after_ours, after_theirs)  # the global random stream stays in step
