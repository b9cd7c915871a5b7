"""``--report-to``: TensorBoard event files with what metrics.jsonl holds; W&B and MLflow named
with the package to install when it is missing."""

from __future__ import annotations

import importlib.util

import pytest

from tiny_assets import check_ok, invoke, read_jsonl, session_assets, train_args


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_training_validation_and_test_metrics(assets, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    extra = ("--max-steps", "4", "--eval-data", assets.cls_eval_csv, "--eval-every", "2", "--save-every", "2")
    check_ok(invoke(*train_args(assets, run, *extra, "--report-to", "tensorboard", "--test-data", assets.cls_eval_csv)))
    scalars = _scalars(run / "tensorboard")
    logged = read_jsonl(run / "metrics.jsonl")
    train = [r for r in logged if "lr" in r]
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in train], rel=1e-6)
    assert "train/tokens_per_s" in scalars
    assert [step for step, _ in scalars["validation/accuracy"]] == [2, 4]
    assert [step for step, _ in scalars["test/accuracy"]] == [0, 4]  # before and after training

    resumed = train_args(assets, run, "--max-steps", "6", "--eval-data", assets.cls_eval_csv, "--eval-every", "2")
    check_ok(invoke(*resumed, "--save-every", "2", "--report-to", "tensorboard", "--test-data", assets.cls_eval_csv,
                    "--resume"))  # fmt: skip
    steps = [step for step, _ in _scalars(run / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once, across the two processes


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_reporter_whose_package_is_missing_says_what_to_install(assets, tmp_path, name):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here")
    result = invoke(*train_args(assets, tmp_path / "run", "--report-to", name))
    assert result.exit_code != 0 and f"--report-to {name} needs the {name} package: pip install {name}" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
