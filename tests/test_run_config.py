"""The main job's typed configuration: built once, each option checked alone with its flag named."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune.run_config import RunConfig, RunConfigError


def test_defaults_are_the_command_lines_and_the_config_reads_both_ways():
    from deltatune.cli import train

    config = RunConfig()
    for param in train.params:
        if param.name == "config":
            continue
        default = param.default if param.default is not None or not param.multiple else ()
        if isinstance(default, bool) or default is None or isinstance(default, (int, float, str)):
            expected = config[param.name]
            if param.name == "betas":
                continue
            assert expected == default or (default is None and expected is None), param.name
    assert config.lr is None and config["method"] == "lora" and config.get("nope") is None
    assert set(config) == {f.name for f in dataclasses.fields(RunConfig)} - {"given", "total_steps"}
    assert config.betas == (0.9, 0.999)


def test_values_are_typed_once():
    config = RunConfig.from_options(
        {"lr": 1, "batch_size": 4.0, "betas": "0.8, 0.95", "report_to": ["tensorboard"], "output": "x"},
        given={"lr", "nonsense"},
    )
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.batch_size == 4
    assert config.betas == (0.8, 0.95) and config.report_to == ("tensorboard",)
    assert config.given == {"lr"}
    changed = config.replace(lr=2e-4)
    assert changed.lr == 2e-4 and config.lr == 1.0  # frozen: a change is a new config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learning_rate": 1e-3}, "unknown train option 'learning_rate'"),
        ({"batch_sise": 4}, "did you mean 'batch_size'"),
        ({"lr": "fast"}, "--lr 'fast': expected a number"),
        ({"lr": 0}, "--lr 0.0: must be above 0"),
        ({"batch_size": 2.5}, "--batch-size 2.5: expected an integer"),
        ({"val_split": 0.9}, "--val-split 0.9: must be at least 0 and at most 0.5"),
        ({"dropout": 1.5}, "--dropout 1.5: must be at least 0 and at most 1"),
        ({"precision": "fp8"}, "--precision 'fp8': choose one of auto, fp32, bf16, fp16"),
        ({"method": "qlora"}, "--method 'qlora': choose one of .*lora, dora"),
        ({"resume": "yes"}, "--resume 'yes': expected true or false"),
        ({"betas": "0.9"}, "--betas '0.9': expected two numbers"),
        ({"model": None}, "--model needs a value"),
    ],
)
def test_a_bad_option_is_refused_with_its_flag_and_what_it_accepts(options, message):
    with pytest.raises(RunConfigError, match=message):
        RunConfig.from_options(options)


def test_train_given_a_bad_option_stops_before_loading(tmp_path, monkeypatch):
    import deltatune.run

    monkeypatch.setattr(deltatune.run, "training_data_and_task", lambda config: pytest.fail("loaded data"))
    with pytest.raises(RunConfigError, match="--max-steps -1"):
        deltatune.run.run_training({"max_steps": -1, "output": str(tmp_path)})


def test_a_config_built_in_code_keeps_what_it_sets(monkeypatch, tmp_path):
    import deltatune.run

    seen = {}

    def stop(config, *args):
        seen["config"] = config
        raise SystemExit

    records = [{"text": "a", "label": "b"}]
    monkeypatch.setattr(deltatune.run, "training_data_and_task", lambda config: (records, "seq-cls"))
    monkeypatch.setattr(deltatune.run, "_train", stop)
    with pytest.raises(SystemExit):
        deltatune.run.run_training(RunConfig(lr=1e-3, r=4, output=str(tmp_path / "run")))
    assert seen["config"].lr == 1e-3 and seen["config"].r == 4  # not the method's defaults


def test_a_model_without_references_is_freed_without_the_garbage_collector():
    import gc
    import weakref

    import deltatune as dt

    from conftest import tiny_model

    gc.collect()
    gc.disable()
    try:
        model = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=2))
        ref = weakref.ref(model)
        del model
        assert ref() is None  # no reference cycle keeps a PeftModel (and its base's memory) alive
    finally:
        gc.enable()
