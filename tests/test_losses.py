"""The fused LM-head cross-entropy: equal to logits + cross-entropy in value and gradients, and the
tasks use it only where it computes what the model itself would."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.losses import HeadLoss, fused_linear_cross_entropy, plain_head
from deltatune.tasks import CausalLM, Seq2Seq

from conftest import VOCAB, WrappedModel, tiny_gpt2, tiny_llama, tiny_t5

TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=2, chat_template=None)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_fused_cross_entropy_equals_logits_then_cross_entropy(with_bias, chunk_rows):
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (13,))
    leaves = [hidden, weight] + ([bias] if with_bias else [])

    fused = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_rows=chunk_rows)
    (3 * fused).backward()  # a non-unit upstream gradient
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    (3 * reference).backward()

    torch.testing.assert_close(fused, reference)
    for g, want in zip(got, [t.grad for t in leaves]):
        torch.testing.assert_close(g, want)
    with torch.no_grad():  # evaluation: the value alone
        torch.testing.assert_close(
            fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows, bias=bias), reference
        )


def test_fused_cross_entropy_in_bfloat16_computes_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 40, (9,))
    fused = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=2)
    fused.backward()
    assert fused.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    reference = F.cross_entropy(F.linear(hidden.float(), weight.float()), targets, reduction="sum")
    torch.testing.assert_close(fused, reference, rtol=2e-2, atol=2e-2)


def test_fused_cross_entropy_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))


def _causal_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[0, :3] = -100
    labels[1, 7] = -100
    return {"input_ids": ids, "attention_mask": mask, "lm_labels": labels}


def _reference_causal_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["lm_labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _lora_grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_causal_lm_task_loss_equals_the_models_own_logits(factory):
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()  # no dropout in the base model: the two passes must see the same network
    task, batch = CausalLM(TOKENIZER), _causal_batch()
    assert plain_head(model) is not None  # the fused path applies
    loss = task.loss_sum(model, batch)
    loss.backward()
    fused_grads = _lora_grads(model)
    model.zero_grad()
    reference = _reference_causal_loss(model, batch)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for got, want in zip(fused_grads, _lora_grads(model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert dict(task.head_loss.verdicts) == {plain_head(model): True}


def test_causal_lm_task_with_lora_on_the_head_uses_the_plain_path():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert plain_head(model) is None
    task, batch = CausalLM(TOKENIZER), _causal_batch()
    torch.testing.assert_close(task.loss_sum(model, batch), _reference_causal_loss(model, batch))
    assert not task.head_loss.verdicts


def test_models_that_transform_their_logits_get_the_plain_path():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2 declares it
    assert plain_head(model) is None


class _PostProcessedLogits(WrappedModel):
    """A causal LM that changes its logits after the head without saying so in its config."""

    def __init__(self, how: str) -> None:
        super().__init__(tiny_llama())
        self.how = how

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        if self.how == "soft cap":
            out.logits = 3.0 * torch.tanh(out.logits * 50.0)
        else:  # a bias over the vocabulary: would not even fit the hidden states
            out.logits = out.logits + torch.linspace(0, 5, VOCAB)
        return out


@pytest.mark.parametrize("how", ["soft cap", "vocabulary bias"])
def test_an_undeclared_logit_transform_is_caught_on_the_first_batch(how):
    model = _PostProcessedLogits(how)
    task, batch = CausalLM(TOKENIZER), _causal_batch()
    with pytest.warns(UserWarning, match="changes its logits after the head"):
        loss = task.loss_sum(model, batch)
    torch.testing.assert_close(loss, _reference_causal_loss(model, batch))
    assert dict(task.head_loss.verdicts) == {plain_head(model.inner): False}
    task.loss_sum(model, batch)  # decided once: no second check, no second warning


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_logits_with_the_head_run_outside_equal_the_models_own(factory):
    model = dt.get_peft_model(factory(), dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    outputs = lambda: model(input_ids=ids, logits_to_keep=1).logits[:, -1]  # noqa: E731  a strided slice
    head_loss = HeadLoss()
    with torch.no_grad():
        got = head_loss.logits_of(model, outputs)
        want = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32 and dict(head_loss.verdicts) == {plain_head(model): True}


def test_the_head_is_checked_once_for_a_model_and_its_view_without_adapters():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    calls = []

    def outputs(disabled: bool) -> torch.Tensor:
        calls.append(disabled)
        if disabled:
            with model.disable_adapter():
                return model(input_ids=ids).logits
        return model(input_ids=ids).logits

    head_loss = HeadLoss()
    with torch.no_grad():
        adapted = head_loss.logits_of(model, lambda: outputs(False))
        base = head_loss.logits_of(model.get_base_model(), lambda: outputs(True))
        torch.testing.assert_close(adapted, model(input_ids=ids).logits)
        with model.disable_adapter():
            torch.testing.assert_close(base, model(input_ids=ids).logits)
    assert calls == [False, False, True]  # the check ran the model twice (its results are the answer); the view once
    assert not torch.allclose(adapted, base)


def test_logits_of_a_model_with_lora_on_its_head_are_the_models_own():
    model = dt.get_peft_model(
        tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    ids = torch.tensor([[5, 6, 7, 8]])
    head_loss = HeadLoss()
    with torch.no_grad():
        got = head_loss.logits_of(model, lambda: model(input_ids=ids).logits)
        torch.testing.assert_close(got, model(input_ids=ids).logits)
    assert not head_loss.verdicts


@pytest.mark.parametrize("how", ["soft cap", "vocabulary bias"])
def test_logits_of_an_undeclared_logit_transform_are_caught(how):
    model = _PostProcessedLogits(how)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    head_loss = HeadLoss()
    with torch.no_grad(), pytest.warns(UserWarning, match="changes its logits after the head"):
        got = head_loss.logits_of(model, lambda: model(input_ids=ids).logits[:, -1])
    torch.testing.assert_close(got, model(input_ids=ids).logits[:, -1])
    assert dict(head_loss.verdicts) == {plain_head(model.inner): False}


def test_the_first_batch_check_draws_no_random_numbers_and_keeps_the_mode():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.3))
    model.train()
    state = torch.random.get_rng_state()
    head, targets = plain_head(model), torch.tensor([[6, 7, -100]])
    outputs = lambda: model(input_ids=torch.tensor([[5, 6, 7]])).logits  # noqa: E731
    head_loss = HeadLoss()
    plain_fn = lambda: head_loss._plain(outputs, targets)  # noqa: E731
    assert head_loss._agrees(model, head, plain_fn, lambda: head_loss._fused(head, outputs, targets))
    assert torch.equal(state, torch.random.get_rng_state()) and model.training


def test_seq2seq_task_loss_equals_the_models_own_loss():
    model = dt.get_peft_model(tiny_t5(), dt.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    model.eval()
    task = Seq2Seq(TOKENIZER)
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(3, VOCAB, (2, 6), generator=generator)
    labels[1, 4:] = -100
    batch = {
        "input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "labels": labels,
    }
    loss = task.loss_sum(model, batch)
    loss.backward()
    fused_grads = _lora_grads(model)
    model.zero_grad()
    out = model(**batch)  # T5's own mean loss over the labelled tokens
    (out.loss * (labels != -100).sum()).backward()
    torch.testing.assert_close(loss, out.loss * (labels != -100).sum())
    for got, want in zip(fused_grads, _lora_grads(model)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _Seq2SeqWithoutDecoderInputHelper(WrappedModel):
    """An encoder-decoder that only takes ``labels`` (no ``prepare_decoder_input_ids_from_labels``)."""

    def __init__(self) -> None:
        super().__init__(tiny_t5())


def test_seq2seq_model_that_needs_labels_gets_the_plain_loss():
    model = _Seq2SeqWithoutDecoderInputHelper()
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    batch = {
        "input_ids": torch.tensor([[11, 12, 13], [14, 15, 16]]),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
    }
    loss = Seq2Seq(TOKENIZER).loss_sum(model, {**batch, "labels": labels})
    torch.testing.assert_close(loss, model(**batch, labels=labels).loss * 6)
