"""Several adapters, and several methods, on one model at once.

* Methods together: LoRA, bottleneck adapters and prefix tuning active at the same time, checked
  against a reference composed by hand (LoRA folded into a fresh base's weights, the bottleneck as a
  forward hook, the prefix through deltatune alone); LoRA and a bottleneck on the same module.
* ``Stack`` and ``Parallel`` composition of bottleneck adapters, checked on one module by hand.
* Mixed-adapter batches (``adapter_names=`` in forward and generate): each row equals that row run
  alone with its adapter; base rows equal the base model exactly.
* ``add_weighted_adapter``: the new adapter's delta weights against the formulas (written out here,
  independently) and against HF PEFT's ``add_weighted_adapter`` on the same checkpoints.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.overrides import TorchFunctionMode

import deltatune as dt
from deltatune import engine
from deltatune.adapter_layer import RowRouting
from deltatune.methods.bottleneck import BottleneckLayer
from deltatune.methods.lora import LoraEmbedding, LoraLinear

from conftest import tiny_inputs, tiny_model

BASE = "__base__"


# -- helpers ---------------------------------------------------------------------------------------
def perturb_adapters(pm: dt.PeftModel, seed: int = 7, scale: float = 0.1) -> None:
    """Add noise to every adapter's trained tensors (magnitudes, heads, biases, prefixes included)."""
    active = pm.active_adapters
    generator = torch.Generator().manual_seed(seed)
    for name in pm.peft_config:
        pm.set_adapter(name)
        with torch.no_grad():
            for _, param in sorted(pm.named_parameters(), key=lambda item: item[0]):
                if param.requires_grad:
                    param.add_(scale * torch.randn(param.shape, generator=generator))
    pm.set_adapter(active)


def logits(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items()}


def bottleneck_update(layer: BottleneckLayer, name: str, h: torch.Tensor) -> torch.Tensor:
    """s * (W_up relu(W_down h + b_down) + b_up), by hand."""
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return layer.scaling[name] * (torch.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


def lora_delta(layer: LoraLinear, name: str) -> torch.Tensor:
    """s * B A, by hand, in (out, in) orientation."""
    return layer.scaling[name] * (layer.lora_B[name].weight @ layer.lora_A[name].weight)


def assert_rows_match(pm: dt.PeftModel, names: list[str], batch: dict, base_model: nn.Module) -> torch.Tensor:
    """The mixed batch equals, row by row, each row alone with its adapter (base rows: bit for bit)."""
    active = pm.active_adapters
    mixed = logits(pm, batch, adapter_names=names)
    base = logits(base_model, batch)
    for i, name in enumerate(names):
        if name == BASE:
            assert torch.equal(mixed[i], base[i]), f"row {i} (base)"
            continue
        pm.set_adapter(name)
        alone = logits(pm, row(batch, i))[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
        assert not torch.allclose(alone, base[i], atol=1e-4), f"adapter {name} changes nothing"
    pm.set_adapter(active)
    assert pm.active_adapters == active
    return mixed


# -- methods on one model at once -------------------------------------------------------------------
def three_methods() -> dt.PeftModel:
    pm = dt.get_peft_model(
        tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "lora"
    )
    pm.add_adapter("bn", dt.BottleneckConfig(placement="houlsby", bottleneck_size=4, init="random"))
    pm.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=3))
    perturb_adapters(pm)
    pm.set_adapter(["lora", "bn", "prefix"])
    return pm


def hand_composed(pm: dt.PeftModel) -> nn.Module:
    """A fresh base with LoRA folded into q/v and the bottleneck as forward hooks on o_proj/down_proj."""
    base = tiny_model("llama")
    adapted = pm.get_base_model().model.layers
    with torch.no_grad():
        for layer, source in zip(base.model.layers, adapted):
            for proj in ("q_proj", "v_proj"):
                getattr(layer.self_attn, proj).weight.add_(lora_delta(getattr(source.self_attn, proj), "lora"))
            for module, wrapper in (
                (layer.self_attn.o_proj, source.self_attn.o_proj),
                (layer.mlp.down_proj, source.mlp.down_proj),
            ):
                module.register_forward_hook(lambda m, a, y, w=wrapper: y + bottleneck_update(w, "bn", y))
    return base


