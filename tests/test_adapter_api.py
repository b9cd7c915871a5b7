"""The multi-adapter API on tiny models: freezing, switching, combining, deleting, merging, saving.

Where HF PEFT defines the behaviour (which modules a config wraps, how many parameters train, what
``print_trainable_parameters`` prints, which tensors a checkpoint holds) the test builds the same
config with ``peft`` on a fresh copy of the same base and compares. Elsewhere the reference is
computed by hand from the adapter's own ``A``/``B`` matrices on a fresh base model.
"""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.adapter_layer import AdapterLayer
from deltatune.methods.lora import LoraEmbedding, LoraLinear
from deltatune.modules_to_save import ModulesToSaveWrapper

from conftest import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama, tiny_t5

QV = ["q_proj", "v_proj"]
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}


# -- helpers ---------------------------------------------------------------------------------------
def perturb_trainable(model: nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    """Add small noise to every trainable tensor, so zero-initialised parts (B, heads, biases) matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def outputs(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def deltatune_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]


def lora_paths(model: nn.Module) -> set[str]:
    """Paths of the modules deltatune wrapped with LoRA (inside the user's model)."""
    return {n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}


def peft_lora_paths(model: nn.Module) -> set[str]:
    """Paths of the modules HF PEFT wrapped with LoRA (inside the user's model)."""
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A")}


def lora_reference(pm: dt.PeftModel, names: list[str], seed: int = 0) -> nn.Module:
    """A fresh tiny llama with ``scale * B @ A`` of each named (plain LoRA) adapter added to its weights."""
    reference = tiny_llama(seed)
    for path, module in pm.get_base_model().named_modules():
        if not isinstance(module, LoraLinear):
            continue
        target = reference.get_submodule(path)
        for name in names:
            if name in module.lora_A:
                config = pm.peft_config[name]
                delta = (config.lora_alpha / config.r) * module.lora_B[name].weight @ module.lora_A[name].weight
                with torch.no_grad():
                    target.weight.add_(delta)
    return reference


def adapter_params(pm: dt.PeftModel, name: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in pm.named_parameters() if f".{name}." in n or n.endswith(f".{name}")}


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def two_adapter_llama() -> dt.PeftModel:
    """``default`` on q/v (rank 4) and ``other`` on q/k (rank 2), both with random, non-zero updates."""
    torch.manual_seed(11)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False))
    torch.manual_seed(12)
    pm.add_adapter(
        "other", dt.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    return pm


# -- freezing and counting -------------------------------------------------------------------------
def test_get_peft_model_freezes_base_and_trains_only_the_adapter():
    model = tiny_llama()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=QV))
    trainable = trainable_names(pm)
    assert trainable, "the adapter must be trainable"
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable), trainable
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # every LoRA tensor of the adapter trains: 2 layers x 2 modules x (A, B)
    assert len(trainable) == 8


def test_print_trainable_parameters_matches_hand_count_and_peft(capsys):
    r = 4
    base = tiny_llama()
    cfg = base.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q_in, q_out = cfg.hidden_size, cfg.num_attention_heads * head_dim
    v_in, v_out = cfg.hidden_size, cfg.num_key_value_heads * head_dim
    expected = cfg.num_hidden_layers * (r * (q_in + q_out) + r * (v_in + v_out))
    base_total = sum(p.numel() for p in base.parameters())

    pm = dt.get_peft_model(base, dt.LoraConfig(r=r, target_modules=QV))
    assert pm.get_nb_trainable_parameters() == (expected, base_total + expected)
    capsys.readouterr()
    pm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", line)
    assert match, line
    assert int(match.group(1).replace(",", "")) == expected
    assert int(match.group(2).replace(",", "")) == base_total + expected
    assert float(match.group(3)) == pytest.approx(100 * expected / (base_total + expected), abs=1e-4)

    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, target_modules=QV))
    assert reference.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    reference.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("bert", {"task_type": "SEQ_CLS"}),
        ("gpt2", {"target_modules": ["c_attn"], "bias": "all", "fan_in_fan_out": True}),
        ("llama", {"target_modules": QV, "modules_to_save": ["lm_head"]}),
        ("t5", {"target_modules": ["q", "v"], "use_dora": True}),
    ],
    ids=["bert-seq-cls", "gpt2-bias-all", "llama-modules-to-save", "t5-dora"],
)
def test_trainable_count_and_names_match_peft(kind, kwargs):
    pm = dt.get_peft_model(FACTORIES[kind](), dt.LoraConfig(r=4, **kwargs))
    reference = peft.get_peft_model(FACTORIES[kind](), peft.LoraConfig(r=4, **kwargs))
    assert pm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    # PEFT keeps DoRA's magnitude in a module (``...lora_magnitude_vector.default.weight``)
    theirs = {
        n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
        for n in trainable_names(reference)
    }
    assert trainable_names(pm) == theirs


