"""Run every benchmark, one after another, and write their ratios as a markdown table.

    .venv/bin/python benchmarks/run_all.py                       # everything, full size
    .venv/bin/python benchmarks/run_all.py --quick               # smoke run of everything
    .venv/bin/python benchmarks/run_all.py --quick-for train_step,end_to_end --threads 1
    .venv/bin/python benchmarks/run_all.py --only lora_layer,mixed_batch --device cuda
    .venv/bin/python benchmarks/run_all.py --extra "mixed_batch=--repeats 3" --extra "inference=--batch 4"

Each script's output goes to ``<output>/<name>.log``; its ``RESULT`` records to
``<output>/results.jsonl``; the table to ``<output>/results.md`` (default output:
``benchmarks/results/<date>-<time>/``). Ratios are deltatune / HF PEFT unless the name says
otherwise: below 1, deltatune is faster or smaller.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "lora_layer",
    "train_step",
    "inference",
    "prompt_prefix",
    "mixed_batch",
    "quantized",
    "end_to_end",
    "serve",
    "stream_text",
]


def names(text: str | None) -> list[str]:
    if not text:
        return []
    out = [n.strip().removeprefix("bench_").removesuffix(".py") for n in text.split(",") if n.strip()]
    unknown = [n for n in out if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    return out


def run_one(name: str, passthrough: list[str], output: Path, timeout: float) -> tuple[int, float, list[dict]]:
    cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *passthrough]
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    started = time.perf_counter()
    log = output / f"{name}.log"
    with open(log, "w") as handle:
        try:
            proc = subprocess.run(
                cmd, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, cwd=common.ROOT, env=common.child_env()
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
    seconds = time.perf_counter() - started
    records = common.parse_results(log.read_text())
    status = "ok" if code == 0 and records else f"FAILED (exit {code}, see {log})"
    print(f"   {status}, {seconds:.0f} s", flush=True)
    return code, seconds, records


def table(records: list[dict[str, Any]], failures: dict[str, int], command: str) -> str:
    first = records[0] if records else {}
    machine = first.get("machine", common.machine())
    lines = [
        "# Benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine.get('nproc')} CPUs ({machine.get('cpu')}), {machine.get('gpu', 'no GPU')}, "
        f"1-minute load average at start {machine.get('load_avg_1m')}",
        f"- commit: {first.get('commit', common.commit())}",
        f"- versions: {json.dumps(first.get('versions', {}))}",
        f"- command: `{command}`",
        "",
        "Ratios are deltatune / HF PEFT unless named otherwise (< 1: deltatune faster or smaller).",
        "",
        "| benchmark | measure | ratio | device, dtype, threads | quick |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for record in records:
        setting = f"{record['device']}, {record['dtype']}, {record['threads']}"
        for key, value in record["ratios"].items():
            lines.append(f"| {record['bench']} | {key} | {value:.3f} | {setting} | {record['quick']} |")
    for name, code in failures.items():
        lines.append(f"| {name} | FAILED (exit {code}) | | | |")
    extras = [r for r in records if r["bench"] == "end_to_end"]
    for record in extras:
        lines += ["", f"end_to_end accuracy: {record['accuracy']} (before training {record['accuracy_before']})"]
    return "\n".join(lines) + "\n"


def write_tables(output: Path, records: list[dict[str, Any]], failures: dict[str, int], command: str) -> str:
    with open(output / "results.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record, default=str) + "\n")
    text = table(records, failures, command)
    (output / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--quick-for", default=None, help="comma-separated benchmarks to run with --quick")
    parser.add_argument("--only", default=None, help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--skip", default=None, help="comma-separated benchmarks to leave out")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every benchmark (0: default)")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='more options for one benchmark, e.g. --extra "prompt_prefix=--repeats 3" (repeatable)',
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument("--output", type=Path, default=None, help="folder for logs and tables")
    args = parser.parse_args()

    selected = names(args.only) or list(BENCHMARKS)
    selected = [n for n in selected if n not in names(args.skip)]
    quick_for = set(names(args.quick_for))
    extra: dict[str, list[str]] = {}
    for item in args.extra:
        name, _, options = item.partition("=")
        extra.setdefault(names(name)[0], []).extend(shlex.split(options))
    output = args.output or HERE / "results" / time.strftime("%Y%m%d-%H%M%S")
    output.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, "benchmarks/run_all.py", *sys.argv[1:]])

    records: list[dict[str, Any]] = []
    failures: dict[str, int] = {}
    text = write_tables(output, records, failures, command)
    for name in selected:
        passthrough = ["--device", args.device]
        if args.threads:
            passthrough += ["--threads", str(args.threads)]
        if args.quick or name in quick_for:
            passthrough.append("--quick")
        passthrough += extra.get(name, [])
        code, _, found = run_one(name, passthrough, output, args.timeout)
        records += found
        if code != 0 or not found:
            failures[name] = code
        text = write_tables(output, records, failures, command)  # after each: a run cut short keeps its tables
    print("\n" + text)
    print(f"written to {output}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
