"""``deltatune compare``: every method on the same data, split, budget and seed, side by side.

Each (method, training-set size, seed, learning rate) is a sub-run: an ordinary ``deltatune train``
run in its own folder under ``<output>/runs/``, started as a child process so that each one's time
and peak memory are its own. A finished sub-run is never repeated (an interrupted compare picks up
where it stopped, resuming a sub-run that has a checkpoint); its test metrics come from
``deltatune eval`` on the sub-run folder, the zero-shot baseline from the same evaluation with the
adapter left off.

``--data-sizes`` repeats the comparison on nested subsets: ``--max-train N`` keeps the first N
training records in the data set's fixed order, so every smaller set lies inside every larger one.
``--lr-sweep`` trains each method at its default learning rate times 1/3, 1 and 3 and keeps the one
with the best validation metric (the test split is never looked at to choose).

The rows go to ``compare.json``; :mod:`deltatune.compare_report` turns them into ``report.md``
and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from deltatune import data as datasets
from deltatune.atomic import atomic_write_bytes
from deltatune.run_folder import LATEST, read_summary

logger = logging.getLogger("deltatune")

SWEEP_FACTORS = (1 / 3, 1.0, 3.0)
# train options that a compare decides per sub-run, or that make no sense across methods
PER_RUN = {"method", "output", "resume", "overwrite", "seed", "max_train", "lr", "test_eval", "test_before"}


@dataclasses.dataclass(frozen=True)
class SubRun:
    """One training run of a compare."""

    method: str
    size: int  # training examples (0: all)
    seed: int
    lr: float | None = None  # None: the method's default

    @property
    def name(self) -> str:
        size = "all" if not self.size else str(self.size)
        return f"{self.method}-n{size}-s{self.seed}" + (f"-lr{self.lr:g}" if self.lr is not None else "")


def parse_sizes(text: str) -> list[int]:
    """``--data-sizes 32,128,all`` -> [32, 128, 0] (0: the whole training set), ascending."""
    sizes: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            sizes.append(0)
        elif part.isdigit() and int(part) > 0:
            sizes.append(int(part))
        else:
            raise ValueError(f"--data-sizes {text!r}: {part!r} is neither a positive number nor 'all'")
    if not sizes:
        raise ValueError("--data-sizes names no size; give e.g. all or 32,128,all")
    return sorted(set(sizes), key=lambda n: n or float("inf"))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = list(dict.fromkeys(int(p) for p in text.split(",") if p.strip()))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected whole numbers such as 0,1,2") from None
    if not seeds:
        raise ValueError("--seeds names no seed; give e.g. 0 or 0,1,2")
    return seeds


def parse_methods(text: str) -> list[str]:
    from deltatune.registry import trainable_methods

    known = trainable_methods()
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ValueError(f"--methods {text!r}: unknown {unknown}; choose from {', '.join(known)}")
    return list(dict.fromkeys(methods))


def default_lr(method: str, task_kind: str) -> float:
    """The rate ``train --method`` would use on this task: the centre of the sweep."""
    from deltatune.run_options import with_method_defaults

    return with_method_defaults({"method": method}, (), task_kind)["lr"]


# -- running --------------------------------------------------------------------------------------
def run_compare(options: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
    """Train every sub-run that is not finished yet, evaluate, and write compare.json and the reports."""
    output = Path(options["output"])
    methods = parse_methods(options["methods"])
    sizes = parse_sizes(options["data_sizes"])
    seeds = parse_seeds(options["seeds"])
    builtin = options["data"] in datasets.BUILTIN_DATASETS
    has_validation = bool(options.get("eval_data")) or (
        builtin and "validation" in datasets.BUILTIN_DATASETS[options["data"]].splits
    )
    if options["lr_sweep"] and not has_validation:
        raise ValueError("--lr-sweep chooses on validation data: pass --eval-data FILE (never the test set)")
    if not builtin and not options.get("test_data"):
        raise ValueError("compare reports test metrics: pass --test-data FILE (a data file has no test split)")
    shared = {k: v for k, v in options.items() if k in given and k not in PER_RUN and k not in COMPARE_ONLY}
    if has_validation and "eval_every" not in given:
        shared["eval_every"] = 0.2  # a validation curve of five points, whatever each task's budget
    output.mkdir(parents=True, exist_ok=True)
    _check_same_compare(output, options, given)
    if options["lr_sweep"]:
        from deltatune.run import training_data_and_task

        task_kind = training_data_and_task(options)[1]

    plan = []
    for size in sizes:
        for seed in seeds:
            for method in methods:
                lrs = [default_lr(method, task_kind) * f for f in SWEEP_FACTORS] if options["lr_sweep"] else [None]
                plan += [SubRun(method, size, seed, lr) for lr in lrs]
    runner = _Runner(output, shared, len(plan))
    with runner:
        for sub in plan:
            runner.train(sub)
    chosen = choose_runs(plan, output) if options["lr_sweep"] else plan
    zero_shot = runner.evaluate(chosen[0], without_adapter=True)  # the base model: any sub-run's task
    zero_shot_validation = (
        runner.evaluate(chosen[0], without_adapter=True, split="validation") if has_validation else None
    )
    rows = [collect_row(sub, output, runner.evaluate(sub), zero_shot, zero_shot_validation) for sub in chosen]
    result = {
        "command": {k: v for k, v in options.items() if k in given or k in COMPARE_ONLY},
        "zero_shot": zero_shot,
        "zero_shot_validation": zero_shot_validation,
        "rows": rows,
        "swept": [collect_sweep_row(sub, output) for sub in plan] if options["lr_sweep"] else [],
    }
    atomic_write_bytes(output / "compare.json", (json.dumps(result, indent=2) + "\n").encode())
    from deltatune.compare_report import write_reports

    write_reports(result, output)
    return result


COMPARE_ONLY = {"methods", "data_sizes", "seeds", "lr_sweep"}


def _check_same_compare(output: Path, options: dict[str, Any], given: Collection[str]) -> None:
    """A compare folder is continued only by the same command: other options would mix two experiments."""
    record = output / "compare_command.json"
    kept = {k: options[k] for k in sorted(given) if k not in COMPARE_ONLY and k != "output"}
    command = json.loads(json.dumps(kept, default=str))
    finished = any((read_summary(f) or {}).get("status") == "finished" for f in (output / "runs").glob("*"))
    if record.is_file() and finished:  # before any sub-run finished, a corrected command may start over
        before = json.loads(record.read_text())
        if before != command:
            changed = sorted(set(before) ^ set(command) | {k for k in before if before.get(k) != command.get(k)})
            raise ValueError(
                f"{output} holds a compare with other options ({', '.join(changed)}); use another --output"
            )
    atomic_write_bytes(record, (json.dumps(command, indent=2) + "\n").encode())


class _Runner:
    """Runs sub-runs as child processes, one progress display across all of them."""

    def __init__(self, output: Path, shared: dict[str, Any], total: int) -> None:
        self.output, self.shared, self.total = output, shared, total
        self.done = 0
        self.progress: Any = None

    def __enter__(self) -> _Runner:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]compare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        )
        self.progress.__enter__()
        self.task = self.progress.add_task("compare", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def folder(self, sub: SubRun) -> Path:
        return self.output / "runs" / sub.name

    def train(self, sub: SubRun) -> None:
        from deltatune.registry import training_defaults

        folder = self.folder(sub)
        summary = read_summary(folder) if folder.is_dir() else None
        if summary and summary.get("status") == "finished":
            self._advance(f"{sub.name}: finished earlier")
            return
        config = {**self.shared, "method": sub.method, "seed": sub.seed, "max_train": sub.size}
        config |= {"output": str(folder), "test_eval": False}
        if sub.lr is not None:
            config["lr"] = sub.lr
        if (folder / LATEST).is_file() and training_defaults(sub.method).resumable:
            config["resume"] = True
        elif folder.exists():
            config["overwrite"] = True  # nothing to continue, or a method whose runs cannot resume exactly
        for stale in self.side("evals", sub, "*.json").parent.glob(f"{sub.name}.*.json"):
            stale.unlink()  # evaluations of an earlier, unfinished attempt
        config_file = self.side("configs", sub, "yaml")
        config_file.write_text(json.dumps(config))  # JSON is YAML
        command = [sys.executable, "-m", "deltatune", "train", "--config", str(config_file)]
        log = self.side("logs", sub, "train.log")
        self._run(command, log, log, sub.name, folder / "metrics.jsonl")
        self._advance(f"{sub.name}: done")

    def side(self, kind: str, sub: SubRun, suffix: str) -> Path:
        """A file about a sub-run kept beside the runs (its folder holds only what train wrote)."""
        folder = self.output / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{sub.name}.{suffix}"

    def evaluate(self, sub: SubRun, without_adapter: bool = False, split: str = "test") -> dict[str, Any]:
        """Metrics of a sub-run on the test split (kept beside it), or of the base model with its task."""
        folder = self.folder(sub)
        stem = ("zero_shot" if without_adapter else "after") + f"_{split}"
        cached = self.side("evals", sub, f"{stem}.json")
        if cached.is_file():
            return json.loads(cached.read_text())
        command = [sys.executable, "-m", "deltatune", "eval", "--adapter", str(folder)]
        if without_adapter:
            command.append("--without-adapter")
        if split == "validation":
            run_options = (read_summary(folder) or {}).get("options", {})
            eval_file = run_options.get("eval_data")
            command += ["--data", eval_file] if eval_file else ["--split", "validation"]
            if run_options.get("max_eval"):
                command += ["--max-examples", str(run_options["max_eval"])]
        self.progress.update(self.task, info=f"evaluating {sub.name}{' (zero-shot)' if without_adapter else ''}")
        out = self.side("logs", sub, f"{stem}.out")
        self._run(command, out, self.side("logs", sub, f"{stem}.log"), sub.name, None)
        text = out.read_text()
        metrics = json.loads(text[text.index("{") :])
        atomic_write_bytes(cached, json.dumps(metrics, indent=2).encode())
        out.unlink()
        return metrics

    def _run(self, command: list[str], stdout: Path, log: Path, name: str, metrics: Path | None) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        with open(stdout, "w", encoding="utf-8") as out, open(log, "a", encoding="utf-8") as err:
            # its own session: a Ctrl-C reaches it once, from here; and it dies with this process
            child = subprocess.Popen(
                command,
                stdout=out,
                stderr=out if stdout == log else err,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            try:
                while child.poll() is None:
                    if metrics is not None:
                        self.progress.update(self.task, info=f"{name}: {_last_step(metrics)}")
                    time.sleep(0.5)
            finally:
                if child.poll() is None:  # interrupted: the child saves a checkpoint; the next compare resumes it
                    child.send_signal(signal.SIGINT)
                    try:
                        child.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
        if child.returncode != 0:
            texts = {stdout.read_text(errors="replace"), log.read_text(errors="replace")}
            lines = "".join(texts).strip().splitlines()
            raise ValueError(f"sub-run {name} failed (exit {child.returncode}; log {log}): {' '.join(lines[-3:])}")

    def _advance(self, info: str) -> None:
        self.done += 1
        self.progress.update(self.task, completed=self.done, info=info)


def _die_with_parent() -> None:
    """In the child, before exec: the kernel ends it if the compare process dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_step(metrics: Path) -> str:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return "starting"
    for line in reversed(lines):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:  # a line being written
            continue
        if "split" not in row and "loss" in row:
            loss = "skipped (NaN)" if row["loss"] is None else f"{row['loss']:.4f}"
            return f"step {row['step']}, loss {loss}"
    return "loading"