# -- add / set / combine / delete --------------------------------------------------------------------
def test_add_adapter_is_inactive_and_frozen():
    torch.manual_seed(11)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    before = outputs(pm, "llama")
    trainable_before = trainable_names(pm)
    pm.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    assert pm.active_adapter == "default" and pm.active_adapters == ["default"]
    assert set(pm.peft_config) == {"default", "other"}
    other = adapter_params(pm, "other")
    assert len(other) == 8 and not any(p.requires_grad for p in other.values())
    assert trainable_names(pm) == trainable_before
    assert torch.equal(outputs(pm, "llama"), before)


def test_set_adapter_switches_outputs_and_trainability():
    pm = two_adapter_llama()
    base = outputs(tiny_llama(), "llama")
    out_default = outputs(pm, "llama")
    torch.testing.assert_close(out_default, outputs(lora_reference(pm, ["default"]), "llama"), atol=1e-5, rtol=0)
    assert not torch.allclose(out_default, base, atol=1e-3)

    pm.set_adapter("other")
    assert pm.active_adapter == "other"
    out_other = outputs(pm, "llama")
    torch.testing.assert_close(out_other, outputs(lora_reference(pm, ["other"]), "llama"), atol=1e-5, rtol=0)
    assert not torch.allclose(out_other, out_default, atol=1e-3)
    assert trainable_names(pm) == set(adapter_params(pm, "other"))
    assert not any(p.requires_grad for p in adapter_params(pm, "default").values())

    pm.set_adapter("default")
    assert torch.equal(outputs(pm, "llama"), out_default)
    assert trainable_names(pm) == set(adapter_params(pm, "default"))


