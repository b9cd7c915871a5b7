"""The main job's contract: a run folder carries what is needed to reuse it, and every flag is honoured.

Tiny random models (tests/tiny_assets.py), in-process CLI runs. Each test here failed on the code
before the run folder carried its task spec (commit f2a6542).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import PeftModel
from deltatune.run_folder import TASK_FILE, TaskSpec, make_task
from tiny_assets import (
    adapter_tensors,
    check_ok,
    classification_rows,
    eval_json,
    invoke,
    read_jsonl,
    session_assets,
    train_args,
    write_csv,
    write_jsonl,
)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def failure(result) -> str:
    """The one-line message of a failed command; it must not be a traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output
    return result.output


def three_class_rows(n: int, seed: int) -> list[dict[str, str]]:
    rows = classification_rows(n, seed)
    for i, row in enumerate(rows):
        if i % 3 == 2:
            row["label"] = "mixed"
    return rows


@pytest.fixture(scope="module")
def bert_run(assets, tmp_path_factory):
    """A classifier on three classes (BERT + head): the label set matters for every later command."""
    root = tmp_path_factory.mktemp("bert")
    data = write_csv(root / "train.csv", three_class_rows(48, seed=1))
    test = write_csv(root / "test.csv", three_class_rows(24, seed=2))
    out = root / "run"
    args = train_args(assets, out, "--max-steps", "3", "--batch-size", "8", "--test-data", test, model=assets.bert)
    args[args.index(str(assets.cls_csv))] = str(data)
    check_ok(invoke(*args))
    return out, test


@pytest.fixture(scope="module")
def llama_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama") / "run"
    check_ok(
        invoke(*train_args(assets, out, "--max-steps", "2", "--batch-size", "8", "--test-data", assets.cls_eval_csv))
    )
    return out


# -- 1. labels travel with the adapter ------------------------------------------------------------
def test_the_adapter_folder_holds_the_task_spec(assets, bert_run, llama_run):
    out, _ = bert_run
    spec = json.loads((out / "adapter" / TASK_FILE).read_text())
    assert spec["kind"] == "seq-cls" and spec["labels"] == ["mixed", "neg", "pos"] and spec["num_labels"] == 3
    assert spec["base_model"] == str(assets.bert) and spec["max_length"] == 256
    spec = json.loads((llama_run / "adapter" / TASK_FILE).read_text())
    assert spec["kind"] == "label-generation" and spec["labels"] == ["neg", "pos"]
    assert spec["label_words"] == ["neg", "pos"] and "{text}" in spec["instruction"]
    assert json.loads((llama_run / "summary.json").read_text())["task_spec"] == spec


def test_eval_of_a_file_missing_a_class_keeps_the_adapters_class_indices(assets, bert_run, tmp_path):
    out, test = bert_run
    full_predictions = tmp_path / "all.jsonl"
    eval_json(invoke("eval", "--adapter", out, "--data", test, "--predictions", full_predictions))
    rows = [r for r in three_class_rows(24, seed=2) if r["label"] != "mixed"]
    subset = write_csv(tmp_path / "two_classes.csv", rows)
    sub_predictions = tmp_path / "sub.jsonl"
    metrics = eval_json(invoke("eval", "--adapter", out, "--data", subset, "--predictions", sub_predictions))
    assert metrics["labels"] == ["mixed", "neg", "pos"] and metrics["examples"] == len(rows)
    expected = [r["prediction"] for r in read_jsonl(full_predictions) if r["label"] != "mixed"]
    assert [r["prediction"] for r in read_jsonl(sub_predictions)] == expected
    correct = [r["correct"] for r in read_jsonl(sub_predictions)]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_eval_of_a_label_the_adapter_does_not_know_names_file_row_and_label(assets, bert_run, tmp_path):
    out, _ = bert_run
    rows = three_class_rows(12, seed=3)
    rows[4]["label"] = "neutral"
    data = write_csv(tmp_path / "renamed.csv", rows)
    message = failure(invoke("eval", "--adapter", out, "--data", data))
    assert str(data) in message and "record 5" in message and "'neutral'" in message
    assert "mixed, neg, pos" in message


