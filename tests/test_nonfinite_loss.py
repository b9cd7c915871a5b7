"""A NaN or infinite loss stops the run before its update (naming the step and the batch's records,
keeping the last checkpoint), or, with ``--on-nan skip``, drops that step's update and goes on."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.run_folder import LATEST
from deltatune.tasks import LabelGeneration
from tiny_assets import adapter_tensors, check_ok, invoke, read_jsonl, session_assets, train_args

FLAGS = ("--max-steps", "8", "--save-every", "2", "--batch-size", "8")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def poison_step(monkeypatch, step: int, value: float = math.nan) -> None:
    """The training loss of optimizer step ``step`` (1-based; one micro-batch per step) becomes ``value``."""
    real = LabelGeneration.loss_sum
    calls = {"n": 0}

    def loss_sum(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * value if calls["n"] == step else loss

    monkeypatch.setattr(LabelGeneration, "loss_sum", loss_sum)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_records(assets, tmp_path, monkeypatch, value):
    out = tmp_path / "run"
    poison_step(monkeypatch, 5, value)
    result = invoke(*train_args(assets, out, *FLAGS))
    assert result.exit_code != 0
    message = result.output
    assert "step 5: the loss is" in message and "checkpoint-4, is kept" in message, message
    records = message.split("training records ")[1].split(";")[0].split(", ")
    assert len(records) == 8 and all(1 <= int(r) <= 64 for r in records)  # the batch of 8 of the 64 rows
    assert "Traceback" not in message
    assert (out / LATEST).read_text() == "checkpoint-4"
    assert not (out / "adapter").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    trained = adapter_tensors(out / "checkpoint-4" / "trained")
    assert all(torch.isfinite(t).all() for t in trained.values())


def test_the_stopped_run_resumes_to_the_uninterrupted_weights(assets, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    check_ok(invoke(*train_args(assets, reference, *FLAGS)))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        poison_step(patch, 5)
        assert invoke(*train_args(assets, out, *FLAGS)).exit_code != 0
    check_ok(invoke(*train_args(assets, out, *FLAGS), "--resume"))  # the cause gone (a fixed record, say)
    ours, theirs = adapter_tensors(out / "adapter"), adapter_tensors(reference / "adapter")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_on_nan_skip_drops_the_step_and_goes_on(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_step(monkeypatch, 3)
    check_ok(invoke(*train_args(assets, out, *FLAGS, "--on-nan", "skip")))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[2]["loss"] is None and all(r["loss"] is not None for i, r in enumerate(rows) if i != 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["skipped_non_finite_steps"] == [3]
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "adapter").values())


def test_compare_progress_reads_a_skipped_step(tmp_path):
    from deltatune.compare import _last_step

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5, "lr": 0.1}\n{"step": 2, "loss": null, "lr": 0.1}\n')
    assert _last_step(metrics) == "step 2, loss skipped (NaN)"
