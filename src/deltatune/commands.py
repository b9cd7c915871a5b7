"""``deltatune eval``, ``generate``, ``merge`` and ``inspect``: they read a run, not the defaults.

Each takes ``--adapter`` as a run folder, an adapter folder or a fully fine-tuned model folder
(:func:`deltatune.run_folder.resolve_trained`) and from it the base model (unless ``--model`` is
given) and the task spec: labels in the order the adapter learnt them, label words, instruction,
columns and longest input. An adapter saved outside ``deltatune train`` has no spec; its task then
comes from the data, as for a base model.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from deltatune import data as datasets
from deltatune.atomic import atomic_write_bytes
from deltatune.checkpoint import CheckpointError, CorruptCheckpointError
from deltatune.config import CONFIG_NAME, PeftConfig
from deltatune.models import EMBEDDED_MODELS, load_model
from deltatune.peft_model import PeftModel
from deltatune.run import (
    check_max_length,
    load_for_task,
    model_family,
    model_record,
    save_model_folder,
    task_spec,
)
from deltatune.run_data import choose_task, load_split, read_records, required_columns
from deltatune.run_folder import SUMMARY_FILE, TaskSpec, Trained, make_task, read_summary, resolve_trained
from deltatune.train import Distributed, evaluate

logger = logging.getLogger("deltatune")

DEFAULT_MODEL = "smollm2-135m-instruct"
SPEC_COLUMNS = ("text_column", "label_column", "prompt_column", "response_column", "max_length")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- the model a command runs ---------------------------------------------------------------------
def base_model_for(trained: Trained | None, model: str | None) -> str:
    """``--model`` when given, else the adapter's own base model, else the embedded default."""
    if trained is not None and trained.full:
        if model:
            raise ValueError(
                f"{trained.folder} is a fully fine-tuned model, not an adapter for --model {model}; drop --model"
            )
        return str(trained.folder)
    recorded = trained.base_model if trained is not None else None
    if model:
        if recorded and model_record(model) != recorded and model != recorded:
            logger.warning("%s was trained on %s; loading it onto %s as --model asks", trained.folder, recorded, model)
        return model
    if recorded and recorded not in EMBEDDED_MODELS and not Path(recorded).is_dir():
        raise ValueError(
            f"the adapter in {trained.folder} was trained on {recorded}, which is not an embedded model nor an "
            "existing folder here; pass --model with that base model"
        )
    return recorded or DEFAULT_MODEL


def attach(model: torch.nn.Module, trained: Trained | None, model_name: str) -> torch.nn.Module:
    """The adapter on the base model; a base it does not fit is an error naming both models."""
    if trained is None or trained.full:
        return model
    try:
        return PeftModel.from_pretrained(model, trained.folder)
    except CorruptCheckpointError:
        raise
    except ValueError as err:  # shapes or module names that differ: a checkpoint for another model
        recorded = trained.base_model
        raise ValueError(
            f"the adapter in {trained.folder} does not fit {model_name}"
            + (f" (it was trained on {recorded}; pass --model {recorded})" if recorded else "")
            + f": {err}"
        ) from err


def _trained(adapter: str | None) -> Trained | None:
    return resolve_trained(adapter) if adapter else None


def _run_options(trained: Trained | None) -> dict[str, Any]:
    if trained is None or trained.run is None:
        return {}
    return (read_summary(trained.run) or {}).get("options") or {}


