"""``deltatune train``: build model, task and data from options, train, measure, report.

``run_training`` is the main job. Every option is checked before anything is loaded (the options, their
defaults and the checks are :mod:`deltatune.run_options`), then the run
folder (:mod:`deltatune.run_folder`) receives the adapter (or, for a full fine-tune, a
transformers model folder) with the task spec the other commands read back, ``metrics.jsonl``,
``curves.png`` and ``summary.json``: every option the run used and the run's evidence for PEFT's
promises -- trainable share, wall time and tokens/s, peak memory, adapter size next to the full
model's, the test metric before and after, and forgetting (the loss on held-out general text
before and after: an adapter should barely move it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import data as datasets
from deltatune.atomic import replace_folder
from deltatune.base_layers import keep_trainable_layout, parameter_count, unquantized_bytes
from deltatune.config import PeftConfig
from deltatune.model_info import set_dropout
from deltatune.models import EMBEDDED_MODELS, load_model, resolve_model_path
from deltatune.packing import check_packed_loss
from deltatune.parallel import distributed_wrapper
from deltatune.peft_model import PeftModel, get_peft_model
from deltatune.quantization import check_quantizable_in_place, kept_in_float, quantize_frozen_linear_layers
from deltatune.report import ProgressReporter, plot_curves, print_summary, printer, short_metrics
from deltatune.reporting import Reporters
from deltatune.run_config import RunConfig
from deltatune.run_data import choose_task, hold_out, limit, load_split, packed, required_columns
from deltatune.run_folder import (
    ADAPTER_DIR,
    LATEST,
    MODEL_DIR,
    TaskSpec,
    check_output,
    check_resume,
    clear_run,
    make_task,
    parse_label_words,
    recorded_options,
    remove_failed_output,
    run_lock,
    write_summary,
)
from deltatune.run_options import (
    LABEL_GENERATION_OPTIONS,
    TASK_METRICS,
    check_options,
    check_targets,
    keep_present_default_modules,
    method_config,
    with_method_defaults,
)
from deltatune.tasks import CausalLM, LabelSpace, Task
from deltatune.train import (
    Distributed,
    TrainArgs,
    Trainer,
    evaluate,
    optimizer_state_bytes,
    peak_memory_mib,
    planned_steps,
    resolve_precision,
)

logger = logging.getLogger("deltatune")


# -- model and task ------------------------------------------------------------------------------
def model_config(name_or_path: str) -> Any:
    """The model's transformers config, read without loading weights (never from the hub)."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, allow_hub=False)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(
            f"--model {name_or_path}: the folder holds no config.json, so it is not a transformers model folder; "
            f"embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    return AutoConfig.from_pretrained(path)


def model_family(name_or_path: str) -> str:
    """``causal``, ``encoder`` or ``seq2seq``, from the embedded registry or the model config."""
    if name_or_path in EMBEDDED_MODELS:
        return "causal" if EMBEDDED_MODELS[name_or_path].kind == "causal-lm" else "encoder"
    config = model_config(name_or_path)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    architectures = " ".join(getattr(config, "architectures", None) or [])
    return "causal" if ("CausalLM" in architectures or "LMHead" in architectures) else "encoder"


def check_max_length(name_or_path: str, max_length: int) -> None:
    """``--max-length`` must fit in the model's context (its position embeddings)."""
    config = model_config(name_or_path)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if context and max_length > context:
        raise ValueError(
            f"--max-length {max_length} is longer than the context of {name_or_path} ({context} tokens, "
            f"max_position_embeddings); pass --max-length {context} or less"
        )


def model_record(name_or_path: str) -> str:
    """How a run names its base model: an embedded name as it is, a folder as an absolute path."""
    return name_or_path if name_or_path in EMBEDDED_MODELS else str(Path(name_or_path).resolve())


