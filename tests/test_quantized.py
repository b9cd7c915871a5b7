"""Layer methods on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, against HF PEFT on the same base.

bitsandbytes 0.50 runs its 4-bit and 8-bit layers forward and backward on the CPU. Quantizing is
deterministic, so two loads of one float checkpoint give bit-identical quantized bases: one for PEFT,
one for deltatune; an adapter written by either loads in the other with equal logits. The tiny Llama
has hidden size 64 (bitsandbytes' CPU path needs at least one 64-weight block per row).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

import deltatune as dt  # noqa: E402
from deltatune import engine  # noqa: E402
from deltatune.base_layers import is_quantized, keep_trainable_layout, linear_base  # noqa: E402
from deltatune.quantization import QuantizationUnavailableError, bitsandbytes_config  # noqa: E402

KINDS = ("nf4", "fp4", "int8")
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("quant") / "llama64"
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load(folder, kind: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if kind == "torchao-int8":
        return torchao_int8(load(folder, None)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = bitsandbytes_config(kind) if kind else None
        extra = {"quantization_config": config, "device_map": "cpu"} if config is not None else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    # PEFT's base too: otherwise its first eval pass repacks the 4-bit weights for bitsandbytes' CPU
    # inference kernel, rounding their scales to bfloat16, and the two libraries compare different bases.
    keep_trainable_layout(model)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 7], [3, 4, 8, 16, 32, 64, 99, 11]])


def logits(model: nn.Module, ids: torch.Tensor = IDS, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


CONFIGS = {
    "lora": lambda lib: lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "rslora": lambda lib: lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False
    ),
    "dora": lambda lib: lib.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True, init_lora_weights=False
    ),
    "ia3": lambda lib: lib.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
    "loha": lambda lib: lib.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"], init_weights=False),
    "lokr": lambda lib: lib.LoKrConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False),
    "oft": lambda lib: lib.OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
    "boft": lambda lib: lib.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False),
}


def randomize_dora(model: nn.Module) -> None:
    """PEFT starts DoRA's magnitude at the column norms: move it so the test sees it used."""
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            with torch.no_grad():
                param.mul_(1 + 0.1 * torch.randn_like(param))


# -- numerics against HF PEFT, both directions through files ------------------------------------
# PEFT 0.21 cannot run LoHa or LoKr on a 4-bit base (it reshapes the delta to the packed weight's shape),
# nor OFT or BOFT on a torchao base loaded outside transformers: those are checked against the
# dequantized float model instead, below.
PEFT_CANNOT = {("loha", "nf4"), ("loha", "fp4"), ("lokr", "nf4"), ("lokr", "fp4")}
PEFT_CANNOT |= {("oft", "torchao-int8"), ("boft", "torchao-int8")}


@pytest.mark.parametrize(
    ("method", "kind"),
    [(m, k) for m in CONFIGS for k in [*KINDS, "torchao-int8"] if (m, k) not in PEFT_CANNOT],
)
def test_adapters_cross_with_peft_on_the_same_quantized_base(llama_dir, tmp_path, kind, method):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(llama_dir, kind), CONFIGS[method](peft))
    randomize_dora(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    reference = logits(theirs)
    assert not torch.allclose(reference, logits(load(llama_dir, kind)), atol=1e-3)  # the adapter matters

    ours = dt.PeftModel.from_pretrained(load(llama_dir, kind), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(ours), reference, atol=ATOL, rtol=1e-4)

    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(load(llama_dir, kind), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back), reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(("method", "kind"), sorted(PEFT_CANNOT))
def test_a_quantized_base_gives_its_dequantized_models_outputs_where_peft_fails(llama_dir, tmp_path, method, kind):
    torch.manual_seed(0)
    quantized = load(llama_dir, kind)
    ours = dt.get_peft_model(quantized, CONFIGS[method](dt)).eval()
    ours.save_pretrained(tmp_path)
    dense = load(llama_dir, None)
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model.layers."):
                module.weight.copy_(
                    linear_base(engine.innermost(ours.get_base_model().get_submodule(name))).dense_weight()
                )
    reference = dt.PeftModel.from_pretrained(dense, tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(ours), logits(load(llama_dir, kind)), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_lora_leaves_the_quantized_model_as_it_was(llama_dir, kind):
    base = load(llama_dir, kind)
    before = logits(base)
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules="all-linear")).eval()
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)
    peft_counts = peft.get_peft_model(load(llama_dir, kind), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert model.get_nb_trainable_parameters() == peft_counts.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "oft", "adapter", "prompt"])
