"""Mixed precision: every method under ``torch.autocast`` (bf16, fp16), and the trainer's ``precision``.

Most GPU training runs under autocast (``Trainer(bf16=True)``, ``deltatune train`` on a GPU). CPU
autocast runs the same code paths here, slowly: the fused LoRA function must cast as autocast
would, since autocast does not reach into an autograd function's backward.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import peft
import pytest
import torch

import deltatune as dt
from deltatune.methods.lora_kernel import FusedLoraLinear
from deltatune.run import build_task
from deltatune.train import autocast, resolve_precision
from tiny_assets import check_ok, classification_rows, invoke, read_jsonl, session_assets, train_args

from conftest import LLAMA_METHODS, perturb_trainable, tiny_inputs, tiny_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def loss_and_grads(model: torch.nn.Module, dtype: torch.dtype | None) -> tuple[torch.Tensor, dict]:
    inputs = tiny_inputs("llama")
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
        out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().float(), grads


def error(grads: dict, reference: dict) -> float:
    """Relative error of all gradients together against the float32 reference."""
    num = sum(float((grads[n].float() - g).norm() ** 2) for n, g in reference.items())
    den = sum(float(g.norm() ** 2) for g in reference.values())
    return (num / den) ** 0.5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["plain", "dora", "rslora"])
def test_lora_under_autocast_is_as_accurate_as_peft(precision, variant, tmp_path, monkeypatch):
    """Same weights in: under autocast our loss and gradients are as close to float32 as PEFT's are."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0}
    kwargs |= {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "plain": {}}[variant]
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kwargs))
    perturb_trainable(reference)
    reference.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True)
    # The adapter layers' precision against PEFT's: both losses from the full logits, as PEFT's is (the
    # fused LM-head loss under autocast is tested in test_causal_lm_loss.py; with it on, this one
    # sample's error is 0.0094 for DoRA instead of 0.0067, and 0.0075-0.0089 over other seeds where
    # the plain loss gives 0.0076-0.0098: rounding noise, not a bias).
    ours.fused_loss = False
    calls = Counter()
    apply = FusedLoraLinear.apply
    monkeypatch.setattr(FusedLoraLinear, "apply", lambda *a: calls.update(["fused"]) or apply(*a))

    exact_loss, exact = loss_and_grads(ours, None)
    calls.clear()
    our_loss, our_grads = loss_and_grads(ours, DTYPES[precision])
    peft_loss, peft_grads = loss_and_grads(reference, DTYPES[precision])

    assert calls["fused"] == (0 if variant == "dora" else 14)  # 2 layers x 7 linears, still fused
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in our_grads.values())
    assert abs(our_loss - exact_loss) <= 2 * abs(peft_loss - exact_loss) + 1e-3
    peft_grads = {
        n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): g
        for n, g in peft_grads.items()
    }
    assert set(peft_grads) == set(our_grads)
    ours_err, peft_err = error(our_grads, exact), error(peft_grads, exact)
    assert ours_err <= 1.5 * peft_err + 1e-3, (ours_err, peft_err)
    assert ours_err < 0.05  # and low precision has not broken anything


@pytest.mark.parametrize("method", sorted(LLAMA_METHODS))
def test_every_method_trains_under_bf16_autocast(method):
    """Loss and gradients under bf16 autocast stay close to float32; every gradient is float32."""
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), LLAMA_METHODS[method]())
    perturb_trainable(model)
    if method == "lora-dropout":  # the two passes must draw the same dropout masks: compare in eval mode
        model.eval()
        model.train = lambda mode=True: model  # noqa: ARG005
    torch.manual_seed(1)
    exact_loss, exact = loss_and_grads(model, None)
    torch.manual_seed(1)
    loss, grads = loss_and_grads(model, torch.bfloat16)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    assert abs(float(loss - exact_loss)) < 0.05 * float(exact_loss)
    assert error(grads, exact) < 0.1


def test_mixed_adapter_batch_under_autocast_matches_each_adapter_alone():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=4, target_modules="all-linear"), "a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules="all-linear"))
    perturb_trainable(model)
    model.eval()
    inputs = tiny_inputs("llama")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(**inputs, adapter_names=["a", "b"]).logits
        alone = []
        for row, name in enumerate(["a", "b"]):
            model.set_adapter(name)
            alone.append(model(**inputs).logits[row])
    torch.testing.assert_close(mixed.float(), torch.stack(alone).float(), atol=3e-2, rtol=3e-2)