def test_set_adapter_list_adds_the_deltas():
    pm = two_adapter_llama()
    q_proj = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear)
    x = torch.randn(3, 5, q_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = q_proj.base_layer(x)
        pm.set_adapter("default")
        y_default = q_proj(x)
        pm.set_adapter("other")
        y_other = q_proj(x)
        pm.set_adapter(["default", "other"])
        y_both = q_proj(x)
    assert not torch.allclose(y_default, base, atol=1e-4) and not torch.allclose(y_other, base, atol=1e-4)
    torch.testing.assert_close(y_both, base + (y_default - base) + (y_other - base), atol=1e-5, rtol=0)

    # the whole model: both updates on (q gets both, v only default's, k only other's)
    assert pm.active_adapters == ["default", "other"]
    reference = lora_reference(pm, ["default", "other"])
    torch.testing.assert_close(outputs(pm, "llama"), outputs(reference, "llama"), atol=1e-5, rtol=0)
    assert trainable_names(pm) == set(adapter_params(pm, "default")) | set(adapter_params(pm, "other"))


def test_delete_inactive_adapter_leaves_the_active_one():
    pm = two_adapter_llama()
    expected = outputs(pm, "llama")
    pm.delete_adapter("other")
    assert set(pm.peft_config) == {"default"} and pm.active_adapters == ["default"]
    assert not adapter_params(pm, "other")
    # k_proj carried only "other": its wrapper is gone
    assert type(pm.get_base_model().model.layers[0].self_attn.k_proj) is nn.Linear
    assert torch.equal(outputs(pm, "llama"), expected)


def test_delete_one_of_two_active_adapters():
    pm = two_adapter_llama()
    pm.set_adapter("other")
    expected = outputs(pm, "llama")
    pm.set_adapter(["default", "other"])
    pm.delete_adapter("default")
    assert pm.active_adapters == ["other"]
    assert type(pm.get_base_model().model.layers[0].self_attn.v_proj) is nn.Linear
    torch.testing.assert_close(outputs(pm, "llama"), expected, atol=1e-6, rtol=0)


def test_delete_active_adapter_activates_the_remaining_one(caplog):
    pm = two_adapter_llama()
    pm.set_adapter("other")
    expected = outputs(pm, "llama")
    pm.set_adapter("default")
    with caplog.at_level("WARNING", logger="deltatune"):
        pm.delete_adapter("default")
    assert pm.active_adapters == ["other"]
    assert "'other' is active now" in caplog.text
    torch.testing.assert_close(outputs(pm, "llama"), expected, atol=1e-6, rtol=0)


def test_delete_last_adapter_removes_every_wrapper():
    model = tiny_bert()
    head = model.classifier
    base = outputs(tiny_bert(), "bert")
    qv = ["query", "value"]
    pm = dt.get_peft_model(
        model, dt.LoraConfig(r=4, target_modules=qv, task_type=dt.TaskType.SEQ_CLS, init_lora_weights=False)
    )
    pm.add_adapter("other", dt.LoraConfig(r=2, target_modules=qv, task_type=dt.TaskType.SEQ_CLS))
    perturb_trainable(pm)
    assert deltatune_modules(pm)
    pm.delete_adapter("other")
    pm.delete_adapter("default")
    assert pm.peft_config == {} and pm.active_adapters == []
    assert deltatune_modules(pm) == []
    assert model.classifier is head
    assert torch.equal(outputs(pm, "bert"), base)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_second_adapter_with_default_target_modules(kind):
    """target_modules=None picks the same attention projections for every adapter, as in PEFT."""
    pm = dt.get_peft_model(FACTORIES[kind](), dt.LoraConfig(r=4))
    first = lora_paths(pm.get_base_model())
    pm.add_adapter("other", dt.LoraConfig(r=2))
    wrapped_other = {
        p for p, m in pm.get_base_model().named_modules() if isinstance(m, LoraLinear) and "other" in m.lora_A
    }
    assert wrapped_other == first
    reference = peft.get_peft_model(FACTORIES[kind](), peft.LoraConfig(r=4))
    reference.add_adapter("other", peft.LoraConfig(r=2))
    assert {
        p for p, m in reference.get_base_model().named_modules() if hasattr(m, "lora_A") and "other" in m.lora_A
    } == wrapped_other


# -- disabling -------------------------------------------------------------------------------------
def test_disable_adapter_gives_base_outputs_and_restores():
    base = outputs(tiny_llama(), "llama")
    torch.manual_seed(3)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    adapted = outputs(pm, "llama")
    assert not torch.allclose(adapted, base, atol=1e-3)
    with pm.disable_adapter():
        assert torch.equal(outputs(pm, "llama"), base)
    assert torch.equal(outputs(pm, "llama"), adapted)


def test_disable_adapter_also_disables_modules_to_save():
    base = outputs(tiny_bert(), "bert")
    pm = dt.get_peft_model(tiny_bert(), dt.LoraConfig(r=4, task_type=dt.TaskType.SEQ_CLS))
    perturb_trainable(pm)
    adapted = outputs(pm, "bert")
    assert not torch.allclose(adapted, base, atol=1e-4)
    with pm.disable_adapter():
        assert torch.equal(outputs(pm, "bert"), base)
    assert torch.equal(outputs(pm, "bert"), adapted)


def test_disable_adapter_when_merged_gives_base_outputs():
    base = outputs(tiny_llama(), "llama")
    torch.manual_seed(3)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    adapted = outputs(pm, "llama")
    pm.merge_adapter()
    with pm.disable_adapter():
        disabled = outputs(pm, "llama")
    # merged again afterwards, with the adapter's outputs
    assert all(layer.merged_adapters == ["default"] for layer in pm.modules() if isinstance(layer, LoraLinear))
    torch.testing.assert_close(outputs(pm, "llama"), adapted, atol=1e-5, rtol=0)
    # Unmerging subtracts the update again: float rounding only (documented in disable_adapter).
    torch.testing.assert_close(disabled, base, atol=1e-6, rtol=0)


# -- merging ---------------------------------------------------------------------------------------
MERGE_CASES = {
    "lora": ("llama", {"target_modules": QV}),
    "dora": ("llama", {"target_modules": QV, "use_dora": True}),
    "rslora": ("llama", {"r": 6, "lora_alpha": 12, "target_modules": QV, "use_rslora": True}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "gpt2-conv1d": ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    "gpt2-lora-bias": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "lora_bias": True}),
    "llama-lora-bias": ("llama", {"target_modules": QV, "lora_bias": True}),
    "bert-seq-cls": ("bert", {"target_modules": ["query", "value"], "task_type": "SEQ_CLS"}),
    "t5": ("t5", {"target_modules": ["q", "v", "wi"]}),
}