def test_training_reaches_only_adapters_and_lowers_the_loss(llama_dir, kind, method):
    base = dt.prepare_model_for_kbit_training(load(llama_dir, kind), use_gradient_checkpointing=False)
    configs = {
        "lora": dt.LoraConfig(r=8, target_modules="all-linear"),
        "dora": dt.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
        "ia3": dt.IA3Config(),
        "loha": dt.LoHaConfig(r=4, target_modules="all-linear"),
        "oft": dt.OFTConfig(oft_block_size=8, target_modules="all-linear"),
        "adapter": dt.BottleneckConfig(reduction_factor=4),
        "prompt": dt.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    model = dt.get_peft_model(base, configs[method])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    rate = {"ia3": 5e-2, "prompt": 1e-1}.get(method, 1e-2)
    optimizer = torch.optim.AdamW(trainable, lr=rate)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), f"{name} changed"


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_lora_on_a_4bit_base_trains_through_the_fused_function_with_the_plain_graphs_numbers(
    llama_dir, kind, monkeypatch
):
    """The fused function dequantizes in forward and again in backward; same loss and gradients as
    bitsandbytes' own layer plus the unfused LoRA graph, and without gradients the layer's own kernel."""
    from deltatune.methods.lora import LoraLinear
    from deltatune.methods.lora_kernel import FusedLoraLinear

    calls = []
    original = FusedLoraLinear.apply
    monkeypatch.setattr(FusedLoraLinear, "apply", lambda *a: calls.append(callable(a[1])) or original(*a))
    model = dt.get_peft_model(load(llama_dir, kind), dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    results = []
    for fused in (True, False):
        monkeypatch.setattr(LoraLinear, "fused", fused)
        calls.clear()
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        results.append((loss.detach(), grads, list(calls)))
    (fused_loss, fused_grads, fused_calls), (plain_loss, plain_grads, plain_calls) = results
    assert fused_calls and all(fused_calls) and len(fused_calls) == 14 and not plain_calls
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    monkeypatch.setattr(LoraLinear, "fused", True)
    calls.clear()
    with torch.no_grad():
        model(input_ids=IDS)
    assert not calls
    # under training dropout a gradient-free pass (a checkpointed block's first) draws its mask as
    # the recomputation will: through the function
    for layer in [m for m in model.modules() if isinstance(m, LoraLinear)]:
        layer.lora_dropout["default"] = nn.Dropout(0.5)
    with torch.no_grad():
        model(input_ids=IDS)
    assert len(calls) == 14


# -- several adapters, switching, mixed batches, generation ---------------------------------------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_two_adapters_mixed_rows_disable_and_generate(llama_dir, kind):
    base = load(llama_dir, kind)
    plain = logits(base)
    torch.manual_seed(0)
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    first = logits(model)
    model.set_adapter("other")
    second = logits(model)
    mixed = logits(model, adapter_names=["default", "other"])
    torch.testing.assert_close(mixed[0], first[0], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(mixed[1], second[1], atol=ATOL, rtol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), plain, atol=0, rtol=0)
    out = model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


# -- merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_a_quantized_base_warns_and_errs_no_more_than_peft(llama_dir, tmp_path, kind, caplog):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(llama_dir, kind), CONFIGS["lora"](peft))
    theirs.save_pretrained(tmp_path)
    exact = logits(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_error = (logits(theirs.merge_and_unload()) - exact).abs().max()

    ours = dt.PeftModel.from_pretrained(load(llama_dir, kind), tmp_path).eval()
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        merged = ours.merge_and_unload()
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "requantized" in message and "rounding changed them by up to" in message
    assert "merge into the float base instead" in message
    assert not any(isinstance(m, dt.PeftModel) for m in merged.modules())
    our_error = (logits(merged) - exact).abs().max()
    assert 0 < our_error <= peft_error * 1.05 + 1e-6, (our_error, peft_error)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unmerge_restores_the_quantized_base_as_closely_as_peft(llama_dir, tmp_path, kind):
    """Merge then unmerge requantizes twice; the adapter is back in the forward, the base off by rounding."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(load(llama_dir, kind), CONFIGS["lora"](peft)).eval()
    theirs.save_pretrained(tmp_path)
    before = logits(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
        theirs.unmerge_adapter()
    peft_drift = (logits(theirs) - before).abs().max()
    ours = dt.PeftModel.from_pretrained(load(llama_dir, kind), tmp_path).eval()
    ours.merge_adapter()
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
    ours.unmerge_adapter()
    our_drift = (logits(ours) - before).abs().max()
    assert 0 < our_drift <= peft_drift * 1.05 + 1e-6, (our_drift, peft_drift)


@pytest.mark.parametrize("kind", KINDS)
def test_an_adapter_trained_on_a_quantized_base_merges_exactly_into_the_float_base(llama_dir, tmp_path, kind):
    torch.manual_seed(0)
    quantized = dt.get_peft_model(load(llama_dir, kind), CONFIGS["lora"](dt))
    quantized.save_pretrained(tmp_path)
    on_float = dt.PeftModel.from_pretrained(load(llama_dir, None), tmp_path).eval()
    unmerged = logits(on_float)
    torch.testing.assert_close(logits(on_float.merge_and_unload()), unmerged, atol=ATOL, rtol=1e-4)
    # the float base with the adapter is close to the quantized one it was trained on
    assert (unmerged - logits(quantized.eval())).abs().max() < 0.2 * unmerged.abs().max()


# -- the base-weight interface --------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dense_weight_round_trips_through_requantization(llama_dir, kind):
    model = load(llama_dir, kind)
    layer = model.model.layers[0].self_attn.q_proj
    float_weight = load(llama_dir, None).model.layers[0].self_attn.q_proj.weight.detach()
    view = linear_base(layer)
    assert view.quantized and (view.out_features, view.in_features) == tuple(float_weight.shape)
    dense = view.dense_weight()
    assert dense.shape == float_weight.shape and dense.is_floating_point()
    assert (dense - float_weight).abs().max() < 0.2 * float_weight.abs().max()  # a 4/8-bit reconstruction
    error = view.set_dense_weight(dense.clone())
    # values on the grid requantize to themselves, up to the 8-bit absmax of double quantization
    assert error < 1e-3 * float_weight.abs().max()
    torch.testing.assert_close(view.dense_weight(), dense, atol=float(error) + 1e-7, rtol=0)
    changed = dense.clone()
    changed[0, :] += 0.5
    assert view.set_dense_weight(changed) > error  # an off-grid change rounds, and says by how much


def test_prepare_model_for_kbit_training_matches_peft(llama_dir):
    from transformers import AutoModelForCausalLM

    def load_bf16():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(
                llama_dir, dtype=torch.bfloat16, quantization_config=bitsandbytes_config("nf4"), device_map="cpu"
            )

    ours = dt.prepare_model_for_kbit_training(load_bf16())
    theirs = peft.prepare_model_for_kbit_training(load_bf16())
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()} == {
        n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()
    }
    assert ours.model.norm.weight.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.float32
    assert ours.is_gradient_checkpointing
    ours.train()
    assert ours.get_input_embeddings()(IDS).requires_grad  # reentrant checkpointing needs it


# -- refusals ---------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """What a GPTQ/AWQ layer looks like from outside: sizes, packed integer weights, no float weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class WithQuantLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = QuantLinear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


@pytest.mark.parametrize("targets", ["all-linear", ["proj"]])
def test_an_unsupported_quantized_layer_is_refused_with_its_type_and_the_supported_ones(targets):
    with pytest.raises(dt.TargetModuleError) as err:
        dt.get_peft_model(WithQuantLinear(), dt.LoraConfig(r=2, target_modules=targets))
    assert "QuantLinear" in str(err.value) and "Linear4bit" in str(err.value) and "Linear8bitLt" in str(err.value)


def test_quantizing_without_bitsandbytes_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name))
    with pytest.raises(QuantizationUnavailableError, match=r"pip install 'deltatune\[quant\]'"):
        bitsandbytes_config("nf4")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_gradients_after_an_evaluation_equal_gradients_before_it(llama_dir, method):
    """bitsandbytes repacks a 4-bit weight for CPU inference on the first eval pass, into a kernel with
    no backward; the model must train as if no evaluation had happened."""

    def first_gradient(evaluate_first: bool) -> torch.Tensor:
        torch.manual_seed(0)
        config = (
            CONFIGS["lora"](dt)
            if method == "lora"
            else dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
        )
        model = dt.get_peft_model(load(llama_dir, "nf4"), config)
        if evaluate_first:
            model.eval()
            logits(model)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return next(p.grad for p in model.parameters() if p.requires_grad)

    torch.testing.assert_close(first_gradient(True), first_gradient(False), atol=1e-6, rtol=1e-5)


