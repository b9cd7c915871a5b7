"""LoRA checkpoints cross between HF PEFT and deltatune with identical outputs, both ways.

For each tiny model and LoRA variant: one library builds an adapter with non-zero weights
(``init_lora_weights=False`` and every trainable tensor perturbed), saves it, the other library
loads it onto a fresh copy of the same base, and the logits agree to 1e-5. Gradients of one training
step agree too, which pins down DoRA's treatment of the weight norm as a constant.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune as dt

from conftest import perturb_trainable, tiny_inputs, tiny_model

TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value"],
    "t5": ["q", "v"],
}
EMBEDDINGS = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
HEADS = {"llama": "lm_head", "gpt2": "lm_head", "t5": "lm_head"}


def variant_kwargs(kind: str, variant: str) -> dict | None:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": list(TARGETS[kind]), "init_lora_weights": False}
    if kind == "gpt2":
        kwargs["fan_in_fan_out"] = True
    if kind == "bert":
        kwargs["task_type"] = "SEQ_CLS"
    if variant == "plain":
        pass
    elif variant == "dora":
        kwargs["use_dora"] = True
    elif variant == "rslora":
        kwargs.update(r=6, lora_alpha=12, use_rslora=True)
    elif variant == "embedding":
        if kind not in EMBEDDINGS:
            return None  # T5 shares one embedding between encoder and decoder: not a fair test
        kwargs["target_modules"] = kwargs["target_modules"] + [EMBEDDINGS[kind]]
    elif variant == "modules_to_save":
        if kind not in HEADS:
            return None  # BERT's head is saved in every variant through task_type=SEQ_CLS
        kwargs["modules_to_save"] = [HEADS[kind]]
    elif variant == "bias_all":
        if kind not in ("gpt2", "bert"):
            return None  # Llama and T5 have no biases
        kwargs["bias"] = "all"
    elif variant == "patterns":
        kwargs["rank_pattern"] = {
            "layers.1.self_attn.q_proj": 2,
            "h.1.attn.c_attn": 2,
            "layer.1.attention.self.query": 2,
        }
        kwargs["alpha_pattern"] = {"v_proj": 3, "c_proj": 3, "value": 3, "q": 5}
    elif variant == "lora_bias":
        kwargs["lora_bias"] = True
    return kwargs


VARIANTS = ["plain", "dora", "rslora", "embedding", "modules_to_save", "bias_all", "patterns", "lora_bias"]
CASES = [
    pytest.param(kind, variant, id=f"{kind}-{variant}")
    for kind in ("llama", "gpt2", "bert", "t5")
    for variant in VARIANTS
    if variant_kwargs(kind, variant) is not None
]


def logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def saved_keys(directory) -> set[str]:
    from safetensors.torch import load_file

    return set(load_file(str(directory / "adapter_model.safetensors")))


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_peft_checkpoint_loads_in_deltatune(kind, variant, tmp_path):
    kwargs = variant_kwargs(kind, variant)
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(**kwargs))
    perturb_trainable(reference)
    reference.eval()
    expected = logits(reference, kind)
    reference.save_pretrained(tmp_path)

    loaded = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    torch.testing.assert_close(logits(loaded, kind), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(tiny_model(kind), kind), atol=1e-3), "adapter had no effect"

    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged, kind), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_deltatune_checkpoint_loads_in_peft(kind, variant, tmp_path):
    kwargs = variant_kwargs(kind, variant)
    torch.manual_seed(3)
    ours = dt.get_peft_model(tiny_model(kind), dt.LoraConfig(**kwargs))
    perturb_trainable(ours)
    ours.eval()
    expected = logits(ours, kind)
    ours.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "task_type" in config
    assert list(config) == sorted(config), "PEFT writes sorted keys"

    reference = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path).eval()
    torch.testing.assert_close(logits(reference, kind), expected, atol=1e-5, rtol=1e-5)

    # Same files, same keys: what PEFT writes for this adapter is what we wrote.
    peft_dir = tmp_path / "peft"
    reference.save_pretrained(peft_dir)
    peft_keys = saved_keys(peft_dir)
    if variant == "embedding":  # PEFT also writes the whole base embedding ("save_embedding_layers")
        peft_keys = {k for k in peft_keys if not k.endswith("base_layer.weight")}
    if variant == "bias_all":  # PEFT also writes the head's frozen original bias and its copy's bias again
        peft_keys = {k.replace(".modules_to_save", "") for k in peft_keys if ".original_module." not in k}
    assert peft_keys == saved_keys(tmp_path)


@pytest.mark.parametrize("variant", ["plain", "dora", "rslora", "embedding", "lora_bias"])
def test_training_gradients_match_peft(variant, tmp_path):
    """Same weights in, same loss and same gradients out, for one training step."""
    kind = "llama"
    kwargs = variant_kwargs(kind, variant)
    torch.manual_seed(3)
    reference = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(**kwargs))
    perturb_trainable(reference)
    reference.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path, is_trainable=True)

    inputs = tiny_inputs(kind)
    labels = inputs["input_ids"]
    reference.train()
    ours.train()
    ref_loss = reference(**inputs, labels=labels).loss
    our_loss = ours(**inputs, labels=labels).loss
    torch.testing.assert_close(our_loss, ref_loss, atol=1e-6, rtol=0)
    ref_loss.backward()
    our_loss.backward()

    # PEFT keeps DoRA's magnitude in a module (".weight"); here it is a plain parameter.
    ref_grads = {
        n.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): p.grad
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(our_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_non_default_adapters_use_peft_subfolders(tmp_path):
    ours = dt.get_peft_model(
        tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    ours.add_adapter("second", dt.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()

    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    reference.load_adapter(tmp_path / "second", adapter_name="second")
    reference.set_adapter("second")
    ours.set_adapter("second")
    ours.eval()
    reference.eval()
    torch.testing.assert_close(logits(ours, "llama"), logits(reference, "llama"), atol=1e-5, rtol=1e-5)


def test_peft_multi_adapter_directory_loads_by_name(tmp_path):
    reference = peft.get_peft_model(
        tiny_model("gpt2"), peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )
    reference.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
    reference.save_pretrained(tmp_path)
    reference.set_adapter("other")
    reference.eval()

    ours = dt.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    ours.set_adapter("other")
    torch.testing.assert_close(logits(ours, "gpt2"), logits(reference, "gpt2"), atol=1e-5, rtol=1e-5)