def merge_case(case: str) -> tuple[str, nn.Module, dt.PeftModel]:
    kind, kwargs = MERGE_CASES[case]
    model = FACTORIES[kind]()
    kwargs = {"r": 4, "lora_alpha": 8, **kwargs}
    pm = dt.get_peft_model(model, dt.LoraConfig(**kwargs))
    perturb_trainable(pm)
    return kind, model, pm


def assert_same_state(model: nn.Module, reference: nn.Module, atol: float) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert sorted(got) == sorted(want), f"extra: {set(got) - set(want)}, missing: {set(want) - set(got)}"
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unmerge_round_trip(case):
    kind, model, pm = merge_case(case)
    fresh = FACTORIES[kind]()
    unmerged = outputs(pm, kind)
    assert not torch.allclose(unmerged, outputs(fresh, kind), atol=1e-4)

    pm.merge_adapter()
    merged_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    changed = [n for n, p in merged_weights.items() if n.endswith("weight")]
    assert changed
    torch.testing.assert_close(outputs(pm, kind), unmerged, atol=1e-5, rtol=0)

    pm.unmerge_adapter()
    assert not any(isinstance(m, AdapterLayer) and m.merged_adapters for m in model.modules())
    torch.testing.assert_close(outputs(pm, kind), unmerged, atol=1e-5, rtol=0)
    # the merge really changed the base weights, and the unmerge really undid it
    after = dict(model.named_parameters())
    assert any(not torch.allclose(merged_weights[n], after[n], atol=1e-6) for n in changed)
    assert_same_state(pm.unload(), fresh, atol=1e-6)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_and_unload_leaves_no_adapter_modules(case):
    kind, model, pm = merge_case(case)
    expected = outputs(pm, kind)
    merged = pm.merge_and_unload()
    assert merged is model
    assert deltatune_modules(merged) == []
    torch.testing.assert_close(outputs(merged, kind), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_unload_returns_exact_base(case):
    kind, model, pm = merge_case(case)
    base = outputs(FACTORIES[kind](), kind)
    assert not torch.allclose(outputs(pm, kind), base, atol=1e-4)
    unloaded = pm.unload()
    assert unloaded is model
    assert deltatune_modules(unloaded) == []
    assert torch.equal(outputs(unloaded, kind), base)
    assert_same_state(unloaded, FACTORIES[kind](), atol=0)


def test_merge_and_unload_keeps_the_trained_head():
    model = tiny_bert()
    original_head = model.classifier
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, task_type=dt.TaskType.SEQ_CLS))
    perturb_trainable(pm)
    trained = pm.get_base_model().classifier.modules_to_save["default"]
    merged = pm.merge_and_unload()
    assert merged.classifier is trained and merged.classifier is not original_head


