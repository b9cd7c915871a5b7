"""The ``deltatune`` command line, end to end on tiny random models (in-process with click's CliRunner)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification, LlamaForCausalLM

import deltatune.run
from deltatune.cli import METHODS, main
from deltatune.data import general_text
from deltatune.losses import plain_head
from deltatune.peft_model import PeftModel
from deltatune.registry import trainable_methods
from deltatune.tasks import CausalLM, LabelGeneration, LabelSpace
from tiny_assets import (
    adapter_tensors,
    assert_label_loss_as_alone,
    check_ok,
    classification_rows,
    eval_json,
    invoke,
    read_jsonl,
    run_deltatune,
    session_assets,
    train_args,
    write_csv,
    write_jsonl,
)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def fresh_llama(assets) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(assets.llama).eval()


def probe_inputs(assets) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    return tokenizer(
        ["The film was great.", "A dull plot, the cast was clumsy and tedious."], return_tensors="pt", padding=True
    )


def logits_of(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_same_metrics(got: dict, want: dict) -> None:
    for key in ("accuracy", "macro_f1", "exact_match", "examples"):
        if key in want:
            assert got[key] == want[key], key
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)


# -- help, listings ------------------------------------------------------------------------------
def wide_help(*args: str) -> str:
    from click.testing import CliRunner

    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=400, max_content_width=400)
    return check_ok(result).output


def option_lines(text: str) -> dict[str, str]:
    """Each option's entry on a click help page as one line (continuation lines joined)."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"\s{1,4}-", line):
            entries.append(line)
        elif entries and line.startswith(" " * 10) and line.strip():
            entries[-1] += " " + line.strip()
    lines = {}
    for entry in entries:
        head = re.match(r"\s+(-[\w-]+(?:, -[\w-]+)*(?: / --[\w-]+)?)", entry).group(1)
        for name in re.findall(r"--?[\w-]+", head):
            lines[name] = entry
    return lines


def test_group_help_lists_every_command():
    text = wide_help()
    for command in ("train", "eval", "generate", "merge", "inspect", "models", "datasets"):
        assert re.search(rf"^\s+{command}\s", text, re.M), command


def test_train_help_shows_every_option_with_its_default():
    from deltatune.cli import train

    lines = option_lines(wide_help("train"))
    for param in train.params:
        if param.name in ("config",):
            assert "--config" in lines
            continue
        name = param.opts[0]
        assert name in lines, f"{name} missing from train --help"
        if param.default is not None and (not getattr(param, "is_flag", False) or param.secondary_opts):
            assert "[default: " in lines[name], f"{name} shows no default: {lines[name]!r}"
    assert "lora/dora: 0.0005" in lines["--lr"] and "adalora/boft/loha/lokr: 0.002" in lines["--lr"]
    assert "oft: 0.0002" in lines["--lr"]
    assert "vera: 0.01" in lines["--lr"] and "x>0" in lines["--lr"]
    assert "lora/dora: 16; adalora/loha/lokr: 8; vera: 256); x>=1]" in lines["--r"] and lines["--r"] is lines["--rank"]
    assert "lora/dora: 32.0; adalora/loha: 16; lokr: 8" in lines["--alpha"]
    assert "[default: (70; seq-cls: 600); x>=0]" in lines["--max-steps"]
    assert "[default: runs/default]" in lines["--output"]
    assert "[default: lora]" in lines["--method"]
    assert "[" + "|".join(METHODS) + "]" in lines["--method"]
    assert set(METHODS) == set(trainable_methods())


@pytest.mark.parametrize("command", ["eval", "generate", "merge"])
def test_other_commands_help_show_defaults(command):
    lines = option_lines(wide_help(command))
    assert "[default: (the adapter's base model, else smollm2-135m-instruct)]" in lines["--model"]


def test_models_lists_the_embedded_models():
    output = check_ok(invoke("models")).output
    assert re.search(r"^smollm2-135m-instruct\s+causal-lm\s", output, re.M)
    assert re.search(r"^minilm-l6\s+encoder\s", output, re.M)


def test_datasets_lists_the_builtin_sets():
    output = check_ok(invoke("datasets")).output
    assert re.search(r"^rotten-tomatoes\s", output, re.M)
    assert re.search(r"^chatterbot\s", output, re.M)


# -- --config files --------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """Replace run_training by a recorder of the options the CLI passes it."""
    seen: list[dict] = []
    monkeypatch.setattr(deltatune.run, "run_training", lambda options, given=(): seen.append(options) or {})
    return seen