def test_lora_bottleneck_and_prefix_together(tmp_path):
    pm = three_methods()
    batch = tiny_inputs("llama")
    together = logits(pm, batch)
    alone = {}
    for name in ("lora", "bn", "prefix"):
        pm.set_adapter(name)
        alone[name] = logits(pm, batch)
        assert not torch.allclose(together, alone[name], atol=1e-4), f"{name} alone equals all three"
    pm.set_adapter(["lora", "bn", "prefix"])
    assert not torch.allclose(together, logits(tiny_model("llama"), batch), atol=1e-4)

    # Save all three (each in its own subfolder), then rebuild by hand: fold LoRA, hook the bottleneck,
    # and let deltatune add only the prefix.
    pm.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"lora", "bn", "prefix"}
    types = {
        n: json.loads((tmp_path / n / "adapter_config.json").read_text())["peft_type"] for n in ("lora", "bn", "prefix")
    }
    assert types == {"lora": "LORA", "bn": "BOTTLENECK", "prefix": "PREFIX_TUNING"}
    reference = dt.PeftModel.from_pretrained(hand_composed(pm), tmp_path / "prefix", adapter_name="prefix")
    torch.testing.assert_close(logits(reference, batch), together, atol=1e-5, rtol=1e-5)

    # Loaded by name into a fresh model: the same outputs, together and alone.
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora", adapter_name="lora")
    loaded.load_adapter(tmp_path / "bn", "bn")
    loaded.load_adapter(tmp_path, "prefix", subfolder="prefix")
    loaded.set_adapter(["lora", "bn", "prefix"])
    torch.testing.assert_close(logits(loaded, batch), together, atol=1e-6, rtol=1e-6)
    for name, expected in alone.items():
        loaded.set_adapter(name)
        torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=1e-6)


