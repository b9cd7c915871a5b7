"""The ``deltatune`` command: train, eval, generate, merge, serve, inspect, models, datasets.

Options come from flags, or from a YAML/TOML file given with ``--config`` (flags override it).
``deltatune train`` with no arguments is the default run: LoRA on the embedded SmolLM2 for Rotten
Tomatoes sentiment posed as instruction following.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import click

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# Every `train --method` (deltatune.registry.trainable_methods; listed here so the CLI starts without torch).
METHODS = (
    *("lora", "dora", "adalora", "loha", "lokr", "vera", "oft", "boft", "ia3", "ln-tuning"),
    *("prefix", "prompt", "ptuning", "adapter", "full"),
)
TASKS = ("auto", "label-generation", "causal-lm", "seq-cls", "seq2seq")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config run.yaml``: its keys (option names, dashes or underscores) become the defaults."""
    if not value:
        return value
    path = Path(value)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # yaml and toml raise their own error types
        raise click.BadParameter(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {err}") from err
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of option names to values")
    aliases = {}
    for param in ctx.command.params:
        for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
            aliases[opt.lstrip("-").replace("-", "_")] = param.name
        aliases[param.name] = param.name
    defaults = {}
    for key, item in data.items():
        name = aliases.get(str(key).lstrip("-").replace("-", "_"))
        if name is None or name == "config":
            raise click.BadParameter(f"{path}: unknown option {key!r}; see deltatune {ctx.command.name} --help")
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


config_option = click.option(
    "--config",
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    type=click.Path(exists=True, dir_okay=False),
    help="YAML or TOML file of option values (flags given on the command line override it).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Log at debug level.")
def main(verbose: bool) -> None:
    """Parameter-efficient fine-tuning: LoRA, DoRA, IA3, prompt/prefix tuning, bottleneck adapters."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    # torchao (imported by transformers whenever it is installed) warns at import about kernels for
    # other devices and Python builds, and its enums trip a torch deprecation warning: nothing a run can act on
    for noisy in ("transformers", "httpx", "huggingface_hub", "torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def friendly_errors(command: Any) -> Any:
    """Bad input ends in a one-line message naming the problem, not a traceback (``-v`` shows it)."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, KeyError, OSError) as err:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from err

    return wrapper


def given_options() -> set[str]:
    """The options the user set (on the command line or in a --config file), not left at their defaults."""
    ctx = click.get_current_context()
    return {
        name for name in ctx.params if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    }


def _betas(_ctx: click.Context, _param: click.Parameter, value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    else:
        parts = [p.strip() for p in str(value).split(",")]
    try:
        betas = tuple(float(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected two numbers such as 0.9,0.999") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise click.BadParameter(f"{value!r}: expected two numbers in [0, 1) such as 0.9,0.999")
    return betas  # type: ignore[return-value]


class MethodDefault(click.Option):
    """An option whose default comes from ``--method``: its help lists each method's own default.

    The defaults live with the methods (``deltatune.registry.training_defaults``); they are read
    only when the help is shown, so the command line starts without importing torch.
    """

    def get_help_extra(self, ctx: click.Context) -> Any:
        from deltatune.registry import method_options, trainable_methods
        from deltatune.run_options import METHOD_FALLBACKS, RUN_WIDE

        by_value: dict[str, list[str]] = {}
        for method, defaults in trainable_methods().items():
            value = defaults.get(self.name, METHOD_FALLBACKS.get(self.name))
            if self.name not in RUN_WIDE and method not in method_options().get(self.name, ()):
                continue
            text = "none" if value is None else str(value)
            per_task = [f"{task}: {o[self.name]}" for task, o in defaults.tasks.items() if self.name in o]
            text += f" ({', '.join(per_task)})" if per_task else ""
            by_value.setdefault(text, []).append(method)
        self.show_default = "; ".join(f"{'/'.join(methods)}: {value}" for value, methods in by_value.items())
        return super().get_help_extra(ctx)


class TaskDefault(click.Option):
    """An option whose default some task kinds set for every method (``deltatune.tasks``): its help lists them."""

    def get_help_extra(self, ctx: click.Context) -> Any:
        from deltatune.tasks import TASKS

        per_task = [
            f"{kind}: {t.training_defaults[self.name]}" for kind, t in TASKS.items() if self.name in t.training_defaults
        ]
        self.show_default = f"{self.default}" + (f"; {', '.join(per_task)}" if per_task else "")
        return super().get_help_extra(ctx)


POSITIVE = click.FloatRange(min=0, min_open=True)
NON_NEGATIVE = click.FloatRange(min=0)
AT_LEAST_ONE = click.IntRange(min=1)
COUNT = click.IntRange(min=0)
RUN_MODEL = "the adapter's base model, else smollm2-135m-instruct"


def model_options(f: Any) -> Any:
    return click.option(
        "--model",
        default="smollm2-135m-instruct",
        help="Embedded model name (see `deltatune models`) or a local model folder.",
    )(f)


def run_model_option(f: Any) -> Any:
    return click.option(
        "--model",
        default=None,
        show_default=RUN_MODEL,
        help="Embedded model name or local model folder to load the adapter onto.",
    )(f)


def quantize_option(f: Any) -> Any:
    return click.option(
        "--quantize",
        type=click.Choice(["none", "nf4", "fp4", "int8"]),
        default="none",
        help="Load the base's linear layers in 4-bit (nf4/fp4, QLoRA) or 8-bit (bitsandbytes).",
    )(f)


def adapter_option(required: bool = False, help_text: str = "Run folder or adapter folder.") -> Any:
    return click.option(
        "--adapter", default=None, required=required, type=click.Path(exists=True, file_okay=False), help=help_text
    )


def data_options(f: Any, evaluation_only: bool = False) -> Any:
    options = [
        click.option(
            "--data",
            default="rotten-tomatoes",
            help="Built-in data set (see `deltatune datasets`) or a JSONL/CSV/Parquet file."
            + (" Default for eval with --adapter: the run's own test data." if evaluation_only else ""),
        ),
    ]
    if not evaluation_only:
        options.append(
            click.option("--eval-data", default=None, help="File for validation (built-in sets use their own split).")
        )
    options += [
        click.option(
            "--test-data",
            default=None,
            help="File for the test (it overrides a built-in set's test split).",
        ),
        click.option("--text-column", default="text", help="Input text column (classification)."),
        click.option("--label-column", default="label", help="Label column (classification)."),
        click.option("--prompt-column", default="prompt", help="Prompt column (chat / seq2seq)."),
        click.option("--response-column", default="response", help="Response column (chat / seq2seq)."),
        click.option(
            "--task",
            type=click.Choice(TASKS),
            default="auto",
            help="auto: label-generation for a causal LM with labels, seq-cls for an encoder, "
            "causal-lm for prompt/response data, seq2seq for encoder-decoder models.",
        ),
        click.option("--max-length", default=256, type=AT_LEAST_ONE, help="Longest input in tokens."),
        click.option(
            "--on-long",
            type=click.Choice(["truncate", "skip", "error"]),
            default="truncate",
            help="What to do with an input longer than --max-length.",
        ),
        click.option(
            "--on-nan",
            type=click.Choice(["stop", "skip"]),
            default="stop",
            help="A step whose loss is NaN or infinite: stop the run, naming the step and its records "
            "(the last checkpoint is kept), or skip the step's update and go on.",
        ),
        click.option(
            "--on-bad-row",
            type=click.Choice(["error", "skip"]),
            default="error",
            help="What to do with an empty or malformed row in a data file.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def eval_data_options(f: Any) -> Any:
    return data_options(f, evaluation_only=True)


@main.command()
@config_option
@model_options
@quantize_option
@click.option("--method", type=click.Choice(METHODS), default="lora", help="What to train.")
@click.option(
    "--r",
    "--rank",
    "r",
    cls=MethodDefault,
    default=None,
    type=AT_LEAST_ONE,
    help="Rank: LoRA/DoRA's, AdaLoRA's final average, LoHa/LoKr's factors', VeRA's projections' "
    "(--rank under torchrun: --r clashes).",
)
@click.option(
    "--alpha", cls=MethodDefault, default=None, type=POSITIVE, help="LoRA/DoRA/LoHa/LoKr alpha (scale alpha/r)."
)
@click.option(
    "--dropout",
    default=0.0,
    type=click.FloatRange(0, 1, max_open=True),
    help="LoRA/DoRA and VeRA dropout on the adapter's input; LoHa/LoKr rank dropout.",
)
@click.option(
    "--model-dropout",
    cls=MethodDefault,
    default=None,
    type=click.FloatRange(0, 1, max_open=True),
    help="Rate of the model's own dropout layers while training (the base and its head, not an adapter's "
    "own: see --dropout); none keeps the model's configured rates.",
)
@click.option("--use-rslora", is_flag=True, help="LoRA/DoRA: rank-stabilised scale alpha/sqrt(r).")
@click.option(
    "--init-lora-weights",
    default="true",
    help="LoRA/DoRA init: true (B = 0), false, gaussian, pissa or pissa_niter_K; with --quantize nf4/int8, "
    "loftq (LoRA: loads the float base, starts the adapter at the top of its quantization error, then quantizes).",
)
@click.option(
    "--targets",
    cls=MethodDefault,
    default=None,
    help="Modules to adapt: comma-separated names or 'all-linear' (IA3's none: keys, values, feed-forward input; "
    "LN tuning's: every norm layer).",
)
@click.option("--exclude-modules", default=None, help="Modules to leave alone, comma-separated.")
@click.option("--layers-to-transform", default=None, help="Only these blocks, e.g. 0,1,4-7.")
@click.option(
    "--modules-to-save",
    cls=MethodDefault,
    default=None,
    help="Modules trained in full and saved with the adapter, comma-separated; the task's head "
    "(classifier, score) is always added, and a method's default applies where the model has it.",
)
@click.option(
    "--virtual-tokens",
    cls=MethodDefault,
    default=None,
    type=AT_LEAST_ONE,
    help="Virtual tokens (prompt, ptuning, prefix).",
)
@click.option(
    "--virtual-init",
    cls=MethodDefault,
    default=None,
    type=click.Choice(["task", "vocab", "random"]),
    help="Where virtual tokens start: task (the embeddings, or for prefix tuning the activations, of the task's "
    "own instruction and label words), vocab (sampled vocabulary rows), random.",
)
@click.option(
    "--prefix-projection/--no-prefix-projection",
    cls=MethodDefault,
    default=None,
    help="Prefix tuning through an MLP reparameterisation.",
)
@click.option(
    "--encoder-hidden-size",
    cls=MethodDefault,
    default=None,
    type=AT_LEAST_ONE,
    help="Hidden width of the prefix projection (none: the key/value width) or the P-tuning encoder.",
)
@click.option(
    "--encoder-type",
    cls=MethodDefault,
    type=click.Choice(["MLP", "LSTM"]),
    default=None,
    help="P-tuning prompt encoder.",
)
@click.option(
    "--prompt-init-text",
    default=None,
    help="With --virtual-init task: start the virtual tokens from this text instead of the task's words.",
)
@click.option(
    "--reduction-factor",
    cls=MethodDefault,
    default=None,
    type=AT_LEAST_ONE,
    help="Bottleneck adapter reduction factor; on seq-cls the Pfeiffer placement halves the default (one "
    "adapter per block where Houlsby has two: the same parameters).",
)
@click.option(
    "--placement",
    type=click.Choice(["houlsby", "pfeiffer", "parallel"]),
    default="houlsby",
    help="Bottleneck adapter placement.",
)
@click.option(
    "--adapter-input",
    cls=MethodDefault,
    type=click.Choice(["sublayer", "normed", "auto"]),
    default=None,
    help="What a bottleneck adapter reads: the sublayer's output (Houlsby et al.), or the norm closing "
    "a post-norm sublayer applied to output plus residual, its update going into that norm (Pfeiffer "
    "et al. 2021); auto: normed where the model has such a norm (BERT), sublayer elsewhere.",
)
@data_options
@click.option(
    "--label-words",
    default=None,
    show_default="the labels themselves (rotten-tomatoes: negative,positive)",
    help="Label generation: the answer for each label, in label order (a,b) or as label=word pairs.",
)
@click.option(
    "--instruction",
    default=None,
    help="Label generation: the user turn, with {text} where the example goes.",
)
@click.option("--system", default=None, help="Label generation: a system turn (default: the model's own).")
@click.option("--lr", cls=MethodDefault, default=None, type=POSITIVE, help="Peak learning rate.")
@click.option("--min-lr", default=0.0, type=NON_NEGATIVE, help="Learning rate the linear/cosine schedule decays to.")
@click.option(
    "--schedule",
    type=click.Choice(["linear", "cosine", "constant"]),
    default="linear",
    help="Learning-rate schedule after warmup.",
)
@click.option(
    "--warmup",
    cls=MethodDefault,
    default=None,
    type=NON_NEGATIVE,
    help="Warmup: a fraction of the steps (< 1) or a number of steps.",
)
@click.option(
    "--optim",
    type=click.Choice(["adamw", "sgd", "adafactor", "adamw8bit", "paged_adamw8bit"]),
    default="adamw",
    help="Optimizer (adamw8bit/paged_adamw8bit: bitsandbytes' 8-bit states; paged needs CUDA).",
)
@click.option("--betas", default="0.9,0.999", callback=_betas, help="AdamW betas (SGD: the first is its momentum).")
@click.option("--epochs", default=1.0, type=POSITIVE, help="Epochs; they rule when given without --max-steps.")
@click.option(
    "--max-steps",
    cls=TaskDefault,
    default=70,
    type=COUNT,
    help="Optimizer steps (0: use --epochs); the default applies only when --epochs is not given.",
)
@click.option(
    "--batch-size", cls=TaskDefault, default=8, type=AT_LEAST_ONE, help="Examples per process per micro-step."
)
@click.option("--grad-accum", default=1, type=AT_LEAST_ONE, help="Micro-steps per optimizer step.")
@click.option("--clip", default=1.0, type=NON_NEGATIVE, help="Gradient-norm clipping (0: off).")
@click.option("--weight-decay", default=0.0, type=NON_NEGATIVE, help="Weight decay.")
@click.option(
    "--loraplus-ratio",
    default=None,
    type=POSITIVE,
    help="LoRA+: train LoRA's B (and 1-D tensors) at this multiple of --lr (the paper recommends 16).",
)
@click.option("--seed", default=0, help="Seed for initialisation, data order and dropout.")
@click.option(
    "--eval-every",
    default=0,
    type=NON_NEGATIVE,
    help="Evaluate on the validation set every N steps, or every fraction of the steps when < 1 (0: at the end).",
)
@click.option(
    "--metric-for-best",
    default=None,
    show_default="the task's main metric (accuracy, or loss)",
    help="Validation metric that picks best/ and drives early stopping (accuracy, macro_f1, loss, ...).",
)
@click.option(
    "--early-stopping-patience",
    default=0,
    type=COUNT,
    help="Stop after N validations without a better --metric-for-best (0: never; needs --eval-every).",
)
@click.option("--save-every", default=25, type=COUNT, help="Checkpoint every N steps (0: at the end only).")
@click.option("--save-total-limit", default=1, type=AT_LEAST_ONE, help="Checkpoints to keep (the newest).")
@click.option("--eval-batch-size", default=32, type=AT_LEAST_ONE, help="Batch size for evaluation.")
@click.option("--max-train", default=0, type=COUNT, help="Use at most N training examples (0: all).")
@click.option("--max-eval", default=128, type=COUNT, help="Use at most N validation examples (0: all).")
@click.option("--max-test", default=0, type=COUNT, help="Use at most N test examples (0: all).")
@click.option(
    "--val-split",
    default=0.1,
    type=click.FloatRange(0, 0.5),
    help="Without validation data (no --eval-data, no validation split in --data), hold out this seeded "
    "share of the training rows for it, at most 500 (0: none).",
)
@click.option(
    "--report-to",
    multiple=True,
    type=click.Choice(["tensorboard", "wandb", "mlflow"]),
    show_default="metrics.jsonl only",
    help="Also send the metrics to TensorBoard (event files in tensorboard/), W&B (offline) or MLflow "
    "(a file store in mlruns/); repeat for several. metrics.jsonl is always written.",
)
@click.option(
    "--packing",
    is_flag=True,
    help="Causal LM / chat: put several training examples in each row of --max-length tokens, each attending "
    "only to itself (fewer padded tokens; checked on the first row to give the unpacked loss).",
)
@click.option("--output", default="runs/default", type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
@click.option("--overwrite", is_flag=True, help="Replace the run in a non-empty --output.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations to save memory.")
@click.option(
    "--compile",
    "compile_blocks",
    is_flag=True,
    help="torch.compile each transformer block (compiles first; no measured gain on CPUs, meant for GPUs).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    help="auto: this process's GPU when there is one (NCCL with torchrun), else the CPU.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    help="Forward pass under autocast (weights, gradients, optimizer stay fp32). auto: bf16 on a GPU that has it, "
    "else fp32; fp16 adds loss scaling.",
)
@click.option("--fsdp", is_flag=True, help="Shard the model with FSDP across processes (with torchrun).")
@click.option(
    "--forgetting/--no-forgetting",
    default=True,
    help="Measure the base model's loss on held-out general text before and after.",
)
@click.option(
    "--test/--no-test",
    "test_eval",
    default=True,
    help="Evaluate on the test split before and after training.",
)
@friendly_errors
def train(**options: Any) -> None:
    """Fine-tune a model: progress bar, evaluation, checkpoints, and a summary of PEFT's promises.

    Each method trains at its own defaults (learning rate, warmup, virtual tokens and their start,
    targets), shown per method below; an option given on the command line or in --config wins.
    """
    from deltatune.run import run_training

    given = given_options()
    step_budget(options, given)
    try:
        run_training(options, given)
    except KeyboardInterrupt:
        if (Path(options["output"]) / "checkpoint-latest").is_file():
            click.echo("\ninterrupted: a checkpoint was saved; continue with the same command plus --resume", err=True)
        else:
            click.echo("\ninterrupted before training started: nothing was saved", err=True)
        sys.exit(130)


def step_budget(options: dict[str, Any], given: set[str]) -> None:
    """A flag given beats a default not given: ``--epochs`` alone trains by epochs."""
    if "epochs" in given and "max_steps" not in given:
        options["max_steps"] = 0
        given.add("max_steps")
    elif "epochs" in given and options["max_steps"]:
        logging.getLogger("deltatune").warning(
            "--max-steps %d and --epochs %g both given: --max-steps rules (pass --max-steps 0 to train by epochs)",
            options["max_steps"],
            options["epochs"],
        )


# compare decides these per sub-run (or they make no sense across methods)
COMPARE_PER_RUN = ("method", "output", "resume", "overwrite", "seed", "max_train", "lr", "test_eval")


def _compare(**options: Any) -> None:
    """Fine-tune every method on the same data, split, budget and seed, and report PEFT's promises.

    Each method trains at its own defaults (or, with --lr-sweep, at the best of three learning
    rates on validation) in a sub-run under OUTPUT/runs/; an interrupted compare continues without
    repeating finished sub-runs. Writes compare.json, report.md and report.html.
    """
    from deltatune.compare import run_compare

    given = given_options()
    step_budget(options, given)
    try:
        result = run_compare(options, given)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: run the same command again to continue (finished sub-runs are kept)", err=True)
        sys.exit(130)
    click.echo(f"{len(result['rows'])} rows; report: {Path(options['output']) / 'report.html'}")


compare = click.Command(
    "compare",
    callback=friendly_errors(_compare),
    help=_compare.__doc__,
    params=[p for p in train.params if p.name not in COMPARE_PER_RUN]
    + [
        click.Option(
            ["--methods"],
            default="full,lora,dora,ia3,adapter,prefix,prompt,ptuning",
            help="Methods to compare, comma-separated.",
        ),
        click.Option(["--data-sizes"], default="all", help="Training-set sizes, nested subsets, e.g. 32,128,512,all."),
        click.Option(["--seeds"], default="0", help="Seeds, e.g. 0,1,2 (the report gives mean and spread)."),
        click.Option(["--lr-sweep"], is_flag=True, help="Each method at the best of 1/3, 1, 3 x its default lr."),
        click.Option(["--output"], required=True, type=click.Path(file_okay=False), help="Compare folder."),
    ],
)
main.add_command(compare)


@main.command("eval")
@config_option
@run_model_option
@quantize_option
@adapter_option(help_text="Run folder or adapter folder to evaluate (none: the base model).")
@eval_data_options
@click.option("--split", default="test", help="Split of a built-in data set.")
@click.option("--max-examples", default=0, type=COUNT, help="Evaluate at most N examples (0: all).")
@click.option("--eval-batch-size", default=32, type=AT_LEAST_ONE, help="Batch size.")
@click.option(
    "--without-adapter",
    is_flag=True,
    help="Evaluate the base model with the adapter's task (labels, prompt) and its weights left off: zero-shot.",
)
@click.option(
    "--predictions",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write one JSON line per example (row, text, label, prediction, correct) to this file.",
)
@friendly_errors
def eval_command(**options: Any) -> None:
    """Metrics of a model (with or without an adapter) on a data split, with the adapter's own labels."""
    from deltatune.commands import run_eval

    click.echo(json.dumps(run_eval(options, given_options()), indent=2))


@main.command()
@run_model_option
@quantize_option
@adapter_option()
@click.option("--prompt", default=None, help="One prompt; without it (and --prompts), an interactive chat.")
@click.option(
    "--prompts",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A file of prompts (one per line, or JSON lines with 'prompt'); replies as JSON lines.",
)
@click.option("--raw", is_flag=True, help="Send prompts as typed, not in a classification run's instruction.")
@click.option("--max-new-tokens", default=128, type=AT_LEAST_ONE, help="Tokens to generate per reply.")
@click.option("--temperature", default=0.0, type=NON_NEGATIVE, help="0: greedy decoding.")
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True), help="Nucleus sampling mass.")
@click.option("--top-k", default=0, type=COUNT, help="Sample from the K likeliest tokens (0: all).")
@click.option("--repetition-penalty", default=1.0, type=POSITIVE, help="Penalty for repeated tokens (1: none).")
@click.option("--num-beams", default=1, type=AT_LEAST_ONE, help="Beam search width (1: none; no streaming above 1).")
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@friendly_errors
def generate(**options: Any) -> None:
    """Generate text, streaming tokens, from a prompt, a file of prompts or an interactive chat."""
    from deltatune.commands import run_generate

    run_generate(options, given_options())


@main.command()
@run_model_option
@click.option(
    "--quantize",
    type=click.Choice(["none", "nf4", "fp4", "int8"]),
    default="none",
    help="Merge into a 4/8-bit base (requantized; rounding reported) instead of the float one.",
)
@adapter_option(required=True)
@click.option("--output", required=True, type=click.Path(), help="Folder for the merged model.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Weights' type.")
@click.option("--max-shard-size", default=None, help="Largest weights file, e.g. 2GB (default: transformers').")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output.")
@friendly_errors
def merge(**options: Any) -> None:
    """Merge an adapter into its base model and save it in transformers format."""
    from deltatune.commands import run_merge

    click.echo(f"merged model written to {run_merge(options)}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def inspect(directory: str, as_json: bool) -> None:
    """Describe a run folder, an adapter or a model folder: method, targets, size, base model, labels."""
    from deltatune.commands import describe_adapter

    info = describe_adapter(Path(directory))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "options":
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>22}: {value}")


@main.command()
@click.option("--model", default="smollm2-135m-instruct", help="Embedded model name or local model folder to serve.")
@click.option("--adapter", multiple=True, help="NAME=PATH: an adapter (run folder or adapter folder) served as NAME.")
@click.option(
    "--adapter-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder from which clients may load adapters (POST /v1/adapters); without it they can load none.",
)
@quantize_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto: a GPU if any.")
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), help="Port to listen on (0: any free one).")
@click.option("--max-batch", default=32, type=AT_LEAST_ONE, help="Rows decoding together at most.")
@click.option("--max-queue", default=256, type=AT_LEAST_ONE, help="Waiting requests at most (then 429).")
@click.option("--max-tokens", default=256, type=AT_LEAST_ONE, help="Reply length for requests that give none.")
@click.option("--request-timeout", default=600.0, type=NON_NEGATIVE, help="Seconds a request may take (0: no limit).")
@click.option("--drain-timeout", default=0.0, type=NON_NEGATIVE, help="Seconds SIGTERM waits for requests (0: all).")
@click.option("--api-key", default=None, envvar="DELTATUNE_API_KEY", help="Require Authorization: Bearer KEY.")
@friendly_errors
def serve(**options: Any) -> None:
    """Serve the base model and its adapters behind an OpenAI-compatible API, batching requests together."""
    from deltatune.serving.server import run_server

    run_server(options)


@main.command()
def models() -> None:
    """The embedded models (no download needed)."""
    from deltatune.models import list_models

    for row in list_models():
        state = "installed" if row["installed"] else "not installed"
        if row.get("cached"):
            state += ", converted"
        click.echo(f"{row['name']:<24} {row['kind']:<10} {state:<24} {row['description']}")


@main.command()
def datasets() -> None:
    """The built-in data sets (no download needed)."""
    from deltatune.data import BUILTIN_DATASETS

    for info in BUILTIN_DATASETS.values():
        click.echo(f"{info.name:<16} {info.task:<9} splits: {', '.join(info.splits):<24} {info.description}")


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


if __name__ == "__main__":
    main()
