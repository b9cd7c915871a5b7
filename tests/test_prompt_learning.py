"""Prompt tuning, P-tuning and prefix tuning: HF PEFT interop, the maths, generate and bad input.

Everything runs on the tiny random models of ``conftest``. Interop: one library builds an adapter
with every trainable tensor perturbed, saves it, the other loads it onto a fresh copy of the same
base and the outputs agree to 1e-5. The rest checks what PEFT cannot (BERT prefixes against a
hand-written attention, generate against a step-by-step forward) and the error messages.
"""

from __future__ import annotations

import json
import math
import re

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.model_info import cache_argument
from deltatune.models import resolve_model_path

from conftest import VOCAB, perturb_trainable, tiny_inputs, tiny_model

N = 3  # virtual tokens in every test unless said otherwise
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
METHODS = ["prompt", "ptuning-mlp", "ptuning-lstm", "prefix", "prefix-projection"]
CASES = [
    pytest.param(kind, method, id=f"{kind}-{method}")
    for kind in TASKS
    for method in METHODS
    if not (kind == "bert" and method.startswith("prefix"))  # PEFT refuses BERT prefixes under transformers 5
]
# adapter_config.json fields PEFT needs to rebuild a prompt-learning adapter.
PEFT_FIELDS = [
    "num_virtual_tokens",
    "token_dim",
    "num_layers",
    "num_attention_heads",
    "num_transformer_submodules",
    "peft_type",
    "task_type",
]
METHOD_FIELDS = {
    "ptuning-mlp": ["encoder_reparameterization_type", "encoder_hidden_size"],
    "ptuning-lstm": ["encoder_reparameterization_type", "encoder_hidden_size"],
    "prefix": ["prefix_projection"],
    "prefix-projection": ["prefix_projection", "encoder_hidden_size"],
}
SMOL = "smollm2-135m-instruct"


def method_config(lib, kind: str, method: str, n: int | None = N, task_type: str | None = None):
    """The same config from ``peft`` or ``deltatune`` (``lib``)."""
    kwargs = {"task_type": task_type or TASKS[kind], "num_virtual_tokens": n}
    if method == "prompt":
        return lib.PromptTuningConfig(**kwargs)
    if method.startswith("ptuning"):
        kind_ = method.split("-")[1].upper()
        return lib.PromptEncoderConfig(**kwargs, encoder_reparameterization_type=kind_, encoder_hidden_size=16)
    if method == "prefix":
        return lib.PrefixTuningConfig(**kwargs)
    assert method == "prefix-projection"
    return lib.PrefixTuningConfig(**kwargs, prefix_projection=True, encoder_hidden_size=16)


def build(lib, kind: str, method: str, seed: int = 3, **kwargs):
    torch.manual_seed(seed)
    model = lib.get_peft_model(tiny_model(kind), method_config(lib, kind, method, **kwargs))
    perturb_trainable(model)
    return model.eval()


def logits(model: torch.nn.Module, kind: str, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs(kind), **extra).logits


def saved(directory) -> tuple[dict[str, tuple[int, ...]], dict]:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    return {k: tuple(v.shape) for k, v in tensors.items()}, config


def table(pm, name: str = "default") -> torch.Tensor:
    return pm.prompt_encoder[name].table().detach()