# -- LoftQ ------------------------------------------------------------------------------------------
def loftq_reference(weight: torch.Tensor, r: int, scale: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Li et al. 2023, Algorithm 1, written out: returns (Q_T dequantized, s * B_T A_T)."""
    from deltatune.quantization import quantize_round_trip

    low_rank = torch.zeros_like(weight)
    for _ in range(iters):
        quantized = quantize_round_trip(weight - low_rank, 4)
        U, S, Vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        low_rank = (U[:, :r] * S[:r]) @ Vh[:r]
    return quantized, low_rank


@pytest.mark.parametrize("alpha", [4, 16])
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_start_follows_the_paper_and_beats_plain_quantization(llama_dir, tmp_path, alpha, iters):
    from deltatune.quantization import quantize_round_trip

    float_model = load(llama_dir, None)
    original = float_model.model.layers[0].mlp.down_proj.weight.detach().clone()
    config = dt.LoraConfig(
        r=4,
        lora_alpha=alpha,
        target_modules=["down_proj", "q_proj"],
        init_lora_weights="loftq",
        loftq_config={"loftq_bits": 4, "loftq_iter": iters},
    )
    model = dt.get_peft_model(float_model, config)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    scale = alpha / 4
    start = layer.base_layer.weight.detach()
    update = scale * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    expected_base, expected_update = loftq_reference(original, 4, scale, iters)
    torch.testing.assert_close(start, expected_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(update, expected_update, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(quantize_round_trip(start, 4), start, atol=1e-6, rtol=0)  # on nf4's grid
    plain_error = (original - quantize_round_trip(original, 4)).norm()
    assert (original - (start + update)).norm() < 0.95 * plain_error  # rank 4 of 64 on random weights

    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())  # PEFT's fields and values
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": iters}


def test_loftq_leaves_layers_a_quantized_load_keeps_float_as_they_are():
    """T5 keeps ``wo`` in float32 and a tied LM head is the embedding matrix: a quantized load never
    quantizes them, so LoftQ gives them the plain start and leaves their weights alone (its start
    would put the rounded weight in a float layer that the quantized base does not have)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from deltatune.quantization import kept_in_float, quantize_frozen_linear_layers

    loftq = {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_layers=1, num_heads=4, decoder_start_token_id=0)
    )
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    )  # fmt: skip
    for model, targets, float_names in [(t5, "all-linear", (".wo",)), (llama, ["q_proj", "lm_head"], ("lm_head",))]:
        kept = kept_in_float(model)
        weights = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if n.endswith(("wo.weight", "embed_tokens.weight"))
        }
        peft_model = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules=targets, **loftq))
        quantize_frozen_linear_layers(peft_model, "nf4", kept)
        layers = dict(engine.adapter_layers(peft_model))
        stay_float = [path for path in layers if path.endswith(float_names)]
        assert stay_float and len(stay_float) < len(layers)
        for path, layer in layers.items():
            kept_float = path in stay_float
            assert is_quantized(layer.base_layer) != kept_float, path
            assert layer.lora_B["default"].weight.any() != kept_float, path  # LoftQ's start, or B = 0
        now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()}
        assert weights and all(torch.equal(now[name], weight) for name, weight in weights.items())


