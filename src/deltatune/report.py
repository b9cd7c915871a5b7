"""What a training run shows and leaves for a person: the progress bar, the curves, the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def short_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in ("accuracy", "macro_f1", "exact_match", "loss", "perplexity", "token_accuracy") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def printer(enabled: bool) -> Any:
    """A function printing a line on the console (rank 0 only: other processes stay silent)."""
    from rich.console import Console

    console = Console(stderr=False)
    return (lambda text: console.print(text, highlight=False)) if enabled else (lambda text: None)


class ProgressReporter:
    """A rich progress bar with loss, learning rate, tokens/s and time left (rank 0 only)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.task_id = None

    def __enter__(self) -> ProgressReporter:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.__enter__()
        return self

    def update(self, record: dict[str, Any], total: int) -> None:
        if self.bar is None:
            return
        if self.task_id is None:
            self.task_id = self.bar.add_task("train", total=total, info="", completed=record["step"] - 1)
        if "split" in record:
            self.bar.console.print(f"step {record['step']} validation: {short_metrics(record)}", highlight=False)
            return
        loss = "skipped (NaN)" if record["loss"] is None else f"{record['loss']:.4f}"
        info = f"loss {loss}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task_id, completed=record["step"], info=info)
        if not self.bar.console.is_terminal and (record["step"] % 10 == 0 or record["step"] == total):
            self.bar.console.print(f"step {record['step']}/{total}  {info}", highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def plot_curves(metrics_file: Path, image: Path) -> None:
    """Training loss (and validation metric) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "split" not in r and r.get("loss") is not None]  # a skipped NaN step has none
    evals = [r for r in rows if r.get("split") == "validation"]
    figure, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 6, 4), squeeze=False)
    axes[0][0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    axes[0][0].set(xlabel="step", ylabel="training loss", title="training loss")
    if evals:
        key = "accuracy" if "accuracy" in evals[0] else "loss"
        axes[0][1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o")
        axes[0][1].set(xlabel="step", ylabel=key, title=f"validation {key}")
    figure.tight_layout()
    figure.savefig(image, dpi=100)
    plt.close(figure)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", show_header=False)
    metric = summary["main_metric"]
    rows = [
        (
            "trainable parameters",
            f"{summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_percent']:.3f}%)",
        ),
        (
            "training",
            f"{summary['steps']} steps, {summary['train_seconds']:.0f} s, {summary['tokens_per_s']:.0f} tok/s",
        ),
        (
            "wall time",
            f"{summary['wall_seconds']:.0f} s ({summary.get('device', 'cpu')}, {summary.get('precision', 'fp32')})",
        ),
        ("peak memory", f"{summary['peak_memory_mib']:.0f} MiB"),
        (
            "adapter size",
            f"{summary['adapter_bytes'] / 2**20:.2f} MiB (full model {summary['full_model_bytes'] / 2**20:.0f} MiB)",
        ),
    ]
    if summary.get("stopped_early"):
        rows.append(
            (
                "early stopping",
                f"no gain in {summary['options']['metric_for_best'] or metric} for "
                f"{summary['options']['early_stopping_patience']} evaluations",
            )
        )
    if summary["test_before"] and summary["test_after"]:
        rows.append((f"test {metric}", f"{summary['test_before'][metric]:.4f} -> {summary['test_after'][metric]:.4f}"))
    if summary["forgetting"]:
        f = summary["forgetting"]
        rows.append(
            (
                "general-text loss",
                f"{f['general_text_loss_before']:.4f} -> {f['general_text_loss_after']:.4f} ({f['change']:+.4f})",
            )
        )
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