# -- modules_to_save -------------------------------------------------------------------------------
def test_seq_cls_head_is_trained_saved_and_switched(tmp_path):
    model = tiny_bert()
    head = model.classifier
    original = {k: v.clone() for k, v in head.state_dict().items()}
    inputs = tiny_inputs("bert")
    base = outputs(tiny_bert(), "bert")

    config = dt.LoraConfig(r=4, target_modules=["query", "value"], task_type=dt.TaskType.SEQ_CLS)
    pm = dt.get_peft_model(model, config)
    pm.add_adapter("other", config)
    wrapper = model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper) and wrapper.base_layer is head
    assert pm.peft_config["default"].modules_to_save == ["classifier"]
    copy_default = wrapper.modules_to_save["default"]
    assert all(p.requires_grad for p in copy_default.parameters())
    assert not any(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in wrapper.modules_to_save["other"].parameters())

    # one training step
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.5)
    loss = pm(**inputs, labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    assert not torch.equal(copy_default.weight, original["weight"])
    for key, tensor in head.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    for key, tensor in wrapper.modules_to_save["other"].state_dict().items():
        assert torch.equal(tensor, original[key]), key

    # saved automatically under the original module's path
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.classifier.weight"], copy_default.weight.detach())
    assert torch.equal(saved["base_model.model.classifier.bias"], copy_default.bias.detach())
    saved_other = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert torch.equal(saved_other["base_model.model.classifier.weight"], original["weight"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]

    # switching adapters switches heads: zero default's head, so its logits are exactly zero
    with torch.no_grad():
        copy_default.weight.zero_()
        copy_default.bias.zero_()
    assert torch.equal(outputs(pm, "bert"), torch.zeros_like(base))
    pm.set_adapter("other")  # untrained LoRA (B = 0) and an untouched head copy: the base model
    assert torch.equal(outputs(pm, "bert"), base)
    pm.set_adapter("default")
    assert torch.equal(outputs(pm, "bert"), torch.zeros_like(base))


# -- training --------------------------------------------------------------------------------------
def test_training_step_changes_only_adapter_parameters():
    model = tiny_llama()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=QV))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    optimizer = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    inputs = tiny_inputs("llama")
    loss = pm(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    after = dict(pm.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the step changed nothing"
    assert all(".lora_" in n for n in changed), changed
    assert {n for n in before if ".lora_B." in n} <= changed  # B starts at zero and gets a gradient
    assert all(after[n].grad is None for n in before if ".lora_" not in n)


def test_training_with_bias_all_trains_and_saves_biases(tmp_path):
    model = tiny_gpt2()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all"))
    bias_names = {n for n, _ in pm.named_parameters() if n.endswith(".bias") and ".lora_" not in n}
    assert bias_names and bias_names <= trainable_names(pm)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.1)
    inputs = tiny_inputs("gpt2")
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    after = dict(pm.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n in changed for n in bias_names)
    assert changed <= bias_names | {n for n in before if ".lora_" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if n.endswith(".weight") and ".lora_" not in n)

    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name in bias_names:  # parameter paths of a PeftModel are the checkpoint keys
        assert torch.equal(saved[name], after[name].detach()), name

    reference = peft.get_peft_model(
        tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    )
    reference.save_pretrained(tmp_path / "peft")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


# -- generation and attribute passthrough ----------------------------------------------------------
def test_generate_equals_merged_generate():
    torch.manual_seed(5)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    inputs = tiny_inputs("llama")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = pm.generate(**inputs, **kwargs)
        base = tiny_llama().generate(**inputs, **kwargs)
        assert generated.shape[1] > inputs["input_ids"].shape[1]
        assert not torch.equal(generated, base)  # the adapter matters
        merged = pm.merge_and_unload()
        assert torch.equal(merged.generate(**inputs, **kwargs), generated)


def test_generate_after_merge_adapter():
    torch.manual_seed(5)
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False))
    inputs = tiny_inputs("llama")
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        generated = pm.generate(**inputs, **kwargs)
        pm.merge_adapter()
        assert torch.equal(pm.generate(**inputs, **kwargs), generated)


def test_attribute_passthrough():
    model = tiny_llama()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=QV))
    assert pm.config is model.config
    assert pm.base_model.model is model
    assert pm.get_base_model() is model
    assert pm.base_model.config is model.config
    assert pm.model is model.model  # a submodule of the user's model, reached through the wrapper