def test_label_generation_head_outside_the_model_agrees_under_autocast(assets):
    """The once-per-model check passes under bf16 (no fallback warning); loss as the model's own logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.llama)
    records = classification_rows(16, seed=0)
    options = {"max_length": 64, "on_long": "truncate", "text_column": "text", "label_column": "label", "data": "rows"}
    task = build_task("label-generation", tokenizer, records, options)
    batch = task.collate(task.encode(records[:8], source="rows"))
    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(assets.llama), dt.LoraConfig(r=4))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autocast(torch.device("cpu"), "bf16"):
            ours = task.loss_sum(model, batch)
            plain = torch.nn.functional.cross_entropy(
                task._outputs(model, batch).float(), batch["target_tokens"], reduction="sum"
            )
    assert task.head_loss.verdicts and all(task.head_loss.verdicts.values())
    torch.testing.assert_close(ours, plain, rtol=2e-2, atol=0)


# -- the trainer ---------------------------------------------------------------------------------
def test_resolve_precision(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", gpu) == "fp32"
    with pytest.raises(ValueError, match="no bf16 support; use --precision fp16 or fp32"):
        resolve_precision("bf16", gpu)
    with pytest.raises(ValueError, match="auto or one of fp32, bf16, fp16"):
        resolve_precision("fp8", cpu)


def test_low_precision_runs_follow_the_fp32_run(assets, tmp_path):
    """``--precision bf16/fp16``: the same run, losses within low-precision rounding of float32's."""
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        check_ok(invoke(*train_args(assets, out, "--max-steps", "4", "--batch-size", "8", "--precision", precision)))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["precision"] == precision
        losses[precision] = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        assert bool(state["grad_scaler"]) == (precision == "fp16")  # loss scaling for fp16 only
    assert losses["fp32"][-1] < losses["fp32"][0]
    for precision in ("bf16", "fp16"):
        assert losses[precision] == pytest.approx(losses["fp32"], rel=0.05), precision


def test_fp16_resume_restores_the_loss_scale(assets, tmp_path):
    out = tmp_path / "run"
    check_ok(invoke(*train_args(assets, out, "--max-steps", "2", "--batch-size", "8", "--precision", "fp16")))
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["grad_scaler"]["scale"] > 1
    state["grad_scaler"]["scale"] = 1024.0  # a scale the run would not reach by itself in 3 steps
    state_file.write_text(json.dumps(state))
    args = train_args(assets, out, "--max-steps", "3", "--batch-size", "8", "--precision", "fp16", "--resume")
    check_ok(invoke(*args))
    resumed = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert resumed["grad_scaler"]["scale"] in (1024.0, 512.0)  # kept, or halved after an overflow


def test_transformers_trainer_with_bf16_trains_our_adapter_as_it_trains_peft(tmp_path):
    """A PEFT user's ``Trainer(bf16=True)`` script, with deltatune imported instead: same losses."""
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 99, (16, 8), generator=generator)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    config = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False}
    losses = {}
    for name, lib in (("peft", peft), ("deltatune", dt)):
        torch.manual_seed(0)
        model = lib.get_peft_model(tiny_model("llama"), lib.LoraConfig(**config))
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            use_cpu=True,
            bf16=True,
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses[name] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses["deltatune"]) == 4
    assert losses["deltatune"] == pytest.approx(losses["peft"], rel=2e-2)


# -- a half-precision base with float32 adapters (no autocast) -------------------------------------
class Holder(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(24, 20).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fused_lora_on_a_half_precision_base_computes_what_peft_computes(precision, monkeypatch):
    """Half base, float32 adapters: the fused path, with PEFT's numbers (low-rank products in float32)."""
    dtype = DTYPES[precision]
    ours = dt.get_peft_model(Holder(dtype), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    theirs = peft.get_peft_model(Holder(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    perturb_trainable(theirs)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                param.copy_(dict(theirs.named_parameters())[name])
    assert ours.base_model.model.proj.lora_A["default"].weight.dtype == torch.float32  # as PEFT keeps them
    calls = Counter()
    apply = FusedLoraLinear.apply
    monkeypatch.setattr(FusedLoraLinear, "apply", lambda *a: calls.update(["fused"]) or apply(*a))
    x = torch.randn(3, 5, 24).to(dtype)
    weights = torch.linspace(-1, 1, 20)
    results = []
    for model in (ours, theirs):
        model.train()
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out.float() * weights).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, xi.grad, grads))
    assert calls["fused"] == 1
    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    assert out.dtype == ref_out.dtype == dtype and grad_x.dtype == dtype
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-2, atol=1e-2)
    for name, grad in ref_grads.items():
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-3, msg=name)


def test_half_precision_llama_with_lora_trains_as_peft_does(tmp_path):
    """A bf16 model with float32 adapters (no autocast): loss and gradients as PEFT's."""
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    perturb_trainable(reference)
    reference.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path, is_trainable=True)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path, is_trainable=True)
    our_loss, our_grads = loss_and_grads(ours, None)
    peft_loss, peft_grads = loss_and_grads(reference, None)
    assert our_loss == pytest.approx(float(peft_loss), abs=2e-2)
    assert set(our_grads) == set(peft_grads)
    assert all(g.dtype == torch.float32 for g in our_grads.values())
    assert error(our_grads, peft_grads) < 2e-2
