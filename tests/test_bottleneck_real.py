"""Houlsby adapters fine-tune the real embedded MiniLM on Rotten Tomatoes sentiment (slow: real model).

60 steps of batch 16 (a tenth of an epoch) on the training split lift validation accuracy on 200
reviews from chance (a fresh classifier head) to well above it; the adapter and its classifier head
(``task_type="SEQ_CLS"`` puts the head in ``modules_to_save``) save and reload with identical outputs.
About 1 s per step on one CPU core.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import deltatune as dt
from deltatune.data import rotten_tomatoes
from deltatune.methods.bottleneck import BottleneckLayer
from deltatune.models import load_model

STEPS = 60
BATCH = 16
LR = 3e-3
MAX_LENGTH = 64
N_EVAL = 200


def encode(tokenizer, rows):
    return tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
    )


def evaluate(model, tokenizer, rows) -> tuple[float, torch.Tensor]:
    """Accuracy and logits (in the order of ``rows``); batches of similar length to cut padding."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
    result = torch.empty(len(rows), 2)
    with torch.no_grad():
        for start in range(0, len(order), 50):
            chunk = order[start : start + 50]
            result[chunk] = model(**encode(tokenizer, [rows[i] for i in chunk])).logits
    labels = torch.tensor([r["label"] for r in rows])
    return (result.argmax(-1) == labels).float().mean().item(), result


@pytest.mark.slow
def test_houlsby_adapters_learn_rotten_tomatoes_sentiment(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    config = dt.BottleneckConfig(task_type="SEQ_CLS", placement="houlsby", reduction_factor=16)
    pm = dt.get_peft_model(model, config)
    layers = [m for m in pm.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 12  # 6 layers x (attention output, FFN output)
    assert all(m.adapter_down["default"].out_features == 384 // 16 for m in layers)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n or ".classifier.modules_to_save." in n for n in trainable)
    assert any(".classifier." in n for n in trainable)

    validation = rotten_tomatoes("validation")[:N_EVAL]
    accuracy_before, _ = evaluate(pm, tokenizer, validation)

    train = rotten_tomatoes("train")
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad and "layer.0." in n}
    pm.train()
    losses = []
    for step in range(STEPS):
        rows = [train[j] for j in order[step * BATCH : (step + 1) * BATCH]]
        labels = torch.tensor([r["label"] for r in rows])
        loss = pm(**encode(tokenizer, rows), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)

    accuracy_after, logits_after = evaluate(pm, tokenizer, validation)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}; loss {first:.3f} -> {last:.3f}")
    assert accuracy_before < 0.62
    assert accuracy_after > 0.66
    assert accuracy_after - accuracy_before > 0.1
    assert last < first - 0.04

    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "houlsby"
    fresh, _ = load_model("minilm-l6", task="seq-cls", num_labels=2)
    loaded = dt.PeftModel.from_pretrained(fresh, tmp_path)
    accuracy_loaded, logits_loaded = evaluate(loaded, tokenizer, validation)
    assert accuracy_loaded == accuracy_after
    torch.testing.assert_close(logits_loaded, logits_after, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits_loaded.argmax(-1), logits_after.argmax(-1))
