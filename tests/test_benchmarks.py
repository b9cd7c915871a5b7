"""Smoke test of the benchmark scripts: they run, exit 0 and print a RESULT record with ratios."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, **extra_env: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", **extra_env)
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--device", "cpu", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.slow
def test_benchmarks_quick_runs_print_a_result():
    for script in ("bench_lora_layer.py", "bench_mixed_batch.py"):
        record = run_quick(script)
        assert record["ratios"], record
        assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in record["ratios"].values())
        assert any("peft" in key for key in record["ratios"]), record["ratios"]
        for key, diff in record.get("checks", {}).items():
            if "expected_nonzero" not in key:
                assert diff < 1e-3, (script, key, diff)  # identical adapters: the same outputs in both libraries


@pytest.mark.slow
def test_train_step_benchmark_checks_the_fused_loss_against_the_models_own():
    record = run_quick("bench_train_step.py")
    assert {"all_linear/time_deltatune_fused_over_peft", "all_linear/memory_deltatune_fused_over_peft"} <= set(
        record["ratios"]
    )
    assert record["checks"], record
    for key, diff in record["checks"].items():
        assert abs(diff) < 1e-4, (key, diff)  # the fused LM-head loss is the model's own loss
    trainable = record["trainable"]
    assert trainable["all_linear/deltatune_fused"] == trainable["all_linear/peft"] > 0


@pytest.mark.slow
def test_inference_benchmark_runs_without_the_embedded_weights():
    """A GPU machine gets SmolLM2 from its config with random weights and no tokenizer (device_check.sh)."""
    record = run_quick("bench_inference.py", DELTATUNE_BENCH_RANDOM_WEIGHTS="1")
    assert record["generate"]["new_tokens"] > 0 and all(v > 0 for v in record["generate"]["tokens_per_s"].values())
    assert record["checks"]["max_abs_diff_deltatune_vs_peft_unmerged"] < 1e-4


@pytest.mark.slow
def test_serve_benchmark_runs_the_three_servers_and_agrees_with_peft():
    """On SmolLM2 with 8 adapters: deltatune serve's greedy replies equal HF PEFT's one request at a time."""
    record = run_quick("bench_serve.py")
    assert {"throughput_serve_over_naive@4", "throughput_serve_over_per_adapter@4"} <= set(record["ratios"])
    assert all(run["tokens"] > 0 and run["p99_s"] >= run["p50_s"] > 0 for run in record["runs"].values())
    assert record["checks"]["replies_equal_to_naive_share"] == 1.0


@pytest.mark.slow
def test_stream_text_benchmark_agrees_with_the_naive_decode():
    record = run_quick("bench_stream_text.py")  # the script asserts equal text before it times
    assert set(record["ratios"]) == {"256_tokens/time_over_naive", "1024_tokens/time_over_naive"}
    assert all(math.isfinite(v) and v > 0 for v in record["ratios"].values())
