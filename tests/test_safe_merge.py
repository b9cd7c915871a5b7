"""``safe_merge=True`` refuses an adapter whose merge gives non-finite weights, for every mergeable method,
and leaves the base weights as they were; a finite adapter merges as without the check."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt

MERGEABLE = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "dora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    "lora_embedding": lambda: dt.LoraConfig(r=4, target_modules=["embed_tokens"]),
    "ia3": lambda: dt.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: dt.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: dt.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: dt.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    "oft": lambda: dt.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]),
    "boft": lambda: dt.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"]),
    "adalora": lambda: dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]),
    "ln_tuning": lambda: dt.LNTuningConfig(target_modules=["input_layernorm"]),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(MERGEABLE))
def test_safe_merge_refuses_non_finite_weights_and_changes_nothing(method):
    """Even when only the last adapted layer is broken, no layer stays merged."""
    model = dt.get_peft_model(tiny_llama(), MERGEABLE[method]())
    trained = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    with torch.no_grad():  # away from the identity, and only the last layer broken: the others merge first
        for parameter in trained:
            parameter.add_(torch.randn_like(parameter) * 0.1)
        trained[-1].fill_(float("nan"))
    before = base_state(model.get_base_model())
    with pytest.raises(ValueError, match="non-finite.*'default'|'default'.*non-finite"):
        model.merge_adapter(safe_merge=True)
    after = base_state(model.get_base_model())
    assert after.keys() == before.keys()
    for key, tensor in before.items():
        assert torch.allclose(after[key], tensor, rtol=0, atol=0, equal_nan=True), key


@pytest.mark.parametrize("method", sorted(MERGEABLE))
def test_safe_merge_of_a_finite_adapter_equals_the_plain_merge(method):
    ids = torch.arange(12).view(2, 6)
    outputs = []
    for safe in (False, True):
        model = dt.get_peft_model(tiny_llama(), MERGEABLE[method]())
        torch.manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        merged = model.merge_and_unload(safe_merge=safe)
        with torch.no_grad():
            outputs.append(merged(input_ids=ids).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
