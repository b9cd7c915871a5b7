"""Devices: what the library creates follows the model's device, and a GPU computes what the CPU does.

Two kinds of test. The ``meta`` device stands in for a GPU on any machine: an operation mixing
its tensors with CPU tensors raises, as it does with CUDA tensors, so a tensor created on the CPU
by mistake shows up here without a GPU. The ``device`` tests (marker ``device``) run each method
on the accelerator and compare with the same computation on the CPU; they need CUDA and are
skipped without it. ``DELTATUNE_TEST_DEVICE=cpu`` runs them against the CPU itself, which checks
the tests, not a device.
"""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch

import deltatune as dt
from tiny_assets import check_ok, invoke, read_jsonl, session_assets, train_args

from conftest import LLAMA_METHODS, perturb_trainable, tiny_inputs, tiny_model

DEVICE = os.environ.get("DELTATUNE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
on_device = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (DELTATUNE_TEST_DEVICE=cpu checks the tests)")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def two_adapters(device: str = "cpu") -> dt.PeftModel:
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=4, init_lora_weights=False), "a")
    model.add_adapter("b", dt.LoraConfig(r=4, init_lora_weights=False))
    return model.to(device)


def on(inputs: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def loss_and_grads(model: torch.nn.Module, device: str, autocast: torch.dtype | None = None) -> tuple[float, dict]:
    inputs = on(tiny_inputs("llama"), device)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


# -- the meta device: placement bugs without a GPU ---------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "ties", "ties_svd"])
def test_weighted_adapters_are_built_on_the_models_device(kind):
    model = two_adapters("meta")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type=kind, density=0.5)
    mixed = [p for n, p in model.named_parameters() if ".mix." in n]
    assert mixed and all(p.device.type == "meta" for p in mixed)


def test_soft_prompt_is_initialised_on_the_models_device():
    config = dt.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM", task_type="CAUSAL_LM")
    model = dt.get_peft_model(tiny_model("llama").to("meta"), config)
    assert all(p.device.type == "meta" for p in model.parameters())


# -- an accelerator against the CPU -------------------------------------------------------------------
@on_device
@pytest.mark.device
@pytest.mark.parametrize("method", sorted(set(LLAMA_METHODS) - {"lora-dropout"}))  # masks differ by device
def test_every_method_on_the_device_computes_what_the_cpu_computes(method):
    torch.manual_seed(0)
    cpu = dt.get_peft_model(tiny_model("llama"), LLAMA_METHODS[method]())
    perturb_trainable(cpu)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    cpu_loss, cpu_grads = loss_and_grads(cpu, "cpu")
    gpu_loss, gpu_grads = loss_and_grads(gpu, DEVICE)
    assert gpu_loss == pytest.approx(cpu_loss, abs=1e-4)
    assert set(gpu_grads) == set(cpu_grads)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@on_device
@pytest.mark.device
@pytest.mark.parametrize("variant", ["plain", "dora"])
def test_lora_under_bf16_autocast_on_the_device_is_as_accurate_as_peft(variant, tmp_path):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": variant == "dora"}
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**kwargs))
    perturb_trainable(reference)
    reference.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path, is_trainable=True).to(DEVICE)
    reference.to(DEVICE)
    _, exact = loss_and_grads(ours, DEVICE)
    _, our_grads = loss_and_grads(ours, DEVICE, torch.bfloat16)
    _, peft_grads = loss_and_grads(reference, DEVICE, torch.bfloat16)
    peft_grads = {
        n.replace("magnitude_vector.default.weight", "magnitude_vector.default"): g for n, g in peft_grads.items()
    }

    def error(grads: dict) -> float:
        num = sum(float((grads[n] - g).norm() ** 2) for n, g in exact.items())
        return (num / sum(float(g.norm() ** 2) for g in exact.values())) ** 0.5

    assert error(our_grads) <= 1.5 * error(peft_grads) + 1e-3


@on_device
@pytest.mark.device
def test_mixed_adapter_batch_on_the_device_matches_each_adapter_alone():
    model = two_adapters(DEVICE).eval()
    inputs = on(tiny_inputs("llama"), DEVICE)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["a", "b"]).logits
        alone = []
        for row, name in enumerate(["a", "b"]):
            model.set_adapter(name)
            alone.append(model(**inputs).logits[row])
    torch.testing.assert_close(mixed, torch.stack(alone), atol=1e-5, rtol=1e-4)


@on_device
@pytest.mark.device
@pytest.mark.parametrize("kind", ["linear", "svd", "ties"])
def test_weighted_adapters_on_the_device_equal_the_cpus(kind):
    deltas = {}
    for device in ("cpu", DEVICE):
        model = two_adapters(device)
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type=kind, density=0.5)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        deltas[device] = layer.get_delta_weight("mix").cpu()  # B A: the factors' signs may differ (SVD)
    torch.testing.assert_close(deltas[DEVICE], deltas["cpu"], atol=1e-4, rtol=1e-3)


@on_device
@pytest.mark.device
def test_merged_model_and_saved_adapter_from_the_device_match_the_cpu(tmp_path):
    model = two_adapters(DEVICE).eval()
    inputs = on(tiny_inputs("llama"), DEVICE)
    with torch.no_grad():
        unmerged = model(**inputs).logits
        model.merge_adapter()
        merged = model(**inputs).logits
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a", adapter_name="a").eval()
    with torch.no_grad():
        on_cpu = loaded(**tiny_inputs("llama")).logits
    torch.testing.assert_close(on_cpu, unmerged.cpu(), atol=1e-4, rtol=1e-4)


@on_device
@pytest.mark.device
def test_train_command_on_the_device(assets, tmp_path):
    """``deltatune train --device cuda``: default precision, the loss falls, the adapter loads on the CPU."""
    out = tmp_path / "run"
    check_ok(invoke(*train_args(assets, out, "--max-steps", "6", "--batch-size", "8", "--device", DEVICE)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == torch.device(DEVICE).type
    bf16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported()
    assert summary["precision"] == ("bf16" if bf16 else "fp32")
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from transformers import AutoModelForCausalLM

    loaded = dt.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.llama), out / "adapter")
    assert loaded.peft_config["default"].r == 4
