"""LoRA layers against the papers' formulas, written out by hand here.

LoRA (Hu et al. 2021): ``y = x W^T + b + s x A^T B^T`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
DoRA (Liu et al. 2024): ``y = x (m * V / ||V||_row)^T + b`` with ``V = W + s B A``.
PiSSA (Meng et al. 2024): ``s B A = U_r S_r V_r^T`` and the base keeps ``W - U_r S_r V_r^T``.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoraEmbedding, LoraLinear


class Toy(nn.Module):
    """A plain torch model: the core works on any nn.Module, not only transformers models."""

    def __init__(self, d_in: int = 12, d_out: int = 10, vocab: int = 20, conv1d: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_in)
        self.proj = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
        if conv1d:
            nn.init.normal_(self.proj.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.emb(ids))


def wrap(conv1d: bool = False, seed: int = 0, **config) -> tuple[dt.PeftModel, Toy]:
    torch.manual_seed(seed)
    model = Toy(conv1d=conv1d)
    reference = Toy(conv1d=conv1d)
    reference.load_state_dict(model.state_dict())
    config.setdefault("target_modules", ["proj"])
    config.setdefault("init_lora_weights", False)
    return dt.get_peft_model(model, dt.LoraConfig(**config)), reference


def weight_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


IDS = torch.tensor([[1, 5, 7, 3], [0, 2, 19, 4]])


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_linear_formula(conv1d, use_rslora):
    pm, reference = wrap(conv1d=conv1d, r=3, lora_alpha=7, use_rslora=use_rslora)
    layer = pm.base_model.model.proj
    assert isinstance(layer, LoraLinear)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = 7 / math.sqrt(3) if use_rslora else 7 / 3
    x = reference.emb(IDS)
    expected = x @ weight_out_in(reference.proj).T + reference.proj.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(pm(IDS), expected, atol=1e-6, rtol=1e-6)


def test_dora_formula_and_initial_magnitude():
    pm, reference = wrap(r=2, lora_alpha=4, use_dora=True)
    layer = pm.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, b, s = reference.proj.weight, reference.proj.bias, 2.0
    V = W + s * B @ A
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], V.norm(dim=1))
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, W.shape[0]))
    m = layer.lora_magnitude_vector["default"]
    x = reference.emb(IDS)
    expected = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b
    torch.testing.assert_close(pm(IDS), expected, atol=1e-5, rtol=1e-5)


def test_dora_treats_the_norm_as_constant_in_backward():
    pm, reference = wrap(r=2, lora_alpha=4, use_dora=True)
    layer = pm.base_model.model.proj
    A, B, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    pm(IDS).square().sum().backward()
    # Same forward, written with the norm detached: the gradients must match exactly that graph.
    A2, B2, m2 = (t.detach().clone().requires_grad_() for t in (A, B, m))
    x = reference.emb(IDS).detach()
    V = reference.proj.weight + 2.0 * B2 @ A2
    (x @ (m2[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + reference.proj.bias).square().sum().backward()
    for ours, theirs in ((A, A2), (B, B2), (m, m2)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def test_embedding_formula():
    pm, reference = wrap(r=2, lora_alpha=6, target_modules=["emb"])
    layer = pm.base_model.model.emb
    assert isinstance(layer, LoraEmbedding)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (r, vocab), (dim, r)
    table = reference.emb.weight + 3.0 * (B @ A).T
    torch.testing.assert_close(pm(IDS), reference.proj(table[IDS]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_8"])
def test_pissa_takes_the_principal_part_and_leaves_the_residual(init):
    torch.manual_seed(0)
    model = Toy(d_in=16, d_out=12)
    original = model.proj.weight.detach().clone()
    before = model(IDS).detach()
    pm = dt.get_peft_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=init))
    layer = pm.base_model.model.proj
    principal = layer.get_delta_weight("default")
    U, S, Vh = torch.linalg.svd(original)
    expected = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    tolerance = 1e-4 if init == "pissa" else 5e-2  # a randomised SVD is close, not exact
    torch.testing.assert_close(principal, expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight + principal, original, atol=1e-5, rtol=0)
    torch.testing.assert_close(pm(IDS), before, atol=1e-5, rtol=1e-5)  # outputs unchanged at init


def test_pissa_adapter_reloads_onto_the_original_base(tmp_path):
    torch.manual_seed(0)
    pm = dt.get_peft_model(
        Toy(d_in=16, d_out=12), dt.LoraConfig(r=4, target_modules=["proj"], init_lora_weights="pissa")
    )
    with torch.no_grad():
        pm.base_model.model.proj.lora_B["default"].weight.mul_(1.3)  # "training"
    expected = pm(IDS)
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = dt.PeftModel.from_pretrained(Toy(d_in=16, d_out=12), tmp_path)
    torch.testing.assert_close(loaded(IDS), expected, atol=1e-5, rtol=1e-5)


def test_gaussian_init_scale_and_zero_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256))
    pm = dt.get_peft_model(model, dt.LoraConfig(r=16, target_modules=["0"], init_lora_weights="gaussian"))
    layer = pm.base_model.model[0]
    assert abs(layer.lora_A["default"].weight.std().item() - 1 / 16) < 0.005
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 32),
    dora=st.booleans(),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_round_trip(d_in, d_out, r, alpha, dora, conv1d, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out))
    original = model[0].weight.detach().clone()
    config = dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False, use_dora=dora)
    pm = dt.get_peft_model(model, config)
    x = torch.randn(3, d_in)
    unmerged = pm(x).detach()
    pm.merge_adapter()
    torch.testing.assert_close(pm(x), unmerged, atol=1e-4, rtol=1e-4)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm.base_model.model[0].base_layer.weight, original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pm(x), unmerged, atol=1e-5, rtol=1e-5)


def test_tied_embedding_merge_keeps_the_head(tmp_path):
    from conftest import tiny_inputs, tiny_model

    pm = dt.get_peft_model(tiny_model("gpt2"), dt.LoraConfig(r=4, target_modules=["wte"], init_lora_weights=False))
    pm.eval()
    with torch.no_grad():
        expected = pm(**tiny_inputs("gpt2")).logits
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(**tiny_inputs("gpt2")).logits, expected, atol=1e-5, rtol=0)
    assert merged.config.tie_word_embeddings is False


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("bias_trainable", [False, True])
def test_fused_lora_equals_the_plain_graph(conv1d, bias_trainable):
    """FusedLoraLinear: same output and same gradients (input, A, B, trained bias) as the unfused graph."""
    pm, _ = wrap(conv1d=conv1d, r=3, lora_alpha=5)
    layer = pm.base_model.model.proj
    layer.base_layer.bias.requires_grad_(bias_trainable)
    x = torch.randn(2, 5, 12, requires_grad=True)
    results = []
    for fused in (True, False):
        LoraLinear.fused = fused
        try:
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            out = layer(x)
            (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
            grads = [
                x.grad.clone(),
                layer.lora_A["default"].weight.grad.clone(),
                layer.lora_B["default"].weight.grad.clone(),
            ]
            if bias_trainable:
                grads.append(layer.base_layer.bias.grad.clone())
            results.append((out.detach(), grads))
        finally:
            LoraLinear.fused = True
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-5)
    for fused_grad, plain_grad in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(fused_grad, plain_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_without_gradients_skips_the_autograd_function_and_equals_the_formula(conv1d, monkeypatch):
    from deltatune.methods.lora_kernel import FusedLoraLinear

    pm, _ = wrap(conv1d=conv1d, r=3, lora_alpha=5, lora_dropout=0.1)
    layer = pm.base_model.model.proj
    layer.eval()
    x = torch.randn(2, 5, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base = layer.base_layer
    reference = x @ weight_out_in(base).T + base.bias + layer.scaling["default"] * (x @ A.T) @ B.T
    with_function = layer(x)  # grad mode, trainable A and B: the autograd function

    def refuse(*args):
        raise AssertionError("FusedLoraLinear used where nothing needs a gradient")

    monkeypatch.setattr(FusedLoraLinear, "apply", refuse)
    with torch.no_grad():
        without = layer(x)
    A.requires_grad_(False), B.requires_grad_(False)
    frozen = layer(x)  # grad mode, but nothing requires a gradient
    for got in (with_function, without, frozen):
        torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-5)
    assert without.shape == x.shape[:-1] + (base.bias.shape[0],)


def test_fused_path_with_several_active_adapters_of_which_one_is_on_the_layer():
    """Two active adapters, only one of them on this layer: the fused path, the same output."""
    pm, _ = wrap(r=3, lora_alpha=5)
    pm.add_adapter("other", dt.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    layer = pm.base_model.model.proj
    layer.active_adapters = ["default", "other"]  # as set_adapter leaves a layer that lacks "other"
    x = torch.randn(2, 12)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    reference = layer.base_layer(x) + layer.scaling["default"] * (x @ A.T) @ B.T
    out = layer(x)
    assert type(out.grad_fn).__name__ == "FusedLoraLinearBackward"
    torch.testing.assert_close(out, reference)


def test_fused_lora_dropout_applies_one_mask_to_the_adapter_path_only():
    from deltatune.methods.lora_kernel import FusedLoraLinear

    torch.manual_seed(0)
    x = torch.randn(4, 6, requires_grad=True)
    W, b = torch.randn(5, 6), torch.randn(5)
    A, B = torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    keep = torch.rand(x.shape) >= 0.3  # a boolean mask; the 1 / (1 - p) rescaling is passed separately
    out = FusedLoraLinear.apply(x, W, b, A, B, 1.5, keep, 1 / 0.7)
    out.square().sum().backward()
    fused = [x.grad.clone(), A.grad.clone(), B.grad.clone()]
    for t in (x, A, B):
        t.grad = None
    reference = x @ W.T + b + 1.5 * ((x * keep / 0.7) @ A.T) @ B.T
    torch.testing.assert_close(out, reference)
    reference.square().sum().backward()
    for got, want in zip(fused, [x.grad, A.grad, B.grad]):
        torch.testing.assert_close(got, want)


def test_fused_lora_dequantizes_in_backward_only_for_the_input_gradient():
    """A weight given as a function (a quantized base's dequantization) is called once in forward,
    and in backward only when the input needs a gradient (the first block's input does not)."""
    from deltatune.methods.lora_kernel import FusedLoraLinear

    torch.manual_seed(0)
    W = torch.randn(5, 6)
    calls = []

    def dequantize():
        calls.append(1)
        return W

    for input_grad, expected_calls in ((False, 1), (True, 2)):
        calls.clear()
        x = torch.randn(4, 6, requires_grad=input_grad)
        A, B = torch.randn(2, 6, requires_grad=True), torch.randn(5, 2, requires_grad=True)
        FusedLoraLinear.apply(x, dequantize, None, A, B, 1.5, None, 1.0).square().sum().backward()
        assert len(calls) == expected_calls
        reference_A, reference_B = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        (x.detach() @ W.T + 1.5 * (x.detach() @ reference_A.T) @ reference_B.T).square().sum().backward()
        torch.testing.assert_close(A.grad, reference_A.grad)
        torch.testing.assert_close(B.grad, reference_B.grad)


def test_fused_lora_dropout_in_the_layer_follows_the_formula():
    """Training: ``W x + s B A (m * x / (1 - p))`` with a Bernoulli keep-mask ``m`` (redrawn here from
    the same seed); evaluation: no dropout."""
    pm, _ = wrap(r=4, lora_alpha=8, lora_dropout=0.5)
    layer = pm.base_model.model.proj
    layer.train()
    x = torch.randn(3, 12)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    keep = torch.rand_like(x) >= 0.5  # the draw the layer made
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    reference = layer.base_layer(x) + layer.scaling["default"] * ((x * keep / 0.5) @ A.T) @ B.T
    torch.testing.assert_close(out, reference)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling["default"] * (x @ A.T) @ B.T)