def test_loftq_in_place_refuses_gpt2_conv1d_layers_it_would_leave_float():
    from deltatune.quantization import check_quantizable_in_place, kept_in_float

    from conftest import tiny_model

    model = tiny_model("gpt2")
    expected = r"Conv1D layers \(transformer\.h\.0\.attn\.c_attn, .*--init-lora-weights true"
    with pytest.raises(ValueError, match=expected):
        check_quantizable_in_place(model, kept_in_float(model))


def test_loftq_on_an_already_quantized_layer_says_how_to_start_from_float(llama_dir):
    config = dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(dt.ConfigError, match="starts from the float weights.*without quantization_config"):
        dt.get_peft_model(load(llama_dir, "nf4"), config)
    with pytest.raises(dt.ConfigError, match="loftq_bits must be 4"):
        dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})


def test_quantizing_on_a_device_without_kernels_says_so():
    from deltatune.quantization import check_device

    with pytest.raises(QuantizationUnavailableError, match="no kernels for mps devices"):
        check_device("nf4", torch.device("mps"))
    check_device("none", torch.device("mps"))  # nothing to quantize: fine


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_qlora_on_cuda_matches_peft_and_trains(llama_dir, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    def cuda_base():
        return AutoModelForCausalLM.from_pretrained(
            llama_dir, dtype=torch.float32, quantization_config=bitsandbytes_config(kind), device_map={"": "cuda"}
        ).eval()

    torch.manual_seed(0)
    theirs = peft.get_peft_model(cuda_base(), CONFIGS["lora"](peft))
    theirs.save_pretrained(tmp_path)
    ours = dt.PeftModel.from_pretrained(cuda_base(), tmp_path, is_trainable=True)
    ids = IDS.cuda()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=1e-4, rtol=1e-3)
    ours.train()
    trainable = [p for p in ours.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = ours(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -- torchao's weight-only int8 ------------------------------------------------------------------
def torchao_int8(model: nn.Module) -> nn.Module:
    torchao = pytest.importorskip("torchao.quantization")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao.quantize_(
            model,
            torchao.Int8WeightOnlyConfig(),
            filter_fn=lambda m, name: isinstance(m, nn.Linear) and "layers." in name,
        )
    return model


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with each torchao weight replaced by its dequantized float tensor: the reference."""
    import copy

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao"):
            module.weight = nn.Parameter(module.weight.dequantize().detach().clone(), requires_grad=False)
    return plain


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_torchao_int8_base_equals_its_dequantized_float_model(llama_dir, tmp_path, method):
    base = torchao_int8(load(llama_dir, None))
    reference_base = dequantized_copy(base)
    layer = base.model.layers[0].self_attn.q_proj
    assert linear_base(layer).quantized and "int8" in linear_base(layer).describe()
    torch.manual_seed(0)
    ours = dt.get_peft_model(base, CONFIGS[method](dt))
    randomize_dora(ours)
    ours.save_pretrained(tmp_path)
    reference = dt.PeftModel.from_pretrained(reference_base, tmp_path).eval()
    torch.testing.assert_close(logits(ours.eval()), logits(reference), atol=1e-4, rtol=1e-4)
    ours.train()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


def test_torchao_int8_merge_requantizes_and_reports_it(llama_dir, caplog):
    torch.manual_seed(0)
    model = dt.get_peft_model(torchao_int8(load(llama_dir, None)), CONFIGS["lora"](dt)).eval()
    exact = logits(model)
    with caplog.at_level(logging.WARNING, logger="deltatune"):
        merged = model.merge_and_unload()
    assert "torchao Int8Tensor" in caplog.text and "rounding changed them by up to" in caplog.text
    assert type(merged.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert (logits(merged) - exact).abs().max() < 0.05 * exact.abs().max()


def test_a_loftq_adapter_loads_onto_the_4bit_base_it_was_made_for(llama_dir, tmp_path):
    """LoftQ's workflow: initialise on the float model, save the quantized-then-dequantized base and
    the adapter, load that base in nf4 and the adapter onto it: the start the float model had."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = dt.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
    )
    start = dt.get_peft_model(load(llama_dir, None), config).eval()
    expected = logits(start)
    start.save_pretrained(tmp_path / "adapter")
    start.unload().save_pretrained(tmp_path / "base")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=nf4, device_map="cpu")
    loaded = dt.PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True).eval()
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=1e-4)


