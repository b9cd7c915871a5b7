"""The ``deltatune`` command: train, eval, generate, merge, inspect, models, datasets.

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

METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "ptuning", "adapter", "full")
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
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def friendly_errors(command: Any) -> Any:
    """Bad input ends in a one-line message naming the problem, not a traceback (``-v`` shows it)."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, KeyError, FileNotFoundError) as err:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise click.ClickException(str(message)) from err

    return wrapper


def model_options(f: Any) -> Any:
    f = click.option(
        "--model",
        default="smollm2-135m-instruct",
        help="Embedded model name (see `deltatune models`) or a local model folder.",
    )(f)
    return f


def data_options(f: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--data",
                default="rotten-tomatoes",
                help="Built-in data set (see `deltatune datasets`) or a JSONL/CSV/Parquet file.",
            ),
            click.option("--eval-data", default=None, help="File for evaluation (built-in sets use their own splits)."),
            click.option(
                "--test-data", default=None, help="File for the final test (built-in sets: their test split)."
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
            click.option("--max-length", default=256, help="Longest input in tokens."),
            click.option(
                "--on-long",
                type=click.Choice(["truncate", "skip", "error"]),
                default="truncate",
                help="What to do with an input longer than --max-length.",
            ),
            click.option(
                "--on-bad-row",
                type=click.Choice(["error", "skip"]),
                default="error",
                help="What to do with an empty or malformed row in a data file.",
            ),
        ]
    ):
        f = option(f)
    return f


@main.command()
@config_option
@model_options
@click.option("--method", type=click.Choice(METHODS), default="lora", help="What to train.")
@click.option("--r", "--rank", "r", default=16, help="LoRA/DoRA rank (use --rank under torchrun: --r clashes).")
@click.option("--alpha", default=32.0, help="LoRA/DoRA alpha (scale alpha/r).")
@click.option("--dropout", default=0.0, help="LoRA dropout.")
@click.option(
    "--targets", default="all-linear", help="Modules to adapt (LoRA/DoRA/IA3): comma-separated names or 'all-linear'."
)
@click.option("--virtual-tokens", default=20, help="Virtual tokens (prompt, ptuning, prefix).")
@click.option("--reduction-factor", default=16, help="Bottleneck adapter reduction factor.")
@click.option(
    "--placement",
    type=click.Choice(["houlsby", "pfeiffer", "parallel"]),
    default="houlsby",
    help="Bottleneck adapter placement.",
)
@data_options
@click.option("--lr", default=5e-4, help="Peak learning rate.")
@click.option(
    "--schedule",
    type=click.Choice(["linear", "cosine", "constant"]),
    default="linear",
    help="Learning-rate schedule after warmup.",
)
@click.option("--warmup", default=0.05, help="Warmup: a fraction of the steps (< 1) or a number of steps.")
@click.option("--epochs", default=1.0, help="Epochs (ignored when --max-steps is set).")
@click.option("--max-steps", default=70, type=int, help="Optimizer steps (0: use --epochs).")
@click.option("--batch-size", default=8, help="Examples per process per micro-step.")
@click.option("--grad-accum", default=1, help="Micro-steps per optimizer step.")
@click.option("--clip", default=1.0, help="Gradient-norm clipping (0: off).")
@click.option("--weight-decay", default=0.0, help="AdamW weight decay.")
@click.option("--seed", default=0, help="Seed for initialisation, data order and dropout.")
@click.option("--eval-every", default=0, help="Evaluate on the validation set every N steps (0: at the end).")
@click.option("--save-every", default=25, help="Checkpoint every N steps (0: at the end only).")
@click.option("--eval-batch-size", default=32, help="Batch size for evaluation.")
@click.option("--max-train", default=0, help="Use at most N training examples (0: all).")
@click.option("--max-eval", default=128, help="Use at most N validation examples (0: all).")
@click.option("--max-test", default=0, help="Use at most N test examples (0: all).")
@click.option("--output", default="runs/default", type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --output.")
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
    """Fine-tune a model: progress bar, evaluation, checkpoints, and a summary of PEFT's promises."""
    from deltatune.run import run_training

    try:
        run_training(options)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: a checkpoint was saved; continue with the same command plus --resume", err=True)
        sys.exit(130)


@main.command("eval")
@config_option
@model_options
@click.option(
    "--adapter",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder to evaluate (none: the base model).",
)
@data_options
@click.option("--split", default="test", help="Split of a built-in data set.")
@click.option("--max-examples", default=0, help="Evaluate at most N examples (0: all).")
@click.option("--eval-batch-size", default=32, help="Batch size.")
@friendly_errors
def eval_command(**options: Any) -> None:
    """Metrics of a model (with or without an adapter) on a data split."""
    from deltatune.run import run_eval

    click.echo(json.dumps(run_eval(options), indent=2))


@main.command()
@model_options
@click.option("--adapter", default=None, type=click.Path(exists=True, file_okay=False), help="Adapter folder.")
@click.option("--prompt", default=None, help="One prompt; without it, an interactive chat.")
@click.option("--max-new-tokens", default=128, help="Tokens to generate per reply.")
@click.option("--temperature", default=0.0, help="0: greedy decoding.")
@friendly_errors
def generate(model: str, adapter: str | None, prompt: str | None, max_new_tokens: int, temperature: float) -> None:
    """Generate text, streaming tokens, from one prompt or an interactive chat."""
    from deltatune.run import run_generate

    run_generate(model, adapter, prompt, max_new_tokens, temperature)


@main.command()
@model_options
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Adapter folder.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the merged model.")
@friendly_errors
def merge(model: str, adapter: str, output: str) -> None:
    """Merge an adapter into its base model and save it in transformers format."""
    from deltatune.run import run_merge

    click.echo(f"merged model written to {run_merge(model, adapter, output)}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@friendly_errors
def inspect(directory: str) -> None:
    """Describe an adapter folder (or a training run): method, targets, size, base model."""
    from deltatune.run import describe_adapter

    for key, value in describe_adapter(Path(directory)).items():
        click.echo(f"{key:>22}: {value}")


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
