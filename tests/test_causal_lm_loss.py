"""``PeftModel(..., labels=...)`` on a causal LM: the loss made by the fused LM head equals the
model's own loss, logits and gradients, keeps nothing vocabulary-sized for backward, and steps
aside wherever it would not compute what the model computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.losses import CausalLMLoss, LinearCrossEntropyWithLogits

from conftest import VOCAB, WrappedModel, tiny_gpt2, tiny_llama, tiny_t5


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lora(factory, **config) -> dt.PeftModel:
    config = {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.0, "init_lora_weights": False, **config}
    return dt.get_peft_model(factory(), dt.LoraConfig(**config))


def _step(model, batch, fused: bool, logits_term: bool = False, **extra):
    model.fused_loss = fused
    model.zero_grad()
    out = model(**batch, **extra)
    objective = out.loss + (out.logits.float().pow(2).mean() if logits_term else 0.0)
    objective.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), out.logits.detach(), grads


def _assert_same(ours, theirs) -> None:
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1])
    assert len(ours[2]) == len(theirs[2]) > 0
    for got, want in zip(ours[2], theirs[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("items", [None, 11])
@pytest.mark.parametrize("logits_term", [False, True])
def test_fused_loss_equals_the_models_own(factory, items, logits_term):
    model = _lora(factory)
    model.train(factory is tiny_llama)  # GPT-2 has dropout: both passes must see the same network
    batch = _batch()
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
    theirs = _step(model, batch, fused=False, logits_term=logits_term, **extra)
    ours = _step(model, batch, fused=True, logits_term=logits_term, **extra)
    _assert_same(ours, theirs)
    assert list(model._causal_lm_loss.verdicts.values()) == [True]  # the fused path ran


def test_fused_loss_equals_hf_peft_on_the_same_weights():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "lora_dropout": 0.0}
    torch.manual_seed(1)
    theirs_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    ours_model = dt.get_peft_model(copy.deepcopy(base), dt.LoraConfig(**config))
    ours_model.load_state_dict(theirs_model.state_dict())
    batch = _batch(2)
    theirs_model.zero_grad()
    reference = theirs_model(**batch)
    reference.loss.backward()
    ours = _step(ours_model, batch, fused=True)
    torch.testing.assert_close(ours[0], reference.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], reference.logits.detach())
    theirs_grads = [p.grad for p in theirs_model.parameters() if p.requires_grad]
    for got, want in zip(ours[2], theirs_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_full_fine_tuning_of_the_head_gets_its_gradient():
    model = tiny_llama()
    model.train()
    head = model.get_output_embeddings()
    batch = _batch()
    loss = CausalLMLoss()
    for term in (False, True):
        model.zero_grad()
        out = model(**batch)
        (out.loss + (out.logits.pow(2).mean() if term else 0.0)).backward()
        want = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        out = loss(model, batch)
        (out.loss + (out.logits.pow(2).mean() if term else 0.0)).backward()
        assert loss.verdicts[head]
        for got, expected in zip([p.grad for p in model.parameters()], want):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_head_with_bias_and_bfloat16_match_the_plain_computation():
    torch.manual_seed(0)
    hidden = torch.randn(7, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(30, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.tensor([1, -100, 5, 29, -100, 0, 3])
    total, logits = LinearCrossEntropyWithLogits.apply(hidden, weight, bias, targets, 3)
    (total + logits.float().sum() * 0.1).backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    plain_logits = F.linear(hidden, weight, bias)
    plain_total = F.cross_entropy(plain_logits.float(), targets, reduction="sum")
    (plain_total + plain_logits.float().sum() * 0.1).backward()
    torch.testing.assert_close(total, plain_total, rtol=1e-3, atol=1e-3)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, plain_logits)
    for got, want in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def _saved_shapes(model, batch, fused: bool) -> list[tuple[int, ...]]:
    """Shapes of the tensors autograd keeps for backward during the forward."""
    model.fused_loss = fused
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return shapes


def test_nothing_vocabulary_sized_is_kept_for_backward():
    model = _lora(tiny_llama)
    model.train()
    batch = _batch()
    _saved_shapes(model, batch, fused=True)  # the once-per-model check runs here
    by_vocabulary = lambda shapes: [s for s in shapes if s and s[-1] == VOCAB]  # noqa: E731
    assert by_vocabulary(_saved_shapes(model, batch, fused=False))  # the log-softmax of every logit
    assert by_vocabulary(_saved_shapes(model, batch, fused=True)) == []


def test_model_with_its_own_loss_function_gets_its_own_loss():
    model = _lora(tiny_llama)
    model.train()
    batch = _batch()
    model.get_base_model().loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    loss = model(**batch).loss
    assert not model._causal_lm_loss.verdicts
    assert loss.item() == pytest.approx(model(**batch).logits.float().mean().item(), rel=1e-5)


class _UnshiftedLM(WrappedModel):
    """A causal LM whose loss scores each position against its own label (no shift): not transformers' rule."""

    def __init__(self) -> None:
        super().__init__(tiny_llama())

    def forward(self, labels=None, **kwargs):
        out = self.inner(**kwargs)
        if labels is not None:
            out["loss"] = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1))
        return out


