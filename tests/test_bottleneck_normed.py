"""Bottleneck adapters that read the normed residual sum (``adapter_input="normed"``).

Pfeiffer et al. 2021's adapter reads :math:`N(s)`, the norm that closes a post-norm sublayer applied
to :math:`s = h + x`, and adds its update inside that norm: :math:`N(s + A'(N(s)))`. The reference
here is that formula written out on BERT's own ``*Output`` modules, fed the adapter's weights.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers.models.bert import modeling_bert

import deltatune as dt
from deltatune import engine
from deltatune.config import ConfigError
from deltatune.methods.bottleneck import BottleneckLayer, NormedBottleneckLayer
from deltatune.modules_to_save import ModulesToSaveWrapper
from test_composition import BASE, perturb_adapters

from conftest import tiny_inputs, tiny_model


def tiny_bert() -> torch.nn.Module:
    """The tiny BERT with norms away from the identity and sublayer outputs large beside their
    residual, so that N(s) and s differ (at init they nearly coincide)."""
    model = tiny_model("bert")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            elif name.endswith("output.dense"):
                module.weight.mul_(10)
    return model


def bert_config(**kwargs) -> dt.BottleneckConfig:
    kwargs.setdefault("task_type", "SEQ_CLS")
    return dt.BottleneckConfig(**kwargs)


def logits(model: torch.nn.Module, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_inputs("bert"), **kwargs).logits


def layers_by_path(pm: dt.PeftModel) -> dict[str, BottleneckLayer]:
    root = pm.get_base_model()
    return {engine.checkpoint_path(p): m for p, m in engine.adapter_layers(root) if isinstance(m, BottleneckLayer)}


def by_hand(pm: dt.PeftModel, names: list[str], stack: bool = False) -> torch.Tensor:
    """The base model with every adapted ``*Output`` module computing N(s + sum A'(N(s))) by hand."""
    layers = layers_by_path(pm)
    reference = tiny_bert()
    head = pm.get_base_model().classifier
    if hasattr(head, "modules_to_save"):
        reference.classifier.load_state_dict(head.modules_to_save["default"].state_dict())

    def output_forward(module, hidden_states, input_tensor):
        adapter = layers.get(module.path)
        s = module.dropout(module.dense(hidden_states)) + input_tensor
        if adapter is None:
            return module.LayerNorm(s)
        normed = module.LayerNorm(s)
        for name in names:
            down, up = adapter.adapter_down[name], adapter.adapter_up[name]
            s = s + adapter.scaling[name] * (torch.relu(normed @ down.weight.T + down.bias) @ up.weight.T + up.bias)
            if stack:
                normed = module.LayerNorm(s)
        return module.LayerNorm(s)

    for path, module in reference.named_modules():
        if isinstance(module, (modeling_bert.BertOutput, modeling_bert.BertSelfOutput)):
            module.path = f"{path}.LayerNorm"
            module.forward = output_forward.__get__(module)
    return logits(reference)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_output_is_the_formula_by_hand(placement):
    pm = dt.get_peft_model(tiny_bert(), bert_config(placement=placement, adapter_input="normed", init="random"))
    expected_paths = {"bert.encoder.layer.{i}.output.LayerNorm"}
    if placement == "houlsby":
        expected_paths.add("bert.encoder.layer.{i}.attention.output.LayerNorm")
    assert set(layers_by_path(pm)) == {p.format(i=i) for p in expected_paths for i in range(2)}
    assert all(isinstance(layer, NormedBottleneckLayer) for layer in layers_by_path(pm).values())
    torch.testing.assert_close(logits(pm), by_hand(pm, ["default"]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(pm), logits(tiny_bert()), atol=1e-3)


def test_near_identity_start_is_the_base_model_and_every_adapter_weight_learns():
    pm = dt.get_peft_model(tiny_bert(), bert_config(placement="pfeiffer", adapter_input="normed"))
    base = tiny_bert()
    pm.get_base_model().classifier.modules_to_save["default"].load_state_dict(base.classifier.state_dict())
    torch.testing.assert_close(logits(pm), logits(base), atol=0, rtol=0)
    optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        pm(**tiny_inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
    for layer in layers_by_path(pm).values():
        for module in (layer.adapter_down["default"], layer.adapter_up["default"]):
            assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_stack_feeds_each_adapter_the_norm_of_the_sum_so_far():
    # No task type: the classifier stays the base model's, shared by both adapters.
    config = dt.BottleneckConfig(placement="pfeiffer", adapter_input="normed", init="random")
    pm = dt.get_peft_model(tiny_bert(), config, "a")
    pm.add_adapter("b", dataclasses.replace(config, scaling=0.5))
    pm.set_adapter(dt.Stack("a", "b"))
    stacked = by_hand(pm, ["a", "b"], stack=True)
    torch.testing.assert_close(logits(pm), stacked, atol=1e-5, rtol=1e-5)
    pm.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(pm), by_hand(pm, ["a", "b"]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stacked, logits(pm), atol=1e-4)


def test_mixed_batch_rows_equal_each_row_alone():
    pm = dt.get_peft_model(tiny_bert(), bert_config(adapter_input="normed", bottleneck_size=4), "normed")
    pm.add_adapter("plain", bert_config(placement="pfeiffer", bottleneck_size=6))
    pm.add_adapter("normed8", bert_config(placement="pfeiffer", adapter_input="normed", bottleneck_size=8))
    perturb_adapters(pm)
    batch = tiny_inputs("bert", batch=5, seed=3)
    names = ["normed", "plain", BASE, "normed8", "normed"]
    with torch.no_grad():
        mixed = pm(**batch, adapter_names=names).logits
    for i, name in enumerate(names):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        with torch.no_grad():
            if name == BASE:
                with pm.disable_adapter():
                    alone = pm(**one).logits[0]
            else:
                pm.set_adapter(name)
                alone = pm(**one).logits[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)


def test_auto_reads_the_normed_sum_where_a_closing_norm_exists_and_the_sublayer_elsewhere():
    bert = dt.get_peft_model(tiny_bert(), bert_config(placement="pfeiffer", adapter_input="auto"))
    assert {type(m) for m in layers_by_path(bert).values()} == {NormedBottleneckLayer}
    llama = dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(placement="pfeiffer", adapter_input="auto"))
    assert set(layers_by_path(llama)) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert {type(m) for m in layers_by_path(llama).values()} == {BottleneckLayer}


def test_normed_on_a_pre_norm_model_says_why_and_what_to_use():
    with pytest.raises(
        engine.TargetModuleError, match=r"model\.layers\.0\.mlp\.down_proj.*no norm.*'sublayer' or 'auto'"
    ):
        dt.get_peft_model(tiny_model("llama"), dt.BottleneckConfig(placement="pfeiffer", adapter_input="normed"))


def test_a_norm_trained_in_full_is_not_also_adapted():
    config = bert_config(adapter_input="auto", modules_to_save=["LayerNorm"])
    with pytest.raises(engine.TargetModuleError, match=r"modules_to_save names bert\.encoder.*LayerNorm.*'sublayer'"):
        dt.get_peft_model(tiny_bert(), config)
    pm = dt.get_peft_model(tiny_bert(), bert_config(adapter_input="sublayer", modules_to_save=["LayerNorm"]))
    assert set(layers_by_path(pm)) == {
        f"bert.encoder.layer.{i}.{s}output.dense" for i in range(2) for s in ("", "attention.")
    }
    norm = pm.get_base_model().bert.encoder.layer[0].output.LayerNorm
    assert isinstance(norm, ModulesToSaveWrapper)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"adapter_input": "norm"}, "adapter_input must be one of"),
        ({"adapter_input": "normed", "placement": "parallel"}, "parallel adapter reads the feed-forward input"),
        ({"adapter_input": "normed", "train_layer_norms": True}, "use one of the two"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        dt.BottleneckConfig(**kwargs)


def test_save_load_round_trip(tmp_path):
    pm = dt.get_peft_model(tiny_bert(), bert_config(adapter_input="normed", init="random"))
    expected = logits(pm)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapter_input"] == "normed"
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert loaded.peft_config["default"].adapter_input == "normed"
    assert torch.equal(logits(loaded), expected)
    # An adapter saved before the option existed reads the sublayer, as it was trained to.
    old = tmp_path / "old"
    plain = dt.get_peft_model(tiny_bert(), bert_config(init="random"))
    plain.save_pretrained(old)
    config = json.loads((old / "adapter_config.json").read_text())
    del config["adapter_input"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    loaded = dt.PeftModel.from_pretrained(tiny_bert(), old)
    assert {type(m) for m in layers_by_path(loaded).values()} == {BottleneckLayer}
    assert torch.equal(logits(loaded), logits(plain))


def test_auto_is_saved_resolved(tmp_path):
    pm = dt.get_peft_model(tiny_bert(), bert_config(adapter_input="auto"))
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapter_input"] == "normed"


def test_auto_leaves_an_attention_module_with_query_and_key_norms_alone():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    config = Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    pm = dt.get_peft_model(Olmo2ForCausalLM(config), dt.BottleneckConfig(adapter_input="auto"))
    paths = set(layers_by_path(pm))
    assert paths == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert pm.peft_config["default"].adapter_input == "sublayer"
    with pytest.raises(
        engine.TargetModuleError,
        match=r"self_attn holds the norms model\.layers\.0\.self_attn\.q_norm of that width and 4 linear",
    ):
        dt.get_peft_model(Olmo2ForCausalLM(config), dt.BottleneckConfig(adapter_input="normed"))


def test_unload_gives_the_base_model_back():
    pm = dt.get_peft_model(tiny_bert(), bert_config(adapter_input="normed", init="random"))
    model = pm.unload()
    base = tiny_bert()
    model.classifier = base.classifier
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)


def test_a_half_precision_base_trains_float32_adapters_and_keeps_its_dtype():
    base = tiny_bert().to(torch.bfloat16)
    pm = dt.get_peft_model(base, bert_config(adapter_input="normed", init="random"))
    layer = next(iter(layers_by_path(pm).values()))
    assert layer.adapter_down["default"].weight.dtype == torch.float32
    out = pm(**tiny_inputs("bert"), labels=torch.tensor([0, 1]))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert layer.adapter_up["default"].weight.grad.abs().sum() > 0
