"""(IA)³ (Liu et al. 2022): the paper's formulas by hand, merging, and HF PEFT interop both ways.

Keys and values scale their projection's output, bias included: ``y = l ⊙ (W x + b)``. The FFN's
down projection scales its input, the FFN activation: ``y = W (l ⊙ x) + b``. Vectors start at 1.
"""

from __future__ import annotations

import json
import logging

import peft
import pytest
import torch
from peft.tuners.ia3 import IA3Layer
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.adapter_layer import AdapterLayer
from deltatune.config import ConfigError
from deltatune.engine import TargetModuleError
from deltatune.methods.ia3 import IA3Config, IA3Linear

from conftest import tiny_inputs, tiny_model

KINDS = ["llama", "gpt2", "bert", "t5"]


class Toy(nn.Module):
    """Keys/values-like ``k`` and a feed-forward ``ff``, both with biases; Conv1D or nn.Linear."""

    def __init__(self, d_in: int = 6, d_out: int = 5, conv1d: bool = False) -> None:
        super().__init__()
        make = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
        self.k = make(d_in, d_out)
        self.ff = make(d_in, d_out)
        for module in (self.k, self.ff):
            nn.init.normal_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.k(x), self.ff(x)], dim=-1)


def out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def toy_pair(conv1d: bool = False, **config) -> tuple[dt.PeftModel, Toy]:
    torch.manual_seed(0)
    model, reference = Toy(conv1d=conv1d), Toy(conv1d=conv1d)
    reference.load_state_dict(model.state_dict())
    config = {"target_modules": ["k", "ff"], "feedforward_modules": ["ff"], "init_ia3_weights": False, **config}
    return dt.get_peft_model(model, IA3Config(**config)), reference


X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5))


def by_hand(reference: Toy, l_k: torch.Tensor, l_ff: torch.Tensor) -> torch.Tensor:
    y_k = l_k * (X @ out_in(reference.k).T + reference.k.bias)
    y_ff = (l_ff * X) @ out_in(reference.ff).T + reference.ff.bias
    return torch.cat([y_k, y_ff], dim=-1)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_formula_by_hand(conv1d):
    pm, reference = toy_pair(conv1d)
    k, ff = pm.base_model.model.k, pm.base_model.model.ff
    assert isinstance(k, IA3Linear) and isinstance(ff, IA3Linear)
    l_k, l_ff = k.ia3_l["default"], ff.ia3_l["default"]
    assert l_k.shape == (5, 1) and l_ff.shape == (1, 6)  # PEFT's shapes: (out, 1) and (1, in)
    expected = by_hand(reference, l_k.flatten(), l_ff.flatten())
    torch.testing.assert_close(pm(X), expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected, reference(X), atol=1e-3)


