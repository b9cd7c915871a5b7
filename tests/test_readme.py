"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {})
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