def test_save_puts_default_at_the_root_and_others_in_subfolders(tmp_path):
    pm = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=2, init_lora_weights=False))
    pm.add_adapter("bn", dt.BottleneckConfig(placement="pfeiffer", init="random"))
    pm.set_adapter(["default", "bn"])
    batch = tiny_inputs("llama")
    expected = logits(pm, batch)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert json.loads((tmp_path / "bn" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert not any(".adapter_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    assert not any(".lora_" in k for k in load_file(tmp_path / "bn" / "adapter_model.safetensors"))
    loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path, "bn", subfolder="bn")
    loaded.set_adapter(["default", "bn"])
    assert torch.equal(logits(loaded, batch), expected)


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_and_bottleneck_on_the_same_module(lora_first, tmp_path):
    lora = dt.LoraConfig(r=4, lora_alpha=6, target_modules="all-linear", init_lora_weights=False)
    bottleneck = dt.BottleneckConfig(placement="houlsby", bottleneck_size=4, init="random", scaling=0.8)
    torch.manual_seed(3)
    if lora_first:
        pm = dt.get_peft_model(tiny_model("llama"), lora, "lora")
        pm.add_adapter("bn", bottleneck)
    else:
        pm = dt.get_peft_model(tiny_model("llama"), bottleneck, "bn")
        pm.add_adapter("lora", lora)
    pm.set_adapter(["lora", "bn"])
    block = pm.get_base_model().model.layers[0]

    # The chain is Bottleneck(LoRA(Linear)) whichever came first.
    for module in (block.self_attn.o_proj, block.mlp.down_proj):
        assert type(module) is BottleneckLayer
        assert type(module.base_layer) is LoraLinear
        assert type(module.base_layer.base_layer) is nn.Linear
    assert type(block.self_attn.q_proj) is LoraLinear and type(block.mlp.up_proj) is LoraLinear

    # The module's output is y + A(y), with y = W x + s B A x.
    captured = {}
    wrapper = block.self_attn.o_proj
    wrapper.register_forward_hook(lambda m, a, out: captured.update(x=a[0], out=out))
    batch = tiny_inputs("llama")
    together = logits(pm, batch)
    x = captured["x"]
    lora_layer = wrapper.base_layer
    y = x @ (lora_layer.base_layer.weight + lora_delta(lora_layer, "lora")).T
    torch.testing.assert_close(captured["out"], y + bottleneck_update(wrapper, "bn", y), atol=1e-5, rtol=1e-5)

    # The order of adding does not change the parameter names or the outputs.
    other = dt.get_peft_model(
        tiny_model("llama"), lora if not lora_first else bottleneck, "lora" if not lora_first else "bn"
    )
    other.add_adapter("bn" if not lora_first else "lora", bottleneck if not lora_first else lora)
    other.set_adapter(["lora", "bn"])
    assert set(other.state_dict()) == set(pm.state_dict())
    other.load_state_dict(pm.state_dict())
    assert torch.equal(logits(other, batch), together)

    # The LoRA checkpoint has HF PEFT's keys (no base_layer step), and HF PEFT loads it alone.
    pm.save_pretrained(tmp_path)
    lora_keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    bn_keys = set(load_file(tmp_path / "bn" / "adapter_model.safetensors"))
    assert not any("base_layer" in k for k in lora_keys | bn_keys)
    assert "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight" in lora_keys
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in bn_keys
    reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert lora_keys == set(peft.get_peft_model_state_dict(reference))
    by_peft = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "lora")
    pm.set_adapter("lora")
    torch.testing.assert_close(logits(by_peft, batch), logits(pm, batch), atol=1e-5, rtol=1e-5)


# -- Stack and Parallel -----------------------------------------------------------------------------
def two_bottlenecks() -> dt.PeftModel:
    pm = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(bottleneck_size=4, init="random"), "a")
    pm.add_adapter("b", dt.BottleneckConfig(bottleneck_size=6, init="random", scaling=0.6, non_linearity="tanh"))
    perturb_adapters(pm, scale=0.2)
    return pm


def test_stack_and_parallel_on_one_module():
    pm = two_bottlenecks()
    wrapper = pm.get_base_model().model.layers[0].mlp.down_proj
    captured = {}
    wrapper.base_layer.register_forward_hook(lambda m, a, y: captured.__setitem__("y", y))
    wrapper.register_forward_hook(lambda m, a, out: captured.__setitem__("out", out))
    batch = tiny_inputs("llama")

    def A(h):
        return bottleneck_update(wrapper, "a", h)

    def B(h):
        down, up = wrapper.adapter_down["b"], wrapper.adapter_up["b"]
        return 0.6 * (torch.tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)

    results = {}
    for label, setting in [
        ("stack", dt.Stack("a", "b")),
        ("stack_ba", dt.Stack("b", "a")),
        ("parallel", dt.Parallel("a", "b")),
        ("list", ["a", "b"]),
    ]:
        pm.set_adapter(setting)
        assert pm.active_adapters == list(setting)
        results[label] = logits(pm, batch)
        y, out = captured["y"], captured["out"]
        if label == "stack":
            y1 = y + A(y)
            expected = y1 + B(y1)
        elif label == "stack_ba":
            y1 = y + B(y)
            expected = y1 + A(y1)
        else:
            expected = y + A(y) + B(y)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=label)
    assert torch.equal(results["parallel"], results["list"])
    assert not torch.allclose(results["stack"], results["parallel"], atol=1e-4)
    assert not torch.allclose(results["stack"], results["stack_ba"], atol=1e-4)

    # Switching back to one adapter or a plain list forgets the stacking.
    pm.set_adapter(dt.Stack("a", "b"))
    pm.set_adapter(["a", "b"])
    assert torch.equal(logits(pm, batch), results["parallel"])