def test_requantizing_an_8bit_layer_keeps_its_outlier_threshold():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(torch.randn(64, 64), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    view = linear_base(layer)
    view.set_dense_weight(view.dense_weight() * 1.5)
    assert layer.state.threshold == 6.0 and not layer.state.has_fp16_weights
    assert layer(torch.randn(2, 64)).shape == (2, 64)


# -- trainers: a stock Trainer refuses a quantized base unless it sees a PEFT model ---------------
class _TokenRows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = IDS[index % 2].roll(index)
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_trainer_trains_a_quantized_base_and_saves_the_adapter(llama_dir, tmp_path, kind):
    from transformers import Trainer, TrainingArguments

    from deltatune.integrations import AdapterTrainer

    model = dt.get_peft_model(load(llama_dir, kind), dt.LoraConfig(r=4, target_modules="all-linear"))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_steps=4, logging_steps=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="purely quantized"):  # what a stock Trainer says, for the record
        Trainer(model=model, args=args, train_dataset=_TokenRows())
    trainer = AdapterTrainer(model=model, args=args, train_dataset=_TokenRows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    saved = {p.name for p in (tmp_path / "checkpoint-4").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    assert not any(name.startswith("model") for name in saved)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    resumed = AdapterTrainer(model=model, args=args, train_dataset=_TokenRows())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))  # step 4 of 4: loads, trains no more
    for name, param in model.named_parameters():
        if name in trained:
            torch.testing.assert_close(param, trained[name], msg=name)  # the checkpoint's adapter is back


