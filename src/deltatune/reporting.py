"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

``deltatune train --report-to tensorboard`` (or ``wandb``, ``mlflow``; several may be given)
sends every record the trainer logs (training loss, learning rate, tokens/s; validation and
test metrics) to each, under ``train/...``, ``validation/...`` and ``test/...`` at its step. All
three write inside the run folder and need no network: TensorBoard event files in
``tensorboard/``, W&B in offline mode under ``wandb/`` (``wandb sync`` uploads later), MLflow
in a file store under ``mlruns/`` (unless ``MLFLOW_TRACKING_URI`` names another). A resumed run
drops what the interrupted one logged after its checkpoint, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

REPORTERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Reporter(Protocol):
    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def _scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """The record's step and its numeric fields named ``split/field``."""
    split = record.get("split", "train")
    values = {
        f"{split}/{key}": float(value)
        for key, value in record.items()
        if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    return int(record.get("step", 0)), values


class TensorBoardReporter:
    def __init__(self, output: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at and after it, from the interrupted run, are dropped on resume
        self.writer = SummaryWriter(log_dir=str(output / "tensorboard"), purge_step=resume_step)

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = _scalars(record)
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, output: Path, resume_step: int | None, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "deltatune"),
            dir=str(output),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=dict(config),
            resume="allow" if resume_step else None,
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = _scalars(record)
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    def __init__(self, output: Path, resume_step: int | None, config: Mapping[str, Any]) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((output / "mlruns").resolve().as_uri())
        self.mlflow = mlflow
        self.run = mlflow.start_run()
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})

    def log(self, record: Mapping[str, Any]) -> None:
        step, values = _scalars(record)
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def check_reporters(names: Sequence[str]) -> None:
    """Each named reporter exists and its package is installed, or a ValueError that says what to install."""
    import importlib.util

    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"--report-to {name}: choose from {', '.join(REPORTERS)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ValueError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")


class Reporters:
    """The reporters of one run, made on its first record (on resume: dropping what came after the
    checkpoint, whose step the first record tells); logs only where ``enabled`` (the main process)."""

    def __init__(
        self, names: Sequence[str], output: Path, config: Mapping[str, Any], resuming: bool, enabled: bool = True
    ) -> None:
        check_reporters(names)
        self.names, self.output, self.config = list(dict.fromkeys(names)), output, dict(config)
        self.resuming, self.enabled = resuming, enabled and bool(names)
        self.made: list[Reporter] | None = None

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self.made is None:
            step = int(record.get("step", 0)) if self.resuming else None
            self.made = [self._make(name, step) for name in self.names]
        for reporter in self.made:
            reporter.log(record)

    def _make(self, name: str, resume_step: int | None) -> Reporter:
        if name == "tensorboard":
            return TensorBoardReporter(self.output, resume_step)
        if name == "wandb":
            return WandbReporter(self.output, resume_step, self.config)
        return MlflowReporter(self.output, resume_step, self.config)

    def close(self) -> None:
        for reporter in self.made or []:
            reporter.close()
        self.made = None
