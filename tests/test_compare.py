"""``deltatune compare`` end to end on tiny models: rows, files, nesting, resume after a kill, verdicts,
and the HTML report in a real headless browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deltatune.compare import SubRun, parse_sizes
from deltatune.compare_report import summarise, verdicts
from tiny_assets import ROOT, check_ok, deltatune_command, invoke, session_assets, subprocess_env


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def compare_args(assets, output: Path, *extra: str) -> list[str]:
    return [
        "compare",
        "--model",
        str(assets.llama),
        "--data",
        str(assets.cls_csv),
        "--eval-data",
        str(assets.cls_eval_csv),
        "--test-data",
        str(assets.cls_eval_csv),
        "--methods",
        "lora,full",
        "--data-sizes",
        "16,all",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--no-forgetting",
        "--output",
        str(output),
        *extra,
    ]


@pytest.fixture(scope="module")
def compared(assets, tmp_path_factory):
    output = tmp_path_factory.mktemp("compare") / "out"
    check_ok(invoke(*compare_args(assets, output)))
    return output


def test_compare_writes_a_row_per_method_and_size_and_the_reports(compared):
    result = json.loads((compared / "compare.json").read_text())
    assert sorted((r["method"], r["size"]) for r in result["rows"]) == [
        ("full", 0),
        ("full", 16),
        ("lora", 0),
        ("lora", 16),
    ]
    for row in result["rows"]:
        summary = json.loads((Path(row["run"]) / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["options"]["max_train"] == row["size"]
        assert row["test"]["examples"] == 16 and 0 <= row["test"]["accuracy"] <= 1
        assert row["trainable_params"] == summary["trainable_params"] and row["steps"] == 2
        assert row["train_seconds"] > 0 and row["peak_memory_mib"] > 0 and row["adapter_bytes"] > 0
        assert row["curves"]["train"] and row["best_step"] in (1, 2)  # eval every max_steps // 5 = 1 step
    lora = next(r for r in result["rows"] if r["method"] == "lora")
    assert lora["lr"] == 5e-4 and lora["zero_shot"]["accuracy"] == result["zero_shot"]["accuracy"]
    full = next(r for r in result["rows"] if r["method"] == "full")
    assert full["lr"] == 3e-5 and full["trainable_percent"] == 100
    for name in ("report.md", "report.html", "report-0.png"):
        assert (compared / name).is_file()
    assert "## Verdicts" in (compared / "report.md").read_text()


def test_data_sizes_are_sorted_and_deduplicated():
    assert parse_sizes("128,32,all,32") == [32, 128, 0]
    with pytest.raises(ValueError, match="neither a positive number"):
        parse_sizes("32,-1")


def test_a_second_compare_repeats_nothing_and_other_options_are_refused(assets, compared):
    before = {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/summary.json")}
    check_ok(invoke(*compare_args(assets, compared)))
    assert {p: p.stat().st_mtime_ns for p in compared.glob("runs/*/summary.json")} == before
    result = invoke(*compare_args(assets, compared, "--batch-size", "2"))
    assert result.exit_code != 0 and "other options" in result.output


def test_a_sub_run_killed_mid_training_resumes_from_its_checkpoint(assets, tmp_path):
    output = tmp_path / "mid"
    args = compare_args(assets, output, "--methods", "lora", "--data-sizes", "all", "--max-steps", "60")
    args += ["--save-every", "5"]
    child = subprocess.Popen(deltatune_command(*args), env=subprocess_env(), cwd=ROOT, start_new_session=True)
    run = output / "runs" / "lora-nall-s0"
    deadline = time.monotonic() + 240
    while not (run / "checkpoint-10").is_dir():
        assert child.poll() is None and time.monotonic() < deadline, "compare ended before a checkpoint"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    check_ok(invoke(*args))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, line in zip(steps, (run / "metrics.jsonl").read_text().splitlines()) if "split" not in line]
    assert train_steps == list(range(1, 61))  # resumed: each step once
    assert "resume" in json.loads((output / "configs" / "lora-nall-s0.yaml").read_text())


def test_seeds_end_to_end(assets, tmp_path):
    output = tmp_path / "seeds"
    check_ok(invoke(*compare_args(assets, output, "--methods", "lora", "--data-sizes", "all", "--seeds", "0,1,1")))
    rows = json.loads((output / "compare.json").read_text())["rows"]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    assert " ± " in (output / "report.md").read_text()


def test_compare_resumes_after_a_kill_without_repeating_finished_sub_runs(assets, tmp_path):
    output = tmp_path / "killed"
    command = deltatune_command(*compare_args(assets, output, "--methods", "lora,prompt", "--data-sizes", "all"))
    child = subprocess.Popen(command, env=subprocess_env(), cwd=ROOT, start_new_session=True)
    first = output / "runs" / "lora-nall-s0" / "summary.json"
    deadline = time.monotonic() + 240
    while not (first.is_file() and json.loads(first.read_text())["status"] == "finished"):
        assert child.poll() is None and time.monotonic() < deadline, "compare ended before the first sub-run did"
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (output / "compare.json").exists()
    stamp = first.stat().st_mtime_ns
    check_ok(invoke(*compare_args(assets, output, "--methods", "lora,prompt", "--data-sizes", "all")))
    assert first.stat().st_mtime_ns == stamp  # the finished sub-run was not trained again
    rows = json.loads((output / "compare.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["lora", "prompt"]


def test_lr_sweep_chooses_on_validation(assets, tmp_path):
    from tiny_assets import classification_rows, read_jsonl, write_csv

    validation = write_csv(tmp_path / "validation.csv", classification_rows(12, seed=21))  # not the test file
    output = tmp_path / "sweep"
    args = compare_args(assets, output, "--methods", "lora", "--data-sizes", "all", "--lr-sweep")
    args[args.index("--eval-data") + 1] = str(validation)
    args += ["--metric-for-best", "loss", "--max-steps", "3"]
    check_ok(invoke(*args))
    result = json.loads((output / "compare.json").read_text())
    swept = result["swept"]
    assert sorted(r["lr"] for r in swept) == pytest.approx([5e-4 / 3, 5e-4, 1.5e-3])
    final = {}  # the final validation loss of each rate, read from the sub-runs' own logs
    for entry in swept:
        rows = read_jsonl(output / "runs" / f"lora-nall-s0-lr{entry['lr']:g}" / "metrics.jsonl")
        final[entry["lr"]] = [r for r in rows if r.get("split") == "validation"][-1]["loss"]
        assert final[entry["lr"]] == entry["validation"]
    assert result["rows"][0]["lr"] == pytest.approx(min(final, key=final.get))
    assert result["rows"][0]["validation_after"]["examples"] == 12 and result["zero_shot_validation"]["examples"] == 12


def test_lr_sweep_without_validation_data_is_refused(assets, tmp_path):
    args = compare_args(assets, tmp_path / "o", "--lr-sweep")
    args[args.index("--eval-data") : args.index("--eval-data") + 2] = []
    result = invoke(*args)
    assert result.exit_code != 0 and "validation" in result.output and "--eval-data" in result.output


def row(
    method: str, accuracy: float, seconds: float, params: int, size: int = 0, seed: int = 0, gap: float = 0.1
) -> dict:
    return {
        "method": method,
        "size": size,
        "seed": seed,
        "lr": 1e-3,
        "main_metric": "accuracy",
        "test": {"accuracy": accuracy},
        "zero_shot": {"accuracy": 0.5},
        "trainable_params": params,
        "trainable_percent": 100 * params / 1000,
        "train_seconds": seconds,
        "tokens_per_s": 100.0,
        "peak_memory_mib": 1000.0 if method == "full" else 600.0,
        "adapter_bytes": params * 4,
        "full_model_bytes": 4000,
        "forgetting": {"change": 0.2 if method == "full" else 0.01},
        "overfitting_gap": gap,
        "best_step": 10,
        "steps": 20,
    }


def test_verdicts_are_computed_from_the_rows():
    rows = [
        row("full", 0.90, 100.0, 1000, gap=0.5),
        row("lora", 0.891, 35.0, 35, gap=0.1),
        row("prompt", 0.70, 120.0, 1),
        row("full", 0.60, 10.0, 1000, size=32),
        row("lora", 0.70, 5.0, 35, size=32),
    ]
    found = {v["promise"]: v["verdict"] for v in verdicts(summarise(rows))}
    assert (
        "lora reached 99 % of full fine-tuning's accuracy (0.891 vs 0.900) with 3.50 % of the parameters "
        "in 0.35 of the time" in found["quality"]
    )
    assert found["quality"].endswith("Within 1 point of full fine-tuning (or better): lora.")
    assert "lora 0.35x, prompt 1.20x. Holds for lora." in found["faster training"]
    assert "Holds for lora, prompt." in found["lower memory"]
    assert "lora 3.50 %" in found["compact checkpoints"]
    assert "Less than full fine-tuning's for lora, prompt" in found["less forgetting"]
    assert "Smaller gap than full fine-tuning's for lora, prompt" in found["less overfitting"]
    assert found["low-data regime"] == "with 32 training examples, better than full fine-tuning (0.600): lora."


def test_seeds_give_mean_and_spread():
    entries = summarise([row("lora", 0.8, 1, 35, seed=0), row("lora", 0.9, 1, 35, seed=1)])
    assert entries[0]["metric"] == pytest.approx(0.85) and entries[0]["spread"] == pytest.approx(0.0707, abs=1e-4)
    assert SubRun("lora", 0, 1).name == "lora-nall-s1" and SubRun("full", 32, 0, 1e-5).name == "full-n32-s0-lr1e-05"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Chromium is not installed (make test installs Debian's chromium)")
def test_the_html_report_opens_in_a_headless_browser_with_its_plots(compared, tmp_path):
    page = (compared / "report.html").resolve()
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    browser += ["--enable-logging=stderr", "--v=0", "--allow-file-access-from-files"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "CONSOLE" not in dom.stderr and "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    assert dom.stdout.count("<img") >= 4 and "Verdicts" in dom.stdout
    shot = tmp_path / "page.png"
    run = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:  # the plots drew: many colours, not a blank page with broken images
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50


@pytest.mark.slow
def test_a_small_real_compare_on_the_embedded_model(tmp_path):
    """LoRA and prompt tuning on the embedded SmolLM2 and Rotten Tomatoes, a few steps each."""
    output = tmp_path / "real"
    args = ["compare", "--methods", "lora,prompt", "--data-sizes", "32", "--max-steps", "3", "--batch-size", "4"]
    args += ["--max-eval", "16", "--max-test", "48", "--no-forgetting", "--output", str(output)]
    check_ok(invoke(*args))
    result = json.loads((output / "compare.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"lora", "prompt"} and result["zero_shot"]["examples"] == 48
    assert result["zero_shot"]["model"] == "smollm2-135m-instruct" and result["zero_shot"]["labels"] == ["0", "1"]
    for row in rows.values():
        assert row["test"]["examples"] == 48 and row["steps"] == 3 and row["tokens_per_s"] > 0
    assert rows["prompt"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert "lora" in (output / "report.md").read_text()