def test_a_different_loss_rule_is_caught_on_the_first_batch():
    model = _UnshiftedLM()
    model.train()
    loss = CausalLMLoss()
    batch = _batch()
    out = loss(model, batch)
    assert dict(loss.verdicts) == {model.get_output_embeddings(): False}
    torch.testing.assert_close(out.loss, model(**batch).loss)


def test_where_it_does_not_apply_the_model_runs_as_it_is():
    model = _lora(tiny_llama)
    model.train()
    batch = _batch()
    with torch.no_grad():
        model(**batch)  # evaluation: the model's own loss, no check
    shifted = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    model(**batch, shift_labels=shifted).loss.backward()
    model(**{k: v for k, v in batch.items() if k != "labels"})
    assert not model._causal_lm_loss.verdicts
    softcapped = _lora(tiny_llama)
    softcapped.get_base_model().config.final_logit_softcapping = 30.0
    softcapped(**batch).loss.backward()
    assert not softcapped._causal_lm_loss.verdicts


def test_an_encoder_decoder_keeps_its_own_loss():
    model = dt.get_peft_model(tiny_t5(), dt.LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    model.eval()
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    batch = {"input_ids": torch.tensor([[11, 12, 13], [14, 15, 16]]), "labels": labels}
    ours = model(**batch).loss
    model.fused_loss = False
    torch.testing.assert_close(ours, model(**batch).loss)
    assert list(model._causal_lm_loss.verdicts.values()) == [False]


def test_prompt_tuning_and_mixed_adapter_rows_use_it_too():
    model = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model.train()
    batch = _batch()
    _assert_same(_step(model, batch, fused=True), _step(model, batch, fused=False))
    assert list(model._causal_lm_loss.verdicts.values()) == [True]
    lora = _lora(tiny_llama)
    lora.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    rows = {"adapter_names": ["default", "other", "__base__"]}
    _assert_same(_step(lora, batch, fused=True, **rows), _step(lora, batch, fused=False, **rows))


def test_under_bf16_autocast_the_head_gradient_is_as_accurate_as_the_plain_one():
    model = _lora(tiny_llama)
    model.train()
    batch = _batch()
    norm = model.get_base_model().model.norm
    grads: list[torch.Tensor] = []
    norm.register_full_backward_hook(lambda module, grad_in, grad_out: grads.append(grad_out[0].clone()))
    model.fused_loss = False
    model(**batch).loss.backward()
    exact = grads.pop()
    errors = {}
    for fused in (False, True):
        model.fused_loss = fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        out.loss.backward()
        errors[fused] = float((grads.pop() - exact).norm() / exact.norm())
    assert list(model._causal_lm_loss.verdicts.values()) == [True]  # checked under autocast, and ran
    assert errors[True] <= 1.1 * errors[False] + 1e-4, errors
    assert errors[True] < 0.02
