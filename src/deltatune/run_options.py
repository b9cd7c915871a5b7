"""What ``deltatune train``'s options mean: which methods each applies to, the defaults a method or a
task supplies for those not given, the checks made before anything loads, and the adapter config
they describe.

A method's and a task's own values live with them (:func:`deltatune.registry.training_defaults`,
:func:`deltatune.tasks.task_training_defaults`); this module only says in which order they apply.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from deltatune import data as datasets
from deltatune.config import PeftConfig
from deltatune.registry import method_options, training_defaults
from deltatune.run_config import RunConfig

logger = logging.getLogger("deltatune")

# Options whose default is the method's own (deltatune.registry.training_defaults); these values
# serve a method whose module names none.
METHOD_DEFAULTED = ("lr", "warmup", "r", "alpha", "targets", "virtual_tokens", "virtual_init", "prefix_projection")
METHOD_DEFAULTED += ("encoder_hidden_size", "encoder_type", "reduction_factor", "modules_to_save", "model_dropout")
METHOD_DEFAULTED += ("adapter_input",)
# Defaulted options that every method reads (the rest are read only by the methods that name them).
RUN_WIDE = ("lr", "warmup", "model_dropout")
METHOD_FALLBACKS: dict[str, Any] = {
    "lr": 5e-4,
    "warmup": 0.05,
    "r": 16,
    "alpha": 32.0,
    "targets": "all-linear",
    "virtual_tokens": 20,
    "virtual_init": "random",
    "prefix_projection": False,
    "encoder_hidden_size": None,
    "encoder_type": "MLP",
    "reduction_factor": 16,
    "modules_to_save": None,
    "model_dropout": None,
    "adapter_input": "sublayer",
}
# Options a task kind may set for every method (deltatune.tasks.task_training_defaults); otherwise
# the command line's default stands.
TASK_DEFAULTED = ("batch_size", "max_steps")
LABEL_GENERATION_OPTIONS = ("label_words", "instruction", "system")
TASK_METRICS = {
    "label-generation": ("accuracy", "macro_f1", "exact_match", "loss"),
    "seq-cls": ("accuracy", "macro_f1", "loss"),
    "causal-lm": ("loss", "perplexity", "token_accuracy"),
    "seq2seq": ("loss", "perplexity"),
}
VALIDATION_OPTIONS = ("eval_every", "max_eval", "metric_for_best", "early_stopping_patience")


# -- defaults and checks -------------------------------------------------------------------------
def with_method_defaults(
    config: RunConfig | Mapping[str, Any], given: Collection[str], task_kind: str | None = None
) -> RunConfig:
    """``config`` with each defaulted option the user did not give set to its default for this method
    and task: the method's value for the task, else the task's (``task_training_defaults``), else the
    method's own, else the run's (``METHOD_FALLBACKS``, or the command line's default)."""
    from deltatune.tasks import task_training_defaults

    if not isinstance(config, RunConfig):
        config = RunConfig.from_options(config, given)

    defaults = training_defaults(config.method)
    for_task = task_training_defaults(task_kind) if task_kind else {}
    resolved: dict[str, Any] = {}
    for key in METHOD_DEFAULTED + TASK_DEFAULTED:
        if key in given and getattr(config, key) is not None:
            continue
        method_sets, value = defaults.for_task(task_kind, key) if task_kind else (False, None)
        if method_sets:
            resolved[key] = value
        elif key in for_task:
            resolved[key] = for_task[key]
        elif key in METHOD_DEFAULTED:
            resolved[key] = defaults.get(key, METHOD_FALLBACKS[key])
    return config.replace(**resolved)


# -- checks before anything is loaded -----------------------------------------------------------
def check_options(config: RunConfig, given: Collection[str]) -> None:
    """Options that cannot apply: errors where the run would differ from what the user asked (validation
    options without validation data), warnings where they are merely unused (another method's option)."""
    quantize = config.quantize
    if quantize != "none" and config.method == "full":
        raise ValueError(
            f"--quantize {quantize} freezes the base in {quantize}, and --method full trains every weight: "
            "use a PEFT method (QLoRA: --method lora) or --quantize none"
        )
    if str(config.init_lora_weights).lower() == "loftq" and config.method == "dora":
        raise ValueError(
            "--init-lora-weights loftq: deltatune train starts LoRA (--method lora) from the quantization error, "
            "not DoRA; use --method lora, or --method dora with --init-lora-weights true"
        )
    if str(config.init_lora_weights).lower() == "loftq" and quantize not in ("nf4", "int8"):
        raise ValueError(
            f"--init-lora-weights loftq starts the adapter so that the quantized base plus it approximates the float "
            f"weights, and --quantize {quantize} has no LoftQ grid: use --quantize nf4 or int8"
        )
    if quantize != "none" and config.fsdp:
        raise ValueError(f"--quantize {quantize} is not supported with --fsdp (bitsandbytes weights cannot be sharded)")
    if config.fsdp and not training_defaults(config.method).shardable:
        raise ValueError(
            f"--fsdp shards the parameters, and --method {config.method} reads whole tensors between steps: "
            "train it with DDP (torchrun without --fsdp) or on one process"
        )
    if config.resume and not training_defaults(config.method).resumable:
        raise ValueError(
            f"--resume cannot continue a --method {config.method} run exactly (its training state is not in the "
            "checkpoints); start a new run"
        )
    if config.resume and config.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it: give one of them")
    builtin = config.data in datasets.BUILTIN_DATASETS
    has_validation = (
        bool(config.eval_data)
        or (builtin and "validation" in datasets.BUILTIN_DATASETS[config.data].splits)
        or config.val_split > 0  # a share of the training file is held out
        or "validation" in (datasets.dataset_dict_splits(config.data) if Path(config.data).is_dir() else [])
    )
    if not has_validation:
        for key in VALIDATION_OPTIONS:
            if key in given:
                raise ValueError(
                    f"--{key.replace('_', '-')} needs validation data, and {config.data} has no validation "
                    "split: pass --eval-data FILE, or hold out a share of the training rows with --val-split"
                )
    if config.report_to:
        from deltatune.reporting import check_reporters

        check_reporters(config.report_to)
    every = config.eval_every or 0
    if every >= 1 and every != int(every):
        raise ValueError(f"--eval-every {every}: give a number of steps, or a fraction of the steps below 1")
    if config.early_stopping_patience and not config.eval_every:
        raise ValueError("--early-stopping-patience needs --eval-every N (evaluations during training to compare)")
    for key, methods in method_options().items():
        if key in given and config.method not in methods:
            logger.warning(
                "--%s applies to --method %s, not %s; ignored",
                key.replace("_", "-"),
                "/".join(methods),
                config.method,
            )


# -- the adapter config ---------------------------------------------------------------------------
def _names(text: str | None) -> list[str] | None:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return names or None


def parse_layers(text: str | None) -> list[int] | None:
    """``--layers-to-transform 0,1,4-7`` -> [0, 1, 4, 5, 6, 7]."""
    if not text:
        return None
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not found:
            raise ValueError(f"--layers-to-transform {text!r}: {part!r} is not a layer number or a range like 4-7")
        first, last = int(found.group(1)), int(found.group(2) or found.group(1))
        layers += range(first, last + 1)
    return sorted(set(layers))


def method_config(config: RunConfig, task_kind: str) -> PeftConfig | None:
    """The adapter config for ``--method`` (None for full fine-tuning): the method's own builder
    (``TrainingDefaults.config``, in its module) from the options and the generic ones parsed here."""
    build = training_defaults(config.method).config
    if build is None:
        return None
    targets = config.targets
    common = {
        "task_type": {"seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}.get(task_kind, "CAUSAL_LM"),
        "target_modules": targets if targets in (None, "all-linear") else _names(targets),
        "exclude_modules": _names(config.exclude_modules),
        "layers_to_transform": parse_layers(config.layers_to_transform),
        "modules_to_save": _names(config.modules_to_save),
    }
    return build(config, common)


def keep_present_default_modules(model: nn.Module, config: RunConfig) -> RunConfig:
    """``config`` without the defaulted ``modules_to_save`` entries that name no module of ``model``:
    a method's default (the bottleneck adapters' BERT pooler on seq-cls) applies where the model has
    one, while a name the user gave must match (``check_targets``)."""
    if "modules_to_save" in config.given or not config.modules_to_save:
        return config
    names = [name for name, _ in model.named_modules() if name]
    present = [entry for entry in _names(config.modules_to_save) or [] if _names_a_module(entry, names)]
    return config.replace(modules_to_save=",".join(present) or None)


def _names_a_module(entry: str, names: list[str]) -> bool:
    """Whether ``entry`` is a module's path or the end of one (``pooler`` names ``bert.pooler``)."""
    return any(name == entry or name.endswith("." + entry) for name in names)


def check_targets(model: nn.Module, config: RunConfig) -> None:
    """Each ``--targets`` / ``--exclude-modules`` / ``--modules-to-save`` entry must name a module."""
    names = [name for name, _ in model.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names if not name.rsplit(".", 1)[-1].isdigit()})
    flags = {"targets": "--targets", "exclude_modules": "--exclude-modules", "modules_to_save": "--modules-to-save"}
    for key, flag in flags.items():
        if config.method not in method_options().get(key, ()):
            continue
        value = getattr(config, key)
        if not value or value == "all-linear":
            continue
        for entry in _names(value) or []:
            if not _names_a_module(entry, names):
                close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=4, cutoff=0.4)
                raise ValueError(
                    f"{flag}: {entry!r} matches no module of {config.model}"
                    + (f"; closest names: {', '.join(close)}" if close else "")
                    + f"; module names: {', '.join(leaves[:30])}"
                )
