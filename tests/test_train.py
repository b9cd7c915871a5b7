"""The trainer: schedule, batch plans, resume after a kill or Ctrl-C, accumulation, transformers.Trainer."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import Trainer as HFTrainer
from transformers import TrainerCallback, TrainingArguments

import deltatune as dt
from deltatune.integrations import AdapterTrainer, SaveAdapterCallback
from deltatune.run_folder import LATEST
from deltatune.train import (
    TrainArgs,
    compile_blocks,
    enable_gradient_checkpointing,
    learning_rate,
    plan_epoch,
)
from tiny_assets import (
    ROOT,
    adapter_tensors,
    assert_same_tensors,
    check_ok,
    deltatune_command,
    invoke,
    read_jsonl,
    session_assets,
    subprocess_env,
    train_args,
)

from conftest import VOCAB, tiny_inputs, tiny_llama


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


# -- learning-rate schedule ------------------------------------------------------------------------
def lrs(schedule: str, warmup: float, total: int = 10, lr: float = 1.0) -> list[float]:
    args = TrainArgs(output=Path("unused"), lr=lr, warmup=warmup, schedule=schedule)
    return [learning_rate(step, total, args) for step in range(total)]


def test_linear_schedule_after_warmup_by_hand():
    # 2 warmup steps reach the peak; then the rate falls linearly over the 8 steps left
    expected = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]
    assert lrs("linear", warmup=2) == pytest.approx(expected)
    assert lrs("linear", warmup=0.2) == pytest.approx(expected)  # a fraction of the 10 steps
    assert lrs("linear", warmup=2, lr=3e-4) == pytest.approx([3e-4 * v for v in expected])


def test_cosine_schedule_after_warmup_by_hand():
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    got = lrs("cosine", warmup=2)
    assert got == pytest.approx(expected)
    assert got[6] == pytest.approx(0.5)  # half way through the decay
    assert got[4] == pytest.approx(0.5 * (1 + math.sqrt(0.5)))


def test_constant_schedule_and_no_warmup():
    assert lrs("constant", warmup=4) == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 6)
    assert lrs("constant", warmup=0) == [1.0] * 10
    assert lrs("linear", warmup=0) == pytest.approx([1 - k / 10 for k in range(10)])
    assert lrs("linear", warmup=0.05)[0] == 1.0  # 5% of 10 steps rounds down to no warmup


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="linear, cosine or constant"):
        TrainArgs(output=Path("unused"), schedule="step")


# -- batch plans -----------------------------------------------------------------------------------
def random_lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 200, (n,), generator=generator).tolist()


@pytest.mark.parametrize("group", [False, True])
def test_plan_epoch_is_deterministic_and_covers_each_example_at_most_once(group):
    lengths = random_lengths(70)
    plan = plan_epoch(lengths, 8, seed=3, epoch=0, group=group)
    assert plan == plan_epoch(lengths, 8, seed=3, epoch=0, group=group)
    assert plan != plan_epoch(lengths, 8, seed=4, epoch=0, group=group)
    assert plan != plan_epoch(lengths, 8, seed=3, epoch=1, group=group)
    assert len(plan) == 70 // 8 and all(len(batch) == 8 for batch in plan)  # the short last batch is dropped
    seen = [i for batch in plan for i in batch]
    assert len(seen) == len(set(seen)) == 64 and set(seen) <= set(range(70))
    for epoch in range(1, 4):
        other = [i for batch in plan_epoch(lengths, 8, seed=3, epoch=epoch, group=group) for i in batch]
        assert len(set(other)) == 64


def test_plan_epoch_drops_a_different_remainder_each_epoch():
    lengths = random_lengths(70)
    dropped = [
        set(range(70)) - {i for b in plan_epoch(lengths, 8, seed=3, epoch=e, group=False) for i in b} for e in range(3)
    ]
    assert all(len(d) == 6 for d in dropped) and len({frozenset(d) for d in dropped}) > 1


def test_plan_epoch_groups_lengths():
    lengths = random_lengths(256, seed=1)
    grouped = plan_epoch(lengths, 8, seed=0, epoch=0, group=True)
    plain = plan_epoch(lengths, 8, seed=0, epoch=0, group=False)

    def padding(plan: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plan)

    assert padding(grouped) * 5 < padding(plain)
    # one window (256 <= 8 * 32): batches are runs of the length order, so their ranges do not overlap
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in grouped)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    # ... yet the batches themselves come in shuffled order, not longest first
    firsts = [max(lengths[i] for i in b) for b in grouped]
    assert firsts != sorted(firsts, reverse=True)


def test_plan_epoch_with_fewer_examples_than_a_batch_is_empty():
    assert plan_epoch([3, 4, 5], 8, seed=0, epoch=0, group=True) == []


# -- resume ----------------------------------------------------------------------------------------
RESUME_FLAGS = ("--max-steps", "8", "--save-every", "2", "--batch-size", "8")


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """An uninterrupted run with the resume test's arguments."""
    out = tmp_path_factory.mktemp("train") / "reference"
    check_ok(invoke(*train_args(assets, out, *RESUME_FLAGS)))
    return out


