"""Prompt tuning and prefix tuning on the real embedded SmolLM2-135M-Instruct (slow).

SmolLM2 has 30 layers, 9 query heads and 3 KV heads of 64 dims, so its prefixes exercise grouped-
query attention at real size. Training runs a few steps on a fixed batch of four short Rotten
Tomatoes reviews, with the loss on the answer token only, and checks that the loss on that batch
falls well below both its starting value and the base model's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.data import build_sentiment_example, rotten_tomatoes, sentiment_template
from deltatune.models import load_model

SMOL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture
def smol():
    """A fresh SmolLM2 (about 1 s from the converted cache) and its tokenizer, left-padding."""
    model, tokenizer = load_model(SMOL, task="causal-lm")
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def sentiment_batch(tokenizer):
    """The four shortest reviews among the first 400 training records, two per label, alternating."""
    template = sentiment_template(tokenizer)
    records = sorted(rotten_tomatoes("train")[:400], key=lambda r: (len(r["text"]), r["text"]))
    positive = [r for r in records if r["label"] == 1][:2]
    negative = [r for r in records if r["label"] == 0][:2]
    examples = [r for pair in zip(positive, negative) for r in pair]
    prompts, answers = [], []
    for record in examples:
        prompt, answer = build_sentiment_example(tokenizer, record["text"], record["label"], template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        answer_id = template.answer_token_ids[record["label"]]
        assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[len(prompt_ids)] == answer_id
        prompts.append(prompt)
        answers.append(answer_id)
    batch = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    return batch, torch.tensor(answers)


def answer_loss(model, batch, answers):
    """CE of the answer token at the last prompt position (virtual positions, if any, come first)."""
    return F.cross_entropy(model(**batch, logits_to_keep=1).logits[:, -1], answers)


def test_prompt_tuning_with_20_virtual_tokens_trains_11520_parameters(smol, capsys):
    model, _ = smol
    base_count = sum(p.numel() for p in model.parameters())
    pm = dt.get_peft_model(model, dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    assert pm.get_nb_trainable_parameters() == (20 * 576, base_count + 20 * 576)
    capsys.readouterr()
    pm.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trainable params: 11,520 || all params: {base_count + 11520:,d} || trainable%: "), line


@pytest.mark.parametrize(
    ("method", "lr"),
    [pytest.param("prompt", 3e-2, id="prompt-tuning"), pytest.param("prefix", 1e-2, id="prefix-tuning")],
)
def test_a_few_steps_lower_the_answer_loss(smol, method, lr):
    model, tokenizer = smol
    batch, answers = sentiment_batch(tokenizer)
    with torch.no_grad():
        base_loss = answer_loss(model, batch, answers).item()

    config_class = dt.PromptTuningConfig if method == "prompt" else dt.PrefixTuningConfig
    torch.manual_seed(0)
    pm = dt.get_peft_model(model, config_class(task_type="CAUSAL_LM", num_virtual_tokens=20))
    trainable = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = answer_loss(pm, batch, answers).item()
    pm.train()
    for _ in range(6):
        loss = answer_loss(pm, batch, answers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    with torch.no_grad():
        after = answer_loss(pm, batch, answers).item()
    # Observed (1 thread): prompt 2.77 -> 0.95, prefix 8.98 -> 0.18; the base model scores 2.86.
    assert after < 0.5 * before, (before, after)
    assert after < 0.6 * base_loss, (base_loss, after)
    assert all(not p.requires_grad for n, p in pm.named_parameters() if not n.startswith("prompt_encoder."))


def test_prefix_generate_equals_stepwise_forward_under_gqa(smol):
    model, tokenizer = smol
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    torch.manual_seed(0)
    pm = dt.get_peft_model(model, dt.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    config = pm.peft_config["default"]
    assert (config.num_layers, config.num_attention_heads, config.token_dim) == (30, 3, 3 * 64)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.mul_(0.3)  # a prefix that steers but does not wreck the model

    batch = tokenizer(
        ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1].all(), "expected left padding on the shorter prompt"
    steps = 5
    args = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": steps,
        "min_new_tokens": steps,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
    }
    with torch.no_grad():
        out = pm.generate(**args)
        with pm.disable_adapter():
            base = pm.generate(**args)

    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    running, running_mask = ids, mask
    for step in range(steps):
        positions = (running_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = pm(input_ids=running, attention_mask=running_mask, position_ids=positions, use_cache=False)
        scores = logits.logits[:, -1]
        scores[:, eos] = float("-inf")  # what min_new_tokens does in generate
        torch.testing.assert_close(out.scores[step], scores, atol=1e-3, rtol=0)
        token = scores.argmax(-1, keepdim=True)
        running = torch.cat([running, token], dim=1)
        running_mask = torch.cat([running_mask, torch.ones_like(token)], dim=1)
    assert out.sequences.shape == (2, ids.shape[1] + steps)
    assert torch.equal(out.sequences, running)
    assert not torch.allclose(out.scores[0], base.scores[0], atol=1e-2), "the prefix did not change the scores"


@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning"])
def test_embedded_minilm_classifies_with_prompt_methods(method, tmp_path):
    """The embedded MiniLM encoder: a few steps train the prompt and the classifier head, which save and reload."""
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    config = {
        "prompt": dt.PromptTuningConfig(num_virtual_tokens=8, task_type="SEQ_CLS"),
        "prefix": dt.PrefixTuningConfig(num_virtual_tokens=8, task_type="SEQ_CLS"),
        "ptuning": dt.PromptEncoderConfig(num_virtual_tokens=8, task_type="SEQ_CLS"),
    }[method]
    torch.manual_seed(0)
    pm = dt.get_peft_model(model, config)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable) and any("prompt_encoder" in n for n in trainable)
    records = rotten_tomatoes("train")[:16]
    batch = tokenizer([r["text"] for r in records], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in records])
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = pm(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    with torch.no_grad():
        expected = pm(**batch).logits
    pm.save_pretrained(tmp_path)
    fresh, _ = load_model("minilm-l6", task="seq-cls", num_labels=2)
    reloaded = dt.PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=0)
