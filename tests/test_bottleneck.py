"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on tiny models.

The adapter's output is checked against the formula computed by hand from its own weights and the
tensors captured with forward hooks; where the adapters go is checked as exact sets of module paths
per model family; near-identity init is checked bit for bit against the base model; checkpoints,
trainable parameters, layer-norm copies, merging and config validation are each checked directly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import deltatune as dt
from deltatune import engine
from deltatune.adapter_layer import AdapterLayer
from deltatune.methods.bottleneck import BottleneckLayer, find_insertion_points
from deltatune.modules_to_save import ModulesToSaveWrapper

from conftest import VOCAB, tiny_inputs, tiny_model

PLACEMENTS = ["houlsby", "pfeiffer", "parallel"]
FAMILIES = ["llama", "gpt2", "bert", "t5"]
HIDDEN = 32


# -- helpers ---------------------------------------------------------------------------------------
def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(config).eval()


def llama_variant(hidden: int = HIDDEN, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A tiny llama like conftest's, with another hidden size or depth."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_model(kind: str, seed: int = 0) -> nn.Module:
    return tiny_qwen2(seed) if kind == "qwen2" else tiny_model(kind, seed)


def inputs_for(kind: str, **kwargs) -> dict[str, torch.Tensor]:
    return tiny_inputs("llama" if kind == "qwen2" else kind, **kwargs)


def config_for(kind: str, **kwargs) -> dt.BottleneckConfig:
    if kind == "bert":
        kwargs.setdefault("task_type", "SEQ_CLS")
    return dt.BottleneckConfig(**kwargs)


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(kind)).logits


def bottleneck_paths(model: nn.Module) -> set[str]:
    """Paths (in the user's model) of the modules a BottleneckLayer adapts."""
    root = model.get_base_model() if isinstance(model, dt.PeftModel) else model
    return {engine.checkpoint_path(p) for p, m in engine.adapter_layers(root) if isinstance(m, BottleneckLayer)}


def per_layer(template: list[str], layers: range = range(2)) -> set[str]:
    return {t.format(i=i) for t in template for i in layers}