def test_active_adapters_multiply_and_disable_gives_base():
    pm, reference = toy_pair()
    pm.add_adapter("second", IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"], init_ia3_weights=False))
    pm.set_adapter(["default", "second"])
    k, ff = pm.base_model.model.k, pm.base_model.model.ff
    l_k = (k.ia3_l["default"] * k.ia3_l["second"]).flatten()
    l_ff = (ff.ia3_l["default"] * ff.ia3_l["second"]).flatten()
    torch.testing.assert_close(pm(X), by_hand(reference, l_k, l_ff), atol=1e-6, rtol=1e-6)
    with pm.disable_adapter():
        assert torch.equal(pm(X), reference(X))


def test_mixed_adapter_batch_rows_match_single_adapter_runs():
    pm = dt.get_peft_model(tiny_model("llama"), IA3Config(init_ia3_weights=False)).eval()
    pm.add_adapter("second", IA3Config(target_modules=["q_proj", "down_proj"], init_ia3_weights=False))
    inputs = tiny_inputs("llama", batch=3)
    with torch.no_grad():
        mixed = pm(**inputs, adapter_names=["second", "__base__", "default"]).logits
        pm.set_adapter("second")
        second = pm(**inputs).logits
        pm.set_adapter("default")
        default = pm(**inputs).logits
        with pm.disable_adapter():
            base = pm(**inputs).logits
    torch.testing.assert_close(mixed[0], second[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[2], default[2], atol=1e-5, rtol=0)
    assert not torch.allclose(second[0], default[0], atol=1e-3)


def test_trainable_parameters_are_the_vectors():
    pm, _ = toy_pair()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.k.ia3_l.default", "base_model.model.ff.ia3_l.default"}


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_at_init_equal_base_exactly(kind):
    base = tiny_model(kind)
    with torch.no_grad():
        expected = base(**tiny_inputs(kind)).logits
    pm = dt.get_peft_model(tiny_model(kind), IA3Config())
    layers = [m for m in pm.modules() if isinstance(m, IA3Linear)]
    assert layers and all(torch.equal(m.ia3_l["default"], torch.ones_like(m.ia3_l["default"])) for m in layers)
    with torch.no_grad():
        assert torch.equal(pm(**tiny_inputs(kind)).logits, expected)


# -- HF PEFT interop ------------------------------------------------------------------------------
EXPLICIT = {
    "llama": {
        "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    },
    "gpt2": {"target_modules": ["c_attn", "c_fc", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]},
    "bert": {
        "target_modules": r".*\.(query|value|intermediate\.dense|output\.dense)",
        "feedforward_modules": r".*layer\.\d+\.output\.dense",
    },
    "t5": {"target_modules": ["q", "k", "v", "o", "wi", "wo"], "feedforward_modules": ["wo"]},
}
CASES = [pytest.param(kind, variant, id=f"{kind}-{variant}") for kind in KINDS for variant in ("default", "explicit")]


def config_kwargs(kind: str, variant: str) -> dict:
    kwargs = dict(EXPLICIT[kind]) if variant == "explicit" else {}
    kwargs["init_ia3_weights"] = False
    if kind == "bert":
        kwargs["task_type"] = "SEQ_CLS"
    return kwargs


def perturb_trainable(model: nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def saved(directory) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


def peft_paths(model: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, IA3Layer)}


def our_paths(model: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, IA3Linear)}


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_peft_checkpoint_loads_in_deltatune(kind, variant, tmp_path):
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model(kind), peft.IA3Config(**config_kwargs(kind, variant)))
    perturb_trainable(reference)
    reference.eval()
    expected = logits(reference, kind)
    reference.save_pretrained(tmp_path)

    loaded = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    assert our_paths(loaded) == peft_paths(reference)
    torch.testing.assert_close(logits(loaded, kind), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, logits(tiny_model(kind), kind), atol=1e-3), "adapter had no effect"

    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kind), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_deltatune_checkpoint_loads_in_peft(kind, variant, tmp_path):
    torch.manual_seed(3)
    ours = dt.get_peft_model(tiny_model(kind), IA3Config(**config_kwargs(kind, variant)))
    perturb_trainable(ours)
    ours.eval()
    expected = logits(ours, kind)
    ours.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and list(config) == sorted(config)
    assert set(config) <= {f for f in peft.IA3Config.__dataclass_fields__}, "old PEFT rejects unknown fields"

    reference = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    assert peft_paths(reference) == our_paths(ours)
    torch.testing.assert_close(logits(reference, kind), expected, atol=1e-5, rtol=0)
    reference.save_pretrained(tmp_path / "peft")
    assert saved(tmp_path / "peft") == saved(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_and_parameter_count_match_peft(kind):
    kwargs = {"task_type": "SEQ_CLS"} if kind == "bert" else {}
    reference = peft.get_peft_model(tiny_model(kind), peft.IA3Config(**kwargs))
    ours = dt.get_peft_model(tiny_model(kind), IA3Config(**kwargs))
    assert our_paths(ours) == peft_paths(reference)
    shapes = {n: tuple(p.shape) for n, p in reference.named_parameters() if p.requires_grad}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters() if p.requires_grad} == shapes
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    ref_config, our_config = reference.peft_config["default"], ours.peft_config["default"]
    assert set(our_config.target_modules) == set(ref_config.target_modules)
    assert set(our_config.feedforward_modules) == set(ref_config.feedforward_modules)


