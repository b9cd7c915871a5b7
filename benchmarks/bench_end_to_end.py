"""End to end: fine-tune SmolLM2-135M on Rotten Tomatoes, ``deltatune train`` vs ``transformers.Trainer`` + HF PEFT.

Both sides train LoRA r=16, alpha=32 on all linear layers, AdamW at lr 5e-4 with linear decay after
a 5 % warmup, gradient clipping at 1.0, batch 8, seed 0, on the same training examples (the first
``--examples`` of the built-in train split, one epoch: 480 examples = 60 steps by default) and the
same prompts: ``deltatune.run.build_task("label-generation", ...)`` builds them, the chat-formatted
instruction ending where the answer starts. The Trainer side uses the standard PEFT recipe: the
sequence is prompt + answer token, right-padded, labels -100 everywhere but the answer token, and
the model's own causal-LM loss (which computes the LM head at every position). ``deltatune train``
runs the LM head at the answer position only and the shared prompt prefix once per batch, so part
of its speed comes from the task formulation, not from the LoRA layers (see bench_train_step.py for
the layers alone). Both sides group training examples by length (the Trainer via
``train_sampling_strategy="group_by_length"``).

Each side runs in its own process (the same thread count through ``OMP_NUM_THREADS``): wall time
and peak resident set of that process (``wait4``), and the training loop's own time (deltatune's
``summary.json`` ``train_seconds``; the Trainer's ``train_runtime``). ``deltatune train`` runs
with ``--no-test`` (no test evaluation inside the run); it still scores ``--max-eval`` validation
examples at the end (8) and writes checkpoints, which the Trainer side does not. Both adapters are
then scored by the same code: deltatune's ``evaluate`` on the first ``--max-test`` test examples,
the PEFT adapter loaded with ``deltatune.PeftModel.from_pretrained``, and the base model likewise
for reference. The time comparison holds only at equal accuracy. Both sides use ``--device``.

    .venv/bin/python benchmarks/bench_end_to_end.py [--quick] [--examples 480] [--max-test 200]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import common

BATCH, R, ALPHA, LR, WARMUP = 8, 16, 32, 5e-4, 0.05
OPTIONS = {
    "max_length": 256,
    "on_long": "truncate",
    "text_column": "text",
    "label_column": "label",
    "data": "rotten-tomatoes",
}


# -- the Trainer + PEFT side (runs in a child process) ---------------------------------------------
def train_with_peft(args: Any, env: common.Env) -> None:
    import peft
    import torch
    from transformers import Trainer, TrainingArguments

    from deltatune.data import load_dataset
    from deltatune.run import build_task

    output = Path(args.output)
    torch.manual_seed(args.seed)
    model, tokenizer = common.load_smollm(env)
    records = load_dataset("rotten-tomatoes", "train")[: args.examples]
    task = build_task("label-generation", tokenizer, records, OPTIONS)
    examples = task.encode(records, source="rotten-tomatoes (train)")
    rows = []
    for example in examples:
        answer = task.answer_ids[example.target]
        rows.append({"input_ids": example.input_ids + [answer], "labels": [-100] * len(example.input_ids) + [answer]})
    pad = task.pad_id

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        fill = [width - len(r["input_ids"]) for r in batch]
        return {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * n for r, n in zip(batch, fill)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * n for r, n in zip(batch, fill)]),
            "labels": torch.tensor([r["labels"] + [-100] * n for r, n in zip(batch, fill)]),
        }

    steps = len(rows) // BATCH
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    training_args = TrainingArguments(
        output_dir=str(output / "trainer"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=int(WARMUP * steps),  # deltatune's rounding of the 5 %
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=args.seed,
        train_sampling_strategy="group_by_length",
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        use_cpu=not env.cuda,
        bf16=env.cuda,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate)
    common.reset_cuda_peak(env)
    result = trainer.train()
    model.save_pretrained(str(output / "adapter"))
    summary = {
        "steps": result.global_step,
        "train_seconds": result.metrics["train_runtime"],
        "train_loss": result.training_loss,
        "train_examples": len(rows),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if env.cuda:
        summary["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    (output / "summary.json").write_text(json.dumps(summary, indent=2))


# -- the parent: run both, score both ---------------------------------------------------------------
def deltatune_command(args: Any, steps: int, output: Path) -> list[str]:
    exe = Path(sys.executable).parent / "deltatune"
    exe_text = str(exe) if exe.exists() else (shutil.which("deltatune") or "deltatune")
    return [
        exe_text,
        "train",
        "--max-steps",
        str(steps),
        "--batch-size",
        str(BATCH),
        "--lr",
        str(LR),
        "--r",
        str(R),
        "--alpha",
        str(ALPHA),
        "--targets",
        "all-linear",
        "--no-forgetting",
        "--no-test",
        "--device",
        "cuda" if args.device == "cuda" else "cpu",
        "--max-eval",
        str(args.max_eval),
        "--max-train",
        str(args.examples),
        "--seed",
        str(args.seed),
        "--output",
        str(output),
    ]


def peft_command(args: Any, output: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peft-child", "--output", str(output)]
    cmd += ["--examples", str(args.examples), "--seed", str(args.seed), "--device", args.device, "--dtype", args.dtype]
    return cmd


def run_side(name: str, cmd: list[str], threads: int, timeout: float) -> common.ChildRun:
    print(f"\n[{name}] {' '.join(cmd)}", flush=True)
    parent_peak = common.peak_rss_mib()
    run = common.run_measured(cmd, env=common.child_env(threads), timeout=timeout)
    if run.returncode != 0:
        print(run.output[-4000:])
        raise SystemExit(f"{name} failed with exit code {run.returncode}")
    if run.peak_rss_mib <= parent_peak * 1.02:
        print(f"  warning: the child's peak RSS may be this process's ({parent_peak:.0f} MiB), inherited at exec")
    print(f"  wall {run.wall_s:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB", flush=True)
    return run


def score(adapters: dict[str, Path | None], examples: int, max_test: int) -> dict[str, dict[str, float]]:
    """Accuracy of each adapter (None: the base model) on the test examples, by deltatune's evaluate."""
    from deltatune import PeftModel
    from deltatune.data import load_dataset
    from deltatune.models import load_model
    from deltatune.run import build_task
    from deltatune.train import Distributed, evaluate

    common.quiet_transformers()
    out = {}
    for name, directory in adapters.items():
        model, tokenizer = load_model(common.MODEL, task="causal-lm")
        train_records = load_dataset("rotten-tomatoes", "train")[:examples]
        task = build_task("label-generation", tokenizer, train_records, OPTIONS)
        test = task.encode(load_dataset("rotten-tomatoes", "test")[:max_test], source="rotten-tomatoes (test)")
        adapted = PeftModel.from_pretrained(model, str(directory)) if directory is not None else model
        out[name] = evaluate(adapted, task, test, 32, Distributed())
        print(f"  {name}: accuracy {out[name]['accuracy']:.4f} on {len(test)} test examples", flush=True)
    return out


