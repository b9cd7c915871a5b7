"""Every method at its best in the main job: defaults kept with each method, input methods that start
from real tokens, and the shared prompt prefix behind virtual tokens (tiny random models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune as dt
from deltatune.cli import METHODS
from deltatune.registry import trainable_methods, training_defaults
from deltatune.tasks import LabelGeneration, LabelSpace
from tiny_assets import assert_label_loss_as_alone, check_ok, classification_rows, invoke, session_assets, train_args

INPUT_METHODS = {
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="RANDOM"),
    "ptuning": lambda: dt.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=16),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=5),
    "prefix-projection": lambda: dt.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True),
}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def llama(assets) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(assets.llama)


# -- defaults with the methods ------------------------------------------------------------------
def test_every_cli_method_has_its_defaults_in_its_module():
    assert set(trainable_methods()) == set(METHODS)
    assert training_defaults("full").lr < training_defaults("lora").lr < training_defaults("ia3").lr
    assert training_defaults("prompt").lr > training_defaults("lora").lr
    assert training_defaults("prefix").get("prefix_projection") is False  # from real activations: steady as it is
    for name in ("prefix", "prompt", "ptuning"):
        assert training_defaults(name).get("virtual_init") == "task"


def test_train_uses_the_methods_defaults_unless_a_flag_is_given(assets, tmp_path):
    out = tmp_path / "ia3"
    args = train_args(assets, out, "--method", "ia3", "--max-steps", "1", "--no-test")
    args[args.index("--lr") : args.index("--lr") + 2] = []  # no --lr: the method's own
    check_ok(invoke(*args))
    options = json.loads((out / "summary.json").read_text())["options"]
    assert options["lr"] == training_defaults("ia3").lr and options["targets"] is None
    out = tmp_path / "given"
    check_ok(invoke(*train_args(assets, out, "--method", "ia3", "--max-steps", "1", "--no-test", "--lr", "0.07")))
    assert json.loads((out / "summary.json").read_text())["options"]["lr"] == 0.07


def test_help_shows_each_methods_default():
    from click.testing import CliRunner

    from deltatune.cli import main

    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=400, max_content_width=400).output
    lr_line = next(line for line in text.splitlines() if line.strip().startswith("--lr"))
    for name in METHODS:
        assert name in lr_line
    assert "prompt: 0.03" in lr_line and "full: 3e-05" in lr_line
    entries = [" ".join(chunk.split()) for chunk in text.split("\n  --")[1:]]
    lines = {"--" + entry.split()[0]: entry for entry in entries}
    assert "prefix: 20; prompt/ptuning: 20 (seq-cls: 8)" in lines["--virtual-tokens"]
    assert "lora" not in lines["--virtual-tokens"]
    assert "prefix/prompt/ptuning: task" in lines["--virtual-init"]
    assert "prefix: False" in lines["--prefix-projection"] and "ia3/ln-tuning: none" in lines["--targets"]
    assert "adapter: 16 (seq-cls: 4)" in lines["--reduction-factor"] and "Pfeiffer" in lines["--reduction-factor"]
    assert "adapter: none (seq-cls: pooler)" in lines["--modules-to-save"]
    assert "ptuning: 128" in lines["--encoder-hidden-size"]
    assert "full/adapter/ia3/prefix/prompt/ptuning: none (seq-cls: 0.0); lora/dora" in lines["--model-dropout"]


# -- defaults with the task -----------------------------------------------------------------------
RUN_DEFAULTS = {"batch_size": 8, "max_steps": 70}  # the command line's own


def test_a_task_sets_its_budget_for_every_method_and_a_flag_still_wins():
    from deltatune.run_options import with_method_defaults
    from deltatune.tasks import task_training_defaults

    budget = task_training_defaults("seq-cls")
    assert budget["batch_size"] > RUN_DEFAULTS["batch_size"] and budget["max_steps"] > RUN_DEFAULTS["max_steps"]
    for method in METHODS:
        resolved = with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "seq-cls")
        assert (resolved["batch_size"], resolved["max_steps"]) == (budget["batch_size"], budget["max_steps"])
        generation = with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "label-generation")
        assert {k: generation[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS
        given = with_method_defaults({"method": method, "batch_size": 4, "max_steps": 70}, {"batch_size"}, "seq-cls")
        assert (given["batch_size"], given["max_steps"]) == (4, budget["max_steps"])
        assert with_method_defaults({"method": method, "lr": 0.07, **RUN_DEFAULTS}, {"lr"}, "seq-cls")["lr"] == 0.07


def test_bottleneck_adapters_are_wider_behind_a_fresh_classifier_head():
    from deltatune.run_options import with_method_defaults

    assert with_method_defaults({"method": "adapter", **RUN_DEFAULTS}, (), "seq-cls")["reduction_factor"] == 4
    assert with_method_defaults({"method": "adapter", **RUN_DEFAULTS}, (), "label-generation")["reduction_factor"] == 16
    given = {"method": "adapter", "reduction_factor": 8, **RUN_DEFAULTS}
    assert with_method_defaults(given, {"reduction_factor"}, "seq-cls")["reduction_factor"] == 8


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_input_methods_behind_a_fresh_head_add_fewer_positions(method):
    from deltatune.run_options import method_config, with_method_defaults

    resolved = with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "seq-cls")
    assert method_config(resolved, "seq-cls").num_virtual_tokens == 8
    assert with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "label-generation")["virtual_tokens"] == 20
    given = {"method": method, "virtual_tokens": 20, **RUN_DEFAULTS}
    assert with_method_defaults(given, {"virtual_tokens"}, "seq-cls")["virtual_tokens"] == 20


@pytest.mark.parametrize(
    ("placement", "task", "given", "width"),
    [("houlsby", "seq-cls", None, 4), ("pfeiffer", "seq-cls", None, 2), ("pfeiffer", "label-generation", None, 16)]
    + [("pfeiffer", "seq-cls", 8, 8), ("houlsby", "label-generation", None, 16)],
)
def test_pfeiffer_behind_a_fresh_head_is_twice_as_wide_as_houlsby_unless_given(placement, task, given, width):
    from deltatune.run_options import method_config, with_method_defaults

    options = {"method": "adapter", "placement": placement, **RUN_DEFAULTS}
    if given is not None:
        options["reduction_factor"] = given
    resolved = with_method_defaults(options, {"placement"} | ({"reduction_factor"} if given else set()), task)
    assert method_config(resolved, task).reduction_factor == width


def test_bottleneck_adapters_train_the_pooler_behind_a_fresh_head_where_the_model_has_one(assets, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bert"
    one_step = ("--no-test", "--max-steps", "1")
    check_ok(invoke(*train_args(assets, out, "--method", "adapter", *one_step, model=assets.bert)))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["pooler", "classifier"] and config["reduction_factor"] == 4
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(".pooler." in key for key in saved) and any(".classifier." in key for key in saved)
    # LoRA adapts the pooler's dense layer itself (all-linear): nothing added.
    out = tmp_path / "lora"
    check_ok(invoke(*train_args(assets, out, "--method", "lora", *one_step, model=assets.bert)))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    # A decoder classifier has no pooler: the default is dropped, a name the user gives is not.
    out = tmp_path / "llama"
    args = ("--method", "adapter", "--task", "seq-cls", *one_step)
    check_ok(invoke(*train_args(assets, out, *args)))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    result = invoke(*train_args(assets, tmp_path / "given", *args, "--modules-to-save", "pooler"))
    assert result.exit_code != 0 and "--modules-to-save: 'pooler' matches no module" in result.output


def bottleneck_modules(run: Path) -> set[str]:
    """The modules a run's saved bottleneck adapters sit on."""
    from safetensors.torch import load_file

    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    return {key.split(".adapter_down.")[0] for key in saved if ".adapter_down." in key}