def latest_step(out: Path) -> int | None:
    try:
        name = (out / LATEST).read_text().strip()
    except (FileNotFoundError, ValueError):
        return None
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") else None


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and the child would inherit that; a user's
    # Ctrl-C reaches a process whose SIGINT is not ignored, so restore the default before exec.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_training(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen(
            deltatune_command(*args),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            cwd=ROOT,
            preexec_fn=_default_sigint,
        )


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before the awaited state:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def test_resume_after_a_kill_gives_the_uninterrupted_result(assets, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = train_args(assets, out, *RESUME_FLAGS)
    log = tmp_path / "log.txt"
    proc = start_training(out, args, log)
    wait_for(lambda: (latest_step(out) or 0) >= 2, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    killed_at = latest_step(out)
    assert killed_at in (2, 4, 6)
    assert not (out / "adapter").exists()  # it really stopped mid-run
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    state = json.loads((out / f"checkpoint-{killed_at}" / "trainer_state.json").read_text())
    assert state["step"] == killed_at

    check_ok(invoke(*args, "--resume"))
    assert latest_step(out) == 8
    assert_same_tensors(adapter_tensors(out / "adapter"), adapter_tensors(reference_run / "adapter"), atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    # the steps after the checkpoint were logged again with the same losses as the uninterrupted run
    reference = {r["step"]: r["loss"] for r in read_jsonl(reference_run / "metrics.jsonl")}
    resumed = [r for r in read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in resumed] == list(range(1, 9))  # the steps after the checkpoint, once
    for row in resumed:
        assert row["loss"] == pytest.approx(reference[row["step"]], abs=1e-5)


def test_resume_with_another_batch_size_is_a_clear_error(assets, reference_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    result = invoke(*train_args(assets, out, "--max-steps", "8", "--batch-size", "4", "--resume"))
    assert result.exit_code != 0
    message = result.output + ("" if isinstance(result.exception, SystemExit) else str(result.exception))
    assert "--batch-size 4 (the run used 8)" in message
    assert adapter_tensors(out / "adapter").keys() == adapter_tensors(reference_run / "adapter").keys()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(assets, tmp_path):
    out = tmp_path / "interrupted"
    args = train_args(assets, out, "--max-steps", "1000", "--save-every", "0", "--batch-size", "8")
    log = tmp_path / "log.txt"
    proc = start_training(out, args, log)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc, log)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "--resume" in text and "interrupted" in text
    assert "Traceback" not in text
    step = latest_step(out)
    assert step is not None and 2 <= step < 1000
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["step"] == step
    assert (out / f"checkpoint-{step}" / "trained" / "adapter_model.safetensors").is_file()
    assert len([r for r in read_jsonl(metrics) if "split" not in r]) == step


# -- gradient accumulation ---------------------------------------------------------------------------
def test_gradient_accumulation_matches_a_full_batch(assets, reference_run, tmp_path):
    out = tmp_path / "accum"
    args = train_args(assets, out, *RESUME_FLAGS)
    args[args.index("--batch-size") + 1] = "4"
    check_ok(invoke(*args, "--grad-accum", "2"))
    assert_same_tensors(adapter_tensors(out / "adapter"), adapter_tensors(reference_run / "adapter"), atol=1e-6)
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    reference = [r["loss"] for r in read_jsonl(reference_run / "metrics.jsonl")]
    assert losses == pytest.approx(reference, abs=1e-5)


def test_gradient_checkpointing_flag_gives_the_same_run(assets, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        out = tmp_path / name
        check_ok(invoke(*train_args(assets, out, "--max-steps", "2", "--batch-size", "8", *extra)))
        runs[name] = out
    assert_same_tensors(
        adapter_tensors(runs["plain"] / "adapter"), adapter_tensors(runs["checkpointed"] / "adapter"), atol=1e-5
    )


# -- gradient checkpointing ------------------------------------------------------------------------
def lora_llama(seed: int = 0) -> dt.PeftModel:
    model = tiny_llama()
    torch.manual_seed(seed)
    config = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return dt.get_peft_model(model, config)


def loss_and_grads(model: dt.PeftModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs = tiny_inputs("llama", batch=3, length=9)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.train()
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def count_calls(function, counter: Counter, key: str):
    def counted(*args, **kwargs):
        counter.update([key])
        return function(*args, **kwargs)

    return counted


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = lora_llama()
    checkpointed = lora_llama()
    enable_gradient_checkpointing(checkpointed)
    base = checkpointed.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    calls = Counter()
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        loss_and_grads(model)  # the fused loss's once-per-model check runs the model twice more: not counted
        mlp = model.get_base_model().model.layers[0].mlp
        mlp.forward = count_calls(mlp.forward, calls, name)  # forward hooks do not fire on recomputation
    loss, grads = loss_and_grads(plain)
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed)
    assert calls == {"plain": 1, "checkpointed": 2}  # the activations really were recomputed
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-5, rtol=0)
    assert sorted(grads) == sorted(grads_ckpt) and any("lora_A" in n for n in grads)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=0, msg=name)


# -- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_gradients_and_names(tmp_path):
    eager, compiled = lora_llama(), lora_llama()
    blocks = compile_blocks(compiled)
    assert blocks == ["model.layers.0", "model.layers.1"]
    layer = compiled.get_base_model().model.layers[0]
    assert layer._compiled_call_impl is not None  # really compiled, in place
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    loss, grads = loss_and_grads(eager)
    loss_compiled, grads_compiled = loss_and_grads(compiled)
    torch.testing.assert_close(loss_compiled, loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
    compiled.save_pretrained(tmp_path / "compiled")
    eager.save_pretrained(tmp_path / "eager")
    assert sorted(adapter_tensors(tmp_path / "compiled")) == sorted(adapter_tensors(tmp_path / "eager"))


@pytest.mark.slow
def test_compile_flag_gives_the_same_run(assets, tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        check_ok(invoke(*train_args(assets, out, "--max-steps", "2", "--batch-size", "8", *extra)))
        runs[name] = out
    assert_same_tensors(
        adapter_tensors(runs["eager"] / "adapter"), adapter_tensors(runs["compiled"] / "adapter"), atol=1e-5
    )


def test_compile_without_transformer_blocks_is_a_clear_error():
    model = dt.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="no transformer blocks to compile"):
        compile_blocks(model)


# -- transformers.Trainer ----------------------------------------------------------------------------
def lm_dataset(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


class LogitsAtSave(TrainerCallback):
    """Records the model's logits on a probe batch at every save, keyed by step."""

    def __init__(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        self.logits[state.global_step] = probe_logits(model)


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**tiny_inputs("llama")).logits
    model.train(was_training)
    return logits


def hf_args(output: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output),
        use_cpu=True,
        report_to=[],
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def check_adapter_folders(output: Path, recorder: LogitsAtSave, final: torch.Tensor) -> None:
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for folder in checkpoints:
        step = int(folder.name.split("-")[1])
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        loaded = dt.PeftModel.from_pretrained(tiny_llama(), folder)
        torch.testing.assert_close(probe_logits(loaded), recorder.logits[step], atol=1e-6, rtol=0)
    assert (output / "adapter_config.json").is_file()
    loaded = dt.PeftModel.from_pretrained(tiny_llama(), output)
    torch.testing.assert_close(probe_logits(loaded), final, atol=1e-6, rtol=0)
    assert not torch.allclose(final, probe_logits(tiny_llama()), atol=1e-4)  # training changed the model
    assert not torch.allclose(recorder.logits[2], recorder.logits[4], atol=1e-6)


def test_adapter_trainer_saves_adapters(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    recorder = LogitsAtSave()
    trainer = AdapterTrainer(model=model, args=hf_args(tmp_path), train_dataset=lm_dataset(), callbacks=[recorder])
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    trainer.save_model()
    check_adapter_folders(tmp_path, recorder, probe_logits(model))
    assert not (tmp_path / "model.safetensors").exists()  # an adapter, not a full copy of the model


def test_stock_trainer_with_save_adapter_callback(tmp_path):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    recorder = LogitsAtSave()
    trainer = HFTrainer(
        model=model,
        args=hf_args(tmp_path),  # remove_unused_columns=True: the base model's columns are kept
        train_dataset=lm_dataset(),
        callbacks=[SaveAdapterCallback(), recorder],
    )
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    check_adapter_folders(tmp_path, recorder, probe_logits(model))


def test_adapter_trainer_keeps_the_base_models_columns(tmp_path):
    """remove_unused_columns=True (the default) must not drop input_ids: PeftModel.forward takes **kwargs."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rows = [dict(row, note="unused") for row in lm_dataset(8)]
    trainer = AdapterTrainer(model=model, args=hf_args(tmp_path, max_steps=1, save_strategy="no"), train_dataset=rows)
    assert trainer.train().global_step == 1


def test_an_interrupt_inside_a_step_takes_effect_when_the_step_ends():
    import os
    import signal

    from deltatune.train import interrupts_between_steps

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_between_steps():
            os.kill(os.getpid(), signal.SIGINT)  # delivered now, deferred
            finished.append("the rest of the step")
    assert finished == ["the rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    with pytest.raises(KeyboardInterrupt):
        with interrupts_between_steps():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
            finished.append("never")
    assert finished == ["the rest of the step"]