def test_peft_config_with_filled_in_feedforward_loads(tmp_path, caplog):
    """PEFT fills feedforward_modules from its table and then cannot load its own checkpoint; we can."""
    reference = peft.get_peft_model(
        tiny_model("llama"), peft.IA3Config(target_modules=["q_proj", "v_proj"], init_ia3_weights=False)
    )
    reference.eval()
    reference.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"] == ["down_proj"]
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert "not a subset of target_modules" in caplog.text
    torch.testing.assert_close(logits(loaded, "llama"), logits(reference, "llama"), atol=1e-5, rtol=0)
    loaded.save_pretrained(tmp_path / "again")  # and what we write back, PEFT loads
    again = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again, "llama"), logits(reference, "llama"), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kind", "targets", "written", "n_ffn"),
    [
        ("llama", ["q_proj", "v_proj"], [], 0),
        ("llama", ["k_proj", "v_proj", "mlp.down_proj"], ["mlp.down_proj"], 2),
        ("gpt2", "all-linear", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], 2),
        ("bert", ["dense"], str, 4),  # attention.output.dense and output.dense are FFN modules, as in PEFT
    ],
    ids=["unused-ffn", "ffn-by-suffix", "all-linear", "regex-needed"],
)
def test_defaulted_feedforward_is_saved_in_a_form_peft_loads(kind, targets, written, n_ffn, tmp_path):
    """PEFT refuses feedforward_modules outside target_modules (string for string) when loading."""
    ours = dt.get_peft_model(tiny_model(kind), IA3Config(target_modules=targets, init_ia3_weights=False)).eval()
    ours.save_pretrained(tmp_path)
    saved_ffn = json.loads((tmp_path / "adapter_config.json").read_text())["feedforward_modules"]
    assert isinstance(saved_ffn, str) if written is str else saved_ffn == written
    reference = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    ff_ref = {n for n, m in reference.base_model.model.named_modules() if isinstance(m, IA3Layer) and m.is_feedforward}
    ff_ours = {
        n for n, m in ours.base_model.model.named_modules() if isinstance(m, IA3Linear) and m.is_feedforward["default"]
    }
    assert ff_ref == ff_ours and len(ff_ours) == n_ffn
    torch.testing.assert_close(logits(reference, kind), logits(ours, kind), atol=1e-5, rtol=0)


def test_feedforward_entries_are_plain_suffixes_as_in_peft(tmp_path):
    """PEFT marks a target feed-forward when its path ends with an entry, dot or not: "o" takes T5's "wo" too."""
    kwargs = {"target_modules": ["o", "wo"], "feedforward_modules": ["o"], "init_ia3_weights": False}
    reference = peft.get_peft_model(tiny_model("t5"), peft.IA3Config(**kwargs)).eval()
    reference.save_pretrained(tmp_path)
    ours = dt.get_peft_model(tiny_model("t5"), IA3Config(**kwargs))
    ff = {
        n for n, m in ours.base_model.model.named_modules() if isinstance(m, IA3Linear) and m.is_feedforward["default"]
    }
    assert ff == {
        n for n, m in reference.base_model.model.named_modules() if isinstance(m, IA3Layer) and m.is_feedforward
    }
    assert any(n.endswith(".wo") for n in ff)
    loaded = dt.PeftModel.from_pretrained(tiny_model("t5"), tmp_path)
    torch.testing.assert_close(logits(loaded, "t5"), logits(reference, "t5"), atol=1e-5, rtol=0)


def test_layers_to_transform_checkpoint_loads_in_peft(tmp_path):
    """PEFT's (IA)³ has no layers_to_transform: the saved target_modules name the adapted paths."""
    ours = dt.get_peft_model(tiny_model("llama"), IA3Config(layers_to_transform=[1], init_ia3_weights=False)).eval()
    assert our_paths(ours) and all(".layers.1." in p for p in our_paths(ours))
    ours.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    assert peft_paths(reference) == our_paths(ours)
    torch.testing.assert_close(logits(reference, "llama"), logits(ours, "llama"), atol=1e-5, rtol=0)
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, "llama"), logits(ours, "llama"), atol=1e-5, rtol=0)