def test_bottleneck_adapters_read_the_normed_sum_behind_a_fresh_head_where_the_model_has_a_closing_norm(
    assets, tmp_path
):
    from deltatune.run_options import with_method_defaults

    assert with_method_defaults({"method": "adapter", **RUN_DEFAULTS}, (), "seq-cls")["adapter_input"] == "auto"
    assert with_method_defaults({"method": "adapter", **RUN_DEFAULTS}, (), "label-generation")["adapter_input"] == (
        "sublayer"
    )
    given = {"method": "adapter", "adapter_input": "sublayer", **RUN_DEFAULTS}
    assert with_method_defaults(given, {"adapter_input"}, "seq-cls")["adapter_input"] == "sublayer"
    one_step = ("--no-test", "--max-steps", "1")
    # BERT (post-norm): the adapters sit on the norms closing each sublayer.
    out = tmp_path / "bert"
    check_ok(invoke(*train_args(assets, out, "--method", "adapter", *one_step, model=assets.bert)))
    # Saved resolved, so that loading does not hang on the structural search.
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["adapter_input"] == "normed"
    keys = bottleneck_modules(out)
    assert keys and all(k.endswith("output.LayerNorm") for k in keys)
    # A flag wins: the sublayer's output projection.
    out = tmp_path / "bert-sublayer"
    args = ("--method", "adapter", "--adapter-input", "sublayer", *one_step)
    check_ok(invoke(*train_args(assets, out, *args, model=assets.bert)))
    keys = bottleneck_modules(out)
    assert keys and all(k.endswith("output.dense") for k in keys)
    # Llama (pre-norm): auto reads the sublayer; normed says why it cannot.
    out = tmp_path / "llama"
    check_ok(invoke(*train_args(assets, out, "--method", "adapter", "--task", "seq-cls", *one_step)))
    keys = bottleneck_modules(out)
    assert keys and all(k.endswith(("o_proj", "down_proj")) for k in keys)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["adapter_input"] == "sublayer"
    result = invoke(
        *train_args(
            assets,
            tmp_path / "normed",
            "--method",
            "adapter",
            "--task",
            "seq-cls",
            "--adapter-input",
            "normed",
            *one_step,
        )
    )
    assert result.exit_code != 0 and "adapter_input='normed' needs the norm" in result.output
    assert "Traceback" not in result.output