YAML_CONFIG = """\
method: dora
r: 4
lr: 0.01
max-steps: 2
targets: q_proj,v_proj
schedule: cosine
forgetting: false
"""

TOML_CONFIG = """\
method = "ia3"
lr = 0.02
max_steps = 3
batch-size = 4
gradient_checkpointing = true
"""


def test_yaml_config_sets_options(tmp_path, captured):
    config = tmp_path / "run.yaml"
    config.write_text(YAML_CONFIG)
    check_ok(invoke("train", "--config", config))
    options = captured[-1]
    assert options["method"] == "dora" and options["r"] == 4 and options["lr"] == 0.01
    assert options["max_steps"] == 2 and options["targets"] == "q_proj,v_proj" and options["schedule"] == "cosine"
    assert options["forgetting"] is False
    assert options["batch_size"] == 8  # untouched options keep their defaults


def test_toml_config_sets_options(tmp_path, captured):
    config = tmp_path / "run.toml"
    config.write_text(TOML_CONFIG)
    check_ok(invoke("train", "--config", config))
    options = captured[-1]
    assert options["method"] == "ia3" and options["lr"] == 0.02 and options["max_steps"] == 3
    assert options["batch_size"] == 4 and options["gradient_checkpointing"] is True


@pytest.mark.parametrize("flags_first", [False, True], ids=["config-first", "flags-first"])
def test_command_line_flags_override_the_config_file(tmp_path, captured, flags_first):
    config = tmp_path / "run.yaml"
    config.write_text(YAML_CONFIG)
    flags = ["--lr", "0.5", "--method", "lora", "--forgetting", "--rank", "8"]
    args = [*flags, "--config", config] if flags_first else ["--config", config, *flags]
    check_ok(invoke("train", *args))
    options = captured[-1]
    assert options["lr"] == 0.5 and options["method"] == "lora" and options["forgetting"] is True
    assert options["r"] == 8
    assert options["max_steps"] == 2  # still from the file


@pytest.mark.parametrize(
    "suffix,text", [(".yaml", "max-steps: 2\nlearning-rate: 0.1\n"), (".toml", "learning_rate = 0.1\n")]
)
def test_unknown_key_in_config_is_a_clear_error(tmp_path, captured, suffix, text):
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    result = invoke("train", "--config", config)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a usage error, not a traceback
    assert "learning" in result.output and str(config) in result.output and "unknown option" in result.output
    assert not captured


def test_invalid_config_file_is_a_clear_error(tmp_path, captured):
    config = tmp_path / "run.toml"
    config.write_text("lr = [unclosed\n")
    result = invoke("train", "--config", config)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "not valid TOML" in result.output


# -- a full training run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(assets, tmp_path_factory):
    """One LoRA run with validation, test and forgetting measurements; later tests read its folder."""
    out = tmp_path_factory.mktemp("cli") / "run"
    args = train_args(assets, out, "--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--forgetting")
    result = check_ok(invoke(*args, "--eval-data", assets.cls_eval_csv, "--test-data", assets.cls_eval_csv))
    return out, result


def test_eval_every_below_one_is_a_fraction_of_the_steps(assets, tmp_path):
    out = tmp_path / "fraction"
    args = train_args(assets, out, "--max-steps", "8", "--eval-every", "0.25", "--no-test", "--max-eval", "4")
    check_ok(invoke(*args, "--eval-data", assets.cls_eval_csv))
    evals = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "validation"]
    assert evals == [2, 4, 6, 8]
    result = invoke(*train_args(assets, tmp_path / "odd", "--eval-every", "1.5", "--eval-data", assets.cls_eval_csv))
    assert result.exit_code != 0 and "--eval-every 1.5: give a number of steps, or a fraction" in result.output


def test_train_writes_adapter_metrics_curves_summary(assets, trained_run):
    out, result = trained_run
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r for r in rows if "split" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for row in steps:
        assert row["loss"] > 0 and row["lr"] > 0 and row["tokens_per_s"] > 0
    evals = [r for r in rows if r.get("split") == "validation"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["accuracy"] <= 1 and r["examples"] == 16 for r in evals)

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(out / "curves.png") as image:
        image.verify()
        assert image.size[0] > 100 and image.size[1] > 100


def test_no_test_skips_the_test_evaluations(assets, tmp_path):
    out = tmp_path / "run"
    args = train_args(assets, out, "--max-steps", "1", "--batch-size", "8", "--no-test")
    check_ok(invoke(*args, "--test-data", assets.cls_eval_csv))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["test_before"] is None and summary["test_after"] is None


