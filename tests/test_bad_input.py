"""Bad input gives a clear error: the right exception type, and a message naming the problem and the fix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
import deltatune.checkpoint
from deltatune.adapter_layer import AdapterLayer

from conftest import VOCAB, tiny_inputs, tiny_llama

QV = ["q_proj", "v_proj"]


def llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A tiny llama like conftest's, with a chosen width and depth."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def save_adapter(model: torch.nn.Module, directory: Path, **kwargs) -> dt.PeftModel:
    config = dt.LoraConfig(r=4, target_modules=QV, init_lora_weights=False, **kwargs)
    pm = dt.get_peft_model(model, config)
    pm.save_pretrained(directory)
    return pm


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs("llama")).logits


def no_adapter_layers(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


# -- target modules --------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["q_prj"], "q_prj", ["q_prj", "v_prj"]], ids=["list", "regex", "two-typos"])
def test_unknown_target_module_lists_close_names(targets):
    model = tiny_llama()
    with pytest.raises(dt.TargetModuleError) as err:
        dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=targets))
    message = str(err.value)
    assert "q_prj" in message and "matched no module" in message
    assert "q_proj" in message  # the close name, i.e. the fix
    assert no_adapter_layers(model)


def test_unknown_target_module_among_known_ones_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_prj"]))
    assert "'v_prj' matched no module" in caplog.text and "v_proj" in caplog.text
    assert {p.rsplit(".", 1)[-1] for p, m in pm.get_base_model().named_modules() if isinstance(m, AdapterLayer)} == {
        "q_proj"
    }


def test_target_of_wrong_type_names_its_type_and_linear_children():
    model = tiny_llama()
    with pytest.raises(dt.TargetModuleError) as err:
        dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=["self_attn"]))
    message = str(err.value)
    assert "model.layers.0.self_attn" in message and "LlamaAttention" in message
    assert "Linear" in message  # what it can wrap
    for child in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{child}" in message
    assert no_adapter_layers(model)


def test_target_of_wrong_type_next_to_a_valid_one_is_not_silently_dropped():
    """PEFT refuses ``["q_proj", "self_attn"]``; dropping the named ``self_attn`` without a word hides the mistake."""
    with pytest.raises(ValueError, match="Target module"):
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "self_attn"]))
    with pytest.raises(dt.TargetModuleError, match=r"self_attn.*LlamaAttention"):
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "self_attn"]))


# -- checkpoint for another base model -------------------------------------------------------------
def test_adapter_for_a_wider_model_names_key_and_shapes(tmp_path):
    save_adapter(llama(hidden=32), tmp_path)
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(llama(hidden=48), tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(4, 32)" in message and "(4, 48)" in message
    assert "different base model" in message


def test_load_adapter_for_a_wider_model_leaves_no_trace(tmp_path):
    save_adapter(llama(hidden=32), tmp_path / "narrow")
    pm = dt.get_peft_model(llama(hidden=48), dt.LoraConfig(r=4, target_modules=QV))
    before = logits(pm)
    with pytest.raises(dt.CheckpointError, match=r"\(4, 32\).*\(4, 48\)"):
        pm.load_adapter(tmp_path / "narrow", "narrow")
    assert list(pm.peft_config) == ["default"]
    assert not any(".narrow." in n for n, _ in pm.named_parameters())
    assert torch.equal(logits(pm), before)


def test_adapter_for_a_shallower_model_names_the_missing_key(tmp_path):
    save_adapter(llama(layers=2), tmp_path)
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(llama(layers=3), tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in message
    assert "no tensor" in message


def test_adapter_for_a_deeper_model_names_the_extra_key(tmp_path):
    save_adapter(llama(layers=3), tmp_path)
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(llama(layers=2), tmp_path)
    message = str(err.value)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in message
    assert "different base model" in message


# -- missing and broken files ----------------------------------------------------------------------
def test_missing_config_names_the_file(tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(dt.ConfigError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "adapter_config.json" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_weights_names_the_file(tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "adapter_model.safetensors" in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights_name_the_file(tmp_path, damage):
    save_adapter(tiny_llama(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"garbage": b"\x07not a safetensors file" * 9, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(err.value)
    assert str(weights) in message and "corrupt" in message


@pytest.mark.parametrize("text", ["{not json", '["a", "list"]', ""], ids=["syntax", "not-an-object", "empty"])
def test_invalid_json_config_names_the_file(tmp_path, text):
    save_adapter(tiny_llama(), tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(text)
    with pytest.raises(dt.ConfigError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert str(config) in str(err.value)


def test_config_without_peft_type_names_the_field(tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    del data["peft_type"]
    config.write_text(json.dumps(data))
    with pytest.raises(dt.ConfigError, match="peft_type") as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert str(config) in str(err.value)


def test_pickle_weights_need_allow_pickle(tmp_path):
    pm = save_adapter(tiny_llama(), tmp_path)
    expected = logits(pm)
    weights = tmp_path / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    message = str(err.value)
    assert "adapter_model.bin" in message and "allow_pickle=True" in message
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    assert torch.equal(logits(loaded), expected)


# -- atomic saves ----------------------------------------------------------------------------------
def broken_save_file(tensors, filename, metadata=None):
    """Write half a file, then fail, like a full disk."""
    Path(filename).write_bytes(b"partial safetensors data")
    raise OSError("No space left on device")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV))
    monkeypatch.setattr(deltatune.checkpoint, "save_file", broken_save_file)
    target = tmp_path / "adapter"
    with pytest.raises(OSError, match="No space left"):
        pm.save_pretrained(target)
    left = sorted(p.name for p in target.iterdir()) if target.exists() else []
    assert "adapter_model.safetensors" not in left
    assert not any("tmp" in name or name.startswith(".") for name in left), left
    assert left == []  # the config is written after the weights, so nothing at all


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    pm = save_adapter(tiny_llama(), tmp_path)
    old_weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    old_config = (tmp_path / "adapter_config.json").read_bytes()
    expected = logits(pm)
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.add_(1.0)
    monkeypatch.setattr(deltatune.checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError, match="No space left"):
        pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old_weights
    assert (tmp_path / "adapter_config.json").read_bytes() == old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    monkeypatch.undo()
    assert torch.equal(logits(dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected)


# -- config fields ---------------------------------------------------------------------------------
def test_unknown_config_fields_are_ignored_with_a_warning(tmp_path, caplog):
    pm = save_adapter(tiny_llama(), tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    data.update(future_knob=3, another_new_option="on")
    config.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    warnings = [r for r in caplog.records if r.name == "deltatune" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "future_knob" in message and "another_new_option" in message and "adapter_config.json" in message
    assert torch.equal(logits(loaded), logits(pm))


def test_peft_bookkeeping_fields_give_no_warning(tmp_path, caplog):
    save_adapter(tiny_llama(), tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    data.update(
        peft_version="0.21.2",
        auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
    )
    config.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [r for r in caplog.records if r.name == "deltatune"], caplog.text


def test_peft_written_config_gives_no_warning(tmp_path, caplog):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=QV)).save_pretrained(tmp_path)
    assert "peft_version" in json.loads((tmp_path / "adapter_config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not [r for r in caplog.records if r.name == "deltatune"], caplog.text


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"lora_dropout": -0.1}, "lora_dropout"),
        ({"bias": "some"}, "bias"),
        ({"init_lora_weights": "foo"}, "init_lora_weights"),
        ({"task_type": "NOT_A_TASK"}, "task_type"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ],
)
def test_invalid_config_values(kwargs, field):
    with pytest.raises(dt.ConfigError) as err:
        dt.LoraConfig(**kwargs)
    message = str(err.value)
    assert field in message
    assert repr(next(iter(kwargs.values()))) in message or str(next(iter(kwargs.values()))) in message


def test_invalid_config_value_in_a_file_names_the_file(tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    config = tmp_path / "adapter_config.json"
    data = json.loads(config.read_text())
    data["r"] = 0
    config.write_text(json.dumps(data))
    with pytest.raises(dt.ConfigError) as err:
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert str(config) in str(err.value) and "rank" in str(err.value)


# -- adapter names ---------------------------------------------------------------------------------
@pytest.fixture
def two_adapters() -> dt.PeftModel:
    pm = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV))
    pm.add_adapter("other", dt.LoraConfig(r=2, target_modules=QV))
    return pm


def test_duplicate_adapter_name(two_adapters):
    before = {n: p.clone() for n, p in two_adapters.state_dict().items()}
    with pytest.raises(ValueError) as err:
        two_adapters.add_adapter("other", dt.LoraConfig(r=8, target_modules=["k_proj"]))
    message = str(err.value)
    assert "'other'" in message and "exists" in message and ("delete" in message or "another name" in message)
    assert list(two_adapters.peft_config) == ["default", "other"]
    assert two_adapters.peft_config["other"].r == 2
    after = two_adapters.state_dict()
    assert sorted(after) == sorted(before)


@pytest.mark.parametrize("name", ["my.adapter", ""])
def test_invalid_adapter_name(two_adapters, name):
    with pytest.raises(ValueError) as err:
        two_adapters.add_adapter(name, dt.LoraConfig(r=2, target_modules=QV))
    message = str(err.value)
    assert repr(name) in message and "'.'" in message
    assert list(two_adapters.peft_config) == ["default", "other"]


@pytest.mark.parametrize("action", ["set_adapter", "set_adapter_list", "delete_adapter", "merge_adapter"])
def test_unknown_adapter_name_lists_the_adapters(two_adapters, action):
    call = {
        "set_adapter": lambda: two_adapters.set_adapter("nope"),
        "set_adapter_list": lambda: two_adapters.set_adapter(["default", "nope"]),
        "delete_adapter": lambda: two_adapters.delete_adapter("nope"),
        "merge_adapter": lambda: two_adapters.merge_adapter(["nope"]),
    }[action]
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "'nope'" in message and "default" in message and "other" in message
    assert two_adapters.active_adapters == ["default"]
    assert not any(isinstance(m, AdapterLayer) and m.merged_adapters for m in two_adapters.modules())