def test_training_gradients_match_peft(tmp_path):
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(init_ia3_weights=False))
    reference.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    inputs = tiny_inputs("llama")
    ref_loss = reference(**inputs, labels=inputs["input_ids"]).loss
    our_loss = ours(**inputs, labels=inputs["input_ids"]).loss
    torch.testing.assert_close(our_loss, ref_loss, atol=1e-6, rtol=0)
    ref_loss.backward()
    our_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_merge_unmerge_round_trip(kind):
    model = tiny_model(kind)
    with torch.no_grad():  # the tiny models' biases start at zero, which would hide a wrong bias merge
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    pm = dt.get_peft_model(model, IA3Config(init_ia3_weights=False)).eval()
    pm.add_adapter("second", IA3Config(init_ia3_weights=False))
    pm.set_adapter(["default", "second"])
    before = {n: p.detach().clone() for n, p in pm.base_model.model.named_parameters() if "base_layer" in n}
    expected = logits(pm, kind)
    pm.merge_adapter()
    changed = [n for n, p in pm.base_model.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(n.endswith("bias") for n in changed) == (kind != "llama")  # output vectors scale the bias
    torch.testing.assert_close(logits(pm, kind), expected, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    for name, param in pm.base_model.model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(pm, kind), expected, atol=1e-5, rtol=0)

    merged = pm.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, kind), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_folds_vector_into_weight_and_bias(conv1d):
    pm, reference = toy_pair(conv1d)
    k, ff = pm.base_model.model.k, pm.base_model.model.ff
    l_k, l_ff = k.ia3_l["default"].detach().flatten(), ff.ia3_l["default"].detach().flatten()
    with torch.no_grad():
        l_k[0] = 0.0  # a zero entry: division cannot undo it, the merge must remember the weights
    pm.merge_adapter()
    torch.testing.assert_close(out_in(k.base_layer), l_k[:, None] * out_in(reference.k))
    torch.testing.assert_close(k.base_layer.bias, l_k * reference.k.bias)
    torch.testing.assert_close(out_in(ff.base_layer), out_in(reference.ff) * l_ff[None, :])
    assert torch.equal(ff.base_layer.bias, reference.ff.bias)  # the input scale leaves the bias alone
    pm.unmerge_adapter()
    assert torch.equal(k.base_layer.weight, reference.k.weight) and torch.equal(k.base_layer.bias, reference.k.bias)
    torch.testing.assert_close(ff.base_layer.weight, reference.ff.weight, atol=1e-6, rtol=0)


# -- configs and bad input ------------------------------------------------------------------------
def test_config_json_round_trip(tmp_path):
    config = IA3Config(target_modules=["k", "ff"], feedforward_modules=["ff"], layers_to_transform=[0])
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("target_modules", "feedforward_modules", "fan_in_fan_out", "init_ia3_weights", "modules_to_save"):
        assert field in data
    assert data["peft_type"] == "IA3" and data["layers_to_transform"] == [0] and "layers_pattern" not in data
    assert dt.PeftConfig.from_pretrained(tmp_path) == config


def test_feedforward_outside_targets_is_an_error():
    with pytest.raises(ConfigError, match=r"\['wo'\] is not in target_modules"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wo"])
    with pytest.raises(ConfigError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")


def test_unknown_target_names_close_modules():
    with pytest.raises(TargetModuleError, match="k_prj.*Closest module names: k_proj"):
        dt.get_peft_model(tiny_model("llama"), IA3Config(target_modules=["k_prj"], feedforward_modules=[]))


def test_model_without_naming_convention_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetModuleError, match="name the keys, values"):
        dt.get_peft_model(model, IA3Config())
    assert all(p.requires_grad for p in model.parameters()), "a failed attach leaves the model as it was"


def test_non_linear_target_is_refused():
    with pytest.raises(TargetModuleError, match="embed_tokens.*Embedding"):
        dt.get_peft_model(tiny_model("llama"), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