# -- mixed-adapter batches ---------------------------------------------------------------------------------
def gpt2_lora_zoo() -> dt.PeftModel:
    fan = {"fan_in_fan_out": True, "init_lora_weights": False}
    pm = dt.get_peft_model(tiny_model("gpt2"), dt.LoraConfig(r=2, target_modules=["c_attn"], **fan), "r2")
    pm.add_adapter("all", dt.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", **fan))
    pm.add_adapter("emb", dt.LoraConfig(r=3, target_modules=["wte", "c_attn"], **fan))
    pm.add_adapter("dora", dt.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], use_dora=True, **fan))
    pm.add_adapter("lb", dt.LoraConfig(r=2, target_modules=["c_fc", "c_attn"], lora_bias=True, **fan))
    pm.add_adapter("rs", dt.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["c_proj"], **fan))
    perturb_adapters(pm)
    return pm


@pytest.mark.parametrize(
    "names",
    [
        ["r2", "all", BASE, "emb", "dora", "lb", "rs"],
        ["dora", "dora", BASE, "r2"],
        ["emb", BASE],
        [BASE, BASE],
    ],
)
def test_mixed_batch_lora_variants_gpt2(names):
    pm = gpt2_lora_zoo()
    pm.set_adapter("all")  # the active adapter plays no part in a mixed batch
    batch = tiny_inputs("gpt2", batch=len(names), seed=5)
    assert_rows_match(pm, names, batch, tiny_model("gpt2"))


def test_mixed_batch_bottlenecks_of_different_widths_and_placements():
    pm = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(bottleneck_size=4, init="random"), "h4")
    pm.add_adapter("p8", dt.BottleneckConfig(placement="pfeiffer", bottleneck_size=8, init="random", scaling=2.0))
    pm.add_adapter("par3", dt.BottleneckConfig(placement="parallel", bottleneck_size=3, init="random", scaling=0.5))
    perturb_adapters(pm)
    batch = tiny_inputs("llama", batch=6, seed=3)
    names = ["par3", "h4", BASE, "p8", "h4", "par3"]
    assert_rows_match(pm, names, batch, tiny_model("llama"))
    pm.set_adapter(dt.Stack("h4", "p8"))  # stacking does not leak into mixed batches
    assert_rows_match(pm, ["p8", "h4"], {k: v[1:3] for k, v in batch.items()}, tiny_model("llama"))


def test_mixed_batch_lora_with_bottleneck():
    pm = dt.get_peft_model(
        tiny_model("llama"), dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "lora"
    )
    pm.add_adapter("lora2", dt.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    pm.add_adapter("bn", dt.BottleneckConfig(bottleneck_size=4, init="random"))
    pm.add_adapter("par", dt.BottleneckConfig(placement="parallel", bottleneck_size=2, init="random"))
    perturb_adapters(pm)
    names = ["lora", "bn", BASE, "par", "lora2", "bn"]
    assert_rows_match(pm, names, tiny_inputs("llama", batch=len(names), seed=4), tiny_model("llama"))


def test_mixed_batch_seq_cls_heads():
    pm = dt.get_peft_model(
        tiny_model("bert"), dt.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]), "l1"
    )
    pm.add_adapter("l2", dt.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key", "dense"]))
    pm.add_adapter("bn", dt.BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=4))
    perturb_adapters(pm)
    heads = pm.get_base_model().classifier
    assert set(heads.modules_to_save) == {"l1", "l2", "bn"}
    assert not torch.equal(heads.modules_to_save["l1"].weight, heads.modules_to_save["l2"].weight)
    names = ["l1", "bn", BASE, "l2", "l1"]
    assert_rows_match(pm, names, tiny_inputs("bert", batch=len(names), seed=6), tiny_model("bert"))


