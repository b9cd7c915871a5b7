"""Shared fixtures: tiny randomly initialised transformers models, built in code (no hub access)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import deltatune as dt  # noqa: E402

# Tiny models are dominated by per-op overhead: one thread is faster than two fighting over 2 cores.
torch.set_num_threads(1)

VOCAB = 99


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5ForConditionalGeneration(config).eval()


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}


def tiny_inputs(kind: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs for a tiny model of ``kind``; ids avoid the special tokens 0..2."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # some padding, so masks matter
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return inputs


@pytest.fixture
def tmp_adapter_dir(tmp_path):
    return tmp_path / "adapter"


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of ``kind`` ("llama", "gpt2", "bert", "t5"); same seed, same weights."""
    return TINY_MODELS[kind](seed)


def sgd_losses(model: torch.nn.Module, kind: str, lr: float, steps: int = 3, seed: int | None = None) -> list[float]:
    """The training losses of ``steps`` plain SGD steps on the tiny inputs of ``kind`` (labels = inputs):
    two libraries given the same weights must give the same list. ``seed`` fixes the model's own dropout."""
    batch = {**tiny_inputs(kind), "labels": tiny_inputs(kind)["input_ids"]}
    model.train()
    if seed is not None:
        torch.manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def perturb_trainable(model: torch.nn.Module, seed: int = 7) -> None:
    """Make every trained tensor non-trivial (magnitudes, heads, biases), deterministically."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


# One config per method family for the tiny Llama, built fresh per call (tests mutate them).
LLAMA_METHODS = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    "lora-dropout": lambda: dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False),
    "dora": lambda: dt.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "ia3": lambda: dt.IA3Config(task_type="CAUSAL_LM"),
    "prefix": lambda: dt.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "p-tuning": lambda: dt.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "houlsby": lambda: dt.BottleneckConfig(placement="houlsby", reduction_factor=4, init="lora"),
    "parallel": lambda: dt.BottleneckConfig(placement="parallel", reduction_factor=4, init="lora"),
}


class WrappedModel(torch.nn.Module):
    """A model wrapped by a plain module (``inner``), with its config and output head: tests
    subclass it to change what the forward does around the real model."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        return self.inner(**kwargs)
