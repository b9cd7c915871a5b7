"""Packing: rows of several examples that attend only to themselves; loss and gradients equal to
the unpacked batch's, and a model that would mix them is caught on the first row."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.packing import PackingError, check_packed_loss, pack_examples, unpacked
from deltatune.tasks import CausalLM, Example
from tiny_assets import check_ok, invoke, read_jsonl, session_assets, train_args, write_jsonl

from conftest import VOCAB, WrappedModel, tiny_gpt2, tiny_llama


class _Tokenizer:
    pad_token_id, eos_token_id, chat_template = 0, 2, None


def _examples(seed: int = 0, n: int = 7) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + (i * 3) % 9
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]  # a prompt, then the response
        out.append(Example(ids, labels=labels))
    return out


def test_rows_fit_keep_every_token_and_restart_positions():
    examples = _examples()
    rows = pack_examples(examples, max_length=20)
    assert all(len(r.input_ids) <= 20 for r in rows) and len(rows) < len(examples)
    assert sum(r.packed for r in rows) == len(examples)
    back = [e for r in rows for e in unpacked(r)]
    assert sorted(map(tuple, (e.input_ids for e in back))) == sorted(map(tuple, (e.input_ids for e in examples)))
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == row.packed
        assert all(row.labels[i] == -100 for i in starts)  # no example learns to predict the next one's start
    assert sum(r.units for r in rows) == sum(e.units for e in examples)


def _loss_and_grads(model, task, examples):
    model.zero_grad()
    loss = sum(task.loss_sum(model, task.collate([e])) for e in examples)  # each row on its own
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_a_packed_row_gives_the_loss_and_gradients_of_its_examples_alone(factory):
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()  # no dropout: both passes see one network
    task = CausalLM(_Tokenizer(), max_length=64)
    row = max(pack_examples(_examples(), max_length=40), key=lambda r: r.packed)
    assert row.packed >= 3
    alone, alone_grads = _loss_and_grads(model, task, unpacked(row))
    packed_loss, packed_grads = _loss_and_grads(model, task, [row])
    torch.testing.assert_close(packed_loss, alone, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    check_packed_loss(task, model, row)  # passes


class _MixesExamples(WrappedModel):
    """A causal LM that attends across the whole row whatever the position ids say."""

    def __init__(self) -> None:
        super().__init__(tiny_llama())

    def forward(self, input_ids, position_ids=None, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def test_a_model_that_mixes_packed_examples_is_refused_on_the_first_row():
    task = CausalLM(_Tokenizer(), max_length=64)
    row = max(pack_examples(_examples(), max_length=40), key=lambda r: r.packed)
    with pytest.raises(PackingError, match="does not keep packed examples apart"):
        check_packed_loss(task, _MixesExamples(), row)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


def test_train_packing_on_chat_data_and_refusals(assets, tmp_path):
    turns = [
        ({"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{2 * i}"})
        for i in range(24)
    ]
    rows = [{"messages": list(pair)} for pair in turns]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "packed"
    packed = ("--packing", "--batch-size", "2", "--max-steps", "2")
    result = check_ok(invoke(*train_args(assets, run, "--data", data, *packed)))
    assert "packing: 24 examples in" in result.output
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "lr" in r] == [1, 2]
    prompt = invoke(*train_args(assets, tmp_path / "p", "--data", data, "--packing", "--method", "prompt"))
    assert prompt.exit_code != 0 and "prompt tuning puts its virtual tokens in front of a row" in prompt.output
    classify = invoke(*train_args(assets, tmp_path / "c", "--packing"))  # the classification CSV
    assert classify.exit_code != 0 and "--packing applies to causal-LM and chat data" in classify.output
