"""`make demo` end to end on the real embedded SmolLM2, shortened (slow: loads the real model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    command = [
        sys.executable,
        str(ROOT / "examples" / "demo.py"),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-size",
        "16",
        "--check-size",
        "8",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "LoRA r=16 on all linear layers: 4,884,480 trainable of" in out
    assert "before training: test loss" in out and "after 3 steps: test loss" in out
    assert "adapter saved:" in out
    assert out.count("same predictions on 8/8 reviews") == 2