def warm_file_cache() -> None:
    """Read the cached model files once, so the first side does not pay for a cold disk."""
    from deltatune.models import resolve_model_path

    path = Path(resolve_model_path(common.MODEL))
    for file in path.rglob("*") if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def main() -> None:
    parser = common.parser(__doc__, repeats=1, warmup=0)
    parser.add_argument("--examples", type=int, default=480, help="training examples (steps = examples / 8)")
    parser.add_argument("--max-test", type=int, default=200, help="test examples scored")
    parser.add_argument(
        "--max-eval",
        type=int,
        default=8,
        help="validation examples deltatune train scores at the end (it always does; the Trainer side does not)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    parser.add_argument("--peft-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and "--examples" not in sys.argv:
        args.examples = 16
    if args.quick and "--max-test" not in sys.argv:
        args.max_test = 16
    env = common.setup(args)
    if args.peft_child:
        train_with_peft(args, env)
        return
    if args.examples % BATCH or args.examples < BATCH:
        raise SystemExit(f"--examples must be a positive multiple of {BATCH}")
    steps = args.examples // BATCH
    notes = [
        "the time comparison holds only at equal test accuracy",
        "deltatune computes the LM head at the answer position only and the shared prompt prefix once per "
        "batch; the Trainer side uses the standard recipe (full causal-LM loss call, labels -100 but the answer)",
        f"deltatune's wall time includes scoring {args.max_eval} validation examples and writing checkpoints; "
        "the Trainer's includes neither",
    ]
    print(f"fine-tuning on {args.examples} examples ({steps} steps of {BATCH}), {env.threads} threads per side")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="deltatune-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    warm_file_cache()
    runs: dict[str, list[common.ChildRun]] = {"deltatune": [], "peft": []}
    summaries: dict[str, list[dict[str, Any]]] = {"deltatune": [], "peft": []}
    for round_ in range(max(args.repeats, 1)):  # A B A B ...
        ours_dir, peft_dir = work / f"deltatune-{round_}", work / f"peft-{round_}"
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(peft_dir, ignore_errors=True)
        runs["deltatune"].append(
            run_side("deltatune", deltatune_command(args, steps, ours_dir), env.threads, args.timeout)
        )
        summaries["deltatune"].append(json.loads((ours_dir / "summary.json").read_text()))
        runs["peft"].append(run_side("peft", peft_command(args, peft_dir), env.threads, args.timeout))
        summaries["peft"].append(json.loads((peft_dir / "summary.json").read_text()))

    print("\nscoring both adapters with deltatune's evaluate:")
    accuracy = score(
        {"base": None, "deltatune": ours_dir / "adapter", "peft": peft_dir / "adapter"}, args.examples, args.max_test
    )
    ours_summary, peft_summary = summaries["deltatune"][-1], summaries["peft"][-1]

    def med(side: str, field: str) -> float:
        if field in ("wall_s", "peak_rss_mib"):
            return common.median([getattr(r, field) for r in runs[side]])
        return common.median([s[field] for s in summaries[side]])

    ratios = {
        "wall_time/deltatune_over_peft": med("deltatune", "wall_s") / med("peft", "wall_s"),
        "train_loop_time/deltatune_over_peft": med("deltatune", "train_seconds") / med("peft", "train_seconds"),
        "peak_rss/deltatune_over_peft": med("deltatune", "peak_rss_mib") / med("peft", "peak_rss_mib"),
    }
    if env.cuda and "cuda_peak_mib" in peft_summary:
        ratios["cuda_peak/deltatune_over_peft"] = ours_summary["peak_memory_mib"] / peft_summary["cuda_peak_mib"]
    acc = {k: v["accuracy"] for k, v in accuracy.items()}
    before = accuracy.pop("base")["accuracy"]
    print(f"\n{'':<12}{'wall s':>10}{'train s':>10}{'peak RSS MiB':>14}{'test acc':>10}")
    for side in ("deltatune", "peft"):
        print(
            f"{side:<12}{med(side, 'wall_s'):>10.1f}{med(side, 'train_seconds'):>10.1f}"
            f"{med(side, 'peak_rss_mib'):>14.0f}{acc[side]:>10.4f}"
        )
    if before is not None:
        print(f"base model test accuracy (before training): {before:.4f}")
    gap = abs(acc["deltatune"] - acc["peft"])
    scored = accuracy["peft"].get("examples", args.max_test)
    mean = (acc["deltatune"] + acc["peft"]) / 2
    tolerance = max(0.02, 2 * math.sqrt(2 * mean * (1 - mean) / max(scored, 1)))  # 2 standard errors of the gap
    comparable = gap <= tolerance
    verdict = "comparable" if comparable else "NOT comparable"
    print(
        f"accuracy: deltatune {acc['deltatune']:.4f} vs PEFT {acc['peft']:.4f} on {scored} examples "
        f"(gap {gap:.4f}, tolerance {tolerance:.4f}) -> time comparison {verdict}"
    )
    if tolerance > 0.05:
        notes.append(f"only {scored} test examples: accuracies this close or far apart say little (use --max-test)")
    for note in notes:
        print(f"note: {note}")
    common.emit(
        "end_to_end",
        env,
        args,
        ratios,
        examples=args.examples,
        steps=steps,
        max_test=args.max_test,
        accuracy=acc,
        accuracy_before=before,
        comparable=comparable,
        accuracy_tolerance=tolerance,
        wall_s={side: [r.wall_s for r in runs[side]] for side in runs},
        train_s={side: [s["train_seconds"] for s in summaries[side]] for side in summaries},
        peak_rss_mib={side: [r.peak_rss_mib for r in runs[side]] for side in runs},
        train_loss_peft=peft_summary.get("train_loss"),
        notes=notes,
        workdir=str(work),
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