def test_wrapped_layer_exposes_base_weight():
    """Model code reads ``self.wo.weight`` (T5) on a wrapped layer; PEFT's layers forward it to the base."""
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV))
    q_proj = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoraLinear)
    assert q_proj.weight is q_proj.base_layer.weight


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_all_linear_forward_is_the_base_model_at_init(kind):
    """B = 0 at init, so every model with every linear layer wrapped computes the base outputs exactly."""
    base = outputs(FACTORIES[kind](), kind)
    pm = dt.get_peft_model(FACTORIES[kind](), dt.LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(outputs(pm, kind), base)


# -- target_modules variants, compared with HF PEFT ------------------------------------------------
LLAMA_QV = {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in QV}
TARGET_CASES = {
    "list": ("llama", {"target_modules": QV}),
    "regex": ("llama", {"target_modules": r".*\.(q|v)_proj"}),
    "all-linear-llama": ("llama", {"target_modules": "all-linear"}),
    "all-linear-gpt2": ("gpt2", {"target_modules": "all-linear"}),
    "all-linear-t5": ("t5", {"target_modules": "all-linear"}),
    "all-linear-bert-seq-cls": ("bert", {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),
    "exclude": (
        "llama",
        {"target_modules": "all-linear", "exclude_modules": ["down_proj", "layers.0.self_attn.k_proj"]},
    ),
    "exclude-regex": ("llama", {"target_modules": QV, "exclude_modules": r".*layers\.0\..*"}),
    "layers-to-transform": ("llama", {"target_modules": QV, "layers_to_transform": [1]}),
    "layers-pattern": ("llama", {"target_modules": QV, "layers_to_transform": 0, "layers_pattern": "layers"}),
    "patterns": (
        "llama",
        {
            "target_modules": QV + ["o_proj"],
            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "o_proj": 6},
            "alpha_pattern": {"v_proj": 3},
        },
    ),
    "default-targets": ("bert", {}),
}


def build_both(kind: str, kwargs: dict) -> tuple[dt.PeftModel, peft.PeftModel]:
    pm = dt.get_peft_model(FACTORIES[kind](), dt.LoraConfig(r=4, lora_alpha=8, **kwargs))
    reference = peft.get_peft_model(FACTORIES[kind](), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    return pm, reference


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_target_modules_match_peft(case):
    kind, kwargs = TARGET_CASES[case]
    pm, reference = build_both(kind, kwargs)
    wrapped = lora_paths(pm.get_base_model())
    assert wrapped
    assert wrapped == peft_lora_paths(reference.get_base_model())
    # same rank and scale per module
    ours = dict(_lora_modules(pm))
    theirs = dict(_lora_modules(reference, peft_side=True))
    assert {p: m.lora_A["default"].out_features for p, m in ours.items()} == {
        p: m.r["default"] for p, m in theirs.items()
    }
    assert {p: m.scaling["default"] for p, m in ours.items()} == pytest.approx(
        {p: m.scaling["default"] for p, m in theirs.items()}
    )
    assert pm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


def _lora_modules(model: nn.Module, peft_side: bool = False):
    base = model.get_base_model()
    for path, module in base.named_modules():
        if (hasattr(module, "lora_A") if peft_side else isinstance(module, LoraLinear)) and path:
            yield path, module


def test_target_list_and_regex_wrap_q_and_v():
    for spec in (QV, r".*\.(q|v)_proj"):
        pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=spec))
        assert lora_paths(pm.get_base_model()) == LLAMA_QV


def test_all_linear_excludes_lm_head_and_saves_leaf_names(tmp_path):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    wrapped = lora_paths(pm.get_base_model())
    assert "lm_head" not in wrapped and type(pm.get_base_model().lm_head) is nn.Linear
    assert len(wrapped) == 2 * 7
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert saved == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # and the saved config wraps the same modules again
    again = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert lora_paths(again.get_base_model()) == wrapped


def test_exclude_modules_and_layers_to_transform():
    pm = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, exclude_modules=["layers.0.self_attn.q_proj"])
    )
    assert lora_paths(pm.get_base_model()) == LLAMA_QV - {"model.layers.0.self_attn.q_proj"}
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, layers_to_transform=[1]))
    assert lora_paths(pm.get_base_model()) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert deltatune_modules(pm.get_base_model().model.layers[0]) == []


def test_rank_and_alpha_pattern_change_one_module():
    pm = dt.get_peft_model(
        tiny_llama(),
        dt.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=QV,
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
    )
    layers = pm.get_base_model().model.layers
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2
    assert layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(3 / 4)
    assert layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 4)


@pytest.mark.parametrize(
    "config",
    [
        lambda: dt.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]),
        lambda: dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        lambda: dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        lambda: dt.BottleneckConfig(bottleneck_size=4, placement="pfeiffer"),
    ],
    ids=["lora", "dora", "ia3", "bottleneck"],
)
def test_delete_adapter_leaves_no_per_adapter_state(config):
    from deltatune.adapter_layer import AdapterLayer

    model = dt.get_peft_model(tiny_llama(), config())
    model.add_adapter("second", config())
    model.delete_adapter("second")
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert layers
    for layer in layers:
        for attr in layer.containers + layer.per_adapter:
            assert "second" not in getattr(layer, attr), (type(layer).__name__, attr)


def test_a_whole_model_survives_torch_save_and_load(tmp_path):
    from conftest import tiny_inputs, tiny_model

    model = dt.get_peft_model(tiny_model("llama"), dt.VeraConfig(r=4, target_modules=["q_proj"], init_weights=False))
    model.add_adapter("ada", dt.AdaLoraConfig(init_r=4, target_r=2, total_step=4, target_modules=["v_proj"]))
    model.eval()
    ids = tiny_inputs("llama")
    expected = model(**ids, labels=ids["input_ids"])  # the fused-loss check ran and cached its verdict
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    again = loaded(**ids, labels=ids["input_ids"])
    torch.testing.assert_close(again.logits, expected.logits)
    torch.testing.assert_close(again.loss, expected.loss)
    assert torch.equal(loaded.base_model.vera_A["default"], model.base_model.vera_A["default"])
