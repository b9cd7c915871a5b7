"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if marker in b]
    assert blocks, f"README has no python example with {marker!r}"
    return blocks[0]


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block("print_trainable_parameters"), str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "trainable params: 3,584 ||" in printed
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_readme_qlora_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("bitsandbytes")
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "BitsAndBytes" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert type(namespace["model"].model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert (tmp_path / "qlora-adapter" / "adapter_model.safetensors").is_file()


def test_readme_trl_example_runs(tmp_path, monkeypatch):
    import pytest

    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM

    from tiny_assets import make_tiny_llama

    make_tiny_llama(tmp_path / "tiny")
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    namespace = {
        "base": AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"),  # its folder holds the tokenizer
        "chat_data": datasets.Dataset.from_list([{"messages": chat}] * 4),
    }
    monkeypatch.chdir(tmp_path)
    block = _block("trl_trainers").replace("max_steps=2)", "max_steps=2, use_cpu=True)")  # as its comment says
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["trainer"].state.global_step == 2
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors").is_file()


METHOD_CONFIGS = ("LoHaConfig", "LoKrConfig", "VeraConfig", "OFTConfig", "BOFTConfig", "AdaLoraConfig")
METHOD_CONFIGS += ("LNTuningConfig", "IA3Config", "BottleneckConfig", "PrefixTuningConfig", "PromptTuningConfig")


def test_readme_new_methods_block_builds_configs_that_attach():
    import deltatune as dt
    from deltatune.registry import _METHODS

    from conftest import tiny_model

    namespace: dict = {}
    exec(compile(_block("LoHaConfig(r=8"), str(README), "exec"), namespace)
    for name in METHOD_CONFIGS[:7]:
        assert name in namespace
    dt.get_peft_model(tiny_model("llama"), dt.LoKrConfig(r=8, decompose_both=True, target_modules="all-linear"))
    text = README.read_text()
    for config in METHOD_CONFIGS + ("LoraConfig", "PromptEncoderConfig"):
        assert f"| `{config}`" in text or f"(`{config}`)" in text, f"README's tables lack {config}"
    registered = {c.__name__ for c in (m.config_class for m in _METHODS.values())}
    assert registered <= set(METHOD_CONFIGS) | {"LoraConfig", "PromptEncoderConfig"}, "a method missing from README"
