"""What the CLI commands do: build model, task and data from options, train, measure, report.

``run_training`` is the main job. Besides the adapter it writes ``metrics.jsonl`` (one line per
step and per evaluation), ``curves.png`` and ``summary.json``: the run's evidence for PEFT's
promises -- trainable share, wall time and tokens/s, peak memory, adapter size next to the full
model's, the test metric before and after, and forgetting (the loss on held-out general text
before and after: an adapter should barely move it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import data as datasets
from deltatune.config import PeftConfig
from deltatune.models import EMBEDDED_MODELS, load_model
from deltatune.peft_model import PeftModel, get_peft_model
from deltatune.tasks import CausalLM, LabelGeneration, LabelSpace, Seq2Seq, SequenceClassification, Task
from deltatune.train import Distributed, TrainArgs, Trainer, evaluate, peak_memory_mib, resolve_precision

logger = logging.getLogger("deltatune")

# The instruction of deltatune.data's sentiment template; the model's own default system turn is kept
# (SmolLM2 answers better with it, and it costs nothing: the prefix all prompts share runs once per batch).
SENTIMENT_INSTRUCTION = (
    "Is the sentiment of this movie review positive or negative? Answer with one word.\n\nReview: {text}"
)
SENTIMENT_SYSTEM = None


# -- model and task ------------------------------------------------------------------------------
def model_family(name_or_path: str) -> str:
    """``causal``, ``encoder`` or ``seq2seq``, from the embedded registry or the model config."""
    if name_or_path in EMBEDDED_MODELS:
        return "causal" if EMBEDDED_MODELS[name_or_path].kind == "causal-lm" else "encoder"
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    return "causal" if ("CausalLM" in architectures or "LMHead" in architectures) else "encoder"


def choose_task(requested: str, family: str, records: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """The task for ``--task auto``: from the model family and the data's columns."""
    if requested != "auto":
        return requested
    columns = set(records[0]) if records else set()
    if options["label_column"] in columns:
        return "label-generation" if family == "causal" else "seq-cls"
    if options["response_column"] in columns:
        return "seq2seq" if family == "seq2seq" else "causal-lm"
    raise datasets.DataError(
        f"{options['data']}: columns {sorted(columns)} hold neither a label column "
        f"({options['label_column']!r}, for classification) nor a response column ({options['response_column']!r}, "
        "for chat tuning); name them with --label-column / --text-column or --response-column / --prompt-column"
    )


def required_columns(kind: str, options: dict[str, Any], sample: dict[str, Any]) -> list[str]:
    if kind in ("label-generation", "seq-cls"):
        return [options["text_column"], options["label_column"]]
    if kind == "seq2seq":
        return [options["prompt_column"], options["response_column"]]
    prompt = [options["prompt_column"]] if options["prompt_column"] in sample else []
    return prompt + [options["response_column"]]


def build_task(kind: str, tokenizer: Any, train_records: list[dict[str, Any]], options: dict[str, Any]) -> Task:
    common = {"max_length": options["max_length"], "on_long": options["on_long"]}
    if kind in ("label-generation", "seq-cls"):
        labels = LabelSpace.from_records(train_records, options["label_column"])
        columns = {"text_column": options["text_column"], "label_column": options["label_column"]}
        if kind == "seq-cls":
            return SequenceClassification(tokenizer, labels, **common, **columns)
        if options["data"] == "rotten-tomatoes":
            return LabelGeneration(
                tokenizer,
                labels,
                **common,
                **columns,
                words=["negative", "positive"],
                instruction=SENTIMENT_INSTRUCTION,
                system=SENTIMENT_SYSTEM,
            )
        return LabelGeneration(tokenizer, labels, **common, **columns)
    columns = {"prompt_column": options["prompt_column"], "response_column": options["response_column"]}
    if kind == "seq2seq":
        return Seq2Seq(tokenizer, **common, **columns)
    return CausalLM(tokenizer, **common, **columns)


def load_for_task(name: str, task_kind: str, num_labels: int) -> tuple[nn.Module, Any]:
    family_task = {
        "label-generation": "causal-lm",
        "causal-lm": "causal-lm",
        "seq-cls": "seq-cls",
        "seq2seq": "seq2seq",
    }
    return load_model(name, task=family_task[task_kind], num_labels=num_labels)