# -- rows -----------------------------------------------------------------------------------------
def _validation(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "split" not in r and r.get("loss") is not None]  # a skipped NaN step has none
    return train, [r for r in rows if r.get("split") == "validation"]


def final_validation(output: Path, sub: SubRun) -> float | None:
    """The validation metric of a sub-run's final weights (the ones its test row measures)."""
    folder = output / "runs" / sub.name
    summary = read_summary(folder) or {}
    metric = summary.get("metric_for_best") or summary.get("main_metric", "loss")
    _, validation = _validation(folder)
    return validation[-1].get(metric) if validation else None


def choose_runs(plan: list[SubRun], output: Path) -> list[SubRun]:
    """Per (method, size, seed), the learning rate whose final weights score best on validation."""
    best: dict[tuple[str, int, int], tuple[float, SubRun]] = {}
    for sub in plan:
        value = final_validation(output, sub)
        if value is None:
            continue
        metric = (read_summary(output / "runs" / sub.name) or {}).get("metric_for_best", "loss")
        score = -value if metric in ("loss", "perplexity") else value
        key = (sub.method, sub.size, sub.seed)
        if key not in best or score > best[key][0]:
            best[key] = (score, sub)
    missing = {(s.method, s.size, s.seed) for s in plan} - set(best)
    if missing:
        raise ValueError(f"--lr-sweep: no validation result for {sorted(missing)}; see the sub-runs' logs")
    return [sub for _, sub in best.values()]