# ------------------------------------------------------------------------------------------------
# 1. Interop with HF PEFT, both ways
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "method"), CASES)
def test_peft_checkpoint_loads_in_deltatune(kind, method, tmp_path):
    reference = build(peft, kind, method)
    expected = logits(reference, kind)
    reference.save_pretrained(tmp_path)

    loaded = dt.PeftModel.from_pretrained(tiny_model(kind), tmp_path)
    torch.testing.assert_close(logits(loaded, kind), expected, atol=1e-5, rtol=0)

    base = logits(tiny_model(kind), kind)
    if TASKS[kind] == "CAUSAL_LM" and not method.startswith("prefix"):
        assert expected.shape[1] == base.shape[1] + N  # outputs include the virtual positions, as in PEFT
    expected = expected[:, -base.shape[1] :]
    assert expected.shape == base.shape
    assert not torch.allclose(expected, base, atol=1e-3), "adapter had no effect"
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, kind), base)


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_deltatune_checkpoint_loads_in_peft(kind, method, tmp_path):
    ours = build(dt, kind, method)
    expected = logits(ours, kind)
    ours.save_pretrained(tmp_path / "ours")

    # What PEFT writes for the same config on the same base: same tensors, same layout fields.
    build(peft, kind, method).save_pretrained(tmp_path / "peft")
    our_shapes, our_config = saved(tmp_path / "ours")
    peft_shapes, peft_config = saved(tmp_path / "peft")
    assert our_shapes == peft_shapes
    for field in PEFT_FIELDS + METHOD_FIELDS.get(method, []):
        assert field in our_config, field
        assert our_config[field] == peft_config[field], field
    if kind == "bert":
        assert {"base_model.classifier.weight", "base_model.classifier.bias"} <= set(our_shapes)

    reference = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reference, kind), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# 2. Grouped-query attention
# ------------------------------------------------------------------------------------------------
def test_prefix_under_grouped_query_attention_has_the_kv_heads():
    model = tiny_model("llama")
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    ours = dt.get_peft_model(model, method_config(dt, "llama", "prefix"))
    config = ours.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (2, 2, 2 * head_dim)

    reference = peft.get_peft_model(tiny_model("llama"), method_config(peft, "llama", "prefix"))
    ref_config = reference.peft_config["default"]
    assert (ref_config.num_layers, ref_config.num_attention_heads, ref_config.token_dim) == (2, 2, 2 * head_dim)

    state = ours.prompt_encoder["default"].adapter_state_dict()
    assert tuple(state["prompt_embeddings"].shape) == (N, 2 * 2 * 2 * head_dim)