DROPOUT_OFF_ON_SEQ_CLS = ("full", "adapter", "ia3", "prefix", "prompt", "ptuning")


@pytest.mark.parametrize("method", METHODS)
def test_the_models_dropout_is_off_behind_a_fresh_head_for_the_methods_it_helps(method):
    from deltatune.run_options import with_method_defaults

    expected = 0.0 if method in DROPOUT_OFF_ON_SEQ_CLS else None
    assert with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "seq-cls")["model_dropout"] == expected
    assert with_method_defaults({"method": method, **RUN_DEFAULTS}, (), "label-generation")["model_dropout"] is None
    given = {"method": method, "model_dropout": 0.3, **RUN_DEFAULTS}
    assert with_method_defaults(given, {"model_dropout"}, "seq-cls")["model_dropout"] == 0.3


def test_set_dropout_reaches_dropout_layers_and_the_rates_fused_attention_reads(assets):
    from deltatune.model_info import set_dropout

    model = llama(assets)
    attentions = [m for m in model.modules() if isinstance(vars(m).get("attention_dropout"), float)]
    assert attentions  # Llama keeps its attention rate as a float for the fused kernel
    assert set_dropout(model, 0.25) >= len(attentions)
    assert all(m.attention_dropout == 0.25 for m in attentions)


def test_train_runs_the_model_at_the_resolved_dropout(assets, tmp_path, monkeypatch):
    from deltatune.train import Trainer

    seen: list[float] = []
    start = Trainer.__init__

    def recording(self, model, *args, **kwargs):  # the rates the training loop starts with
        seen.extend(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
        start(self, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "__init__", recording)
    one_step = ("--no-test", "--max-steps", "1")
    for args, rates in [
        (("--method", "adapter"), {0.0}),
        (("--method", "lora"), {0.1}),  # BERT's own hidden and attention dropout
        (("--method", "adapter", "--model-dropout", "0.2"), {0.2}),
        # The model's rate is set before the adapter attaches: LoRA's own dropout keeps its rate.
        (("--method", "lora", "--dropout", "0.3", "--model-dropout", "0"), {0.0, 0.3}),
    ]:
        seen.clear()
        out = tmp_path / "-".join(args).replace("--", "")
        result = invoke(*train_args(assets, out, *args, *one_step, model=assets.bert))
        check_ok(result)
        assert set(seen) == rates, args
        assert ("model dropout" in result.output) == ("--model-dropout" in args or "adapter" in args)


def test_a_methods_value_for_a_task_beats_the_tasks_and_its_own():
    from deltatune.registry import TrainingDefaults, register_training_defaults
    from deltatune.run_options import with_method_defaults

    register_training_defaults(
        "probe-method", TrainingDefaults(lr=1e-3, tasks={"seq-cls": {"lr": 4e-3, "batch_size": 32}})
    )
    try:
        seq_cls = with_method_defaults({"method": "probe-method", **RUN_DEFAULTS}, (), "seq-cls")
        assert (seq_cls["lr"], seq_cls["batch_size"], seq_cls["max_steps"]) == (4e-3, 32, 600)
        other = with_method_defaults({"method": "probe-method", **RUN_DEFAULTS}, (), "label-generation")
        assert (other["lr"], other["batch_size"]) == (1e-3, 8)
    finally:
        from deltatune import registry

        registry._TRAINING_DEFAULTS.pop("probe-method")


def test_train_records_the_tasks_budget_for_a_classifier(assets, tmp_path):
    out = tmp_path / "bert"
    args = train_args(assets, out, "--method", "lora", "--no-test", "--max-steps", "1", model=assets.bert)
    check_ok(invoke(*args))
    options = json.loads((out / "summary.json").read_text())["options"]
    assert options["batch_size"] == 16 and options["max_steps"] == 1
    assert json.loads((out / "summary.json").read_text())["train_examples_seen"] == 16


def test_help_shows_the_tasks_budget():
    from click.testing import CliRunner

    from deltatune.cli import main

    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=400, max_content_width=400).output
    entries = [" ".join(chunk.split()) for chunk in text.split("\n  --")[1:]]
    lines = {"--" + entry.split()[0]: entry for entry in entries}
    assert "default: (8; seq-cls: 16)" in lines["--batch-size"]
    assert "default: (70; seq-cls: 600)" in lines["--max-steps"]
    for defaults in trainable_methods().values():
        for task, values in defaults.tasks.items():
            if "lr" in values:
                assert f"{task}: {values['lr']}" in lines["--lr"]
    assert "ptuning: MLP (seq-cls: LSTM)" in lines["--encoder-type"]


