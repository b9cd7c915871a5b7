"""The training loop: batches, schedule, evaluation, checkpoints, resume, several processes.

Batches are planned from the seed alone: epoch ``e`` shuffles the examples with seed ``seed + e``,
groups them by length in windows (less padding), and cuts global batches of
``batch_size * grad_accum * world_size`` examples. A global batch is split into accumulation
micro-steps and, within each, into one slice per process. Losses are sums normalised by the
units (label tokens or examples) of the whole global batch, so one process, several processes and
gradient accumulation all compute the same gradients for the same global batch.

A checkpoint (every ``save_every`` steps, on Ctrl-C and at the end) holds the trained tensors, the
optimizer state and the RNG state in safetensors plus a JSON file with the step: the data
position follows from the step, so ``resume`` continues exactly where the run stopped. How the
folders are written, put in place and found again is :mod:`deltatune.run_checkpoint`'s.

Mixed precision (``precision`` bf16 or fp16) runs the forward pass and the loss under
``torch.autocast``: matrix products in the low precision, weights, gradients and the optimizer
state in float32. fp16 adds dynamic loss scaling (``torch.amp.GradScaler``), since its gradients
underflow; bf16 has float32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune import run_checkpoint
from deltatune.model_info import find_blocks
from deltatune.optimizers import loraplus_param_groups
from deltatune.peft_model import PeftModel
from deltatune.tasks import Example, Task

logger = logging.getLogger("deltatune")

OPTIMIZERS = ("adamw", "sgd", "adafactor", "adamw8bit", "paged_adamw8bit")


@dataclasses.dataclass
class TrainArgs:
    """Hyperparameters and run options (the CLI's ``train`` flags)."""

    output: Path
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05  # a fraction of the steps when < 1, else a number of steps
    schedule: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.0
    clip: float | None = 1.0
    on_nan: str = "stop"  # a non-finite loss: stop (NonFiniteLossError) or skip the step's update
    seed: int = 0
    eval_every: float | None = None  # steps between validations; a fraction of the steps when < 1
    save_every: int | None = None
    eval_batch_size: int = 32
    log_every: int = 1
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    compile: bool = False
    resume: bool = False
    precision: str = "fp32"  # fp32 | bf16 | fp16: see autocast()
    optim: str = "adamw"  # adamw | sgd | adafactor
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's; SGD takes the first as its momentum
    min_lr: float = 0.0  # the floor the linear and cosine schedules decay to
    save_total_limit: int = 1  # checkpoints kept (the newest)
    metric_for_best: str | None = None  # None: the task's main metric
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: never)
    loraplus_ratio: float | None = None  # LoRA+: B's learning rate this many times A's (deltatune.optimizers)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be between 0 and lr={self.lr}, got {self.min_lr}")
        if self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be at least 1, got {self.save_total_limit}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan must be 'stop' or 'skip', got {self.on_nan!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")
        if self.eval_every is not None and self.eval_every >= 1 and self.eval_every != int(self.eval_every):
            raise ValueError(f"eval_every is a number of steps or a fraction below 1, got {self.eval_every}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ValueError(f"loraplus_ratio must be positive (LoRA+ recommends 16), got {self.loraplus_ratio}")


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """torchrun's environment; initialises the process group (gloo on CPU, NCCL on GPU).

        ``device`` is the ``--device`` choice: ``cpu`` takes gloo even where CUDA is available.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not dist.is_initialized():
            gpu = device != "cpu" and torch.cuda.is_available()
            dist.init_process_group(backend="nccl" if gpu else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def all_sum(self, value: Any) -> Any:
        if self.world == 1:
            return value
        if isinstance(value, dict):
            return {k: self.all_sum(v) for k, v in value.items()}
        device = self.device()
        tensor = (
            value.detach().to(device, torch.double, copy=True)
            if isinstance(value, torch.Tensor)
            else torch.tensor(float(value), dtype=torch.double, device=device)
        )
        dist.all_reduce(tensor)
        if isinstance(value, torch.Tensor):
            return tensor.to(value.device, value.dtype)
        return int(tensor.item()) if isinstance(value, int) else float(tensor.item())

    def device(self) -> torch.device:
        """Where collective tensors must live: NCCL reduces GPU tensors only, gloo CPU tensors."""
        if self.world > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def learning_rate(step: int, total: int, args: TrainArgs) -> float:
    """The rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    warmup = int(args.warmup * total) if args.warmup < 1 else int(args.warmup)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    progress = (step - warmup) / max(1, total - warmup)
    if args.schedule == "cosine":
        return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.min_lr + (args.lr - args.min_lr) * max(0.0, 1 - progress)


def planned_steps(examples: int, args: TrainArgs, world: int = 1) -> int:
    """Optimizer steps a run of ``examples`` takes: ``max_steps``, else the epochs (a short last batch dropped)."""
    per_epoch = examples // (args.batch_size * args.grad_accum * world)
    return args.max_steps or max(1, math.ceil(args.epochs * per_epoch))


def make_optimizer(params: list[nn.Parameter] | list[dict[str, Any]], args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), SGD with momentum ``betas[0]``, or Adafactor (factored second moments),
    over ``params`` (tensors, or parameter groups such as LoRA+'s)."""
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.betas[0], weight_decay=args.weight_decay)
    if args.optim == "adafactor":
        return torch.optim.Adafactor(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.optim in ("adamw8bit", "paged_adamw8bit"):
        return _bitsandbytes_adamw(params, args)
    return torch.optim.AdamW(params, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)


def _bitsandbytes_adamw(params: list[Any], args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW with 8-bit blockwise-quantized moments (Dettmers et al. 2022): a quarter of AdamW's state
    memory; the paged variant keeps that state in CUDA unified memory, paged to the CPU under pressure."""
    from deltatune.quantization import require_bitsandbytes

    require_bitsandbytes()
    import bitsandbytes as bnb

    paged = args.optim == "paged_adamw8bit"
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if paged and not all(p.is_cuda for p in tensors):
        raise ValueError(
            "--optim paged_adamw8bit pages optimizer state between GPU and CPU memory and needs CUDA; "
            "on the CPU use adamw8bit or adamw"
        )
    optimizer = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return optimizer(params, lr=args.lr, betas=args.betas, weight_decay=args.weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's state tensors hold (moments, and their quantization scales for 8-bit)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def plan_epoch(lengths: Sequence[int], global_batch: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The global batches of one epoch, as example indices; deterministic in (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    order = order[: len(order) - len(order) % global_batch]  # only full global batches
    if not group:
        return [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    window = global_batch * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


class Trainer:
    """Trains ``model`` (a PeftModel, or a plain model for full fine-tuning) on ``task``."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: list[Example],
        args: TrainArgs,
        evaluation: list[Example] | None = None,
        distributed: Distributed | None = None,
        progress: Callable[..., Any] | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        export: Callable[[nn.Module, Path, bool], None] | None = None,
    ) -> None:
        self.model, self.task, self.train_examples, self.args = model, task, train, args
        self.export = export or run_checkpoint.save_trained  # how best/ is written
        self.metric = args.metric_for_best or task.main_metric
        self.higher_is_better = task.higher_is_better if self.metric == task.main_metric else _higher(self.metric)
        self.evaluations_without_gain = 0
        self.stopped_early = False
        self.eval_examples = evaluation
        self.dist = distributed or Distributed()
        self.progress = progress
        self.global_batch = args.batch_size * args.grad_accum * self.dist.world
        if len(train) < self.global_batch:
            raise ValueError(
                f"{len(train)} training examples are fewer than one global batch of {self.global_batch} "
                "(batch size x accumulation x processes)"
            )
        self.steps_per_epoch = len(train) // self.global_batch  # a short last batch is dropped
        self.total_steps = planned_steps(len(train), args, self.dist.world)
        every = args.eval_every or 0
        self.eval_every = max(1, round(every * self.total_steps)) if 0 < every < 1 else int(every)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if args.compile:
            compile_blocks(model)
        self.device = next(model.parameters()).device
        self.engine = wrap(model) if wrap is not None else model  # FSDP replaces the parameters: wrap first
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        groups: list[Any] = self.params
        if args.loraplus_ratio:
            groups = loraplus_param_groups(model, args.lr, args.loraplus_ratio, loraplus_weight_decay=args.weight_decay)
        self.optimizer = make_optimizer(groups, args)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.precision == "fp16")
        self.step = 0
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.skipped_steps: list[int] = []  # steps whose non-finite loss was skipped (on_nan="skip")
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._plans: dict[int, list[list[int]]] = {}

    # -- data -------------------------------------------------------------------------------------
    def _global_batch(self, step: int) -> list[Example]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._plans:
            lengths = [len(e.input_ids) for e in self.train_examples]
            self._plans = {
                epoch: plan_epoch(lengths, self.global_batch, self.args.seed, epoch, self.args.group_by_length)
            }
        return [self.train_examples[i] for i in self._plans[epoch][index]]

    def _micro_batches(self, examples: list[Example]) -> list[list[Example]]:
        """This process's slice of each accumulation micro-step."""
        per_micro = self.args.batch_size * self.dist.world
        micro = [examples[i : i + per_micro] for i in range(0, len(examples), per_micro)]
        size = self.args.batch_size
        return [m[self.dist.rank * size : (self.dist.rank + 1) * size] for m in micro]

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> float:
        examples = self._global_batch(self.step)
        units = sum(e.units for e in examples)
        lr = learning_rate(self.step, self.total_steps, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+'s groups keep their ratio to the schedule
        self.engine.train()
        loss_total = 0.0
        micro_batches = self._micro_batches(examples)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            batch = to_device(self.task.collate(micro), self.device)
            self.train_tokens += batch["tokens"]
            with autocast(self.device, self.args.precision):
                loss = self.task.loss_sum(self.engine, batch) / units
                regulariser = self.model.adapter_loss() if isinstance(self.model, PeftModel) else None
                if regulariser is not None:  # once per step over micro-batches and processes (AdaLoRA's)
                    loss = loss + regulariser / (len(micro_batches) * self.dist.world)
            sync = self.engine.no_sync() if hasattr(self.engine, "no_sync") and not last else contextlib.nullcontext()
            with sync:
                # DDP averages over processes; the loss is a global sum. The scaler is a no-op but for fp16.
                self.scaler.scale(loss * self.dist.world).backward()
            loss_total += float(loss.detach())
        if self.dist.all_sum(0.0 if math.isfinite(loss_total) else 1.0):  # every process decides alike
            self._non_finite(examples, loss_total)
            return math.nan
        self.scaler.unscale_(self.optimizer)  # true gradients for clipping and AdaLoRA's importances (fp16)
        if self.args.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.clip)
        self.scaler.step(self.optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        self.scaler.update()
        if isinstance(self.model, PeftModel):
            self.model.update_and_allocate(self.step + 1)  # needs this step's gradients (AdaLoRA's ranks)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self.dist.all_sum(loss_total)

    def _non_finite(self, examples: list[Example], loss: float) -> None:
        """A step whose loss is NaN or infinite: stop before its update reaches the weights, or (with
        ``on_nan="skip"``) drop the update, count the step, and go on."""
        records = ", ".join(str(e.record) for e in examples if e.record is not None) or "unknown"
        what = f"step {self.step + 1}: the loss is {loss} on the batch of training records {records}"
        self.optimizer.zero_grad(set_to_none=True)
        if self.args.on_nan == "stop":
            kept = run_checkpoint.latest_name(self.args.output)
            raise NonFiniteLossError(
                f"{what}; the run stopped before this update"
                + (f" and its last checkpoint, {kept}, is kept" if kept else "")
                + ". Lower --lr, keep --clip on, train in fp32, or check those records; --on-nan skip "
                "drops such steps instead"
            )
        logger.warning("%s; its update is skipped (--on-nan skip)", what)
        self.skipped_steps.append(self.step + 1)
        self.step += 1

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: list[Example], model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(
            model or self.model, self.task, examples, self.args.eval_batch_size, self.dist, self.args.precision
        )

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        if self.args.resume:
            self.load_checkpoint()
        started = time.perf_counter()
        try:
            while self.step < self.total_steps:
                with interrupts_between_steps():  # a checkpoint saved on Ctrl-C matches the log
                    t0 = time.perf_counter()
                    loss = self.train_step()
                    self.train_seconds += time.perf_counter() - t0
                    record = {
                        "step": self.step,
                        "loss": loss if math.isfinite(loss) else None,  # strict JSON has no NaN
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "tokens_per_s": self.train_tokens * self.dist.world / max(self.train_seconds, 1e-9),
                        "elapsed_s": time.perf_counter() - started,
                    }
                    self._log(record)
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self._evaluate_and_keep_best()
                    if self._patience_ran_out():
                        break
                if self.args.save_every and self.step % self.args.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        if self.eval_examples and not self.stopped_early:
            self._evaluate_and_keep_best()
        self.save_checkpoint()
        return {
            "steps": self.step,
            "train_seconds": self.train_seconds,
            "train_tokens": self.train_tokens,
            "stopped_early": self.stopped_early,
            "skipped_steps": list(self.skipped_steps),
        }

    def _patience_ran_out(self) -> bool:
        patience = self.args.early_stopping_patience
        if patience and self.evaluations_without_gain >= patience:
            self.stopped_early = True
        return self.stopped_early

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dist.main:
            with open(self.args.output / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress(record, self.total_steps)

    def _evaluate_and_keep_best(self) -> dict[str, float]:
        metrics = self.evaluate(self.eval_examples)
        record = {"step": self.step, "split": "validation", **metrics}
        self._log(record)
        if self.metric not in metrics:
            raise ValueError(
                f"metric_for_best {self.metric!r} is not one of this task's metrics: {', '.join(sorted(metrics))}"
            )
        value = metrics[self.metric]
        better = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        if better:
            self.best = value
            self.evaluations_without_gain = 0
            self.export(self.model, self.args.output / "best", self.dist.main)
        else:
            self.evaluations_without_gain += 1
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Every process takes part (sharded tensors are gathered); the main process writes."""
        output = self.args.output
        name = f"checkpoint-{self.step}"
        tmp = output / f".{name}.tmp"
        if self.dist.main:
            for stale in output.glob(".checkpoint-*.tmp"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        try:
            self._write_checkpoint(tmp)
        except (OSError, SafetensorError) as err:  # a full disk, a failing one: say so, leave nothing half-written
            shutil.rmtree(tmp, ignore_errors=True)
            kept = run_checkpoint.latest_name(output)
            raise run_checkpoint.CheckpointSaveError(
                f"could not save {name} in {output}: {getattr(err, 'strerror', None) or err}; "
                + (f"the last complete checkpoint, {kept}, is intact: " if kept else "")
                + "make room and continue with --resume"
            ) from err
        if not self.dist.main:
            self.dist.barrier()
            return None
        final = run_checkpoint.commit(output, tmp, name, self.args.save_total_limit)
        self.dist.barrier()
        return final

    def _write_checkpoint(self, tmp: Path) -> None:
        """The checkpoint's files into ``tmp``: trained tensors, optimizer and RNG state, then the
        trainer state (every process gathers; the main process writes)."""
        run_checkpoint.save_trained(self.model, tmp / "trained", main=self.dist.main)
        tensors, meta = run_checkpoint.optimizer_to_flat(self.optimizer.state_dict())
        if not self.dist.main:
            return
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":  # dropout on a GPU draws from the device's generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {
            "step": self.step,
            "best": self.best,
            "train_tokens": self.train_tokens,
            "train_seconds": self.train_seconds,
            "optimizer": meta,
            "python_random": repr(random.getstate()),
            "global_batch": self.global_batch,
            "grad_scaler": self.scaler.state_dict(),  # empty unless fp16
            "evaluations_without_gain": self.evaluations_without_gain,
            "skipped_steps": self.skipped_steps,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

    def load_checkpoint(self) -> bool:
        folder = run_checkpoint.complete_checkpoint(self.args.output)
        if self.dist.main:
            run_checkpoint.remove_temporaries(self.args.output)
        if folder is None:
            return False
        state = json.loads((folder / "trainer_state.json").read_text())
        if state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{folder} was trained with a global batch of {state['global_batch']}, this run has "
                f"{self.global_batch}; resume with the same batch size, accumulation and process count"
            )
        if any(hasattr(p, "full_tensor") for p in self.params):
            raise ValueError("resuming an FSDP run is not supported yet; resume it without --fsdp")
        run_checkpoint.load_trained(self.model, folder / "trained")
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.torch"))
        cuda_rng = tensors.pop("rng.cuda", None)
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng, self.device)
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.optimizer.load_state_dict(run_checkpoint.optimizer_from_flat(tensors, state["optimizer"]))
        self.step, self.best = state["step"], state["best"]
        if self.dist.main:
            run_checkpoint.forget_steps_after(self.args.output / "metrics.jsonl", self.step)
        self.evaluations_without_gain = state.get("evaluations_without_gain", 0)
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.train_tokens, self.train_seconds = state["train_tokens"], state["train_seconds"]
        return True


class NonFiniteLossError(ValueError):
    """A training step's loss was NaN or infinite; the message names the step and its records."""


def evaluate(
    model: nn.Module,
    task: Task,
    examples: list[Example],
    batch_size: int,
    distributed: Distributed,
    precision: str = "fp32",
) -> dict:
    """Metrics of ``task`` over ``examples``, split across processes; batches grouped by length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    mine = order[distributed.rank :: distributed.world]
    totals: dict[str, Any] = {}
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            batch = to_device(task.collate([examples[i] for i in mine[start : start + batch_size]]), device)
            with autocast(device, precision):
                sums = task.eval_sums(model, batch)
            for key, value in sums.items():
                totals[key] = totals[key] + value if key in totals else value
    model.train(was_training)
    return task.metrics(distributed.all_sum(totals))


@contextlib.contextmanager
def interrupts_between_steps() -> Any:
    """Ctrl-C (SIGINT) inside the block takes effect when it ends; a second one at once.

    A training step is one unit: interrupted between the optimizer's update and the step counter
    or the log line, the checkpoint saved on the interrupt would hold weights the log and the
    counter do not account for, and ``--resume`` would not give the uninterrupted run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, frame: Any) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on the model's device (counts and other values stay as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _higher(metric: str) -> bool:
    """Whether a larger value of a metric is better (losses and perplexities are not)."""
    return metric not in ("loss", "perplexity")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(inner, "gradient_checkpointing_enable"):
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"{type(inner).__name__} does not support gradient checkpointing")
    if hasattr(inner, "enable_input_require_grads"):
        inner.enable_input_require_grads()  # frozen embeddings: keep a graph through the checkpoints
    if getattr(inner, "config", None) is not None:
        inner.config.use_cache = False


def compile_blocks(model: nn.Module) -> list[str]:
    """``torch.compile`` each transformer block in place; returns their paths.

    Per block rather than the whole model, as the blocks are identical: one compilation serves them
    all, and the adapter and task code around them stays eager (it changes with the active adapters).
    In place (``nn.Module.compile``), so parameter names, checkpoints and adapter switching are
    unchanged. The KV cache is turned off in training, as with gradient checkpointing: a cache makes
    every block's layer index part of the compiled code.
    """
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    blocks = find_blocks(inner)
    if not blocks:
        raise ValueError(f"found no transformer blocks to compile in {type(inner).__name__}; train without --compile")
    modules = dict(inner.named_modules())
    for path in blocks:
        modules[path].compile()
    if getattr(inner, "config", None) is not None:
        inner.config.use_cache = False
    return blocks


def peak_memory_mib() -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: ``torch.autocast`` to bf16/fp16 on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


def resolve_precision(choice: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it, else fp32 (CPUs without bf16 instructions only emulate it)."""
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if choice == "auto":
        return "bf16" if bf16_gpu else "fp32"
    if choice == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise ValueError("--precision bf16: this GPU has no bf16 support; use --precision fp16 or fp32")
    if choice not in PRECISIONS:
        raise ValueError(f"--precision must be auto or one of {', '.join(PRECISIONS)}, got {choice!r}")
    return choice