def training_data_and_task(options: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The training records as read and the task they make with the model (``--task auto`` resolved)."""
    raw, _ = load_split(options, "train", None)
    return raw, choose_task(options["task"], model_family(options["model"]), raw, options)


def task_spec(kind: str, records: list[dict[str, Any]], options: dict[str, Any], base_model: str | None) -> TaskSpec:
    """The task a run trains: columns, longest input and, for classification, its labels and prompt."""
    spec = TaskSpec(
        kind=kind,
        base_model=base_model,
        max_length=options["max_length"],
        text_column=options.get("text_column", "text"),
        label_column=options.get("label_column", "label"),
        prompt_column=options.get("prompt_column", "prompt"),
        response_column=options.get("response_column", "response"),
    )
    if kind not in ("label-generation", "seq-cls"):
        return spec
    spec.labels = LabelSpace.from_records(records, spec.label_column, source=str(options.get("data", "data"))).names
    builtin = datasets.BUILTIN_DATASETS.get(options.get("data", ""))
    if kind == "seq-cls" and builtin is not None and builtin.label_words:
        spec.label_words = list(builtin.label_words)  # a classifier does not answer them; they name the labels
    if kind == "label-generation":
        words = parse_label_words(options.get("label_words"), spec.labels)
        if words is None and builtin is not None and builtin.label_words:
            words = list(builtin.label_words)
        spec.label_words = words
        spec.instruction = options.get("instruction") or (builtin.instruction if builtin else None)
        spec.system = options.get("system")
        if spec.instruction is not None:
            _check_instruction(spec.instruction)
    return spec


def start_virtual_tokens(model: PeftModel, config: RunConfig, tokenizer: Any, words: str) -> None:
    """``--virtual-init``: task (the task's words, or --prompt-init-text), vocab (sampled vocabulary
    tokens), random (the method's own random start: prompt tuning's table, P-tuning's encoder)."""
    init = "task" if config.prompt_init_text else config.virtual_init
    if init == "task":
        ids = tokenizer(config.prompt_init_text or words, add_special_tokens=False)["input_ids"]
    elif init == "vocab" and config.method != "prompt":  # prompt tuning samples in its config
        ids = torch.randint(0, len(tokenizer), (config.virtual_tokens,)).tolist()
    else:
        return
    try:
        model.start_virtual_tokens_from(ids)
    except ValueError as err:  # e.g. an encoder without a key/value cache, for a prefix
        logger.warning("virtual tokens start at random: %s", err)


def task_words(spec: TaskSpec, records: list[dict[str, Any]]) -> str:
    """The task in the task's own words, where virtual tokens start: the instruction and the label
    words for label generation, the label names for a classifier, else the first training prompt."""
    if spec.kind == "label-generation":
        instruction = " ".join((spec.instruction or "").replace("{text}", " ").split())
        return f"{' '.join(spec.label_words or spec.labels or [])} {instruction}".strip()  # labels first: kept
    if spec.kind == "seq-cls":
        return " ".join(spec.label_words or spec.labels or [])
    if "messages" in records[0]:
        return next(m["content"] for m in records[0]["messages"] if m["role"] != "system")
    column = spec.prompt_column if spec.prompt_column and spec.prompt_column in records[0] else spec.response_column
    return str(records[0][column])


def _check_instruction(instruction: str) -> None:
    try:
        filled = instruction.format(text="\0")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(
            f"--instruction {instruction!r}: {err!r}; it may hold only {{text}} in braces (write {{{{ for a brace)"
        ) from None
    if "\0" not in filled:
        raise ValueError(f"--instruction {instruction!r} must contain {{text}}, where each example's text goes")


def build_task(kind: str, tokenizer: Any, records: list[dict[str, Any]], options: dict[str, Any]) -> Task:
    """The task for ``kind`` from training records and options (labels from the records)."""
    spec = task_spec(kind, records, options, None)
    return task_from_data(spec, tokenizer, options.get("on_long", "truncate"), str(options.get("data", "data")))


def task_from_data(spec: TaskSpec, tokenizer: Any, on_long: str, source: str) -> Task:
    """The task; a problem with what the data make of it (label words the tokenizer cannot tell apart)
    names the data file."""
    try:
        return make_task(spec, tokenizer, on_long)
    except datasets.DataError as err:
        if source in str(err):
            raise
        raise datasets.DataError(f"{source}: {err}") from None


def load_for_task(
    name: str, task_kind: str, num_labels: int, quantize: str = "none", device: torch.device | None = None
) -> tuple[nn.Module, Any]:
    family_task = {
        "label-generation": "causal-lm",
        "causal-lm": "causal-lm",
        "seq-cls": "seq-cls",
        "seq2seq": "seq2seq",
    }
    return load_model(
        name, task=family_task[task_kind], num_labels=num_labels, allow_hub=False, quantize=quantize, device=device
    )


# -- training ------------------------------------------------------------------------------------
def run_training(options: Mapping[str, Any] | RunConfig, given: Collection[str] = ()) -> dict[str, Any]:
    """The main job (see the module docstring): ``options`` by name (checked and typed here, once, into a
    :class:`~deltatune.run_config.RunConfig`), ``given`` the names of those the user set."""
    config = options if isinstance(options, RunConfig) else RunConfig.from_options(options, given)
    given = config.given | frozenset(given) | config.changed()  # a value set in code counts as given
    config = config.replace(given=given)
    output = Path(config.output)
    raw, task_kind = training_data_and_task(config)
    config = with_method_defaults(config, given, task_kind)
    dist_env = Distributed.from_env(config.device)
    check_options(config, given)  # every process checks, so that each fails alike
    # before the folder is even looked at: a second run must not --overwrite or --resume a live one
    with run_lock(output) if dist_env.main else contextlib.nullcontext():
        created = check_output(output, resume=config.resume, overwrite=bool(config.overwrite))
        if config.resume:
            check_resume(output, config)
        try:
            return _train(config, output, dist_env, given, (raw, task_kind))
        except BaseException as err:
            if dist_env.main:
                remove_failed_output(output, created)
                if isinstance(err, KeyboardInterrupt) and output.is_dir():
                    _mark_status(output, "interrupted")
                elif (output / LATEST).is_file():  # stopped with its checkpoints kept (a NaN loss, a full disk)
                    _mark_status(output, "failed")
            raise


def _mark_status(output: Path, status: str) -> None:
    from deltatune.run_folder import read_summary

    summary = read_summary(output) or {}
    write_summary(output, {**summary, "status": status})


@dataclasses.dataclass
class Splits:
    """A run's encoded examples, and where its validation rows came from (recorded in the summary)."""

    train_records: list[dict[str, Any]]
    train: list[Any]
    validation: list[Any] | None
    test: list[Any] | None
    validation_source: dict[str, Any]


def _train(
    config: RunConfig,
    output: Path,
    dist_env: Distributed,
    given: Collection[str],
    data_and_task: tuple[list[dict[str, Any]], str],
) -> dict[str, Any]:
    """The stages of a run: check the task's options, load the model, encode the data, adapt the model,
    record the run, train and evaluate, export and summarise."""
    started = time.perf_counter()
    recorded = recorded_options(config)  # as given: --resume compares a command with this
    torch.manual_seed(config.seed)
    say = printer(dist_env.main)
    raw, task_kind = data_and_task
    config = _check_task_options(config, given, task_kind, raw)
    columns = required_columns(task_kind, config, raw[0])
    train_records, train_name = load_split(config, "train", None, columns)
    train_records = limit(train_records, config.max_train)
    spec = task_spec(task_kind, train_records, config, model_record(config.model))
    model, tokenizer, device, precision = _load_model(config, task_kind, spec, dist_env, say)
    task = task_from_data(spec, tokenizer, config.on_long, str(config.data))
    if task_kind == "label-generation":  # what the task resolved (default prompt, label words) is what is saved
        spec.label_words, spec.instruction = list(task.words), task.instruction
    splits = _encode_splits(config, task, train_records, train_name, columns, say)
    trained, adapter_config = _adapt(model, config, task, spec, tokenizer, splits)
    trainable, total = _count(trained)
    say(
        f"{config.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"{device.type}, {precision}"
        + ("" if config.model_dropout is None else f", model dropout {config.model_dropout}")
    )
    summary: dict[str, Any] = {
        "status": "running",
        "options": recorded,
        "task_spec": spec.to_dict(),
        "model": config.model,
        "method": config.method,
        "task": task_kind,
        "data": config.data,
        "validation_data": splits.validation_source,
    }
    if dist_env.main:  # everything is checked and loaded: only now is an earlier run replaced
        if config.overwrite and output.is_dir():
            clear_run(output)
        output.mkdir(parents=True, exist_ok=True)
        write_summary(output, summary)
    dist_env.barrier()

    def export(model: nn.Module, folder: Path, main: bool) -> None:
        export_trained(model, folder, main, tokenizer, spec)

    general = _general_examples(tokenizer, model_family(config.model)) if config.forgetting else None
    forgetting_before = _general_loss(trained, general, dist_env, precision, base=True) if general else None
    fitted = _fit(trained, task, splits, _train_args(config, output, precision), config, recorded, dist_env, export)
    forgetting_after = _general_loss(trained, general, dist_env, precision, base=False) if general else None
    final = output / (MODEL_DIR if adapter_config is None else ADAPTER_DIR)
    export(trained, final, dist_env.main)  # every process: sharded tensors are gathered
    quantize = config.quantize
    result, trainer = fitted["result"], fitted["trainer"]
    summary.update(
        {
            "status": "finished",
            "trained": final.name,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100 * trainable / total,
            "steps": result["steps"],
            "stopped_early": result["stopped_early"],
            "skipped_non_finite_steps": result["skipped_steps"],
            "train_examples_seen": result["steps"] * trainer.global_batch,
            "train_seconds": result["train_seconds"],
            "tokens_per_s": result["train_tokens"] * dist_env.world / max(result["train_seconds"], 1e-9),
            "wall_seconds": time.perf_counter() - started,
            "peak_memory_mib": peak_memory_mib(),
            "processes": dist_env.world,
            "device": device.type,
            "precision": precision,
            "adapter_bytes": _folder_bytes(output / f"checkpoint-{result['steps']}" / "trained"),
            "full_model_bytes": sum(unquantized_bytes(p) for p in _base_parameters(trained)),
            "quantization": quantize,
            "base_model_bytes": sum(p.numel() * p.element_size() for p in _base_parameters(trained)),
            "optimizer": config.optim,
            "loraplus_ratio": config.loraplus_ratio,
            "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            "main_metric": task.main_metric,
            "test_before": fitted["before"],
            "test_after": fitted["after"],
            "best_validation": trainer.best,
            "metric_for_best": trainer.metric,
            "forgetting": None
            if general is None
            else {
                "general_text_loss_before": forgetting_before,
                "general_text_loss_after": forgetting_after,
                "change": forgetting_after - forgetting_before,
            },
        }
    )
    if dist_env.main:
        write_summary(output, summary)
        plot_curves(output / "metrics.jsonl", output / "curves.png")
        print_summary(summary)
    return summary


def _check_task_options(
    config: RunConfig, given: Collection[str], task_kind: str, raw: list[dict[str, Any]]
) -> dict[str, Any]:
    """Options that depend on the task the data chose: refused, reported unused, or adjusted."""
    check_max_length(config.model, config.max_length)
    for key in LABEL_GENERATION_OPTIONS:
        if key in given and task_kind != "label-generation":
            logger.warning(
                "--%s applies to label generation, not the %s task; ignored", key.replace("_", "-"), task_kind
            )
    metric = config.metric_for_best
    if metric and metric not in TASK_METRICS[task_kind]:
        raise ValueError(
            f"--metric-for-best {metric}: the {task_kind} task reports {', '.join(TASK_METRICS[task_kind])}"
        )
    if task_kind == "causal-lm" and config.prompt_column not in raw[0]:
        config = config.replace(prompt_column=None)
    return config


def _load_model(
    config: RunConfig, task_kind: str, spec: TaskSpec, dist_env: Distributed, say: Any
) -> tuple[nn.Module, Any, torch.device, str]:
    """The base model and tokenizer on the run's device, and the precision the run trains in."""
    quantize = config.quantize
    say(f"loading {config['model']} for {task_kind}{'' if quantize == 'none' else f' ({quantize})'} ...")
    device = _device(config.device, dist_env)
    # LoftQ starts from the float weights; the base is quantized once the adapter is attached (_adapt).
    load_as = "none" if starts_from_float(config) else quantize
    model, tokenizer = load_for_task(config.model, task_kind, spec.num_labels or 2, load_as, device)
    precision = resolve_precision(config.precision, device)
    if precision == "fp16" and config.fsdp and dist_env.world > 1:
        raise ValueError("--precision fp16 (loss scaling) is not supported with --fsdp; use bf16 or fp32")
    if load_as == "none":
        model.to(device)  # a quantized model was loaded onto its device
    return model, tokenizer, device, precision


def starts_from_float(config: RunConfig) -> bool:
    """Whether the run loads the float base and quantizes it after attaching the adapter (LoftQ)."""
    return config.method == "lora" and config.quantize != "none" and str(config.init_lora_weights).lower() == "loftq"


def _encode_splits(
    config: RunConfig,
    task: Task,
    train_records: list[dict[str, Any]],
    train_name: str,
    columns: list[str],
    say: Any,
) -> Splits:
    """Training, validation (given, or held out of the training rows) and test examples, encoded."""
    eval_records, eval_name = load_split(config, "validation", "eval_data", columns)
    validation_source: dict[str, Any] = {"source": eval_name} if eval_records else {"source": None}
    if not eval_records and config.val_split > 0:
        train_records, eval_records, validation_source = hold_out(
            train_records, config.val_split, config.seed, train_name
        )
        eval_name = f"{train_name} (held-out validation)"
    train_examples = task.encode(train_records, source=train_name)
    if config.packing:
        train_examples = packed(task, train_examples, config, say)
    test_records, test_name = load_split(config, "test", "test_data", columns)
    eval_records = limit(eval_records, config.max_eval)
    test_records = limit(test_records, config.max_test)
    if not config.test_eval:
        test_records = []
    return Splits(
        train_records=train_records,
        train=train_examples,
        validation=task.encode(eval_records, source=eval_name) if eval_records else None,
        test=task.encode(test_records, source=test_name) if test_records else None,
        validation_source=validation_source,
    )


def _adapt(
    model: nn.Module, config: RunConfig, task: Task, spec: TaskSpec, tokenizer: Any, splits: Splits
) -> tuple[nn.Module, PeftConfig | None]:
    """The model to train: the base with ``--method``'s adapter, or the whole base (full fine-tuning)."""
    config = keep_present_default_modules(model, config)
    if config.model_dropout is not None:
        set_dropout(model, config.model_dropout)
    args = _train_args(config, Path(config.output), "fp32")
    steps = planned_steps(len(splits.train), args, Distributed.from_env(config.device).world)
    adapter = method_config(config.replace(total_steps=steps), spec.kind)  # AdaLoRA's schedule spans the run
    if adapter is None:
        for param in model.parameters():
            param.requires_grad_(True)
        trained: nn.Module = model
    else:
        check_targets(model, config)
        adapter.base_model_name_or_path = spec.base_model
        kept = kept_in_float(model) if starts_from_float(config) else []  # named before adapters wrap them
        if starts_from_float(config):
            check_quantizable_in_place(model, kept)
        trained = get_peft_model(model, adapter)
        if starts_from_float(config):
            quantize_frozen_linear_layers(trained, config.quantize, kept)
            keep_trainable_layout(trained)
        if adapter.is_prompt_learning:
            start_virtual_tokens(trained, config, tokenizer, task_words(spec, splits.train_records))
    if config.packing:
        check_packed_loss(task, trained, max(splits.train, key=lambda row: row.packed))
    return trained, adapter


def _train_args(config: RunConfig, output: Path, precision: str) -> TrainArgs:
    return TrainArgs(
        output=output,
        lr=config.lr,
        epochs=config.epochs,
        max_steps=config.max_steps or None,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        warmup=config.warmup,
        schedule=config.schedule,
        weight_decay=config.weight_decay,
        clip=config.clip or None,
        on_nan=config.on_nan,
        seed=config.seed,
        eval_every=config.eval_every or None,
        save_every=config.save_every or None,
        eval_batch_size=config.eval_batch_size,
        resume=config.resume,
        gradient_checkpointing=config.gradient_checkpointing,
        compile=config.compile_blocks,
        precision=precision,
        optim=config.optim,
        betas=config.betas,
        min_lr=config.min_lr,
        save_total_limit=config.save_total_limit,
        metric_for_best=config.metric_for_best,
        early_stopping_patience=config.early_stopping_patience,
        loraplus_ratio=config.loraplus_ratio,
    )


def _fit(
    trained: nn.Module,
    task: Task,
    splits: Splits,
    args: TrainArgs,
    config: RunConfig,
    recorded: dict[str, Any],
    dist_env: Distributed,
    export: Any,
) -> dict[str, Any]:
    """Test before, train (progress, reporters, validation, checkpoints), test after."""
    say = printer(dist_env.main)
    base_only = trained if not isinstance(trained, PeftModel) else _base_view(trained)
    batch, precision, output = args.eval_batch_size, args.precision, args.output
    before = None
    if splits.test and not config.resume:
        before = evaluate(base_only, task, splits.test, batch, dist_env, precision)
        say(f"before training, test: {short_metrics(before)}")
    progress = ProgressReporter(dist_env.main)
    reporters = Reporters(config.report_to, output, recorded, config.resume, dist_env.main)

    def on_record(record: dict[str, Any], total: int) -> None:
        progress.update(record, total)
        reporters.log(record)

    trainer = Trainer(
        trained,
        task,
        splits.train,
        args,
        evaluation=splits.validation,
        distributed=dist_env,
        progress=on_record,
        wrap=distributed_wrapper(config.fsdp, dist_env),
        export=export,
    )
    if before:
        reporters.log({"step": 0, "split": "test", **before})
    try:
        with progress:
            result = trainer.fit()
        after = evaluate(trained, task, splits.test, batch, dist_env, precision) if splits.test else None
        if after:
            reporters.log({"step": result["steps"], "split": "test", **after})
    finally:
        reporters.close()
    if result["stopped_early"]:
        say(
            f"stopped early at step {result['steps']}: {trainer.metric} did not improve "
            f"in {args.early_stopping_patience} evaluations"
        )
    if after:
        say(f"after training, test: {short_metrics(after)}")
    return {"result": result, "trainer": trainer, "before": before, "after": after}


def export_trained(model: nn.Module, folder: Path, main: bool, tokenizer: Any, spec: TaskSpec) -> None:
    """An adapter folder (PEFT's layout), or for a full fine-tune a transformers model folder
    (config, tokenizer, each weight once); either with the task spec. Every process calls this."""
    from deltatune.run_checkpoint import gathered_state

    folder = Path(folder)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder, is_main_process=main)
        if main:
            spec.save(folder)
        return
    state = gathered_state(model)  # collective under FSDP; a tied weight once
    if not main:
        return
    save_model_folder(model, folder, tokenizer, spec, state_dict=state)


def save_model_folder(
    model: nn.Module,
    folder: Path,
    tokenizer: Any,
    spec: TaskSpec | None,
    state_dict: dict[str, torch.Tensor] | None = None,
    max_shard_size: str | None = None,
) -> None:
    """``save_pretrained`` into a temporary sibling, then renamed into place: never half-written."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(tmp, state_dict=state_dict, **extra)
        tokenizer.save_pretrained(tmp)
        if spec is not None:
            spec.save(tmp)
        replace_folder(tmp, folder, folder.parent / f".{folder.name}.old-{os.getpid()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _device(choice: str, distributed: Distributed) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was given, but torch sees no CUDA device")
    torch.cuda.set_device(distributed.local_rank)
    return torch.device("cuda", distributed.local_rank)


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(parameter_count(p) for p in model.parameters())


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
