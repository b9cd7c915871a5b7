"""BOFT: HF PEFT's numbers and files (one factor, what PEFT runs on a CPU), the butterfly product of
several factors against its formula, the output scale, merges, and the butterfly's divisibility rules."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune as dt

from conftest import tiny_inputs, tiny_model


def _logits(model, kind="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


@pytest.mark.parametrize(
    "fields", [{}, {"boft_block_size": 0, "boft_block_num": 4}, {"boft_block_size": 8}], ids=["4", "num-4", "8"]
)
def test_peft_s_adapter_gives_peft_s_logits_here_and_back(fields, tmp_path):
    torch.manual_seed(0)
    config = {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_weights": False, **fields}
    theirs = peft.get_peft_model(tiny_model("llama"), peft.BOFTConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-6, rtol=1e-6)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(back), _logits(theirs), atol=1e-6, rtol=1e-6)


def _reference_rotation(R: torch.Tensor, size: int) -> torch.Tensor:
    """M = B_{m-1} ... B_0 with B_i = P_i blockdiag(Cayley(skew R_i)) P_i^T, from the paper's construction:
    P_i interleaves groups of size/2 within chunks of size * 2^i (evens first)."""
    factors, count, block = R.shape[0], R.shape[1], R.shape[-1]
    M = torch.eye(size)
    for i in range(factors):
        S = 0.5 * (R[i] - R[i].transpose(-1, -2))
        eye = torch.eye(block)
        Q = torch.stack([(eye - s) @ torch.linalg.inv(eye + s) for s in S])
        chunk, group = size // (count // 2**i), block // 2
        order = []
        for start in range(0, size, chunk):
            groups = [list(range(start + g, start + g + group)) for g in range(0, chunk, group)]
            order += [j for g in groups[0::2] + groups[1::2] for j in g]
        P = torch.zeros(size, size)
        P[torch.arange(size), torch.tensor(order)] = 1.0
        M = P @ torch.block_diag(*Q) @ P.T @ M
    return M


@pytest.mark.parametrize(("block", "factors"), [(4, 2), (2, 3), (2, 5)])
def test_several_butterfly_factors_give_the_papers_dense_orthogonal_rotation(block, factors):
    config = dt.BOFTConfig(
        boft_block_size=block, boft_n_butterfly_factor=factors, target_modules=["q_proj"], init_weights=False
    )
    layer = dt.get_peft_model(tiny_model("llama"), config).get_base_model().model.layers[0].self_attn.q_proj
    R = layer.boft_R["default"].detach()
    assert R.shape == (factors, 32 // block, block, block)
    M = layer.rotation_matrix("default").detach()
    torch.testing.assert_close(M, _reference_rotation(R, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M @ M.T, torch.eye(32), atol=1e-5, rtol=0)
    reach = (M != 0).sum(1).float().mean()  # structural zeros are exact
    assert reach == min(32, block * 2 ** (factors - 1))  # each factor doubles how many inputs an output sees
    x = torch.randn(3, 32)
    s = layer.boft_s["default"].detach().flatten()
    expected = (x @ M @ layer.base_layer.weight.T) * s
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_merging_scales_rows_and_rotates_columns_and_two_merge_as_they_run():
    model = dt.get_peft_model(tiny_model("llama"), dt.BOFTConfig(target_modules=["q_proj"], init_weights=False))
    torch.manual_seed(4)
    model.add_adapter("b", dt.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".b" in name and param.requires_grad is False and "boft_R" in name:
                param.normal_(0, 0.1)
    model.set_adapter(["default", "b"])
    model.eval()
    both = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), both, atol=1e-5, rtol=1e-5)


def test_boft_dropout_makes_blocks_of_one_factor_the_identity_in_training():
    config = dt.BOFTConfig(boft_block_size=4, boft_dropout=0.5, target_modules=["q_proj"], init_weights=False)
    layer = dt.get_peft_model(tiny_model("llama"), config).get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(1, 32)
    layer.train()
    torch.manual_seed(0)
    dropped = layer.rotate("default", x)
    same = [torch.allclose(dropped[0, 4 * i : 4 * i + 4], x[0, 4 * i : 4 * i + 4]) for i in range(8)]
    assert sum(same) == 4
    layer.eval()
    rotated = layer.rotate("default", x)
    assert not any(torch.allclose(rotated[0, 4 * i : 4 * i + 4], x[0, 4 * i : 4 * i + 4]) for i in range(8))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"boft_block_size": 5}, "not divisible by boft_block_size 5"),
        ({"boft_block_size": 0, "boft_block_num": 3}, "not divisible by boft_block_num 3"),
        ({"boft_block_size": 8, "boft_n_butterfly_factor": 4}, "block size x 2"),
        ({"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 4}, "multiple of 2"),
    ],
)
def test_layers_the_butterfly_cannot_fit_are_named(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.get_peft_model(tiny_model("llama"), dt.BOFTConfig(target_modules=["q_proj"], **fields))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"boft_block_num": 4}, "not both"),
        ({"boft_block_size": 0}, "both are 0"),
        ({"boft_n_butterfly_factor": 0}, "at least 1"),
        ({"boft_dropout": -0.1}, "boft_dropout must be a probability"),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.BOFTConfig(**fields)


def test_a_boft_model_moves_and_casts_with_its_permutations():
    config = dt.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["q_proj"], init_weights=False)
    model = dt.get_peft_model(tiny_model("llama"), config).eval()
    expected = _logits(model).double()
    moved = model.to("cpu").double()
    torch.testing.assert_close(_logits(moved), expected, atol=1e-5, rtol=1e-5)
    assert all(b.dtype == torch.int64 for n, b in moved.named_buffers() if "boft_P" in n)
    assert not any("boft_P" in k for k in dt.checkpoint.adapter_state_dict(moved.get_base_model(), "default"))


def test_a_peft_cpu_checkpoint_with_one_factor_says_so(tmp_path):
    config = {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "target_modules": ["q_proj"]}
    peft.get_peft_model(tiny_model("llama"), peft.BOFTConfig(**config)).save_pretrained(tmp_path)
    with pytest.raises(dt.CheckpointError, match="one butterfly factor"):
        dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
