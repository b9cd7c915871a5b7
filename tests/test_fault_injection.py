"""Training survives a crash at any moment and a disk that fills up.

A run is killed (SIGKILL, by tests/fault_driver.py) at precise points inside a checkpoint save
and at timed moments; a save meets ENOSPC or EIO. Every time the last complete checkpoint is
intact, nothing half-written is left where a reader would look, and ``--resume`` ends with the
weights of an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import deltatune.train as train
from deltatune.run_checkpoint import complete_checkpoint
from deltatune.run_folder import LATEST
from fuzz_helpers import EXAMPLES, tally, write_report
from tiny_assets import ROOT, adapter_tensors, check_ok, invoke, session_assets, subprocess_env, train_args

FLAGS = ("--max-steps", "8", "--save-every", "2", "--batch-size", "8", "--save-total-limit", "1")
DRIVER = Path(__file__).with_name("fault_driver.py")
# (fault, where): the checkpoint step it strikes at, or milliseconds into training for "timer"
KILL_POINTS = [
    ("before-rename", 4),
    ("optimizer-write", 4),
    ("adapter-write", 6),
    ("pointer", 4),
    ("pointer-rename", 6),
    ("rotation", 4),
    ("metrics-line", 5),
    ("mid-step", 5),
    ("export", 0),
    ("timer", 900),
    ("timer", 1700),
]
# make fuzz: more kills at seeded random moments (one per 100 of its examples)
KILL_POINTS += [("timer", ms) for ms in random.Random(0).sample(range(200, 4000), EXAMPLES // 100)]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    write_report()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("faults") / "reference"
    check_ok(invoke(*train_args(assets, out, *FLAGS)))
    return adapter_tensors(out / "adapter")


def assert_intact(out: Path) -> None:
    """What a reader (or --resume) finds: the pointer names a whole checkpoint, or a kill's fallback."""
    folder = complete_checkpoint(out)
    if folder is None:
        return
    state = json.loads((folder / "trainer_state.json").read_text())
    assert folder.name == f"checkpoint-{state['step']}"
    load_file(str(folder / "optimizer.safetensors"))
    load_file(str(folder / "trained" / "adapter_model.safetensors"))
    json.loads((folder / "trained" / "adapter_config.json").read_text())


def assert_bit_identical(out: Path, reference: dict[str, torch.Tensor]) -> None:
    ours = adapter_tensors(out / "adapter")
    assert ours.keys() == reference.keys()
    different = [k for k in ours if not torch.equal(ours[k], reference[k])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:3]}"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps  # every step logged once, no line cut in half
    leftovers = [p.name for p in out.rglob("*.tmp")] + [p.name for p in out.rglob("*.partial")]
    assert not leftovers, leftovers


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "at"), KILL_POINTS, ids=[f"{f}-{a}" for f, a in KILL_POINTS])
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_weights(assets, reference, tmp_path, fault, at):
    out = tmp_path / "run"
    args = train_args(assets, out, *FLAGS)
    proc = subprocess.run(
        [sys.executable, str(DRIVER), fault, str(at), *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    killed = proc.returncode == -signal.SIGKILL
    assert killed or (fault == "timer" and proc.returncode == 0), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_intact(out)
    try:
        check_ok(invoke(*args, "--resume"))
        assert_bit_identical(out, reference)
    except AssertionError:
        tally("kill points", bad=True)
        raise
    tally("kill points", accepted=killed)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, "safetensors"])
def test_a_save_that_fails_says_so_leaves_nothing_half_written_and_resumes(
    assets, reference, tmp_path, monkeypatch, code
):
    out = tmp_path / "run"
    args = train_args(assets, out, *FLAGS)
    real = train.save_file

    def failing(tensors, path, metadata=None):
        if ".checkpoint-6.tmp" in str(path):
            Path(path).write_bytes(b"partial")  # the disk filled up mid-file
            if code == "safetensors":  # how safetensors itself reports it
                raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
            raise OSError(code, os.strerror(code), str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(train, "save_file", failing)
    result = invoke(*args)
    assert result.exit_code != 0
    message = result.output
    assert "could not save checkpoint-6" in message and "checkpoint-4" in message and "--resume" in message
    assert "Traceback" not in message
    assert (out / LATEST).read_text() == "checkpoint-4"
    assert not list(out.glob(".checkpoint-*"))  # the half-written folder is gone
    assert_intact(out)
    monkeypatch.setattr(train, "save_file", real)  # space was made
    check_ok(invoke(*args, "--resume"))
    assert_bit_identical(out, reference)