# -- 2. a full fine-tune is a model folder --------------------------------------------------------
def test_full_fine_tune_folder_works_with_inspect_merge_and_generate(assets, tmp_path):
    out = tmp_path / "full"
    check_ok(invoke(*train_args(assets, out, "--method", "full", "--max-steps", "1", "--lr", "1e-3", "--no-test")))
    info = json.loads(check_ok(invoke("inspect", out, "--json")).stdout)
    assert info["method"] == "FULL" and info["labels"] == ["neg", "pos"]
    merged = tmp_path / "merged"
    check_ok(invoke("merge", "--adapter", out, "--output", merged, "--dtype", "bf16"))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    assert model.dtype == torch.bfloat16
    check_ok(invoke("generate", "--adapter", out, "--prompt", "The film was great.", "--max-new-tokens", "2"))
    weights = (out / "model" / "model.safetensors").stat().st_size
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out / "model").parameters())
    assert weights < params * 4 * 1.01  # each weight once: the tied embedding is not stored twice


# -- 3. a flag given beats a default not given ----------------------------------------------------
def test_epochs_rule_when_max_steps_is_not_given(assets, tmp_path):
    out = tmp_path / "epochs"
    check_ok(invoke(*train_args(assets, out, "--max-train", "16", "--epochs", "1", "--batch-size", "4", "--no-test")))
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_max_steps_rules_when_both_are_given_and_says_so(assets, tmp_path, caplog):
    out = tmp_path / "both"
    args = train_args(assets, out, "--max-train", "16", "--epochs", "1", "--max-steps", "2", "--batch-size", "4")
    check_ok(invoke(*args, "--no-test"))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert "--max-steps rules" in caplog.text


