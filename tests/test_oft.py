"""OFT: the paper's rotation (exact and Cayley-Neumann), HF PEFT's numbers and files, COFT's radius,
block sizes moved to divisors, and merges that agree with the forward."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.oft import nearest_divisor

from conftest import tiny_inputs, tiny_model

CONFIGS = {
    "neumann": {"oft_block_size": 8},
    "exact": {"oft_block_size": 8, "use_cayley_neumann": False},
    "r": {"r": 4, "oft_block_size": 0},
    "shared": {"oft_block_size": 8, "block_share": True},
    "three-terms": {"oft_block_size": 8, "num_cayley_neumann_terms": 3},
    "moved": {"oft_block_size": 7},
}


def _logits(model, kind="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


@pytest.mark.parametrize("fields", list(CONFIGS.values()), ids=list(CONFIGS))
def test_peft_s_adapter_gives_peft_s_logits_here(fields, tmp_path):
    torch.manual_seed(0)
    config = {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": False, **fields}
    theirs = peft.get_peft_model(tiny_model("llama"), peft.OFTConfig(**config)).eval()
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-6, rtol=1e-6)


def test_the_rotation_is_the_cayley_transform_of_the_stored_triangle():
    config = dt.OFTConfig(oft_block_size=4, use_cayley_neumann=False, target_modules=["q_proj"], init_weights=False)
    model = dt.get_peft_model(tiny_model("llama"), config)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    vector = layer.oft_R["default"].weight[0].detach()  # block 0: the 6 entries above the diagonal, row by row
    Q = torch.zeros(4, 4)
    Q[0, 1], Q[0, 2], Q[0, 3], Q[1, 2], Q[1, 3], Q[2, 3] = vector
    Q = Q - Q.T
    R = (torch.eye(4) - Q) @ torch.linalg.inv(torch.eye(4) + Q)
    full = layer.rotation_matrix("default").detach()
    torch.testing.assert_close(full[:4, :4], R, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full @ full.T, torch.eye(32), atol=1e-5, rtol=0)  # orthogonal
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), layer.base_layer(x @ full), atol=1e-5, rtol=1e-5)
    series = dt.OFTConfig(oft_block_size=4, num_cayley_neumann_terms=12, target_modules=["q_proj"], init_weights=False)
    torch.manual_seed(0)
    approx = dt.get_peft_model(tiny_model("llama"), series).get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        approx.oft_R["default"].weight.copy_(layer.oft_R["default"].weight)
    # The series approximates (I + Q)(I - Q)^-1, the exact branch's transpose (HF PEFT's convention).
    torch.testing.assert_close(approx.rotation_matrix("default").detach(), full.T, atol=1e-4, rtol=0)


def test_coft_keeps_each_block_within_its_radius():
    config = dt.OFTConfig(oft_block_size=8, coft=True, eps=1e-2, target_modules=["q_proj"], init_weights=False)
    model = dt.get_peft_model(tiny_model("llama"), config)
    rotation = model.get_base_model().model.layers[0].self_attn.q_proj.oft_R["default"]
    model(**tiny_inputs("llama"))
    norms = 2**0.5 * rotation.weight.detach().norm(dim=1)  # the skew matrices' Frobenius norms
    assert torch.all(norms <= 1e-2 / 4**0.5 + 1e-7)


def test_a_block_size_that_does_not_divide_moves_to_the_nearest_divisor(caplog):
    assert [nearest_divisor(32, b) for b in (5, 7, 6, 100, 32)] == [4, 8, 4, 32, 32]
    assert nearest_divisor(48, 7) == 6
    config = dt.OFTConfig(oft_block_size=7, target_modules=["q_proj", "down_proj"])
    model = dt.get_peft_model(tiny_model("llama"), config)
    assert "used the nearest divisor: 8 for inputs of 32, 8 for inputs of 64" in caplog.text
    assert model.get_base_model().model.layers[0].mlp.down_proj.oft_R["default"].weight.shape == (8, 28)


def test_two_merged_adapters_equal_the_same_two_unmerged():
    model = dt.get_peft_model(
        tiny_model("llama"), dt.OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False)
    )
    torch.manual_seed(5)
    model.add_adapter("b", dt.OFTConfig(oft_block_size=4, target_modules=["q_proj"], init_weights=False))
    model.set_adapter(["default", "b"])
    model.eval()
    both = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)  # PEFT 0.21 differs by 0.5 here
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)


def test_module_dropout_replaces_blocks_by_the_identity_in_training_only():
    config = dt.OFTConfig(oft_block_size=4, module_dropout=0.5, target_modules=["q_proj"], init_weights=False)
    layer = dt.get_peft_model(tiny_model("llama"), config).get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(1, 32)
    rotated = layer.rotate("default", x)
    layer.train()
    torch.manual_seed(0)
    dropped = layer.rotate("default", x)
    same = [torch.allclose(dropped[0, 4 * i : 4 * i + 4], x[0, 4 * i : 4 * i + 4]) for i in range(8)]
    assert sum(same) == 4  # int(0.5 * 8) blocks pass their input unrotated
    assert not torch.allclose(rotated, x)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"r": 4}, "not both"),
        ({"oft_block_size": 0}, "both are 0"),
        ({"bias": "lora_only"}, "bias must be 'none', 'all' or 'oft_only'"),
        ({"module_dropout": 1.0}, "module_dropout must be a probability"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.OFTConfig(**fields)


def test_an_adapter_from_peft_before_0_14_is_refused_with_the_reason():
    with pytest.raises(dt.ConfigError, match="before 0.14"):
        dt.PeftConfig.from_dict({"peft_type": "OFT", "r": 8})
