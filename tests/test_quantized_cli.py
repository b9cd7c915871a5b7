"""`deltatune train/eval/generate/merge --quantize` on a tiny Llama with 64-wide rows (bitsandbytes'
CPU path wants at least one 64-weight block per row): what the run records, what the other commands
see, what is refused, and LoftQ's start from the command line."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("bitsandbytes")

from tiny_assets import check_ok, invoke, make_tiny_llama, session_assets, train_args  # noqa: E402


@pytest.fixture(scope="module")
def cli_assets(tmp_path_factory):
    assets = session_assets(tmp_path_factory)
    folder = assets.root / "tinyllama64"  # bitsandbytes' CPU path wants 64-weight blocks per row
    if not (folder / "config.json").exists():
        make_tiny_llama(folder, hidden_size=64)
    return assets, folder


@pytest.fixture(scope="module")
def qlora_run(cli_assets, tmp_path_factory):
    assets, llama64 = cli_assets
    out = tmp_path_factory.mktemp("qlora") / "run"
    args = train_args(assets, out, "--quantize", "nf4", "--max-steps", "3", "--optim", "adamw8bit", model=llama64)
    check_ok(invoke(*args, "--test-data", assets.cls_eval_csv))
    return out


def test_train_quantize_records_the_quantization_and_memory(qlora_run):
    summary = json.loads((qlora_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["quantization"] == "nf4"
    assert summary["options"]["quantize"] == "nf4" and summary["optimizer"] == "adamw8bit"
    # nf4 holds two weights a byte: each block linear weight takes 0.5 bytes instead of float32's 4
    # (the 49k-token embedding stays float and dominates this tiny model)
    hidden, layers = 64, 2
    linear_weights = layers * (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * 2 * hidden)
    assert summary["full_model_bytes"] - summary["base_model_bytes"] == 3.5 * linear_weights
    assert summary["optimizer_state_bytes"] > 0
    config = json.loads((qlora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_eval_and_generate_quantize_see_the_model_train_measured(cli_assets, qlora_run):

    assets, _ = cli_assets
    summary = json.loads((qlora_run / "summary.json").read_text())
    result = check_ok(invoke("eval", "--adapter", qlora_run, "--quantize", "nf4", "--test-data", assets.cls_eval_csv))
    metrics = json.loads(result.output[result.output.index("{") :])
    assert metrics["accuracy"] == summary["test_after"]["accuracy"]
    assert metrics["loss"] == pytest.approx(summary["test_after"]["loss"], rel=1e-5)
    out = check_ok(
        invoke("generate", "--adapter", qlora_run, "--quantize", "nf4", "--prompt", "hi", "--max-new-tokens", "3")
    )
    assert out.output.strip()


def test_merge_a_qlora_adapter_into_the_float_base_or_refuse_a_mixed_request(cli_assets, qlora_run, tmp_path):
    check_ok(invoke("merge", "--adapter", qlora_run, "--output", tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file()
    result = invoke("merge", "--adapter", qlora_run, "--quantize", "nf4", "--dtype", "bf16", "--output", tmp_path / "x")
    assert result.exit_code != 0 and "leave --dtype at fp32" in result.output


def test_full_fine_tuning_of_a_quantized_base_and_paged_optimizer_on_cpu_are_refused(cli_assets, tmp_path):
    assets, llama64 = cli_assets
    result = invoke(*train_args(assets, tmp_path / "f", "--quantize", "nf4", "--method", "full", model=llama64))
    assert result.exit_code != 0 and "--method full trains every weight" in result.output
    assert not (tmp_path / "f").exists()
    result = invoke(
        *train_args(assets, tmp_path / "p", "--optim", "paged_adamw8bit", "--max-steps", "1", model=llama64)
    )
    assert result.exit_code != 0 and "needs CUDA" in result.output


def test_train_loftq_starts_nearer_the_float_model_and_its_adapter_loads_on_the_quantized_base(
    cli_assets, qlora_run, tmp_path
):

    assets, llama64 = cli_assets
    runs = {}
    for name, extra in {"loftq": ("--quantize", "nf4", "--init-lora-weights", "loftq"), "float": ()}.items():
        args = train_args(assets, tmp_path / name, *extra, "--max-steps", "3", "--optim", "adamw8bit", model=llama64)
        check_ok(invoke(*args, "--test-data", assets.cls_eval_csv))
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    plain = json.loads((qlora_run / "summary.json").read_text())
    assert runs["loftq"]["quantization"] == "nf4"
    assert runs["loftq"]["base_model_bytes"] == plain["base_model_bytes"]  # stored in 4 bits, as a quantized load
    # the first step's loss (the model as it starts, on the same batch): the quantized base plus
    # LoftQ's start is nearer the float model than the quantized base with B = 0
    folders = {"loftq": tmp_path / "loftq", "float": tmp_path / "float", "plain": qlora_run}
    first = {name: json.loads((f / "metrics.jsonl").read_text().splitlines()[0]) for name, f in folders.items()}
    assert {row["step"] for row in first.values()} == {1}
    start = {name: row["loss"] for name, row in first.items()}
    assert abs(start["loftq"] - start["float"]) < abs(start["plain"] - start["float"])
    config = json.loads((tmp_path / "loftq" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    # one alternation leaves the base a plain quantized load gives: eval there sees what training measured
    result = check_ok(
        invoke("eval", "--adapter", tmp_path / "loftq", "--quantize", "nf4", "--test-data", assets.cls_eval_csv)
    )
    metrics = json.loads(result.output[result.output.index("{") :])
    assert metrics["loss"] == pytest.approx(runs["loftq"]["test_after"]["loss"], rel=1e-5)


def test_train_loftq_without_a_loftq_grid_is_refused(cli_assets, tmp_path):
    assets, llama64 = cli_assets
    for quantize in ("none", "fp4"):
        args = train_args(
            assets, tmp_path / quantize, "--quantize", quantize, "--init-lora-weights", "loftq", model=llama64
        )
        result = invoke(*args)
        assert result.exit_code != 0 and "use --quantize nf4 or int8" in result.output, result.output
        assert not (tmp_path / quantize).exists()


def test_train_loftq_is_lora_s_start(cli_assets, tmp_path, caplog):
    """DoRA is refused; for a method without LoRA's start the option is ignored, as it says, and the
    base is loaded quantized (the parallel adapter's hook on a layer survives: no in-place swap)."""
    assets, llama64 = cli_assets
    loftq = ("--quantize", "nf4", "--init-lora-weights", "loftq")
    result = invoke(*train_args(assets, tmp_path / "dora", *loftq, "--method", "dora", model=llama64))
    assert result.exit_code != 0 and "use --method lora" in result.output, result.output
    assert not (tmp_path / "dora").exists()
    args = ("--method", "adapter", "--placement", "parallel", "--max-steps", "2")
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        check_ok(invoke(*train_args(assets, tmp_path / "adapter", *loftq, *args, model=llama64)))
    assert "--init-lora-weights applies to --method lora/dora, not adapter; ignored" in caplog.text
    summary = json.loads((tmp_path / "adapter" / "summary.json").read_text())
    assert summary["quantization"] == "nf4" and summary["base_model_bytes"] < summary["full_model_bytes"]