def two_llama_adapters() -> dt.PeftModel:
    pm = dt.get_peft_model(
        tiny_model("llama"), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), "lora"
    )
    pm.add_adapter("bn", dt.BottleneckConfig(bottleneck_size=4, init="random"))
    perturb_adapters(pm, scale=0.5)
    return pm


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generate(num_beams):
    pm = two_llama_adapters()
    names = ["lora", BASE, "bn", "lora"]
    batch = tiny_inputs("llama", batch=len(names), seed=8)  # row 0 is left-padded
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "num_beams": num_beams}
    with torch.no_grad():
        mixed = pm.generate(**batch, adapter_names=names, **options)
        for i, name in enumerate(names):
            if name == BASE:
                with pm.disable_adapter():
                    alone = pm.generate(**row(batch, i), **options)
            else:
                pm.set_adapter(name)
                alone = pm.generate(**row(batch, i), **options)
            assert torch.equal(mixed[i], alone[0]), f"row {i} ({name})"
        base = tiny_model("llama").generate(**batch, **options)
    assert torch.equal(mixed[1], base[1])
    assert not torch.equal(mixed[[0, 2, 3]], base[[0, 2, 3]])


def test_mixed_batch_errors():
    pm = two_llama_adapters()
    pm.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=2))
    batch = tiny_inputs("llama", batch=2)
    with pytest.raises(ValueError, match="nope"):
        pm(**batch, adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="prefix"):
        pm(**batch, adapter_names=["lora", "prefix"])
    with pytest.raises(ValueError, match="prefix"):
        pm.generate(input_ids=batch["input_ids"], max_new_tokens=2, adapter_names=["prefix", BASE])
    with pytest.raises(ValueError, match="3"):
        pm(**batch, adapter_names=["lora", BASE, "bn"])
    pm.merge_adapter(["lora"])
    with pytest.raises(RuntimeError, match="merge"):
        pm(**batch, adapter_names=["lora", BASE])
    with pytest.raises(RuntimeError, match="merge"):
        pm.generate(input_ids=batch["input_ids"], max_new_tokens=2, adapter_names=["bn", BASE])
    pm.unmerge_adapter()
    # After the errors no routing is left behind: a plain forward is the active adapter's.
    assert all(layer.row_routing is None for _, layer in engine.adapter_layers(pm.get_base_model()))
    pm.set_adapter("bn")
    expected = logits(pm, batch)
    torch.testing.assert_close(logits(pm, batch, adapter_names=["bn", "bn"]), expected, atol=1e-5, rtol=1e-5)


class _CountMatmuls(TorchFunctionMode):
    NAMES = {"linear", "bmm", "matmul", "mm", "__matmul__", "addmm", "baddbmm", "einsum", "mv"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_mixed_lora_layer_does_not_loop_over_sub_batches():
    """One base matmul plus two batched matmuls, however many adapters the batch mixes."""
    pm = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    for name, r in (("b", 4), ("c", 3), ("d", 1)):
        pm.add_adapter(name, dt.LoraConfig(r=r, target_modules=["q_proj"]))
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear)
    x = torch.randn(8, 5, 32)
    counts = {}
    for names in (["a"], ["a", "b", "c", "d"]):
        index = torch.arange(8) % (len(names) + 1)
        layer.row_routing = RowRouting(names, index)
        counter = _CountMatmuls()
        with torch.no_grad(), counter:
            layer(x)
        counts[len(names)] = counter.count
    layer.row_routing = None
    assert counts[1] == counts[4] == 3, counts


# -- add_weighted_adapter ----------------------------------------------------------------------------------------
TARGETS = {"llama": ["q_proj", "v_proj", "embed_tokens"], "gpt2": ["c_attn"]}


def build_pair(kind: str, ranks: tuple[int, int], directory) -> dt.PeftModel:
    """Adapters "a" and "b" with different ranks/alphas, saved to ``directory``/a and /b."""
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    common = {"target_modules": TARGETS[kind], "init_lora_weights": False, **extra}
    pm = dt.get_peft_model(tiny_model(kind), dt.LoraConfig(r=ranks[0], lora_alpha=8, **common), "a")
    pm.add_adapter("b", dt.LoraConfig(r=ranks[1], lora_alpha=3, **common))
    perturb_adapters(pm, scale=0.3)
    pm.save_pretrained(directory)
    return pm


def factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach(), layer.scaling[name]
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), layer.scaling[name]


def svd_truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the rest."""
    keep = int(density * tensor.numel())
    flat = tensor.flatten()
    out = torch.zeros_like(flat)
    order = sorted(range(flat.numel()), key=lambda j: -abs(flat[j].item()))[:keep]
    out[order] = flat[order]
    return out.view(tensor.shape)


def hand_ties(tensors: list[torch.Tensor], weights: list[float], density: float, method: str) -> torch.Tensor:
    """HF PEFT's TIES: trim each tensor, elect a sign per entry from the trimmed (unweighted) tensors
    (their sum, or the count of their signs), then average the weighted entries whose sign agrees."""
    trimmed = [trim(t, density) for t in tensors]
    if method == "total":
        score = sum(trimmed)
    else:
        score = sum(torch.sign(t) for t in trimmed)
    elected = torch.where(score >= 0, 1.0, -1.0)
    total = torch.zeros_like(trimmed[0])
    count = torch.zeros_like(trimmed[0])
    for t, w in zip(trimmed, weights):
        agrees = (torch.sign(t) == elected).float()
        total += w * t * agrees
        count += agrees
    return total / count.clamp(min=1)


def hand_combined_delta(layer, weights: list[float], kind: str, density, method, svd_rank) -> torch.Tensor:
    """The combined adapter's delta weight, in (out, in) orientation, from the formulas."""
    (A1, B1, s1), (A2, B2, s2) = factors(layer, "a"), factors(layer, "b")
    w1, w2 = weights
    if kind == "cat":
        return w1 * s1 * B1 @ A1 + w2 * s2 * B2 @ A2
    if kind == "svd":
        return svd_truncate(w1 * s1 * B1 @ A1 + w2 * s2 * B2 @ A2, svd_rank)
    if kind == "ties_svd":
        return svd_truncate(hand_ties([s1 * B1 @ A1, s2 * B2 @ A2], [w1, w2], density, method), svd_rank)
    # linear and ties act on the factors: A gets sign(w s) sqrt|w s|, B gets sqrt|w s|.
    wa = [math.copysign(math.sqrt(abs(w * s)), w * s) for w, s in ((w1, s1), (w2, s2))]
    wb = [math.sqrt(abs(w * s)) for w, s in ((w1, s1), (w2, s2))]
    if kind == "linear":
        A = wa[0] * A1 + wa[1] * A2
        B = wb[0] * B1 + wb[1] * B2
    else:
        A = hand_ties([A1, A2], wa, density, method)
        B = hand_ties([B1, B2], wb, density, method)
    return B @ A


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        engine.checkpoint_path(p): m
        for p, m in engine.adapter_layers(model)
        if isinstance(m, (LoraLinear, LoraEmbedding))
    }


