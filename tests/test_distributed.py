"""Several processes (torchrun, gloo on CPU): the same result as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tiny_assets import (
    ROOT,
    VENV_BIN,
    adapter_tensors,
    assert_same_tensors,
    check_ok,
    free_port,
    invoke,
    read_jsonl,
    session_assets,
    subprocess_env,
    train_args,
)

pytestmark = pytest.mark.slow

STEPS = 3
GLOBAL_BATCH = 8


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def run_args(assets, out: Path, batch_size: int) -> list[str]:
    return train_args(
        assets,
        out,
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(batch_size),
        "--eval-data",
        str(assets.cls_eval_csv),
        "--test-data",
        str(assets.cls_eval_csv),
        "--eval-batch-size",
        "5",  # uneven shards of the 16 evaluation examples across 2 processes
    )


@pytest.fixture(scope="module")
def single_process(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    check_ok(invoke(*run_args(assets, out, GLOBAL_BATCH)))
    return out


def torchrun(args: list[str], processes: int = 2, timeout: float = 150) -> subprocess.CompletedProcess:
    command = [
        str(VENV_BIN / "torchrun"),
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "deltatune",
        *args,
    ]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return result


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def check_same_run(out: Path, reference: Path, processes: int) -> None:
    assert_same_tensors(adapter_tensors(out / "adapter"), adapter_tensors(reference / "adapter"), atol=1e-5)
    rows = read_jsonl(out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # one writer: no line twice
    steps = [r for r in rows if "split" not in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if r.get("split") == "validation"] == [STEPS]
    expected = [r for r in read_jsonl(reference / "metrics.jsonl") if "split" not in r]
    for row, want in zip(steps, expected):
        assert row["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert row["lr"] == pytest.approx(want["lr"])
    summary = json.loads((out / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert summary["processes"] == processes and summary["steps"] == STEPS
    assert summary["train_examples_seen"] == want["train_examples_seen"] == STEPS * GLOBAL_BATCH
    for key in ("test_before", "test_after", "best_validation"):
        got, expect = summary[key], want[key]
        if isinstance(expect, dict):
            assert got["examples"] == expect["examples"] == 16
            assert got["accuracy"] == expect["accuracy"]
            assert got["loss"] == pytest.approx(expect["loss"], abs=1e-5)
        else:
            assert got == pytest.approx(expect, abs=1e-6)
    assert files_under(out) == files_under(reference)  # no stray per-rank files


def test_two_processes_match_one(assets, single_process, tmp_path):
    out = tmp_path / "ddp"
    result = torchrun(run_args(assets, out, GLOBAL_BATCH // 2))
    check_same_run(out, single_process, processes=2)
    assert result.stdout.count("run summary") == 1  # only rank 0 prints


def test_fsdp_with_two_processes_matches_one(assets, single_process, tmp_path):
    out = tmp_path / "fsdp"
    torchrun([*run_args(assets, out, GLOBAL_BATCH // 2), "--fsdp"])
    check_same_run(out, single_process, processes=2)


def test_fsdp_full_fine_tune_saves_a_model_folder_with_each_weight_once(assets, tmp_path):
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    check_ok(invoke(*run_args(assets, one, GLOBAL_BATCH), "--method", "full", "--lr", "1e-3"))
    torchrun([*run_args(assets, two, GLOBAL_BATCH // 2), "--method", "full", "--lr", "1e-3", "--fsdp"])
    for folder in (one, two):
        assert (folder / "model" / "config.json").is_file() and (folder / "model" / "tokenizer.json").is_file()
    single, sharded = (
        load_file(str(one / "model" / "model.safetensors")),
        load_file(str(two / "model" / "model.safetensors")),
    )
    assert "lm_head.weight" not in sharded and sorted(sharded) == sorted(single)
    assert_same_tensors(sharded, single, atol=1e-5)


def test_torchrun_refuses_a_non_empty_output_on_every_process(assets, single_process):
    command = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_port()), "-m", "deltatune", *run_args(assets, single_process, 4)]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=ROOT)
    output = result.stderr + result.stdout
    assert result.returncode != 0 and output.count("is not empty") == 2  # each process, none hanging
    assert "src/deltatune" not in output  # torchrun reports its failed children; no deltatune traceback