def test_epochs_from_a_config_file_count_as_given(assets, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1\nmax-train: 8\nbatch-size: 4\n")
    out = tmp_path / "cfg"
    check_ok(invoke(*train_args(assets, out, "--no-test"), "--config", config))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


# -- 4 and 5. resume and overwrite ----------------------------------------------------------------
def test_resume_without_a_checkpoint_is_refused(assets, tmp_path):
    missing = tmp_path / "misspelt"
    message = failure(invoke(*train_args(assets, missing, "--max-steps", "1", "--resume")))
    assert str(missing) in message and "does not exist" in message and not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    message = failure(invoke(*train_args(assets, empty, "--max-steps", "1", "--resume")))
    assert "holds no checkpoint" in message


def test_training_into_a_run_folder_needs_overwrite(assets, llama_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(llama_run, out)
    before = sorted(p.name for p in out.iterdir())
    message = failure(invoke(*train_args(assets, out, "--max-steps", "1")))
    assert "--overwrite" in message and "not empty" in message
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    check_ok(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test", "--overwrite")))
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the run, not the user's files
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-latest"]


def test_merge_refuses_a_non_empty_output_and_the_adapters_own_folder(assets, llama_run, tmp_path):
    message = failure(invoke("merge", "--adapter", llama_run / "adapter", "--output", llama_run / "adapter"))
    assert "adapter's own folder" in message
    assert (llama_run / "adapter" / "adapter_model.safetensors").is_file()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    assert "--overwrite" in failure(invoke("merge", "--adapter", llama_run, "--output", taken))
    check_ok(invoke("merge", "--adapter", llama_run, "--output", taken, "--overwrite"))
    assert not (taken / "x").exists() and (taken / "config.json").is_file()


def test_a_failed_train_leaves_no_output_folder(assets, tmp_path, monkeypatch):
    import deltatune.train

    out = tmp_path / "never"
    failure(invoke(*train_args(assets, out, "--max-steps", "1", "--targets", "q_proj,nonexistent_proj")))
    assert not out.exists()

    def fail(self):
        assert (out / "summary.json").is_file()  # the folder existed while the run ran
        raise ValueError("the data ran out")

    monkeypatch.setattr(deltatune.train.Trainer, "fit", fail)
    assert "the data ran out" in failure(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test")))
    assert not out.exists()


def test_overwrite_keeps_the_old_run_when_the_new_command_is_bad(assets, llama_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(llama_run, out)
    failure(invoke(*train_args(assets, out, "--max-steps", "1", "--targets", "v_projj", "--overwrite")))
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "summary.json").is_file()


# -- 6. options that cannot apply -------------------------------------------------------------------
def test_eval_test_data_evaluates_that_file_and_says_what_it_used(assets, llama_run):
    result = eval_json(invoke("eval", "--adapter", llama_run, "--test-data", assets.cls_eval_csv))
    assert result["data"] == str(assets.cls_eval_csv) and result["split"] is None and result["examples"] == 16
    assert result["labels"] == ["neg", "pos"] and result["adapter"] == str(llama_run / "adapter")
    assert result["model"] == str(assets.llama)


@pytest.mark.parametrize("flag", [["--max-eval", "4"], ["--eval-every", "1"], ["--metric-for-best", "loss"]])
def test_validation_options_without_validation_data_are_errors(assets, tmp_path, flag):
    message = failure(invoke(*train_args(assets, tmp_path / "out", "--max-steps", "1", *flag)))
    assert flag[0] in message and "--eval-data" in message


def test_an_unknown_metric_for_best_is_refused_before_training(assets, tmp_path):
    args = train_args(assets, tmp_path / "out", "--eval-data", assets.cls_eval_csv, "--metric-for-best", "bleu")
    message = failure(invoke(*args))
    assert "--metric-for-best bleu" in message and "accuracy, macro_f1" in message
    assert not (tmp_path / "out").exists()


def test_eval_with_another_task_than_the_adapters_is_an_error(assets, llama_run):
    message = failure(invoke("eval", "--adapter", llama_run, "--data", assets.cls_eval_csv, "--task", "seq-cls"))
    assert "--task seq-cls" in message and "label-generation" in message


def test_eval_of_a_run_without_test_data_asks_for_data(assets, tmp_path):
    out = tmp_path / "notest"
    check_ok(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test")))
    message = failure(invoke("eval", "--adapter", out))
    assert "had no test data" in message and "--data" in message


def test_resume_of_a_chat_run_without_a_prompt_column(assets, tmp_path):
    rows = [{"response": f"The film was {word}."} for word in ["great", "dull", "fine", "bad"] * 4]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    out = tmp_path / "chat"
    args = train_args(assets, out, "--max-steps", "2", "--save-every", "1", "--batch-size", "4", "--no-test")
    args[args.index(str(assets.cls_csv))] = str(data)
    check_ok(invoke(*args, "--max-steps", "1"))
    check_ok(invoke(*args, "--resume"))  # the same command continues: options as given, not as resolved
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_corrupt_adapter_on_its_own_base_says_corrupt(assets, llama_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    message = failure(invoke("eval", "--adapter", broken))
    assert "corrupt or truncated" in message and "does not fit" not in message


def test_split_with_a_data_file_is_an_error(assets, llama_run):
    message = failure(invoke("eval", "--adapter", llama_run, "--data", assets.cls_eval_csv, "--split", "validation"))
    assert "--split" in message


# -- 7. the other commands read the run -------------------------------------------------------------
def test_eval_of_a_run_folder_alone_reproduces_its_test_metrics(assets, llama_run):
    summary = json.loads((llama_run / "summary.json").read_text())
    result = eval_json(invoke("eval", "--adapter", llama_run))  # no --model, no --data: the run's own
    for key in ("accuracy", "macro_f1", "examples"):
        assert result[key] == summary["test_after"][key]
    assert result["loss"] == pytest.approx(summary["test_after"]["loss"], rel=1e-5)


def test_eval_of_a_run_folder_alone_uses_the_runs_test_limit(assets, tmp_path):
    out = tmp_path / "limited"
    args = train_args(assets, out, "--max-steps", "1", "--test-data", assets.cls_eval_csv, "--max-test", "8")
    check_ok(invoke(*args))
    summary = json.loads((out / "summary.json").read_text())
    result = eval_json(invoke("eval", "--adapter", out))
    assert result["examples"] == summary["test_after"]["examples"] == 8
    assert eval_json(invoke("eval", "--adapter", out, "--max-examples", "12"))["examples"] == 12


def test_peft_model_from_pretrained_takes_a_run_folder(assets, llama_run):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.llama), llama_run)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.llama), llama_run / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_an_adapter_on_another_base_names_both_models(assets, llama_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wider"
    config = LlamaConfig.from_pretrained(assets.llama)
    config.hidden_size, config.intermediate_size = 64, 96
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(assets.llama).save_pretrained(other)
    message = failure(invoke("eval", "--adapter", llama_run, "--model", other))
    assert str(other) in message and str(assets.llama) in message and "--model" in message


def test_merge_and_generate_take_the_base_model_from_the_adapter(assets, llama_run, tmp_path):
    merged = tmp_path / "merged"
    check_ok(invoke("merge", "--adapter", llama_run, "--output", merged))
    assert AutoModelForCausalLM.from_pretrained(merged).config.hidden_size == 32
    check_ok(invoke("generate", "--adapter", llama_run, "--prompt", "hi", "--max-new-tokens", "2", "--raw"))


# -- 8. generate with a classification adapter ------------------------------------------------------
def test_generate_puts_the_prompt_in_the_runs_instruction(assets, llama_run, monkeypatch):
    text = "The film was great."
    spec = TaskSpec.load(llama_run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    task = make_task(spec, tokenizer)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.llama), llama_run).eval()
    ids = tokenizer(task.prompt(text), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    result = check_ok(invoke("generate", "--adapter", llama_run, "--prompt", text, "--max-new-tokens", "1"))
    assert result.stdout.strip() == tokenizer.decode([first], skip_special_tokens=True).strip()

    seen: list[list[int]] = []
    real_generate = PeftModel.generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "generate", recording)
    check_ok(invoke("generate", "--adapter", llama_run, "--prompt", text, "--max-new-tokens", "1"))
    check_ok(invoke("generate", "--adapter", llama_run, "--prompt", text, "--max-new-tokens", "1", "--raw"))
    raw = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    raw = raw["input_ids"] if isinstance(raw, dict) or hasattr(raw, "keys") else raw
    assert seen == [ids[0].tolist(), list(raw)]


def test_generate_refuses_prompt_and_prompts_together(assets, llama_run, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert "not both" in failure(invoke("generate", "--adapter", llama_run, "--prompt", "x", "--prompts", prompts))


def train_on_numeric_labels(assets, tmp_path: Path, *extra: str) -> TaskSpec:
    """A one-step run on labels 0/1; the task spec it saved."""
    rows = [{**r, "label": "1" if r["label"] == "pos" else "0"} for r in classification_rows(32, seed=4)]
    data = write_csv(tmp_path / "numeric.csv", rows)
    args = train_args(assets, tmp_path / "run", "--max-steps", "1", "--no-test")
    args[args.index(str(assets.cls_csv))] = str(data)
    check_ok(invoke(*args, *extra))
    return TaskSpec.load(tmp_path / "run" / "adapter")


def test_train_takes_label_words_instruction_and_system(assets, tmp_path):
    extra = ["--label-words", "1=good,0=bad", "--instruction", "Is this good or bad?\n{text}", "--system", "Be brief."]
    spec = train_on_numeric_labels(assets, tmp_path, *extra)
    assert spec.labels == ["0", "1"] and spec.label_words == ["bad", "good"] and spec.system == "Be brief."
    prompt = make_task(spec, AutoTokenizer.from_pretrained(assets.llama)).prompt("Nice.")
    assert "Be brief." in prompt and "Is this good or bad?\nNice." in prompt


def test_numeric_labels_without_words_are_answered_as_numbers(assets, tmp_path):
    spec = train_on_numeric_labels(assets, tmp_path)
    assert spec.label_words == ["0", "1"] and "Answer with the number only." in spec.instruction


@pytest.mark.parametrize(
    ("words", "expected"),
    [("good", "names 1 words for 2 labels"), ("pos=good,meh=bad", "not in the training data")],
)
def test_bad_label_words_are_clear_errors(assets, tmp_path, words, expected):
    message = failure(invoke(*train_args(assets, tmp_path / "out", "--max-steps", "1", "--label-words", words)))
    assert expected in message


# -- 9. the options a run used, and --resume checks them ------------------------------------------------
def test_summary_records_every_option(assets, llama_run):
    from deltatune.cli import train

    summary = json.loads((llama_run / "summary.json").read_text())
    options = summary["options"]
    assert summary["status"] == "finished"
    assert {p.name for p in train.params} - {"config"} == set(options)
    assert options["lr"] == 1e-2 and options["r"] == 4 and options["batch_size"] == 8 and options["seed"] == 3
    assert options["max_length"] == 256 and options["method"] == "lora" and options["targets"] == "all-linear"


def test_resume_with_other_options_names_what_differs(assets, tmp_path):
    out = tmp_path / "run"
    check_ok(invoke(*train_args(assets, out, "--max-steps", "2", "--save-every", "1", "--no-test")))
    message = failure(invoke(*train_args(assets, out, "--max-steps", "2", "--lr", "0.02", "--seed", "4", "--resume")))
    assert "--lr 0.02 (the run used 0.01)" in message and "--seed 4 (the run used 3)" in message


# -- one-line errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("/nonexistent/model", "not an embedded model"),
        ("smollm2", "did you mean 'smollm2-135m-instruct'"),
    ],
)
def test_unknown_models_are_one_line_errors(assets, tmp_path, model, expected):
    message = failure(invoke(*train_args(assets, tmp_path / "out", model=Path(model))))
    assert expected in message and "smollm2-135m-instruct, minilm-l6" in message and "download" in message
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_no_model_is_a_one_line_error(assets, tmp_path):
    message = failure(invoke(*train_args(assets, tmp_path / "out", model=tmp_path)))
    assert "no config.json" in message


def test_inspect_of_a_truncated_adapter_names_the_file(assets, llama_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_run / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = failure(invoke("inspect", broken))
    assert str(weights) in message and "corrupt or truncated" in message


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--lr", "-0.001"), ("--r", "0"), ("--batch-size", "0"), ("--dropout", "1.5"), ("--betas", "0.9")],
)
def test_invalid_numbers_are_refused_before_anything_loads(assets, tmp_path, monkeypatch, flag, value):
    import deltatune.run

    monkeypatch.setattr(deltatune.run, "run_training", lambda *a, **k: pytest.fail("the run started"))
    result = invoke(*train_args(assets, tmp_path / "out", flag, value))
    assert result.exit_code == 2 and "Invalid value" in result.output and flag.lstrip("-") in result.output


def test_a_misspelt_builtin_data_set_says_so(assets, tmp_path):
    args = train_args(assets, tmp_path / "out")
    args[args.index(str(assets.cls_csv))] = "rotten-tomato"
    message = failure(invoke(*args))
    assert "neither a built-in data set" in message and "did you mean 'rotten-tomatoes'" in message


def test_invalid_utf8_names_the_file_and_line(assets, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes("text,label\nThe film was great.,pos\nA caf\xe9 scene.,neg\n".encode("latin-1"))
    args = train_args(assets, tmp_path / "out")
    args[args.index(str(assets.cls_csv))] = str(data)
    message = failure(invoke(*args))
    assert str(data) in message and "line 3" in message and "UTF-8" in message


def test_on_bad_row_skip_skips_malformed_json_lines(assets, tmp_path):
    lines = [json.dumps(r) for r in classification_rows(24, seed=5)]
    lines[3] = '{"text": "broken", "label":'
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = train_args(assets, tmp_path / "out", "--max-steps", "1", "--no-test")
    args[args.index(str(assets.cls_csv))] = str(data)
    message = failure(invoke(*args))
    assert "row 4" in message and "--on-bad-row skip" in message and "on_bad_row=" not in message.split(";")[0]
    check_ok(invoke(*args, "--on-bad-row", "skip"))


def test_empty_value_message_names_the_cli_flag(assets, tmp_path):
    rows = classification_rows(16, seed=6)
    rows[2]["text"] = ""
    data = write_csv(tmp_path / "empty.csv", rows)
    args = train_args(assets, tmp_path / "out")
    args[args.index(str(assets.cls_csv))] = str(data)
    assert "--on-bad-row skip" in failure(invoke(*args))


def test_max_length_beyond_the_models_context(assets, tmp_path):
    message = failure(invoke(*train_args(assets, tmp_path / "out", "--max-length", "4096")))
    assert "--max-length 4096" in message and "512" in message


def test_a_target_that_matches_nothing_is_an_error(assets, tmp_path):
    message = failure(invoke(*train_args(assets, tmp_path / "out", "--targets", "q_proj,v_projj")))
    assert "'v_projj'" in message and "v_proj" in message


# -- options that existed only in the API ---------------------------------------------------------------
def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter" / "adapter_config.json").read_text())


def test_lora_options_reach_the_adapter_config(assets, tmp_path):
    out = tmp_path / "lora"
    extra = ["--use-rslora", "--init-lora-weights", "gaussian", "--exclude-modules", "down_proj"]
    extra += ["--layers-to-transform", "1", "--modules-to-save", "norm"]
    check_ok(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test", *extra)))
    config = adapter_config(out)
    assert config["use_rslora"] is True and config["init_lora_weights"] == "gaussian"
    assert config["layers_to_transform"] == [1] and config["modules_to_save"] == ["norm"]
    keys = list(adapter_tensors(out / "adapter"))
    lora_keys = [k for k in keys if "lora_" in k]
    assert lora_keys and all(".layers.1." in k for k in lora_keys) and not any("down_proj" in k for k in keys)
    assert any(k.startswith("base_model.model.model.norm.") for k in keys)


@pytest.mark.parametrize(
    ("method", "extra", "expected"),
    [
        ("prefix", ["--prefix-projection", "--encoder-hidden-size", "16"], {"prefix_projection": True}),
        ("ptuning", ["--encoder-type", "LSTM", "--encoder-hidden-size", "16"], {"encoder_hidden_size": 16}),
        ("prompt", ["--prompt-init-text", "Classify the review", "--lr", "1e-9"], {"num_virtual_tokens": 4}),
    ],
)
def test_prompt_method_options_reach_the_adapter_config(assets, tmp_path, method, extra, expected):
    out = tmp_path / method
    args = ["--method", method, "--virtual-tokens", "4", *extra]
    check_ok(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test", *args)))
    config = adapter_config(out)
    for key, value in expected.items():
        assert config[key] == value
    if method == "ptuning":
        assert config["encoder_reparameterization_type"] == "LSTM"
    if method == "prompt":  # the table started from the text's embeddings (PEFT's config says RANDOM: no
        # tokenizer path a PEFT loader on another machine would have to find)
        tokenizer = AutoTokenizer.from_pretrained(assets.llama)
        ids = tokenizer("Classify the review", add_special_tokens=False)["input_ids"]
        vocab = AutoModelForCausalLM.from_pretrained(assets.llama).get_input_embeddings().weight
        table = adapter_tensors(out / "adapter")["prompt_embeddings"]
        torch.testing.assert_close(table, vocab[(ids * 4)[:4]].detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_modules_to_save_trains_a_module_next_to_the_virtual_tokens(assets, tmp_path, method):
    out = tmp_path / method
    args = ["--method", method, "--virtual-tokens", "4", "--modules-to-save", "norm"]
    check_ok(invoke(*train_args(assets, out, "--max-steps", "1", "--no-test", *args)))
    assert adapter_config(out)["modules_to_save"] == ["norm"]
    assert any(k.endswith("model.norm.weight") for k in adapter_tensors(out / "adapter"))


def test_an_option_for_another_method_is_reported(assets, tmp_path, caplog):
    args = train_args(assets, tmp_path / "out", "--method", "ia3", "--max-steps", "1", "--no-test", "--use-rslora")
    check_ok(invoke(*args))
    # train_args gives --rank 4
    assert "--r applies to --method lora/dora/adalora/loha/lokr/vera, not ia3" in caplog.text
    assert "--use-rslora applies to --method lora/dora, not ia3" in caplog.text
    assert "--dropout" not in caplog.text  # left at its default: not reported


def test_save_total_limit_keeps_the_newest_checkpoints(assets, tmp_path):
    out = tmp_path / "keep"
    check_ok(invoke(*train_args(assets, out, "--max-steps", "4", "--save-every", "1", "--save-total-limit", "2")))
    assert sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir()) == ["checkpoint-3", "checkpoint-4"]


def test_optimizer_betas_and_minimum_learning_rate(assets, tmp_path):
    out = tmp_path / "sgd"
    args = ["--optim", "sgd", "--betas", "0.5,0.9", "--min-lr", "0.004", "--schedule", "cosine", "--warmup", "0"]
    check_ok(invoke(*train_args(assets, out, "--max-steps", "4", "--no-test", *args)))
    rates = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    assert rates[0] == pytest.approx(0.01) and min(rates) >= 0.004 and rates[-1] < 0.006
    from deltatune.train import TrainArgs, make_optimizer

    param = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(param, TrainArgs(output=tmp_path, optim="sgd", betas=(0.5, 0.9)))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    adamw = make_optimizer(param, TrainArgs(output=tmp_path, betas=(0.8, 0.95)))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95)
    assert isinstance(make_optimizer(param, TrainArgs(output=tmp_path, optim="adafactor")), torch.optim.Adafactor)


def test_early_stopping_on_the_metric_for_best(assets, tmp_path, monkeypatch):
    import deltatune.train

    scripted = iter([0.7, 0.6, 0.65, 0.9, 0.95])  # validation loss: best at step 2, no gain at steps 3 and 4

    def fake_evaluate(self, examples, model=None):
        return {"loss": next(scripted), "accuracy": 0.5, "macro_f1": 0.5, "exact_match": 0.0, "examples": 16}

    monkeypatch.setattr(deltatune.train.Trainer, "evaluate", fake_evaluate)
    out = tmp_path / "early"
    args = ["--eval-data", assets.cls_eval_csv, "--eval-every", "1", "--metric-for-best", "loss"]
    check_ok(invoke(*train_args(assets, out, "--max-steps", "8", "--no-test", *args, "--early-stopping-patience", "2")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["stopped_early"] is True
    assert summary["best_validation"] == 0.6 and summary["metric_for_best"] == "loss"
    assert (out / "best" / TASK_FILE).is_file()


def test_generate_options_and_a_file_of_prompts(assets, llama_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nhow are you\n")
    common = ("generate", "--adapter", llama_run, "--raw", "--max-new-tokens", "4", "--prompts", prompts)
    sampled = ("--temperature", "1.0", "--top-p", "0.9", "--top-k", "20", "--repetition-penalty", "1.2")
    first = check_ok(invoke(*common, *sampled, "--seed", "7")).stdout
    again = check_ok(invoke(*common, *sampled, "--seed", "7")).stdout
    other = check_ok(invoke(*common, *sampled, "--seed", "8")).stdout
    greedy = check_ok(invoke(*common)).stdout
    replies = [json.loads(line) for line in first.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in replies] == ["hello there", "how are you"] and first == again
    assert other != first and greedy != first  # the seed and the sampling options are used
    beams = check_ok(invoke(*common, "--num-beams", "2")).stdout
    assert len([line for line in beams.splitlines() if line.startswith("{")]) == 2


def test_merge_shards_and_inspect_json(assets, llama_run, tmp_path):
    merged = tmp_path / "sharded"
    check_ok(invoke("merge", "--adapter", llama_run, "--output", merged, "--max-shard-size", "1MB"))
    assert len(list(merged.glob("model-*.safetensors"))) > 1 and (merged / TASK_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(merged)
    info = json.loads(check_ok(invoke("inspect", llama_run, "--json")).stdout)
    assert info["method"] == "LORA" and info["labels"] == ["neg", "pos"] and info["options"]["r"] == 4
    assert info["status"] == "finished" and re.fullmatch(r"\d+\.\d\d MiB", info["adapter size"])


def test_eval_predictions_of_a_chat_adapter_is_a_clear_error(assets, tmp_path):
    out = tmp_path / "chat"
    args = train_args(assets, out, "--max-steps", "1", "--no-test")
    args[args.index(str(assets.cls_csv))] = str(assets.chat_jsonl)
    check_ok(invoke(*args))
    metrics = eval_json(invoke("eval", "--adapter", out, "--data", assets.chat_jsonl))
    assert metrics["task"] == "causal-lm" and metrics["loss"] > 0
    message = failure(invoke("eval", "--adapter", out, "--data", assets.chat_jsonl, "--predictions", tmp_path / "p"))
    assert "--predictions applies to classification" in message


def test_files_written_atomically_get_an_ordinary_files_mode(llama_run):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "summary.json"):
        assert stat.S_IMODE((llama_run / name).stat().st_mode) == 0o666 & ~umask, name


# -- a validation split by default -------------------------------------------------------------
def test_hold_out_is_seeded_disjoint_capped_and_skipped_for_tiny_data():
    from deltatune.run_data import hold_out

    records = [{"i": i} for i in range(40)]
    train, validation, source = hold_out(records, 0.1, seed=3, source="data.csv")
    assert len(validation) == 4 and len(train) == 36
    assert sorted(r["i"] for r in train + validation) == list(range(40))
    assert hold_out(records, 0.1, seed=3, source="data.csv")[1] == validation  # same seed, same rows
    assert hold_out(records, 0.1, seed=4, source="data.csv")[1] != validation
    assert source == {"source": "held out from data.csv", "rows": 4, "share": 0.1, "seed": 3}
    assert len(hold_out([{"i": i} for i in range(20_000)], 0.1, 0, "big")[1]) == 500
    kept, none, why = hold_out(records[:3], 0.1, 0, "tiny")
    assert kept == records[:3] and none == [] and why["source"] is None


def _default_val_split(args: list[str]) -> list[str]:
    """The helper's arguments without its ``--val-split 0``: the default again."""
    at = args.index("--val-split")
    return args[:at] + args[at + 2 :]


def test_a_training_file_alone_reports_validation_on_a_held_out_share(assets, tmp_path):
    args = _default_val_split(train_args(assets, tmp_path / "run", "--max-steps", "2"))
    check_ok(invoke(*args, "--eval-every", "1"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["validation_data"] == {
        "source": f"held out from {assets.cls_csv}", "rows": 6, "share": 0.1, "seed": 3,
    }  # fmt: skip
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if r.get("split") == "validation"] == [1, 2]
    assert (tmp_path / "run" / "best").is_dir() and summary["best_validation"] is not None
    check_ok(invoke(*train_args(assets, tmp_path / "none", "--max-steps", "1")))  # --val-split 0: none
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["validation_data"] == {"source": None}
    given = train_args(assets, tmp_path / "given", "--max-steps", "1", "--eval-data", str(assets.cls_eval_csv))
    check_ok(invoke(*_default_val_split(given)))
    recorded = json.loads((tmp_path / "given" / "summary.json").read_text())["validation_data"]
    assert recorded == {"source": str(assets.cls_eval_csv)}  # the given file, nothing held out


def test_resume_of_a_run_from_before_an_option_reads_what_it_did_then(tmp_path):
    from deltatune.run_folder import check_resume, write_summary

    # A seq-cls adapter run recorded before --adapter-input existed read the sublayer's output.
    write_summary(tmp_path, {"status": "running", "options": {"method": "adapter", "reduction_factor": 4}})
    check_resume(tmp_path, {"method": "adapter", "reduction_factor": 4, "adapter_input": "sublayer"})
    with pytest.raises(ValueError, match=r"--adapter-input 'auto' \(the run used 'sublayer'\)"):
        check_resume(tmp_path, {"method": "adapter", "reduction_factor": 4, "adapter_input": "auto"})