def method_config(options: dict[str, Any], task_kind: str) -> PeftConfig | None:
    """The adapter config for ``--method`` (None for full fine-tuning)."""
    from deltatune import BottleneckConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
    from deltatune.methods.ia3 import IA3Config

    task_type = {"seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}.get(task_kind, "CAUSAL_LM")
    method = options["method"]
    targets = options["targets"]
    target_modules: Any = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    tokens = options["virtual_tokens"]
    if method in ("lora", "dora"):
        return LoraConfig(
            r=options["r"],
            lora_alpha=options["alpha"],
            lora_dropout=options["dropout"],
            target_modules=target_modules,
            use_dora=method == "dora",
            task_type=task_type,
        )
    if method == "ia3":
        return IA3Config(target_modules=None if targets == "all-linear" else target_modules, task_type=task_type)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init="SAMPLE_VOCAB", task_type=task_type)
    if method == "ptuning":
        return PromptEncoderConfig(num_virtual_tokens=tokens, encoder_hidden_size=128, task_type=task_type)
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=tokens, task_type=task_type)
    if method == "adapter":
        return BottleneckConfig(
            reduction_factor=options["reduction_factor"], placement=options["placement"], task_type=task_type
        )
    return None


def load_split(
    options: dict[str, Any], split: str, file_option: str | None, columns: list[str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """A split's records and a name for messages: a built-in set's split, or a user file."""
    source = options["data"]
    if source in datasets.BUILTIN_DATASETS:
        info = datasets.BUILTIN_DATASETS[source]
        if split not in info.splits:
            split = "test" if "test" in info.splits else info.splits[-1]
        return datasets.load_dataset(source, split), f"{source} ({split})"
    path = options.get(file_option) if file_option else source
    if not path:
        return [], ""
    return datasets.load_records(path, columns=columns, on_bad_row=options["on_bad_row"]), str(path)


def _limit(records: list[Any], count: int) -> list[Any]:
    return records[:count] if count else records


# -- training ------------------------------------------------------------------------------------
def run_training(options: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    dist_env = Distributed.from_env(options.get("device", "auto"))
    torch.manual_seed(options["seed"])
    output = Path(options["output"])
    output.mkdir(parents=True, exist_ok=True)
    say = _printer(dist_env)

    raw, _ = load_split(options, "train", None)
    family = model_family(options["model"])
    task_kind = choose_task(options["task"], family, raw, options)
    columns = required_columns(task_kind, options, raw[0])
    train_records, train_name = load_split(options, "train", None, columns)
    train_records = _limit(train_records, options["max_train"])
    say(f"loading {options['model']} for {task_kind} ...")
    labels = len({str(r.get(options["label_column"])) for r in train_records}) if task_kind == "seq-cls" else 2
    model, tokenizer = load_for_task(options["model"], task_kind, labels)
    device = _device(options.get("device", "auto"), dist_env)
    precision = resolve_precision(options.get("precision", "auto"), device)
    if precision == "fp16" and options["fsdp"] and dist_env.world > 1:
        raise ValueError("--precision fp16 (loss scaling) is not supported with --fsdp; use bf16 or fp32")
    model.to(device)
    if task_kind == "causal-lm" and options["prompt_column"] not in columns:
        options = {**options, "prompt_column": None}
    task = build_task(task_kind, tokenizer, train_records, options)
    train_examples = task.encode(train_records, source=train_name)
    eval_records, eval_name = load_split(options, "validation", "eval_data", columns)
    test_records, test_name = load_split(options, "test", "test_data", columns)
    eval_records = _limit(eval_records, options["max_eval"])
    test_records = _limit(test_records, options["max_test"])
    eval_examples = task.encode(eval_records, source=eval_name) if eval_records else None
    if not options.get("test_eval", True):
        test_records = []
    test_examples = task.encode(test_records, source=test_name) if test_records else None
    source = options["data"]
    if not options["resume"] and dist_env.main:
        for stale in ("metrics.jsonl",):
            (output / stale).unlink(missing_ok=True)

    config = method_config(options, task_kind)
    if config is None:
        for param in model.parameters():
            param.requires_grad_(True)
        trained: nn.Module = model
    else:
        trained = get_peft_model(model, config)
    trainable, total = _count(trained)
    say(
        f"{options['method']}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"{device.type}, {precision}"
    )

    batch = options["eval_batch_size"]
    before = (
        evaluate(trained if config is None else _base_view(trained), task, test_examples, batch, dist_env, precision)
        if (test_examples and not options["resume"])
        else None
    )
    if before:
        say(f"before training, test: {_short(before)}")
    general = _general_examples(tokenizer, family) if options["forgetting"] else None
    forgetting_before = _general_loss(trained, general, dist_env, precision, base=True) if general else None

    args = TrainArgs(
        output=output,
        lr=options["lr"],
        epochs=options["epochs"],
        max_steps=options["max_steps"] or None,
        batch_size=options["batch_size"],
        grad_accum=options["grad_accum"],
        warmup=options["warmup"],
        schedule=options["schedule"],
        weight_decay=options["weight_decay"],
        clip=options["clip"] or None,
        seed=options["seed"],
        eval_every=options["eval_every"] or None,
        save_every=options["save_every"] or None,
        eval_batch_size=batch,
        resume=options["resume"],
        gradient_checkpointing=options["gradient_checkpointing"],
        compile=options.get("compile_blocks", False),
        precision=precision,
    )
    progress = ProgressReporter(dist_env.main)
    trainer = Trainer(
        trained,
        task,
        train_examples,
        args,
        evaluation=eval_examples,
        distributed=dist_env,
        progress=progress.update,
        wrap=_wrapper(options, dist_env),
    )
    with progress:
        result = trainer.fit()
    after = evaluate(trained, task, test_examples, batch, dist_env, precision) if test_examples else None
    if after:
        say(f"after training, test: {_short(after)}")
    forgetting_after = _general_loss(trained, general, dist_env, precision, base=False) if general else None

    summary = {
        "model": options["model"],
        "method": options["method"],
        "task": task_kind,
        "data": source,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "steps": result["steps"],
        "train_examples_seen": result["steps"] * trainer.global_batch,
        "train_seconds": result["train_seconds"],
        "tokens_per_s": result["train_tokens"] * dist_env.world / max(result["train_seconds"], 1e-9),
        "wall_seconds": time.perf_counter() - started,
        "peak_memory_mib": peak_memory_mib(),
        "processes": dist_env.world,
        "device": device.type,
        "precision": precision,
        "adapter_bytes": _folder_bytes(output / f"checkpoint-{result['steps']}" / "trained"),
        "full_model_bytes": sum(p.numel() * p.element_size() for p in _base_parameters(trained)),
        "main_metric": task.main_metric,
        "test_before": before,
        "test_after": after,
        "best_validation": trainer.best,
        "forgetting": None
        if general is None
        else {
            "general_text_loss_before": forgetting_before,
            "general_text_loss_after": forgetting_after,
            "change": forgetting_after - forgetting_before,
        },
    }
    _export_final(trained, output, dist_env.main)  # every process: sharded tensors are gathered
    if dist_env.main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(output / "metrics.jsonl", output / "curves.png")
        print_summary(summary)
    return summary


def _device(choice: str, distributed: Distributed) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was given, but torch sees no CUDA device")
    torch.cuda.set_device(distributed.local_rank)
    return torch.device("cuda", distributed.local_rank)


def _export_final(model: nn.Module, output: Path, main: bool) -> None:
    from deltatune.train import save_trained

    save_trained(model, output / "adapter", main=main)


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _base_parameters(model: nn.Module) -> list[nn.Parameter]:
    if isinstance(model, PeftModel):
        ids = {id(p) for p in model.parameters() if p.requires_grad}
        return [p for p in model.get_base_model().parameters() if id(p) not in ids]
    return list(model.parameters())


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


class _BaseView(nn.Module):
    """Calls a PeftModel with its adapters disabled: the base model's outputs."""

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        self.inner = model

    def get_base_model(self) -> nn.Module:
        return self.inner.get_base_model()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.inner.disable_adapter():
            return self.inner(*args, **kwargs)


def _base_view(model: nn.Module) -> nn.Module:
    return _BaseView(model) if isinstance(model, PeftModel) else model


def _general_examples(tokenizer: Any, family: str) -> list[Any] | None:
    if family != "causal":
        return None
    task = CausalLM(tokenizer, max_length=128, prompt_column=None, response_column="text")
    return [task, task.encode([{"text": t} for t in datasets.general_text(200)], source="general-text")]


def _general_loss(model: nn.Module, general: list[Any], distributed: Distributed, precision: str, base: bool) -> float:
    task, examples = general
    view = _base_view(model) if base else model
    return evaluate(view, task, examples, 32, distributed, precision)["loss"]


def _wrapper(options: dict[str, Any], distributed: Distributed) -> Any:
    if distributed.world == 1:
        if options["fsdp"]:
            logger.warning("--fsdp needs several processes (torchrun); training on one process without it")
        return None
    if options["fsdp"]:
        return shard_with_fsdp
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        on_gpu = next(module.parameters()).is_cuda  # a CPU model on a GPU machine (--device cpu) takes none
        return DistributedDataParallel(module, device_ids=[distributed.local_rank] if on_gpu else None)

    return wrap


def shard_with_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block is its own shard unit, then the root (gloo on CPU, NCCL on GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (torch.distributed.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in ("accuracy", "macro_f1", "exact_match", "loss", "perplexity") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _printer(distributed: Distributed) -> Any:
    from rich.console import Console

    console = Console(stderr=False)
    return (lambda text: console.print(text, highlight=False)) if distributed.main else (lambda text: None)


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
            self.bar.console.print(f"step {record['step']} validation: {_short(record)}", highlight=False)
            return
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
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
    train = [r for r in rows if "split" not in r]
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


# -- other commands ------------------------------------------------------------------------------
def run_eval(options: dict[str, Any]) -> dict[str, Any]:
    """Metrics on a split of a built-in set, or on ``--test-data`` (default: the ``--data`` file itself).

    Labels come from the built-in set's training split, or from the evaluated file.
    """
    builtin = options["data"] in datasets.BUILTIN_DATASETS
    raw, _ = load_split(options, "train", None)
    family = model_family(options["model"])
    kind = choose_task(options["task"], family, raw, options)
    columns = required_columns(kind, options, raw[0])
    if builtin:
        records, name = load_split(options, options["split"], None)
        train_records = raw
    else:
        file_options = {**options, "test_data": options.get("test_data") or options["data"]}
        records, name = load_split(file_options, "test", "test_data", columns)
        train_records = records
    records = _limit(records, options["max_examples"])
    labels = len({str(r.get(options["label_column"])) for r in train_records}) if kind == "seq-cls" else 2
    model, tokenizer = load_for_task(options["model"], kind, labels)
    if options["adapter"]:
        model = PeftModel.from_pretrained(model, options["adapter"])
    if kind == "causal-lm" and options["prompt_column"] not in columns:
        options = {**options, "prompt_column": None}
    task = build_task(kind, tokenizer, train_records, options)
    return evaluate(model, task, task.encode(records, source=name), options["eval_batch_size"], Distributed())


def run_generate(
    model_name: str, adapter: str | None, prompt: str | None, max_new_tokens: int, temperature: float
) -> None:
    from transformers import TextStreamer

    model, tokenizer = load_model(model_name, task="causal-lm")
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict[str, str]] = []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                history, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            ids = tokenizer(text, return_tensors="pt")
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        answer = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer})
        return answer

    if prompt is not None:
        reply(prompt)
        return
    print("interactive chat; an empty line or Ctrl-D ends it")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        reply(text)


def run_merge(model_name: str, adapter: str, output: str) -> Path:
    config = PeftConfig.from_pretrained(adapter)
    kind = {"SEQ_CLS": "seq-cls", "SEQ_2_SEQ_LM": "seq2seq"}.get(str(config.task_type), "causal-lm")
    model, tokenizer = load_model(model_name, task=kind)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return Path(output)


def describe_adapter(directory: Path) -> dict[str, Any]:
    """Method, targets, size, base model and, for a run folder, its summary."""
    summary_file = directory / "summary.json"
    adapter_dir = directory / "adapter" if (directory / "adapter" / "adapter_config.json").exists() else directory
    config = PeftConfig.from_pretrained(adapter_dir)
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        count = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    info: dict[str, Any] = {
        "method": str(config.peft_type),
        "task type": str(config.task_type),
        "base model": config.base_model_name_or_path,
        "adapter parameters": f"{count:,}",
        "adapter size": f"{weights.stat().st_size / 2**20:.2f} MiB",
    }
    for field in (
        "r",
        "lora_alpha",
        "use_dora",
        "target_modules",
        "num_virtual_tokens",
        "placement",
        "modules_to_save",
    ):
        if hasattr(config, field) and getattr(config, field) not in (None, [], False):
            info[field] = getattr(config, field)
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        info["trainable share"] = f"{summary['trainable_percent']:.3f}%"
        metric = summary["main_metric"]
        if summary.get("test_before") and summary.get("test_after"):
            info[f"test {metric}"] = f"{summary['test_before'][metric]:.4f} -> {summary['test_after'][metric]:.4f}"
    return info