# -- LoftQ in `deltatune train`: float load, LoftQ start, then the base quantized in place ----------
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantizing_a_float_model_in_place_gives_what_a_quantized_load_gives(llama_dir, kind):
    from deltatune.quantization import kept_in_float, quantize_frozen_linear_layers

    loaded = load(llama_dir, kind)
    converted = load(llama_dir, None)
    converted.requires_grad_(False)
    assert quantize_frozen_linear_layers(converted, kind, kept_in_float(converted)) == 14  # the LM head stays float
    assert converted.config.quantization_config.to_dict() == loaded.config.quantization_config.to_dict()
    loaded_layers = dict(loaded.named_modules())
    for name, module in converted.named_modules():
        assert type(module) is type(loaded_layers[name]), name
        if is_quantized(module):
            mine, theirs = linear_base(module), linear_base(loaded_layers[name])
            assert torch.equal(mine.dense_weight(), theirs.dense_weight()), name
            if kind == "int8":
                assert module.state.threshold == loaded_layers[name].state.threshold == 6.0


def test_in_place_quantization_under_adapters_leaves_a_classifier_head_float(llama_dir):
    """Names kept float are taken before adapters wrap the model: the frozen original of a head saved
    with the adapter stays float, as in a quantized load, and LoRA's base layers are converted."""
    from transformers import AutoModelForSequenceClassification

    from deltatune.quantization import kept_in_float, quantize_frozen_linear_layers

    model = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=2)
    kept = kept_in_float(model)
    peft_model = dt.get_peft_model(model, dt.LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    assert quantize_frozen_linear_layers(peft_model, "nf4", kept) == 14
    head = peft_model.get_base_model().score
    assert type(head.base_layer) is nn.Linear and head.modules_to_save["default"].weight.requires_grad
    lora_layers = [layer for _, layer in engine.adapter_layers(peft_model) if layer is not head]
    assert len(lora_layers) == 14 and all(is_quantized(layer.base_layer) for layer in lora_layers)


def test_in_place_quantization_keeps_a_trained_bias_the_same_parameter():
    from deltatune.quantization import quantize_frozen_linear_layers

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    bias = model[0].bias  # trained next to an adapter (bias="all")
    assert quantize_frozen_linear_layers(model, "nf4", []) == 2
    assert model[0].bias is bias and bias.requires_grad and not model[2].bias.requires_grad


def test_in_place_quantization_of_weights_not_loaded_yet_says_so():
    from deltatune.quantization import quantize_frozen_linear_layers

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"2 layers to quantize have no weights yet \(the meta device\), e\.g\. 0"):
        quantize_frozen_linear_layers(model, "nf4", [])