# -- starting from real tokens ------------------------------------------------------------------
@pytest.mark.parametrize("method", list(INPUT_METHODS))
def test_virtual_tokens_started_from_real_tokens_act_as_those_tokens(assets, method):
    """After start_virtual_tokens_from(ids), the model with the adapter computes what the base model
    computes with ids in front of the input: the same next-token distribution at every real position."""
    torch.manual_seed(0)
    model = dt.get_peft_model(llama(assets), INPUT_METHODS[method]())
    model.eval()
    words = [11, 12, 13, 14, 15]
    model.start_virtual_tokens_from(words)
    text = torch.tensor([[21, 22, 23, 24]])
    with torch.no_grad():
        got = model(input_ids=text).logits[0, -text.shape[1] :]  # prompt tuning returns its positions too
        base = llama(assets).eval()(input_ids=torch.tensor([words + text[0].tolist()])).logits[0, len(words) :]
    torch.testing.assert_close(got, base, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_task_init_starts_near_the_base_models_loss_on_smollm2(tmp_path):
    """On the real model, the first step's loss with the task's words in front stays within 3 % of
    the base model's (LoRA's first step: B = 0), where random virtual tokens raise it by a quarter or
    more (the issue measured 5.96 against 2.8 for a random prefix)."""
    first = {}
    common = ["--max-train", "16", "--batch-size", "8", "--max-steps", "1", "--lr", "1e-9", "--no-test"]
    common += ["--no-forgetting", "--max-eval", "8"]
    runs = {"base": ["--method", "lora"], "prefix-random": ["--method", "prefix", "--virtual-init", "random"]}
    runs |= {f"{m}-task": ["--method", m] for m in ("prompt", "ptuning", "prefix")}
    for name, args in runs.items():
        check_ok(invoke("train", *common, *args, "--output", tmp_path / name))
        first[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    for method in ("prompt", "ptuning", "prefix"):
        assert first[f"{method}-task"] < first["base"] * 1.03, first
    assert first["prefix-random"] > first["base"] * 1.2, first


# -- the shared prompt prefix behind virtual tokens ---------------------------------------------------
@pytest.mark.parametrize("method", list(INPUT_METHODS))
def test_shared_prefix_behind_virtual_tokens_equals_one_example_at_a_time(assets, method):
    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    records = classification_rows(6, seed=11)
    task = LabelGeneration(tokenizer, LabelSpace.from_records(records), max_length=256)
    examples = task.encode(records)
    batch = task.collate(examples)
    assert "shared_prefix" in batch and len({len(e.input_ids) for e in examples}) > 1
    torch.manual_seed(0)
    model = dt.get_peft_model(llama(assets), INPUT_METHODS[method]())
    model.train()

    calls = []
    real_forward = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_ids").shape if kwargs.get("input_ids") is not None else None)
        return real_forward(*args, **kwargs)

    model.forward = counting  # on this instance only
    try:
        loss = task.loss_sum(model, batch)
    finally:
        del model.forward
    assert calls[0] == (1, len(task.shared_prefix))  # the prefix ran once, for the whole batch
    assert_label_loss_as_alone(model, task, examples, loss)