COMBINATIONS = [
    pytest.param("linear", None, "total", (4, 4), id="linear"),
    pytest.param("ties", 0.5, "total", (4, 4), id="ties-total"),
    pytest.param("ties", 0.5, "frequency", (4, 4), id="ties-frequency"),
    pytest.param("cat", None, "total", (4, 4), id="cat"),
    pytest.param("cat", None, "total", (4, 2), id="cat-ranks"),
    pytest.param("svd", None, "total", (4, 4), id="svd"),
    pytest.param("svd", None, "total", (2, 4), id="svd-ranks"),
    pytest.param("ties_svd", 0.5, "total", (4, 4), id="ties_svd-total"),
    pytest.param("ties_svd", 0.5, "frequency", (4, 2), id="ties_svd-frequency-ranks"),
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize(("combination", "density", "sign_method", "ranks"), COMBINATIONS)
def test_add_weighted_adapter_matches_formulas_and_peft(kind, combination, density, sign_method, ranks, tmp_path):
    weights = [0.7, -0.4]
    options = {"combination_type": combination}
    if density is not None:
        options.update(density=density, majority_sign_method=sign_method)
    pm = build_pair(kind, ranks, tmp_path)
    pm.add_weighted_adapter(["a", "b"], weights, "m", **options)

    new_config = pm.peft_config["m"]
    expected_rank = {"cat": sum(ranks), "linear": ranks[0], "ties": ranks[0]}.get(combination, max(ranks))
    assert new_config.r == expected_rank and new_config.lora_alpha == expected_rank

    by_peft = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / "a", adapter_name="a")
    by_peft.load_adapter(tmp_path / "b", adapter_name="b")
    by_peft.add_weighted_adapter(["a", "b"], weights, "m", **options)
    peft_layers = {
        n.removeprefix("base_model.model."): m
        for n, m in by_peft.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }

    layers = lora_layers(pm.get_base_model())
    assert set(layers) == set(peft_layers) and layers
    for path, layer in layers.items():
        transposed = isinstance(layer, LoraEmbedding) or layer.fan_in_fan_out
        hand = hand_combined_delta(layer, weights, combination, density, sign_method, max(ranks))
        hand = hand.T if transposed else hand
        ours = layer.get_delta_weight("m").detach()
        theirs = peft_layers[path].get_delta_weight("m").detach()
        assert ours.shape == hand.shape == theirs.shape
        assert hand.abs().max() > 1e-3
        torch.testing.assert_close(ours, hand, atol=1e-5, rtol=1e-4, msg=f"{path}: deltatune vs formula")
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=f"{path}: deltatune vs HF PEFT")

    # The combined adapter runs like HF PEFT's.
    pm.set_adapter("m")
    by_peft.set_adapter("m")
    batch = tiny_inputs(kind)
    torch.testing.assert_close(logits(pm, batch), logits(by_peft, batch), atol=1e-5, rtol=1e-5)


def test_add_weighted_adapter_errors(tmp_path):
    pm = build_pair("llama", (4, 2), tmp_path)
    for combination in ("linear", "ties"):
        with pytest.raises(ValueError, match="rank"):
            pm.add_weighted_adapter(
                ["a", "b"], [0.5, 0.5], f"bad_{combination}", combination_type=combination, density=0.5
            )
        assert f"bad_{combination}" not in pm.peft_config
    pm.add_adapter("c", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="density"):
        pm.add_weighted_adapter(["a", "c"], [0.5, 0.5], "no_density", combination_type="ties")
    with pytest.raises(ValueError, match="density"):
        pm.add_weighted_adapter(["a", "c"], [0.5, 0.5], "no_density", combination_type="ties_svd")
    pm.add_adapter("d", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        pm.add_weighted_adapter(["a", "d"], [0.5, 0.5], "with_dora", combination_type="svd")
    pm.add_adapter("bn", dt.BottleneckConfig())
    with pytest.raises(ValueError):
        pm.add_weighted_adapter(["a", "bn"], [0.5, 0.5], "with_bn", combination_type="cat")
    with pytest.raises(ValueError):
        pm.add_weighted_adapter(["a", "c"], [0.5], "one_weight", combination_type="cat")
    with pytest.raises(ValueError, match="combination_type"):
        pm.add_weighted_adapter(["a", "c"], [0.5, 0.5], "unknown", combination_type="nope")
    assert set(pm.peft_config) == {"a", "b", "c", "d", "bn"}


def test_stack_refuses_adapters_that_cannot_be_stacked():
    pm = dt.get_peft_model(tiny_model("llama"), dt.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    pm.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"Stack chains bottleneck adapters.*\['a', 'b'\] cannot be stacked"):
        pm.set_adapter(dt.Stack("a", "b"))
    pm.set_adapter(["a", "b"])  # as a list their updates add
    assert pm.active_adapters == ["a", "b"]