def test_train_summary_holds_the_evidence(assets, trained_run):
    out, _ = trained_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "label-generation" and summary["method"] == "lora" and summary["steps"] == 4
    weights = adapter_tensors(out / "adapter")
    assert summary["trainable_params"] == sum(t.numel() for t in weights.values())
    assert summary["trainable_percent"] == pytest.approx(100 * summary["trainable_params"] / summary["total_params"])
    assert 0 < summary["trainable_percent"] < 5
    assert summary["wall_seconds"] > 0 and summary["tokens_per_s"] > 0 and summary["peak_memory_mib"] > 0
    assert 0 < summary["adapter_bytes"] < summary["full_model_bytes"]
    model = fresh_llama(assets)
    assert summary["full_model_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    for key in ("test_before", "test_after"):
        assert set(summary[key]) >= {"accuracy", "macro_f1", "loss", "examples"} and summary[key]["examples"] == 16
    assert summary["test_before"]["loss"] != summary["test_after"]["loss"]


def general_text_loss(model: torch.nn.Module, tokenizer) -> float:
    """Mean next-token loss on the forgetting set, one unpadded sentence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sentence in general_text(200):
            ids = tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([ids[-128:]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count


def test_train_summary_forgetting_before_is_the_base_models_loss(assets, trained_run):
    out, _ = trained_run
    forgetting = json.loads((out / "summary.json").read_text())["forgetting"]
    base = general_text_loss(fresh_llama(assets), AutoTokenizer.from_pretrained(assets.llama))
    assert forgetting["general_text_loss_before"] == pytest.approx(base, rel=1e-4)
    assert forgetting["change"] == pytest.approx(
        forgetting["general_text_loss_after"] - forgetting["general_text_loss_before"]
    )
    assert forgetting["general_text_loss_after"] != forgetting["general_text_loss_before"]


def test_eval_command_reproduces_the_runs_test_metrics(assets, trained_run):
    out, _ = trained_run
    summary = json.loads((out / "summary.json").read_text())
    after = eval_json(
        invoke(
            "eval",
            "--model",
            assets.llama,
            "--adapter",
            out / "adapter",
            "--data",
            assets.cls_csv,
            "--test-data",
            assets.cls_eval_csv,
        )
    )
    assert_same_metrics(after, summary["test_after"])
    before = eval_json(
        invoke("eval", "--model", assets.llama, "--data", assets.cls_csv, "--test-data", assets.cls_eval_csv)
    )
    assert_same_metrics(before, summary["test_before"])


def test_eval_of_a_data_file_without_test_data_evaluates_that_file(assets, trained_run):
    """`deltatune eval --data FILE` (no --test-data) evaluates FILE, like --test-data FILE."""
    out, _ = trained_run
    common = ("eval", "--model", assets.llama, "--adapter", out / "adapter")
    expected = eval_json(invoke(*common, "--data", assets.cls_eval_csv, "--test-data", assets.cls_eval_csv))
    assert_same_metrics(eval_json(invoke(*common, "--data", assets.cls_eval_csv)), expected)


def test_merge_writes_a_transformers_model_with_the_adapters_logits(assets, trained_run, tmp_path):
    out, _ = trained_run
    merged_dir = tmp_path / "merged"
    result = check_ok(invoke("merge", "--model", assets.llama, "--adapter", out / "adapter", "--output", merged_dir))
    assert str(merged_dir) in result.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    inputs = probe_inputs(assets)
    with_adapter = PeftModel.from_pretrained(fresh_llama(assets), out / "adapter")
    base = logits_of(fresh_llama(assets), inputs)
    expected = logits_of(with_adapter, inputs)
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(logits_of(merged, inputs), expected, atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(merged_dir)("hi")["input_ids"]


def test_inspect_describes_a_run_and_an_adapter(assets, trained_run):
    out, _ = trained_run
    for folder in (out, out / "adapter"):
        output = check_ok(invoke("inspect", folder)).output
        fields = dict(line.strip().split(": ", 1) for line in output.splitlines() if ": " in line)
        assert fields["method"] == "LORA"
        assert fields["base model"] == str(assets.llama)
        assert "q_proj" in fields["target_modules"] and "down_proj" in fields["target_modules"]
        assert re.fullmatch(r"\d+\.\d\d MiB", fields["adapter size"])
        params = sum(t.numel() for t in adapter_tensors(out / "adapter").values())
        assert fields["adapter parameters"] == f"{params:,}"
    run_output = check_ok(invoke("inspect", out)).output
    assert "trainable share" in run_output and "test accuracy" in run_output


def test_generate_prints_a_reply(assets, trained_run):
    out, _ = trained_run
    result = check_ok(
        invoke(
            "generate", "--model", assets.llama, "--adapter", out / "adapter", "--prompt", "hi", "--max-new-tokens", "5"
        )
    )
    assert result.stdout.strip()


# -- every method ------------------------------------------------------------------------------------
METHOD_FLAGS = {
    "prefix": ["--virtual-tokens", "4"],
    "prompt": ["--virtual-tokens", "4"],
    "ptuning": ["--virtual-tokens", "4"],
    "adapter": ["--reduction-factor", "4"],
}
PEFT_TYPES = {
    "lora": "LORA",
    "dora": "LORA",
    "ia3": "IA3",
    "loha": "LOHA",
    "lokr": "LOKR",
    "vera": "VERA",
    "adalora": "ADALORA",
    "oft": "OFT",
    "boft": "BOFT",
    "ln-tuning": "LN_TUNING",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "ptuning": "P_TUNING",
    "adapter": "BOTTLENECK",
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_its_result_loads(assets, tmp_path, method):
    out = tmp_path / method
    args = train_args(
        assets,
        out,
        "--method",
        method,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--test-data",
        assets.cls_eval_csv,
        *METHOD_FLAGS.get(method, []),
    )
    check_ok(invoke(*args))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == method
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    if method == "full":
        assert summary["trainable_percent"] == 100
        assert not (out / "adapter").exists() and summary["trained"] == "model"
        model = AutoModelForCausalLM.from_pretrained(out / "model")  # a transformers folder, tokenizer included
        assert AutoTokenizer.from_pretrained(out / "model")("hi")["input_ids"]
        from safetensors import safe_open

        with safe_open(str(out / "model" / "model.safetensors"), "pt") as handle:  # the tied embedding once
            assert "lm_head.weight" not in set(handle.keys()) and "model.embed_tokens.weight" in set(handle.keys())
        assert not torch.equal(
            model.model.layers[0].self_attn.q_proj.weight, fresh_llama(assets).model.layers[0].self_attn.q_proj.weight
        )
        after = full_model_metrics(assets, model)
        for folder in (out, out / "model"):  # the tool's own commands take the run and its model folder
            assert_same_metrics(eval_json(invoke("eval", "--adapter", folder, "--data", assets.cls_eval_csv)), after)
    else:
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == PEFT_TYPES[method]
        assert config.get("use_dora", False) == (method == "dora")
        after = eval_json(
            invoke(
                "eval",
                "--model",
                assets.llama,
                "--adapter",
                out / "adapter",
                "--data",
                assets.cls_csv,
                "--test-data",
                assets.cls_eval_csv,
            )
        )
    assert_same_metrics(after, summary["test_after"])


def full_model_metrics(assets, model: torch.nn.Module) -> dict:
    from deltatune.data import load_records
    from deltatune.train import Distributed, evaluate

    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    records = load_records(assets.cls_eval_csv)
    task = LabelGeneration(tokenizer, LabelSpace.from_records(records), max_length=256)
    return evaluate(model, task, task.encode(records), 32, Distributed())


# -- other tasks -----------------------------------------------------------------------------------
def test_seq_cls_with_an_encoder_saves_the_classifier(assets, tmp_path):
    out = tmp_path / "bert"
    args = train_args(
        assets, out, "--max-steps", "2", "--batch-size", "8", "--test-data", assets.cls_eval_csv, model=assets.bert
    )
    check_ok(invoke(*args))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "seq-cls"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "classifier" in (config.get("modules_to_save") or [])
    weights = adapter_tensors(out / "adapter")
    classifier = {k: v for k, v in weights.items() if "classifier" in k}
    assert classifier and any(v.shape == (2, 32) for v in classifier.values())
    initial = BertForSequenceClassification.from_pretrained(assets.bert).classifier.weight
    assert not any(torch.equal(v, initial) for v in classifier.values())  # trained, not the random init
    after = eval_json(
        invoke(
            "eval",
            "--model",
            assets.bert,
            "--adapter",
            out / "adapter",
            "--data",
            assets.cls_csv,
            "--test-data",
            assets.cls_eval_csv,
        )
    )
    assert_same_metrics(after, summary["test_after"])


def test_causal_lm_on_prompt_response_jsonl(assets, tmp_path):
    out = tmp_path / "chat"
    args = train_args(assets, out, "--max-steps", "2", "--batch-size", "8", "--test-data", assets.chat_jsonl)
    check_ok(invoke(*[a if a != str(assets.cls_csv) else str(assets.chat_jsonl) for a in args]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["main_metric"] == "loss"
    assert summary["test_after"]["loss"] < summary["test_before"]["loss"]


def test_causal_lm_loss_covers_response_tokens_only(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    task = CausalLM(tokenizer, max_length=256)
    records = [
        {"prompt": "What did you think of the film?", "response": "It was great."},
        {"prompt": "Hello there, how are you doing today?", "response": "Fine, thanks for asking, and you?"},
    ]
    examples = task.encode(records)
    for record, example in zip(records, examples):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        assert example.labels[:n_head] == [-100] * n_head
        assert example.labels[n_head:] == example.input_ids[n_head:]
        assert tokenizer.decode(example.labels[n_head:]) == record["response"] + "<|im_end|>"
        assert example.units == len(example.input_ids) - n_head

    model = fresh_llama(assets)
    batch = task.collate(examples)
    loss = task.loss_sum(model, batch)
    # by hand on the padded batch, with the full logits
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["lm_labels"]
    by_hand = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100
    )
    torch.testing.assert_close(loss.detach(), by_hand, atol=1e-4, rtol=1e-5)
    # and one unpadded example at a time
    total = 0.0
    for example in examples:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            row_logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(example.labels[1:])
        total += float(F.cross_entropy(row_logits, targets, reduction="sum", ignore_index=-100))
    assert float(loss) == pytest.approx(total, rel=1e-4)
    assert batch["units"] == sum(e.units for e in examples)


def test_label_generation_loss_and_gradients_match_one_example_at_a_time(assets):
    """However a batch is computed (padding, a shared prompt prefix), it equals each prompt run alone."""
    import deltatune as dt

    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    records = classification_rows(6, seed=11)
    task = LabelGeneration(tokenizer, LabelSpace.from_records(records), max_length=256)
    examples = task.encode(records)
    assert len({len(e.input_ids) for e in examples}) > 1  # padding is exercised
    torch.manual_seed(0)
    config = dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = dt.get_peft_model(fresh_llama(assets), config)
    assert_label_loss_as_alone(model, task, examples, task.loss_sum(model, task.collate(examples)))
    with torch.no_grad():
        predictions = task.predict(model, task.collate(examples))
        alone = [
            int(model(input_ids=torch.tensor([e.input_ids])).logits[0, -1, task.answer_ids].argmax()) for e in examples
        ]
    assert predictions == alone
    assert dict(task.head_loss.verdicts) == {plain_head(model): True}  # the head ran outside, on contiguous rows


# -- bad input ---------------------------------------------------------------------------------------
def failure_text(result) -> str:
    """What a failed CLI run told the user (its output, plus the message of an escaped exception)."""
    assert result.exit_code != 0, result.output
    escaped = "" if isinstance(result.exception, SystemExit) else str(result.exception)
    return result.output + escaped


def assert_no_traceback(result) -> None:
    """The run failed as a CLI should: a message and an exit code, not an escaped Python exception."""
    assert isinstance(result.exception, SystemExit), (
        f"the CLI let a {type(result.exception).__name__} escape (a traceback for the user): {result.exception}"
    )
    assert "Traceback" not in result.output


def bad_run(assets, tmp_path, data: Path, *extra: object):
    args = train_args(assets, tmp_path / "out", "--max-steps", "1", "--batch-size", "8")
    args[args.index(str(assets.cls_csv))] = str(data)
    return invoke(*args, *extra)


@pytest.mark.parametrize("task", ["label-generation", "auto"])
def test_csv_missing_the_label_column(assets, tmp_path, task):
    rows = [{"text": r["text"], "sentiment": r["label"]} for r in classification_rows(16, seed=5)]
    data = write_csv(tmp_path / "nolabel.csv", rows)
    result = bad_run(assets, tmp_path, data, "--task", task)
    message = failure_text(result)
    assert str(data) in message
    assert "'text'" in message and "'sentiment'" in message  # the columns the file has
    if task == "label-generation":
        assert "'label'" in message
    assert_no_traceback(result)


def test_empty_text_row_is_an_error_unless_skipped(assets, tmp_path):
    rows = classification_rows(24, seed=6)
    rows[4]["text"] = "  "
    data = write_csv(tmp_path / "empty.csv", rows)
    result = bad_run(assets, tmp_path, data)
    message = failure_text(result)
    assert str(data) in message and re.search(r"\brow 5\b", message) and "'text'" in message
    check_ok(bad_run(assets, tmp_path, data, "--on-bad-row", "skip"))
    assert_no_traceback(result)


def test_wrong_typed_label_row_is_an_error_unless_skipped(assets, tmp_path):
    rows = classification_rows(24, seed=6)
    rows[3]["label"] = ["positive"]
    rows[9]["text"] = {"body": "a review"}
    data = tmp_path / "typed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = bad_run(assets, tmp_path, data)
    message = failure_text(result)
    assert str(data) in message and re.search(r"\brow 4\b", message) and "'label'" in message and "list" in message
    assert "--on-bad-row skip" in message
    assert_no_traceback(result)
    check_ok(bad_run(assets, tmp_path, data, "--on-bad-row", "skip"))


def test_test_label_never_seen_in_training(assets, tmp_path):
    rows = classification_rows(16, seed=7)
    rows[2]["label"] = "meh"
    test_file = write_csv(tmp_path / "test.csv", rows)
    result = bad_run(assets, tmp_path, assets.cls_csv, "--test-data", test_file)
    message = failure_text(result)
    assert "'meh'" in message and "not seen in training" in message
    assert str(test_file) in message and re.search(r"\b(row|record) 3\b", message)
    assert_no_traceback(result)


def long_rows() -> list[dict[str, str]]:
    rows = classification_rows(24, seed=8)
    rows[6]["text"] = "The film was long. " + " ".join(["very"] * 120)
    return rows


def test_text_longer_than_max_length_with_on_long_error(assets, tmp_path):
    data = write_csv(tmp_path / "long.csv", long_rows())
    result = bad_run(assets, tmp_path, data, "--max-length", "96", "--on-long", "error")
    message = failure_text(result)
    assert str(data) in message and re.search(r"\b(row|record) 7\b", message) and "max_length=96" in message
    assert_no_traceback(result)


def test_text_longer_than_max_length_is_truncated_by_default(assets, tmp_path):
    data = write_csv(tmp_path / "long.csv", long_rows())
    check_ok(bad_run(assets, tmp_path, data, "--max-length", "96"))
    # the truncated prompt keeps its end, where the answer follows
    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    task = LabelGeneration(tokenizer, LabelSpace(["neg", "pos"]), max_length=96, on_long="truncate")
    full = tokenizer(task.prompt(long_rows()[6]["text"]), add_special_tokens=False)["input_ids"]
    (example,) = task.encode([long_rows()[6]])
    assert len(full) > 96 and len(example.input_ids) == 96
    assert example.input_ids[-20:] == full[-20:] and example.input_ids[:5] == full[:5]


def test_bad_input_in_a_real_process_prints_no_traceback(assets, tmp_path):
    rows = classification_rows(16, seed=9)
    rows[2]["label"] = "meh"
    test_file = write_csv(tmp_path / "test.csv", rows)
    args = train_args(assets, tmp_path / "out", "--max-steps", "1", "--test-data", str(test_file))
    result = run_deltatune(*args, timeout=240)
    assert result.returncode not in (0, -9), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "'meh'" in result.stdout + result.stderr


def test_missing_data_file_is_a_clear_error(assets, tmp_path):
    result = bad_run(assets, tmp_path, tmp_path / "nope.csv")
    message = failure_text(result)
    assert "nope.csv" in message
    assert_no_traceback(result)


def test_label_generation_on_a_file_without_labels_names_the_file(assets, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}] * 8)
    result = bad_run(assets, tmp_path, data, "--task", "label-generation")
    message = failure_text(result)
    assert str(data) in message and "'label'" in message
    assert_no_traceback(result)


def test_a_run_shows_no_import_time_warnings_of_optional_libraries(assets):
    """transformers imports torchao whenever it is installed; its import-time warnings (kernels for
    other devices and Python builds) are nothing a user can act on and stay out of a run's output."""
    import subprocess
    import sys

    pytest.importorskip("torchao")
    command = [sys.executable, "-m", "deltatune", "eval", "--model", str(assets.llama), "--data", str(assets.cls_csv)]
    done = subprocess.run([*command, "--max-examples", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout
    for noise in ("Failed to load", "Detected no triton", "register_constant"):
        assert noise not in done.stderr, done.stderr