# -- eval -----------------------------------------------------------------------------------------
def run_eval(options: dict[str, Any], given: Collection[str] = ()) -> dict[str, Any]:
    """Metrics on a split of a built-in set or on a file, with the adapter's own labels and prompt.

    The data: ``--test-data`` or ``--data`` when given, else the run's own test data.
    """
    trained = _trained(options.get("adapter"))
    without = bool(options.get("without_adapter"))
    if without and trained is None:
        raise ValueError("--without-adapter takes the task of an --adapter (run folder) and leaves its weights off")
    if without and trained.spec is not None and trained.spec.base_model and not options.get("model"):
        model_name = trained.spec.base_model  # a full fine-tune's own base, too
    else:
        model_name = base_model_for(trained, options.get("model"))
    options = {**options}
    run_options = _run_options(trained)
    if "data" not in given and "test_data" not in given and run_options:  # the run's own test, as it ran
        options["data"], options["test_data"] = run_options.get("data", options["data"]), run_options.get("test_data")
        if not options["test_data"] and options["data"] not in datasets.BUILTIN_DATASETS:
            raise ValueError(
                f"the run in {trained.run} had no test data (it trained on {options['data']}); "
                "name the file to evaluate with --data"
            )
        if "max_examples" not in given:
            options["max_examples"] = run_options.get("max_test", 0)
    data_file = options.get("test_data") or (None if options["data"] in datasets.BUILTIN_DATASETS else options["data"])
    if data_file and "split" in given:
        raise ValueError(f"--split applies to built-in data sets; the file {data_file} is evaluated whole")
    spec = trained.spec if trained is not None else None
    if spec is not None:
        if "task" in given and options["task"] not in ("auto", spec.kind):
            raise ValueError(f"--task {options['task']}: {trained.folder} was trained for {spec.kind}")
        options.update({k: getattr(spec, k) for k in SPEC_COLUMNS if k not in given})
        spec = TaskSpec(**{**spec.__dict__, **{k: options[k] for k in SPEC_COLUMNS}})
    if data_file:
        records, name = read_records(data_file, None, options["on_bad_row"]), str(data_file)
        split = None
    else:
        records, name = load_split(options, options["split"], None)
        split = name.split("(")[-1].rstrip(")")
    if spec is None:
        spec = _spec_from_data(options, model_name, records, data_file)
    columns = required_columns(spec.kind, options, records[0])
    if data_file:
        records = read_records(data_file, columns, options["on_bad_row"])
    records = records[: options["max_examples"]] if options["max_examples"] else records
    if options.get("predictions") and not spec.is_classification:
        raise ValueError("--predictions applies to classification; for prompt/response data use deltatune generate")
    check_max_length(model_name, spec.max_length)
    model, tokenizer = load_for_task(model_name, spec.kind, spec.num_labels or 2, options.get("quantize") or "none")
    if not without:
        model = attach(model, trained, model_name)
    task = make_task(spec, tokenizer, options["on_long"])
    examples, kept = _encode_keeping_rows(task, records, name)
    metrics = evaluate(model, task, examples, options["eval_batch_size"], Distributed())
    if options.get("predictions"):
        _write_predictions(Path(options["predictions"]), model, task, spec, records, examples, kept, options)
    return {
        **metrics,
        "task": spec.kind,
        "data": name,
        "split": split,
        "labels": spec.labels,
        "model": model_name,
        "adapter": str(trained.folder) if trained is not None and not without else None,
    }


def _spec_from_data(
    options: dict[str, Any], model_name: str, records: list[dict[str, Any]], data_file: str | None
) -> TaskSpec:
    """No saved spec (a base model, or an adapter from elsewhere): the task and labels from the data."""
    kind = choose_task(options["task"], model_family(model_name), records, options)
    if kind == "causal-lm" and options["prompt_column"] not in records[0]:
        options["prompt_column"] = None
    label_source = records
    if options["data"] in datasets.BUILTIN_DATASETS and kind in ("label-generation", "seq-cls"):
        label_source = datasets.load_dataset(options["data"], "train")
    elif kind in ("label-generation", "seq-cls"):
        logger.warning("no saved label set: the labels come from %s itself", data_file)
    return task_spec(kind, label_source, options, model_record(model_name))


def _encode_keeping_rows(task: Any, records: list[dict[str, Any]], name: str) -> tuple[list[Any], list[int]]:
    """Encoded examples and the data row each came from (``--on-long skip`` drops some)."""
    examples, kept = [], []
    for row, record in enumerate(records, start=1):
        example = task.encode_one(record, f"{name}: record {row}")
        if example is not None:
            examples.append(example)
            kept.append(row)
    if not examples:
        raise datasets.DataError(f"{name}: no usable records")
    return examples, kept


def _write_predictions(
    path: Path,
    model: torch.nn.Module,
    task: Any,
    spec: TaskSpec,
    records: list[dict[str, Any]],
    examples: list[Any],
    kept: list[int],
    options: dict[str, Any],
) -> None:
    """One JSON line per example: the row, its text, its label, the prediction and whether it is right."""
    model.eval()
    lines = []
    size = options["eval_batch_size"]
    with torch.no_grad():
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            predicted = task.predict(model, task.collate(chunk))
            for example, index in zip(chunk, predicted):
                row = kept[len(lines)]
                record = records[row - 1]
                label = spec.labels[index]
                lines.append(
                    {
                        "row": row,
                        "text": record[spec.text_column],
                        "label": str(record[spec.label_column]),
                        "prediction": label,
                        "correct": index == example.target,
                    }
                )
    atomic_write_bytes(path, "".join(json.dumps(line) + "\n" for line in lines).encode())