# ------------------------------------------------------------------------------------------------
# 3. BERT prefix against a hand-written attention (PEFT has no BERT prefix to compare with)
# ------------------------------------------------------------------------------------------------
def test_bert_prefix_matches_hand_written_attention():
    pm = build(dt, "bert", "prefix")
    bert = pm.get_base_model().bert
    attention = bert.encoder.layer[0].attention.self
    inputs = tiny_inputs("bert")
    captured = {}

    def on_attention(module, args, kwargs, output):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["output"] = output[0] if isinstance(output, tuple) else output

    def on_embeddings(module, args, kwargs, output):
        captured["embeddings"] = output

    handles = [
        attention.register_forward_hook(on_attention, with_kwargs=True),
        bert.embeddings.register_forward_hook(on_embeddings, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            pm(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    hidden = captured["hidden"]
    batch, length, _ = hidden.shape
    heads = bert.config.num_attention_heads
    head_dim = bert.config.hidden_size // heads
    layers = bert.config.num_hidden_layers
    prefix = table(pm).view(N, layers * 2, heads, head_dim)
    prefix_key = prefix[:, 0].transpose(0, 1).expand(batch, -1, -1, -1)  # layer 0: key at index 0, value at 1
    prefix_value = prefix[:, 1].transpose(0, 1).expand(batch, -1, -1, -1)

    with torch.no_grad():

        def split(x):
            return x.view(batch, length, heads, head_dim).transpose(1, 2)

        query = split(attention.query(hidden))
        key = torch.cat([prefix_key, split(attention.key(hidden))], dim=2)
        value = torch.cat([prefix_value, split(attention.value(hidden))], dim=2)
        scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
        keep = torch.cat([torch.ones(batch, N, dtype=torch.bool), inputs["attention_mask"].bool()], dim=1)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, length, heads * head_dim)
        without_prefix = (scores[..., N:].softmax(-1) @ value[:, :, N:]).transpose(1, 2).reshape(expected.shape)
    torch.testing.assert_close(captured["output"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, without_prefix, atol=1e-3), "the prefix had no weight"

    # Real tokens take positions n..n+L-1 (BERT offsets positions by the cache length, and the
    # prefix arrives as a cache of n positions); token types default to 0.
    emb = bert.embeddings
    with torch.no_grad():
        positions = torch.arange(N, N + length)
        manual = emb.LayerNorm(
            emb.word_embeddings(inputs["input_ids"])
            + emb.position_embeddings(positions)[None]
            + emb.token_type_embeddings(torch.zeros_like(inputs["input_ids"]))
        )
    torch.testing.assert_close(captured["embeddings"], manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden, manual, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# 4. Training forward: no loss on virtual positions, gradients only for the adapter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm", "prefix-projection"])
def test_training_loss_skips_virtual_positions_and_only_adapter_gets_gradients(method, tmp_path):
    """Labels gain ``n`` ignored positions in front, as in PEFT.

    So no virtual position is a target, but the last virtual position does predict the first real
    token: the loss is the CE of ``logits[:, n-1:-1]`` against the labels, not of ``logits[:, n:]``
    shifted by one (which would drop the first real token's prediction). PEFT computes the same.
    """
    pm = build(dt, "llama", method)
    pm.train()
    inputs = tiny_inputs("llama")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[1, 0] = inputs["input_ids"][1, 0]  # row 1 has no padding: its first token is a target
    out = pm(**inputs, labels=labels)

    virtual = 0 if method.startswith("prefix") else N  # prefixes live in the cache, not in the sequence
    assert out.logits.shape[:2] == (labels.shape[0], labels.shape[1] + virtual)
    if virtual:
        predictions = out.logits[:, virtual - 1 : -1]
        manual = F.cross_entropy(predictions.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        within = out.logits[:, virtual:]  # the real positions only, the base model's shift
        real_only = F.cross_entropy(within[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        assert not torch.allclose(out.loss, real_only, atol=1e-4)
    else:
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=0)

    out.loss.backward()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert trainable and with_grad == trainable
    assert all(n.startswith("prompt_encoder.default.") for n in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if n in trainable)

    pm.eval()
    pm.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        ours, theirs = pm(**inputs, labels=labels).loss, reference(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_forward_without_attention_mask_equals_a_mask_of_ones(method):
    pm = build(dt, "llama", method)
    ids = tiny_inputs("llama")["input_ids"]
    with torch.no_grad():
        bare = pm(input_ids=ids).logits
        masked = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(bare, masked, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# 5. generate
# ------------------------------------------------------------------------------------------------
# generate is checked against deltatune's own step-by-step forward (which matches PEFT's forward,
# section 1), not against PEFT's generate: PEFT 0.21.2's generate under transformers 5 ignores
# prefixes altogether (its scores equal the base model's), and for prompt tuning / P-tuning its
# decoding steps after the first disagree with PEFT's own forward pass (llama and GPT-2).
PROMPTS = torch.tensor([[0, 0, 0, 15, 42, 8], [11, 23, 7, 64, 30, 9]])  # left padding with pad id 0
PROMPT_MASK = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
NEW = 6


def stepwise_greedy(pm, ids, mask, steps, eos, pad):
    """Greedy decoding by full forward passes without cache: (sequences, logits of each step)."""
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    scores = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            step = pm(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        scores.append(step)
        token = torch.where(finished, torch.full_like(step[:, 0], pad, dtype=torch.long), step.argmax(-1))
        finished |= token == eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
        if finished.all():
            break
    return ids, scores


def stepwise_seq2seq(pm, ids, mask, steps, start, eos, pad):
    decoder = torch.full((ids.shape[0], 1), start, dtype=torch.long)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    scores = []
    for _ in range(steps):
        with torch.no_grad():
            step = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, use_cache=False).logits[:, -1]
        scores.append(step)
        token = torch.where(finished, torch.full_like(step[:, 0], pad, dtype=torch.long), step.argmax(-1))
        finished |= token == eos
        decoder = torch.cat([decoder, token[:, None]], dim=1)
        if finished.all():
            break
    return decoder, scores


GENERATE_CASES = [
    pytest.param(kind, method, id=f"{kind}-{method}")
    for kind in ("llama", "gpt2")
    for method in ("prompt", "ptuning-mlp", "prefix")
]


@pytest.mark.parametrize(("kind", "method"), GENERATE_CASES)
def test_greedy_generate_equals_stepwise_forward(kind, method):
    pm = build(dt, kind, method)
    config = pm.get_base_model().config
    length = PROMPTS.shape[1]
    with torch.no_grad():
        out = pm.generate(input_ids=PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW, do_sample=False)
        result = pm.generate(
            input_ids=PROMPTS,
            attention_mask=PROMPT_MASK,
            max_new_tokens=NEW,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
        with pm.disable_adapter():
            base = pm.generate(input_ids=PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW, do_sample=False)
    want, scores = stepwise_greedy(pm, PROMPTS, PROMPT_MASK, NEW, config.eos_token_id, config.pad_token_id)

    assert out.shape == (2, length + NEW)  # no virtual token in the output, and no early stop here
    assert torch.equal(out[:, :length], PROMPTS)
    assert torch.equal(out, want)
    assert torch.equal(result.sequences, want)
    assert len(result.scores) == NEW
    for got, expected in zip(result.scores, scores):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.equal(out, base), "the adapter did not change what is generated"


@pytest.mark.parametrize(("kind", "method"), GENERATE_CASES)
def test_sampling_generate_is_seeded_and_uses_the_adapter(kind, method):
    pm = build(dt, kind, method)
    args = {"input_ids": PROMPTS, "attention_mask": PROMPT_MASK, "max_new_tokens": NEW, "do_sample": True}
    with torch.no_grad():
        torch.manual_seed(11)
        first = pm.generate(**args, top_k=0)
        torch.manual_seed(11)
        second = pm.generate(**args, top_k=0)
        torch.manual_seed(12)
        top1 = pm.generate(**args, top_k=1)
        greedy = pm.generate(input_ids=PROMPTS, attention_mask=PROMPT_MASK, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(first, second)
    assert first.shape[1] <= PROMPTS.shape[1] + NEW and torch.equal(first[:, : PROMPTS.shape[1]], PROMPTS)
    assert torch.equal(top1, greedy)  # sampling from the adapted distribution, not the base one


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_max_length_counts_the_real_tokens_only(method):
    """``max_length`` is prompt + new tokens, as in transformers and PEFT; virtual tokens do not count."""
    pm = build(dt, "llama", method)
    length = PROMPTS.shape[1]
    args = {"input_ids": PROMPTS, "attention_mask": PROMPT_MASK, "do_sample": False}
    with torch.no_grad():
        by_new = pm.generate(**args, max_new_tokens=NEW)
        by_length = pm.generate(**args, max_length=length + NEW)
    assert by_new.shape == (2, length + NEW)
    assert by_length.shape == by_new.shape, f"max_length={length + NEW} gave {by_length.shape[1]} tokens"
    assert torch.equal(by_length, by_new)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_beam_search_scores_are_the_forward_log_probabilities(method):
    """Beams expand the prompt / the prefix cache per row: each returned beam's score is its mean
    log-probability under the adapted forward pass (length_penalty 1)."""
    pm = build(dt, "llama", method)
    length, beams = PROMPTS.shape[1], 2
    with torch.no_grad():
        out = pm.generate(
            input_ids=PROMPTS,
            attention_mask=PROMPT_MASK,
            num_beams=3,
            num_return_sequences=beams,
            max_new_tokens=4,
            return_dict_in_generate=True,
            output_scores=True,
        )
        sequences = out.sequences
        assert sequences.shape == (2 * beams, length + 4)
        assert torch.equal(sequences[:, :length], PROMPTS.repeat_interleave(beams, dim=0))
        mask = torch.cat([PROMPT_MASK.repeat_interleave(beams, dim=0), torch.ones_like(sequences[:, length:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        log_probs = pm(input_ids=sequences, attention_mask=mask, position_ids=positions).logits.log_softmax(-1)
    virtual = log_probs.shape[1] - sequences.shape[1]
    predicted = log_probs[:, virtual + length - 1 : -1]  # the positions that predict the new tokens
    total = predicted.gather(2, sequences[:, length:, None]).squeeze(2).sum(dim=1)
    torch.testing.assert_close(out.sequences_scores, total / 4, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_t5_greedy_generate_equals_stepwise_decoder(method):
    """Tokens and per-step scores (the tiny T5 tends to repeat token 0, so the scores carry the test)."""
    pm = build(dt, "t5", method)
    config = pm.get_base_model().config
    args = {
        "input_ids": PROMPTS,
        "attention_mask": PROMPT_MASK,
        "max_new_tokens": NEW,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    with torch.no_grad():
        out = pm.generate(**args)
        with pm.disable_adapter():
            base = pm.generate(**args)
    want, scores = stepwise_seq2seq(
        pm, PROMPTS, PROMPT_MASK, NEW, config.decoder_start_token_id, config.eos_token_id, config.pad_token_id
    )
    assert out.sequences.shape == (2, 1 + NEW)
    assert torch.equal(out.sequences, want)
    assert len(out.scores) == NEW
    for got, expected in zip(out.scores, scores):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(out.scores[0], base.scores[0], atol=1e-3), "the adapter did not change the scores"


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_decoding_by_hand_with_the_returned_cache_equals_a_full_forward(method):
    """A later step gets the cache (which holds the virtual tokens) and the real tokens' mask only."""
    pm = build(dt, "llama", method)
    name = cache_argument(pm.get_base_model())  # "cache" in transformers 5, "past_key_values" before
    ids, mask = PROMPTS, PROMPT_MASK
    grown = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    positions = (grown.cumsum(-1) - 1).clamp(min=0)
    token = torch.tensor([[5], [6]])
    with torch.no_grad():
        first = pm(input_ids=ids, attention_mask=mask, position_ids=positions[:, :-1], use_cache=True)
        cache = first[name] if name in first else first["past_key_values"]
        assert cache.get_seq_length() == N + ids.shape[1]
        step = pm(input_ids=token, attention_mask=grown, position_ids=positions[:, -1:], **{name: cache}).logits
        full = pm(input_ids=torch.cat([ids, token], dim=1), attention_mask=grown, position_ids=positions).logits
        embeds = pm(inputs_embeds=pm.get_input_embeddings()(ids), attention_mask=mask).logits
        by_ids = pm(input_ids=ids, attention_mask=mask).logits
    assert step.shape[1] == 1
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds, by_ids, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm", "prefix-projection"])
def test_generate_after_save_and_load_gives_the_same_tokens(method, tmp_path):
    pm = build(dt, "llama", method)
    args = {"input_ids": PROMPTS, "attention_mask": PROMPT_MASK, "max_new_tokens": NEW, "do_sample": False}
    with torch.no_grad():
        before = pm.generate(**args)
    pm.save_pretrained(tmp_path)
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.generate(**args), before)


# ------------------------------------------------------------------------------------------------
# 6. Attention masks and token types
# ------------------------------------------------------------------------------------------------
def test_bert_prompt_tuning_with_token_type_ids(tmp_path):
    pm = build(dt, "bert", "prompt")
    inputs = tiny_inputs("bert")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    token_types = torch.zeros_like(ids)
    token_types[:, 4:] = 1
    with torch.no_grad():
        got = pm(**inputs, token_type_ids=token_types).logits
        base = pm.get_base_model()  # its classifier is the adapter's trained copy while "default" is active
        embeds = torch.cat([table(pm).expand(ids.shape[0], -1, -1), base.get_input_embeddings()(ids)], dim=1)
        ones = torch.ones(ids.shape[0], N, dtype=ids.dtype)
        want = base(
            inputs_embeds=embeds,
            attention_mask=torch.cat([ones, mask], dim=1),
            token_type_ids=torch.cat([0 * ones, token_types], dim=1),
        ).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, logits(pm, "bert"), atol=1e-4), "token types made no difference"

    pm.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    torch.testing.assert_close(logits(reference, "bert", token_type_ids=token_types), got, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# 7. Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class", [dt.PromptTuningConfig, dt.PromptEncoderConfig, dt.PrefixTuningConfig])
@pytest.mark.parametrize("count", [0, None, -2])
def test_no_virtual_tokens_is_a_config_error(config_class, count):
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens"):
        config_class(task_type="CAUSAL_LM", num_virtual_tokens=count)


@pytest.mark.parametrize(("kind", "method"), [("llama", "prompt"), ("llama", "prefix"), ("gpt2", "ptuning-mlp")])
def test_input_longer_than_context_names_the_limit(kind, method):
    pm = build(dt, kind, method)
    ids = torch.randint(3, VOCAB, (1, 127), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        pm(input_ids=ids)
    message = str(err.value)
    assert re.search(r"\b128\b", message) and re.search(r"\b125\b", message), message
    with pytest.raises(ValueError, match=r"\b125\b"):
        pm.generate(input_ids=ids, max_new_tokens=1)
    with torch.no_grad():
        fits = pm(input_ids=ids[:, :125]).logits  # 125 + 3 = 128 positions: exactly the context
    assert fits.shape[1] == 125 + (0 if method.startswith("prefix") else N)


@pytest.fixture(scope="module")
def smol_path():
    return resolve_model_path(SMOL)


def wide_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny llama whose vocabulary is SmolLM2's, so that its tokenizer's ids index the embedding."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_text_init_longer_than_the_prompt_names_both_counts(smol_path):
    text = "A fairly long description of the task at hand, please"
    count = len(AutoTokenizer.from_pretrained(smol_path)(text, add_special_tokens=False)["input_ids"])
    assert count > 3
    config = dt.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=3,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=SMOL,
    )
    model = wide_llama(49152)
    with pytest.raises(dt.ConfigError) as err:
        dt.get_peft_model(model, config)
    message = str(err.value)
    assert re.search(rf"\b{count}\b", message) and re.search(r"\b3\b", message), message
    assert all(p.requires_grad for p in model.parameters()), "a failed get_peft_model left the model frozen"


def test_text_init_copies_the_text_embeddings_repeated(smol_path):
    text = "great movie review"
    tokenizer = AutoTokenizer.from_pretrained(smol_path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = 2 * len(ids) + 1
    model = wide_llama(len(tokenizer))
    vocab = model.get_input_embeddings().weight.detach().clone()
    kwargs = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": n,
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": text,
    }
    ours = dt.get_peft_model(model, dt.PromptTuningConfig(**kwargs, tokenizer_name_or_path=SMOL))
    assert torch.equal(table(ours), vocab[(ids * 3)[:n]])

    reference = peft.get_peft_model(
        wide_llama(len(tokenizer)), peft.PromptTuningConfig(**kwargs, tokenizer_name_or_path=str(smol_path))
    )
    assert torch.equal(table(ours), reference.prompt_encoder["default"].embedding.weight.detach())


def test_sample_vocab_init_takes_vocabulary_rows():
    model = tiny_model("llama")
    vocab = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    config = dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8, prompt_tuning_init="SAMPLE_VOCAB")
    rows = table(dt.get_peft_model(model, config))
    matches = (rows[:, None, :] == vocab[None, :, :]).all(dim=-1)  # (virtual token, vocabulary row)
    assert torch.all(matches.any(dim=1)), "a prompt row is not a vocabulary row"
    assert len({int(row) for row in matches.float().argmax(dim=1)}) > 1  # not one row repeated


def llama_layout(layers: int = 2, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("layers", "kv_heads", "names"),
    [
        pytest.param(3, 2, (r"\b2 layers", r"\b3 layers"), id="deeper"),
        pytest.param(2, 4, (r"\b2 (KV )?heads", r"\b4 (KV )?heads"), id="more-kv-heads"),
    ],
)
def test_prefix_checkpoint_for_another_layout_names_both(layers, kv_heads, names, tmp_path):
    build(dt, "llama", "prefix").save_pretrained(tmp_path)
    target = llama_layout(layers, kv_heads)
    with pytest.raises((dt.ConfigError, dt.CheckpointError)) as err:
        dt.PeftModel.from_pretrained(target, tmp_path)
    message = str(err.value)
    for name in names:
        assert re.search(name, message), message
    assert "layers" in message and "heads" in message
    assert all(p.requires_grad for p in target.parameters()), "the failed load left the model changed"

    host = dt.get_peft_model(target, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises((dt.ConfigError, dt.CheckpointError)):
        host.load_adapter(tmp_path, "prefix")
    assert list(host.peft_config) == ["default"] and len(host.prompt_encoder) == 0


def test_checkpoint_whose_table_disagrees_with_its_config_names_the_shapes(tmp_path):
    build(dt, "llama", "prompt").save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["num_virtual_tokens"] = 5
    config_path.write_text(json.dumps(config))
    with pytest.raises(dt.CheckpointError) as err:
        dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert "(3, 32)" in str(err.value) and "(5, 32)" in str(err.value)


# ------------------------------------------------------------------------------------------------
# 8. Trainable parameter counts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_match_peft(method, capsys):
    ours = dt.get_peft_model(tiny_model("llama"), method_config(dt, "llama", method))
    reference = peft.get_peft_model(tiny_model("llama"), method_config(peft, "llama", method))
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    if method == "prompt":
        assert ours.get_nb_trainable_parameters()[0] == N * 32
    capsys.readouterr()
    ours.print_trainable_parameters()
    our_line = capsys.readouterr().out
    reference.print_trainable_parameters()
    assert our_line == capsys.readouterr().out
    assert our_line.startswith(f"trainable params: {ours.get_nb_trainable_parameters()[0]:,d} ||")


def test_prompt_tuning_for_classification_also_trains_the_head():
    ours = dt.get_peft_model(tiny_model("bert"), method_config(dt, "bert", "prompt"))
    reference = peft.get_peft_model(tiny_model("bert"), method_config(peft, "bert", "prompt"))
    head = 32 * 3 + 3
    assert ours.get_nb_trainable_parameters()[0] == N * 32 + head
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()


# ------------------------------------------------------------------------------------------------
# 9. A prompt adapter and a LoRA adapter on one model
# ------------------------------------------------------------------------------------------------
def test_prompt_and_lora_compose_and_round_trip(tmp_path):
    pm = build(dt, "llama", "prompt")
    pm.add_adapter("lora", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    inputs = tiny_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    pm.set_adapter(["default", "lora"])
    both = logits(pm, "llama")
    pm.set_adapter("default")
    prompt_only = logits(pm, "llama")
    pm.set_adapter("lora")
    lora_only = logits(pm, "llama")
    with torch.no_grad():
        embeds = torch.cat([table(pm).expand(ids.shape[0], -1, -1), pm.get_input_embeddings()(ids)], dim=1)
        mask_n = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
        manual = pm(inputs_embeds=embeds, attention_mask=mask_n).logits  # LoRA active, prompt put in by hand
    base = logits(tiny_model("llama"), "llama")

    torch.testing.assert_close(both, manual, atol=1e-6, rtol=0)
    assert both.shape[1] == ids.shape[1] + N and lora_only.shape[1] == ids.shape[1]
    assert not torch.allclose(both, prompt_only, atol=1e-3)
    assert not torch.allclose(both[:, N:], lora_only, atol=1e-3)
    assert not torch.allclose(lora_only, base, atol=1e-3)

    pm.set_adapter(["default", "lora"])
    with pm.disable_adapter():
        assert torch.equal(logits(pm, "llama"), base)
    assert torch.equal(logits(pm, "llama"), both)

    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "lora" / "adapter_config.json").is_file()
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded, "llama"), prompt_only, atol=1e-6, rtol=0)
    loaded.load_adapter(tmp_path / "lora", "lora")
    loaded.set_adapter("lora")
    torch.testing.assert_close(logits(loaded, "llama"), lora_only, atol=1e-6, rtol=0)
    loaded.set_adapter(["default", "lora"])
    torch.testing.assert_close(logits(loaded, "llama"), both, atol=1e-6, rtol=0)

    only_lora = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora", adapter_name="lora")
    torch.testing.assert_close(logits(only_lora, "llama"), lora_only, atol=1e-6, rtol=0)