def hand_update(layer: BottleneckLayer, name: str, h: torch.Tensor, act, scaling: float) -> torch.Tensor:
    """s * (W_up f(W_down h + b_down) + b_up), from the adapter's own weights."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    z = act(h @ down.weight.T + down.bias)
    return scaling * (z @ up.weight.T + up.bias)


# Which module paths each placement adapts, per family, read off the structure.
ATTN_OUT = {
    "llama": ["model.layers.{i}.self_attn.o_proj"],
    "qwen2": ["model.layers.{i}.self_attn.o_proj"],
    "gpt2": ["transformer.h.{i}.attn.c_proj"],
    "bert": ["bert.encoder.layer.{i}.attention.output.dense"],
    "t5": [
        "encoder.block.{i}.layer.0.SelfAttention.o",
        "decoder.block.{i}.layer.0.SelfAttention.o",
        "decoder.block.{i}.layer.1.EncDecAttention.o",
    ],
}
FFN_OUT = {
    "llama": ["model.layers.{i}.mlp.down_proj"],
    "qwen2": ["model.layers.{i}.mlp.down_proj"],
    "gpt2": ["transformer.h.{i}.mlp.c_proj"],
    "bert": ["bert.encoder.layer.{i}.output.dense"],
    "t5": ["encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"],
}
FFN_IN = {
    "llama": ["model.layers.{i}.mlp.gate_proj"],
    "qwen2": ["model.layers.{i}.mlp.gate_proj"],
    "gpt2": ["transformer.h.{i}.mlp.c_fc"],
    "bert": ["bert.encoder.layer.{i}.intermediate.dense"],
    "t5": ["encoder.block.{i}.layer.1.DenseReluDense.wi", "decoder.block.{i}.layer.2.DenseReluDense.wi"],
}


# -- the formula -----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_output_is_the_formula_by_hand(placement, activation):
    scaling = 0.37
    pm = dt.get_peft_model(
        tiny_model("llama"),
        dt.BottleneckConfig(
            placement=placement, non_linearity=activation, scaling=scaling, bottleneck_size=4, init="random"
        ),
    )
    act = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    block = pm.get_base_model().model.layers[0]
    wrappers = {"ffn": block.mlp.down_proj}
    if placement == "houlsby":
        wrappers["attn"] = block.self_attn.o_proj
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for key, wrapper in wrappers.items():
        assert isinstance(wrapper, BottleneckLayer) and isinstance(wrapper.base_layer, nn.Linear)
        handles.append(
            wrapper.base_layer.register_forward_hook(lambda m, a, o, k=key: captured.__setitem__(k + "_y", o))
        )
        handles.append(wrapper.register_forward_hook(lambda m, a, o, k=key: captured.__setitem__(k + "_out", o)))
    handles.append(block.mlp.register_forward_pre_hook(lambda m, a: captured.__setitem__("ffn_in", a[0])))
    with torch.no_grad():
        pm(**tiny_inputs("llama"))
    for handle in handles:
        handle.remove()

    for key, wrapper in wrappers.items():
        y, out = captured[key + "_y"], captured[key + "_out"]
        h = captured["ffn_in"] if placement == "parallel" else y
        assert wrapper.adapter_down["default"].in_features == h.shape[-1]
        expected = y + hand_update(wrapper, "default", h, act, scaling)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out, y, atol=1e-4), "the adapter changed nothing"
    if placement == "parallel":
        # Reading the FFN's input, not its output: the sequential formula must not fit.
        y, out = captured["ffn_y"], captured["ffn_out"]
        assert not torch.allclose(out, y + hand_update(wrappers["ffn"], "default", y, act, scaling), atol=1e-4)


# -- near-identity init ----------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", FAMILIES + ["qwen2"])
def test_near_identity_init_is_the_base_model_exactly(kind, placement):
    expected = logits(make_model(kind), kind)
    pm = dt.get_peft_model(make_model(kind), config_for(kind, placement=placement))
    assert bottleneck_paths(pm)
    for _, layer in engine.adapter_layers(pm.get_base_model()):
        if isinstance(layer, BottleneckLayer):
            assert torch.count_nonzero(layer.adapter_down["default"].weight) > 0  # only W_up, b_up are zero
            assert torch.count_nonzero(layer.adapter_up["default"].weight) == 0
    assert torch.equal(logits(pm, kind), expected)
    # ... and the adapters are really on the forward path: a non-zero b_up changes the outputs.
    with torch.no_grad():
        for _, layer in engine.adapter_layers(pm.get_base_model()):
            if isinstance(layer, BottleneckLayer):
                bias = layer.adapter_up["default"].bias
                bias.copy_(torch.linspace(-0.5, 0.5, bias.numel()))  # not constant: layer norms would remove it
    assert not torch.allclose(logits(pm, kind), expected, atol=1e-4)


# -- where the adapters go -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FAMILIES + ["qwen2"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_insertion_points_are_read_from_structure(kind, placement):
    ffn = per_layer(FFN_OUT[kind])
    expected = ffn | per_layer(ATTN_OUT[kind]) if placement == "houlsby" else ffn
    config = config_for(kind, placement=placement)
    points = find_insertion_points(make_model(kind), config)
    assert {p.output_path for p in points} == expected
    if placement == "parallel":
        inputs = {p.output_path: p.input_path for p in points}
        assert set(inputs.values()) == per_layer(FFN_IN[kind])
        for point in points:
            assert point.input_path.startswith(point.block + ".") and point.output_path.startswith(point.block + ".")
    else:
        assert all(p.input_path is None for p in points)
    pm = dt.get_peft_model(make_model(kind), config)
    assert bottleneck_paths(pm) == expected


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_layers_to_transform_keeps_only_those_blocks(kind):
    pm = dt.get_peft_model(make_model(kind), config_for(kind, layers_to_transform=[1]))
    expected = per_layer(FFN_OUT[kind] + ATTN_OUT[kind], range(1, 2))
    assert bottleneck_paths(pm) == expected
    pm = dt.get_peft_model(make_model(kind), config_for(kind, layers_to_transform=0, placement="pfeiffer"))
    assert bottleneck_paths(pm) == per_layer(FFN_OUT[kind], range(1))


def test_module_names_in_the_config_override_the_search():
    config = dt.BottleneckConfig(attn_output_modules=["self_attn.v_proj"], ffn_output_modules=["mlp.up_proj"])
    pm = dt.get_peft_model(tiny_model("llama"), config)
    assert bottleneck_paths(pm) == per_layer(["model.layers.{i}.self_attn.v_proj", "model.layers.{i}.mlp.up_proj"])

    config = dt.BottleneckConfig(placement="parallel", ffn_input_modules=["mlp.up_proj"])
    points = find_insertion_points(tiny_model("llama"), config)
    assert {(p.output_path, p.input_path) for p in points} == {
        (f"model.layers.{i}.mlp.down_proj", f"model.layers.{i}.mlp.up_proj") for i in range(2)
    }

    # GPT-2 (Conv1D layers), by suffix, and by full path within the one block transformed.
    config = dt.BottleneckConfig(placement="pfeiffer", ffn_output_modules=["mlp.c_fc"])
    pm = dt.get_peft_model(tiny_model("gpt2"), config)
    assert bottleneck_paths(pm) == per_layer(["transformer.h.{i}.mlp.c_fc"])
    config = dt.BottleneckConfig(
        placement="pfeiffer", ffn_output_modules=["transformer.h.1.mlp.c_fc"], layers_to_transform=[1]
    )
    pm = dt.get_peft_model(tiny_model("gpt2"), config)
    assert bottleneck_paths(pm) == {"transformer.h.1.mlp.c_fc"}


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x):
        return self.o(torch.softmax(self.q(x), -1))


class _AttentionOnlyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.attn(x))


class _AttentionOnlyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_AttentionOnlyBlock(), _AttentionOnlyBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_search_failure_says_how_to_name_the_modules():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(dt.TargetModuleError, match="ffn_output_modules="):
        dt.get_peft_model(mlp, dt.BottleneckConfig())
    assert not any(isinstance(m, AdapterLayer) for m in mlp.modules())
    assert all(p.requires_grad for p in mlp.parameters())  # the model is left as it was

    model = _AttentionOnlyModel()
    with pytest.raises(dt.TargetModuleError, match="feed-forward") as err:
        dt.get_peft_model(model, dt.BottleneckConfig(placement="pfeiffer"))
    message = str(err.value)
    assert "layers.0" in message and "attn.o" in message and "ffn_output_modules=" in message
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())

    # Following the advice works.
    pm = dt.get_peft_model(model, dt.BottleneckConfig(placement="pfeiffer", ffn_output_modules=["attn.o"]))
    assert bottleneck_paths(pm) == {"layers.0.attn.o", "layers.1.attn.o"}


def test_named_modules_work_on_a_model_without_a_module_list():
    """The error above tells the user to name the modules; doing so must then work."""
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    config = dt.BottleneckConfig(placement="pfeiffer", ffn_output_modules=["2"], bottleneck_size=2)
    pm = dt.get_peft_model(mlp, config)
    assert bottleneck_paths(pm) == {"2"}


# -- widths and parameter counts ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "width"),
    [
        ({}, HIDDEN // 16),
        ({"reduction_factor": 4}, HIDDEN // 4),
        ({"reduction_factor": 8, "bottleneck_size": 5}, 5),
        ({"bottleneck_size": 3}, 3),
    ],
)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bottleneck_width(kind, kwargs, width):
    pm = dt.get_peft_model(tiny_model(kind), dt.BottleneckConfig(placement="parallel", **kwargs))
    layers = [m for _, m in engine.adapter_layers(pm.get_base_model()) if isinstance(m, BottleneckLayer)]
    assert layers
    for layer in layers:
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        assert tuple(down.weight.shape) == (width, HIDDEN) and tuple(down.bias.shape) == (width,)
        assert tuple(up.weight.shape) == (HIDDEN, width) and tuple(up.bias.shape) == (HIDDEN,)


@pytest.mark.parametrize(
    ("kind", "placement", "points", "extra"),
    [
        ("llama", "houlsby", 4, 0),
        ("llama", "pfeiffer", 2, 0),
        ("llama", "parallel", 2, 0),
        ("t5", "houlsby", 10, 0),
        ("gpt2", "houlsby", 4, 0),
        ("bert", "houlsby", 4, HIDDEN * 3 + 3),  # the SEQ_CLS classifier copy
    ],
)
def test_trainable_parameter_count_by_hand(kind, placement, points, extra):
    m = 4
    pm = dt.get_peft_model(tiny_model(kind), config_for(kind, placement=placement, bottleneck_size=m))
    per_point = (HIDDEN * m + m) + (m * HIDDEN + HIDDEN)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == points * per_point + extra
    base_total = sum(p.numel() for p in tiny_model(kind).parameters())
    assert total == base_total + trainable


# -- layer norms --------------------------------------------------------------------------------------
NORMS = per_layer(["model.layers.{i}.input_layernorm", "model.layers.{i}.post_attention_layernorm"])


def test_train_layer_norms_gives_each_adapter_its_own_norms(tmp_path):
    base_out = logits(tiny_model("llama"), "llama")
    pm = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(train_layer_norms=True, bottleneck_size=4))
    pm.add_adapter("other", dt.BottleneckConfig(train_layer_norms=True, bottleneck_size=4))
    model = pm.get_base_model()
    wrappers = {p: m for p, m in engine.adapter_layers(model) if isinstance(m, ModulesToSaveWrapper)}
    assert set(wrappers) == NORMS  # the final model.norm is not in a block
    assert torch.equal(logits(pm, "llama"), base_out)  # copies of the norms: still the base model
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == 4 * (2 * 4 * HIDDEN + 4 + HIDDEN) + len(NORMS) * HIDDEN

    # Only the active adapter's copies train; the originals never do.
    for wrapper in wrappers.values():
        assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
        assert not any(p.requires_grad for p in wrapper.modules_to_save["other"].parameters())
        assert not any(p.requires_grad for p in wrapper.base_layer.parameters())
    with torch.no_grad():
        for wrapper in wrappers.values():
            wrapper.modules_to_save["default"].weight.mul_(1.5)
            wrapper.modules_to_save["other"].weight.mul_(0.5)

    # Switching adapters switches which copy runs.
    calls: list[str] = []
    for wrapper in wrappers.values():
        for name, module in [*wrapper.modules_to_save.items(), ("base", wrapper.base_layer)]:
            module.register_forward_hook(lambda *_, n=name: calls.append(n))
    default_out = logits(pm, "llama")
    assert set(calls) == {"default"} and len(calls) == len(NORMS)
    calls.clear()
    pm.set_adapter("other")
    other_out = logits(pm, "llama")
    assert set(calls) == {"other"}
    assert not torch.allclose(default_out, other_out, atol=1e-4)
    for wrapper in wrappers.values():
        assert not any(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
        assert all(p.requires_grad for p in wrapper.modules_to_save["other"].parameters())
    calls.clear()
    with pm.disable_adapter():
        assert torch.equal(logits(pm, "llama"), base_out)
    assert set(calls) == {"base"}

    # Saved with the adapter under the norm's own path, and loaded back into the copies.
    pm.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    for path in NORMS:
        key = f"base_model.model.{path}.weight"
        assert torch.equal(state[key], wrappers[path].modules_to_save["default"].weight)
    assert not any("modules_to_save" in k or "original_module" in k for k in state)
    other_state = load_file(tmp_path / "other" / "adapter_model.safetensors")
    for path in NORMS:
        assert torch.equal(
            other_state[f"base_model.model.{path}.weight"], wrappers[path].modules_to_save["other"].weight
        )
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert torch.equal(logits(loaded, "llama"), default_out)
    loaded.load_adapter(tmp_path / "other", "other")
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded, "llama"), other_out)


def test_train_layer_norms_only_in_adapted_blocks():
    config = dt.BottleneckConfig(train_layer_norms=True, layers_to_transform=[1], placement="pfeiffer")
    pm = dt.get_peft_model(tiny_model("llama"), config)
    wrapped = {p for p, m in engine.adapter_layers(pm.get_base_model()) if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == per_layer(["model.layers.{i}.input_layernorm", "model.layers.{i}.post_attention_layernorm"], [1])
    bert = dt.get_peft_model(tiny_model("bert"), config_for("bert", train_layer_norms=True))
    wrapped = {p for p, m in engine.adapter_layers(bert.get_base_model()) if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == {"classifier"} | per_layer(
        ["bert.encoder.layer.{i}.attention.output.LayerNorm", "bert.encoder.layer.{i}.output.LayerNorm"]
    )


# -- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_save_load_round_trip(kind, placement, tmp_path):
    config = config_for(kind, placement=placement, init="random", non_linearity="gelu", scaling=0.5)
    pm = dt.get_peft_model(tiny_model(kind), config)
    expected = logits(pm, kind)
    assert not torch.allclose(expected, logits(tiny_model(kind), kind), atol=1e-4)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK"
    assert saved["placement"] == placement and saved["non_linearity"] == "gelu" and saved["scaling"] == 0.5
    state = load_file(tmp_path / "adapter_model.safetensors")
    adapter_keys = {k for k in state if ".adapter_down." in k or ".adapter_up." in k}
    paths = {f"base_model.model.{p}" for p in bottleneck_paths(pm)}
    assert adapter_keys == {
        f"{p}.{c}.{t}" for p in paths for c in ("adapter_down", "adapter_up") for t in ("weight", "bias")
    }
    assert not any("default" in k for k in state)

    loaded = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    assert isinstance(loaded.peft_config["default"], dt.BottleneckConfig)
    assert loaded.peft_config["default"].placement == placement
    assert torch.equal(logits(loaded, kind), expected)


def test_loading_into_a_different_hidden_size_names_key_and_shapes(tmp_path):
    pm = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(bottleneck_size=4, init="random"))
    pm.save_pretrained(tmp_path)
    wider = llama_variant(hidden=48)
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(wider, tmp_path)
    message = str(err.value)
    assert "adapter_down.weight" in message or "adapter_up.weight" in message
    assert "(4, 32)" in message and "(4, 48)" in message or "(32, 4)" in message and "(48, 4)" in message
    assert not any(isinstance(m, AdapterLayer) for m in wider.modules())  # handed back unwrapped


def test_loading_into_a_different_depth_names_the_key(tmp_path):
    pm = dt.get_peft_model(llama_variant(layers=3), dt.BottleneckConfig(bottleneck_size=4, init="random"))
    pm.save_pretrained(tmp_path / "deep")
    with pytest.raises(dt.CheckpointError, match=r"layers\.2\."):
        dt.PeftModel.from_pretrained(llama_variant(layers=2), tmp_path / "deep")

    pm = dt.get_peft_model(llama_variant(layers=2), dt.BottleneckConfig(bottleneck_size=4, init="random"))
    pm.save_pretrained(tmp_path / "shallow")
    with pytest.raises(dt.CheckpointError, match=r"layers\.2\..*adapter_(down|up)"):
        dt.PeftModel.from_pretrained(llama_variant(layers=3), tmp_path / "shallow")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_merge_is_refused_and_unload_gives_the_base_model_back(placement):
    base = tiny_model("llama")
    reference_state = {k: v.clone() for k, v in base.state_dict().items()}
    expected = logits(tiny_model("llama"), "llama")
    pm = dt.get_peft_model(base, dt.BottleneckConfig(placement=placement, init="random"))
    before = logits(pm, "llama")
    with pytest.raises(ValueError, match="nonlinear"):
        pm.merge_adapter()
    with pytest.raises(ValueError, match="nonlinear"):
        pm.merge_and_unload()
    assert torch.equal(logits(pm, "llama"), before)  # a refused merge changes nothing

    model = pm.unload()
    assert model is base
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state)
    assert torch.equal(logits(model, "llama"), expected)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_delete_adapter_restores_the_base_model(placement):
    expected = logits(tiny_model("llama"), "llama")
    pm = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(placement=placement, init="random"))
    pm.add_adapter("second", dt.BottleneckConfig(placement=placement, init="random"))
    pm.delete_adapter("default")
    pm.delete_adapter("second")
    model = pm.get_base_model()
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, "llama"), expected)


def test_parallel_adapter_survives_removing_a_lora_on_its_input_module():
    """The parallel adapter reads the FFN input module's input; removing another adapter's wrapper
    around that module (here a LoRA on gate_proj, added first) must not cut it off."""
    pm = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(target_modules=["gate_proj"]), "lora")
    pm.add_adapter("par", dt.BottleneckConfig(placement="parallel", init="random"))
    pm.set_adapter("par")
    expected = logits(pm, "llama")
    pm.delete_adapter("lora")
    assert torch.equal(logits(pm, "llama"), expected)


# -- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_layer_norms", [False, True])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_training_step_changes_only_adapter_parameters(placement, train_layer_norms):
    pm = dt.get_peft_model(
        tiny_model("llama"),
        dt.BottleneckConfig(placement=placement, init="random", train_layer_norms=train_layer_norms),
    )
    pm.add_adapter("idle", dt.BottleneckConfig(placement=placement, init="random", train_layer_norms=train_layer_norms))
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = tiny_inputs("llama")
    loss = pm(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}

    def trained(name: str) -> bool:
        is_adapter = (".adapter_down.default." in name) or (".adapter_up.default." in name)
        is_norm_copy = ".modules_to_save.default." in name
        return is_adapter or (train_layer_norms and is_norm_copy)

    expected = {n for n in before if trained(n)}
    assert expected and any(".modules_to_save." in n for n in expected) == train_layer_norms
    assert changed == expected
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == expected


# -- config validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"placement": "x"}, "placement"),
        ({"non_linearity": "x"}, "non_linearity"),
        ({"bottleneck_size": 0}, "bottleneck_size"),
        ({"bottleneck_size": -3}, "bottleneck_size"),
        ({"reduction_factor": 0}, "reduction_factor"),
        ({"init": "x"}, "init"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(dt.ConfigError, match=field):
        dt.BottleneckConfig(**kwargs)


def test_invalid_config_from_json_is_a_config_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BOTTLENECK", "placement": "middle"}))
    with pytest.raises(dt.ConfigError, match="placement"):
        dt.PeftConfig.from_pretrained(tmp_path)