# -- generate -------------------------------------------------------------------------------------
def run_generate(options: dict[str, Any], given: Collection[str] = ()) -> None:
    """Replies to one prompt, a file of prompts (JSON lines out) or an interactive chat, streamed."""
    from transformers import TextStreamer

    if options.get("prompt") is not None and options.get("prompts"):
        raise ValueError("give --prompt or --prompts, not both")
    if options.get("temperature", 0.0) == 0:
        unused = [f"--{k.replace('_', '-')}" for k in ("top_p", "top_k", "seed") if k in given]
        if unused:
            logger.warning("%s apply to sampling: give --temperature above 0, or they do nothing", ", ".join(unused))
    trained = _trained(options.get("adapter"))
    model_name = base_model_for(trained, options.get("model"))
    spec = trained.spec if trained is not None else None
    if spec is not None and spec.kind == "seq-cls":
        raise ValueError(f"{trained.folder} is a classifier with a head, not a generator; use deltatune eval")
    seq2seq = (spec.kind == "seq2seq") if spec is not None else model_family(model_name) == "seq2seq"
    model, tokenizer = load_model(
        model_name,
        task="seq2seq" if seq2seq else "causal-lm",
        allow_hub=False,
        quantize=options.get("quantize") or "none",
    )
    model = attach(model, trained, model_name)
    model.eval()
    template = make_task(spec, tokenizer) if spec is not None and spec.kind == "label-generation" else None
    if template is not None and not options.get("raw"):
        logger.info(
            "classification adapter: each prompt goes into the run's instruction (answers: %s); "
            "--raw sends it as typed",
            ", ".join(template.words),
        )
    elif template is None and options.get("raw"):
        logger.warning("--raw applies to a label-generation adapter's instruction; prompts go in as typed anyway")
    if options.get("seed") is not None:
        torch.manual_seed(options["seed"])
    prompts_file = options.get("prompts")
    beams = options.get("num_beams", 1)
    streamer = (
        None if (prompts_file or beams > 1) else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    )
    history: list[dict[str, str]] = []

    def reply(text: str, keep_history: bool) -> str:
        if template is not None and not options.get("raw"):
            prompt_text = template.prompt(text)
            ids = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)
        else:
            turns = (history if keep_history else []) + [{"role": "user", "content": text}]
            if getattr(tokenizer, "chat_template", None) and not seq2seq:
                ids = tokenizer.apply_chat_template(
                    turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                ids = tokenizer(text, return_tensors="pt")
        output = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=options["max_new_tokens"],
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **sampling_options(options),
        )
        start = 0 if seq2seq else ids["input_ids"].shape[1]  # a decoder-only model returns the prompt too
        answer = tokenizer.decode(output[0, start:], skip_special_tokens=True)
        if keep_history:
            history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        return answer

    if prompts_file:
        for prompt in read_prompts(Path(prompts_file)):
            print(json.dumps({"prompt": prompt, "reply": reply(prompt, keep_history=False)}), flush=True)
        return
    if options.get("prompt") is not None:
        answer = reply(options["prompt"], keep_history=False)
        if streamer is None:
            print(answer)
        return
    print("interactive chat; an empty line or Ctrl-D ends it")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer = reply(text, keep_history=template is None)
        if streamer is None:
            print(answer)