def collect_row(
    sub: SubRun,
    output: Path,
    test: dict[str, Any],
    zero_shot: dict[str, Any],
    zero_shot_validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of compare.json: the sub-run's promises in figures."""
    folder = output / "runs" / sub.name
    summary = read_summary(folder) or {}
    train, validation = _validation(folder)
    tail = train[-max(1, len(train) // 10) :]
    metric = summary.get("main_metric", "loss")
    best_row = None
    if validation:
        pick = max if metric not in ("loss", "perplexity") else min
        best_row = pick(validation, key=lambda r: r[metric])
    final_train = sum(r["loss"] for r in tail) / len(tail) if tail else None
    last_validation_loss = validation[-1]["loss"] if validation else None
    return {
        "method": sub.method,
        "size": sub.size,
        "seed": sub.seed,
        "lr": summary.get("options", {}).get("lr"),
        "run": str(folder),
        "trainable_params": summary.get("trainable_params"),
        "trainable_percent": summary.get("trainable_percent"),
        "main_metric": metric,
        "test": test,
        "zero_shot": zero_shot,
        "validation_before": zero_shot_validation,
        "validation_after": validation[-1] if validation else None,
        "validation_best": best_row,
        "best_step": best_row["step"] if best_row else None,
        "steps": summary.get("steps"),
        "final_train_loss": final_train,
        "final_validation_loss": last_validation_loss,
        "overfitting_gap": None
        if last_validation_loss is None or final_train is None
        else last_validation_loss - final_train,
        "train_seconds": summary.get("train_seconds"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "peak_memory_mib": summary.get("peak_memory_mib"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "full_model_bytes": summary.get("full_model_bytes"),
        "forgetting": summary.get("forgetting"),
        "curves": {
            "train": [[r["step"], r["loss"]] for r in train],
            "validation": [[r["step"], r["loss"]] for r in validation],
        },
    }


def collect_sweep_row(sub: SubRun, output: Path) -> dict[str, Any]:
    summary = read_summary(output / "runs" / sub.name) or {}
    return {
        "method": sub.method,
        "size": sub.size,
        "seed": sub.seed,
        "lr": sub.lr,
        "validation": final_validation(output, sub),
        "metric": summary.get("metric_for_best"),
    }