def sampling_options(options: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s decoding arguments: greedy at temperature 0, else sampling with top-p/top-k."""
    chosen: dict[str, Any] = {"num_beams": options.get("num_beams", 1)}
    if options.get("repetition_penalty", 1.0) != 1.0:
        chosen["repetition_penalty"] = options["repetition_penalty"]
    if options.get("temperature", 0.0) > 0:
        chosen.update(do_sample=True, temperature=options["temperature"])
        chosen["top_p"] = options.get("top_p", 1.0)
        chosen["top_k"] = options.get("top_k", 0) or None
    else:
        chosen["do_sample"] = False
        chosen.update(temperature=None, top_p=None, top_k=None)
    return chosen


def read_prompts(path: Path) -> list[str]:
    """A prompts file: JSON lines with a ``prompt`` field (``.jsonl``), or one prompt per line."""
    if path.suffix.lower() == ".jsonl":
        return [str(r["prompt"]) for r in datasets.load_records(path, columns=["prompt"])]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise datasets.DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise datasets.DataError(f"{path}: no prompts (one per line, or JSON lines with a 'prompt' field)")
    return prompts


# -- merge ----------------------------------------------------------------------------------------
def run_merge(options: dict[str, Any]) -> Path:
    """The adapter merged into its base model, saved as a transformers folder (atomically)."""
    trained = resolve_trained(options["adapter"])
    output = Path(options["output"])
    _check_merge_output(output, trained, bool(options.get("overwrite")))
    model_name = base_model_for(trained, options.get("model"))
    quantize = options.get("quantize") or "none"
    if quantize != "none" and (trained.full or options.get("dtype", "fp32") != "fp32"):
        raise ValueError(
            f"--quantize {quantize} merges into a {quantize} base, which keeps its own storage: "
            + ("a full fine-tune has no adapter to merge" if trained.full else "leave --dtype at fp32")
        )
    if trained.full:
        kind = {"seq-cls": "seq-cls", "seq2seq": "seq2seq"}.get(trained.spec.kind if trained.spec else "", "causal-lm")
        num_labels = (trained.spec.num_labels if trained.spec else None) or 2
        merged, tokenizer = load_model(model_name, task=kind, num_labels=num_labels, allow_hub=False)
    else:
        config = PeftConfig.from_pretrained(trained.folder)
        kind = {"SEQ_CLS": "seq-cls", "SEQ_2_SEQ_LM": "seq2seq"}.get(str(config.task_type), "causal-lm")
        num_labels = (trained.spec.num_labels if trained.spec else None) or 2
        model, tokenizer = load_model(model_name, task=kind, num_labels=num_labels, allow_hub=False, quantize=quantize)
        merged = attach(model, trained, model_name).merge_and_unload()
    if quantize == "none":
        merged = merged.to(DTYPES[options.get("dtype", "fp32")])
    spec = trained.spec
    if spec is not None:
        spec = TaskSpec(**{**spec.__dict__, "base_model": None})
    save_model_folder(merged, output, tokenizer, spec, max_shard_size=options.get("max_shard_size"))
    return output


def _check_merge_output(output: Path, trained: Trained, overwrite: bool) -> None:
    protected = [trained.folder.resolve()] + ([trained.run.resolve()] if trained.run else [])
    target = output.resolve()
    for folder in protected:
        if target == folder or folder in target.parents or target in folder.parents:
            raise ValueError(f"--output {output} would overwrite the adapter's own folder {folder}; choose another")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ValueError(f"--output {output} is not empty; pass --overwrite to replace it, or choose another folder")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a folder")


# -- inspect --------------------------------------------------------------------------------------
def describe_adapter(directory: Path) -> dict[str, Any]:
    """Method, targets, size, base model, task and labels and, for a run folder, its options and results."""
    trained = resolve_trained(directory)
    info: dict[str, Any] = {}
    if trained.full:
        info["method"] = "FULL"
        info["model folder"] = str(trained.folder)
        weights = sorted(trained.folder.glob("*.safetensors"))
        count = sum(_tensor_count(w) for w in weights)
        info["parameters"] = f"{count:,}"
        info["model size"] = f"{sum(w.stat().st_size for w in weights) / 2**20:.2f} MiB"
    else:
        config = PeftConfig.from_pretrained(trained.folder)
        weights_file = trained.folder / "adapter_model.safetensors"
        if not weights_file.is_file():
            raise CheckpointError(f"{trained.folder} has {CONFIG_NAME} but no adapter_model.safetensors")
        info.update(
            {
                "method": str(config.peft_type),
                "task type": str(config.task_type),
                "base model": trained.base_model,
                "adapter parameters": f"{_tensor_count(weights_file):,}",
                "adapter size": f"{weights_file.stat().st_size / 2**20:.2f} MiB",
            }
        )
        for field in (*config.described, "modules_to_save"):  # each method says what describes it
            if getattr(config, field) not in (None, [], False):
                info[field] = getattr(config, field)
    if trained.spec is not None:
        info["task"] = trained.spec.kind
        if trained.spec.labels:
            info["labels"] = trained.spec.labels
        if trained.spec.label_words:
            info["label words"] = trained.spec.label_words
    if trained.run is not None and (trained.run / SUMMARY_FILE).is_file():
        summary = read_summary(trained.run) or {}
        info["run"] = str(trained.run)
        info["status"] = summary.get("status", "finished")
        if "trainable_percent" in summary:
            info["trainable share"] = f"{summary['trainable_percent']:.3f}%"
        metric = summary.get("main_metric")
        if summary.get("test_before") and summary.get("test_after"):
            info[f"test {metric}"] = f"{summary['test_before'][metric]:.4f} -> {summary['test_after'][metric]:.4f}"
        if summary.get("options"):
            info["options"] = summary["options"]
    return info


def _tensor_count(path: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read ({err})") from err
