"""AdaLoRA: HF PEFT's SVD-form layers, its rank allocator step for step, pruned adapters in PEFT's files,
and the allocation running inside ``deltatune train`` and ``transformers.Trainer``."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import deltatune as dt
from deltatune import checkpoint
from deltatune.methods.adalora import RankAllocator
from tiny_assets import check_ok, invoke, session_assets, train_args

from conftest import tiny_inputs, tiny_model

SCHEDULE = {"init_r": 6, "target_r": 3, "total_step": 10, "tinit": 2, "tfinal": 3, "deltaT": 2}


def _logits(model, kind="llama"):
    with torch.no_grad():
        return model(**tiny_inputs(kind)).logits


def _train_with_allocation(model, steps, lr=0.5, skipped=()):
    """SGD steps with ``update_and_allocate`` after each backward (HF PEFT's loop); each step's E and ranks.
    A step in ``skipped`` has neither update nor allocation, as ``deltatune train --on-nan skip`` drops one."""
    batch = {**tiny_inputs("llama"), "labels": tiny_inputs("llama")["input_ids"]}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        loss.backward()
        if step not in skipped:
            optimizer.step()
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        E = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_E" in n}
        pattern = {k.replace(".default", ""): v for k, v in (model.peft_config["default"].rank_pattern or {}).items()}
        history.append((loss.item(), E, pattern))
    return history


def test_the_rank_allocator_prunes_as_peft_s_step_for_step():
    fields = {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(**fields))
    torch.manual_seed(0)
    ours = dt.get_peft_model(tiny_model("llama"), dt.AdaLoraConfig(**fields))
    for (their_loss, their_E, their_pattern), (our_loss, our_E, our_pattern) in zip(
        _train_with_allocation(theirs, 10), _train_with_allocation(ours, 10), strict=True
    ):
        assert our_loss == pytest.approx(their_loss, abs=1e-5)  # the orthogonality term included
        for name, tensor in their_E.items():
            torch.testing.assert_close(our_E[name], tensor, atol=1e-6, rtol=1e-5)
        assert our_pattern == their_pattern
    kept = sum(sum(mask) for mask in our_pattern.values())
    assert kept == 3 * 6  # target_r x layers at the end


def test_the_budget_follows_the_cubic_schedule():
    config = dt.AdaLoraConfig(**SCHEDULE, target_modules=["q_proj"])
    model = dt.get_peft_model(tiny_model("llama"), config)
    allocator = RankAllocator(model.get_base_model(), "default", model.peft_config["default"])
    allocator.initial_budget, allocator.target_budget = 36, 18
    schedule = [allocator.budget(t) for t in range(11)]
    expected = [36, 36, 36, 27, 21, 19, 18, 18, 18, 18, 18]
    assert [b for b, _ in schedule] == expected
    assert [m for _, m in schedule] == [False, False, False, False, True, False, True, False, True, True, True]


def test_a_pruned_adapter_is_saved_as_peft_saves_it_and_loads_in_both(tmp_path):
    fields = {**SCHEDULE, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.AdaLoraConfig(**fields))
    _train_with_allocation(model, 10)
    model.eval()
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    modules = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    assert set(saved) == {f"model.layers.{i}.{m}.lora_E" for i in (0, 1) for m in modules}
    state = checkpoint.load_tensors(tmp_path)
    for key, mask in saved.items():
        module = "base_model.model." + key.removesuffix(".lora_E")
        assert state[f"{module}.lora_E"].shape == (sum(mask), 1) and state[f"{module}.lora_A"].shape[0] == sum(mask)
    ours = dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(_logits(ours), expected, atol=1e-6, rtol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-6, rtol=1e-6)


def test_an_unpruned_adapter_crosses_with_peft_both_ways(tmp_path):
    torch.manual_seed(0)
    config = {"init_r": 6, "target_r": 3, "total_step": 10, "init_lora_weights": False}
    theirs = peft.get_peft_model(tiny_model("gpt2"), peft.AdaLoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = dt.PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "theirs")
    torch.testing.assert_close(_logits(ours, "gpt2"), _logits(theirs, "gpt2"), atol=1e-6, rtol=1e-6)
    assert ours.peft_config["default"].fan_in_fan_out  # GPT-2's Conv1D, recorded as PEFT does


def test_a_budget_with_nothing_to_prune_keeps_every_triplet():
    config = dt.AdaLoraConfig(init_r=4, target_r=4, total_step=4, target_modules=["q_proj"])
    model = dt.get_peft_model(tiny_model("llama"), config)
    history = _train_with_allocation(model, 4)  # HF PEFT 0.21 stops here with kthvalue out of range
    assert all(all(mask) for mask in history[-1][2].values())


def test_deltatune_train_allocates_ranks_and_refuses_to_resume(tmp_path_factory, tmp_path):
    assets = session_assets(tmp_path_factory)
    out = tmp_path / "run"
    check_ok(invoke(*train_args(assets, out, "--method", "adalora", "--max-steps", "10", "--batch-size", "4")))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 10 and config["init_r"] == 6
    kept = sum(sum(mask) for mask in config["rank_pattern"].values())
    assert kept == config["target_r"] * len(config["rank_pattern"])  # --rank 4: the final average rank
    result = invoke(*train_args(assets, out, "--method", "adalora", "--max-steps", "12", "--resume"))
    assert result.exit_code != 0 and "cannot continue a --method adalora run exactly" in result.output


def test_transformers_trainer_runs_the_allocation(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from deltatune.integrations import AdapterTrainer

    config = dt.AdaLoraConfig(init_r=4, target_r=2, total_step=4, target_modules=["q_proj", "v_proj"])
    model = dt.get_peft_model(tiny_model("llama"), config)
    ids = tiny_inputs("llama", batch=8)["input_ids"].tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    AdapterTrainer(model=model, args=args, train_dataset=data).train()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern and sum(sum(m) for m in pattern.values()) == 2 * 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "total_step must be the number of training steps"),
        ({"total_step": 10, "tinit": 5, "tfinal": 5}, "leave no steps"),
        ({"total_step": 10, "target_r": 20}, "must not exceed init_r"),
        ({"total_step": 10, "beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"total_step": 10, "use_dora": True}, "DoRA"),
        (
            {"total_step": 10, "rank_pattern": {"x.lora_E": [1, 0]}},
            "rank_pattern=.* is not a dict of str to list of bool",
        ),
    ],
)
def test_bad_configs_name_the_field(fields, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.AdaLoraConfig(**fields)


def test_loading_into_a_pruned_adapter_restores_its_kept_triplets(tmp_path):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.AdaLoraConfig(**SCHEDULE, target_modules=["q_proj", "v_proj"]))
    _train_with_allocation(model, 10)
    model.eval()
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    model.load_adapter(tmp_path, "default")  # transformers.Trainer resumes and loads the best model this way
    torch.testing.assert_close(_logits(model), expected, atol=1e-6, rtol=1e-6)


def test_a_step_with_non_finite_gradients_leaves_the_allocation_alone():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.AdaLoraConfig(**SCHEDULE, target_modules=["q_proj"]))
    history = _train_with_allocation(model, 5)
    batch = {**tiny_inputs("llama"), "labels": tiny_inputs("llama")["input_ids"]}
    model(**batch).loss.backward()
    for param in model.parameters():
        if param.grad is not None:
            param.grad.fill_(float("inf"))  # what an fp16 step the loss scaler skips leaves
    model.update_and_allocate(6)
    assert model.peft_config["default"].rank_pattern == history[-1][2]
    allocator = model.base_model.__dict__["_step_hooks"]["default"]
    assert all(torch.isfinite(t).all() for t in allocator.smoothed.values())


@pytest.mark.parametrize("skipped", [(), (8,), (7, 8, 9)])
def test_the_final_mask_is_made_even_when_its_step_was_skipped(skipped):
    """The schedule's last periodic mask (step 4) leaves more than the target; the final one, due at
    step 8, is made at the first step that runs from there on."""
    schedule = {**SCHEDULE, "tinit": 1, "tfinal": 2, "deltaT": 4}
    fields = {**schedule, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_model("llama"), dt.AdaLoraConfig(**fields))
    history = _train_with_allocation(model, 10, skipped=skipped)
    kept = [sum(sum(mask) for mask in pattern.values()) for _, _, pattern in history]
    assert kept[3] > 3 * 6  # step 4's mask is above the target
    assert kept[-1] == 3 * 6
    allocator = model.base_model.__dict__["_step_hooks"]["default"]
    assert allocator.smoothed == {}  # the importance averages are let go once the final mask is made
    E = {n: p for n, p in model.named_parameters() if "lora_E" in n}
    pattern = model.peft_config["default"].rank_pattern
    for name, values in E.items():
        mask = torch.tensor(pattern[name.removeprefix("base_model.model.").removesuffix(".default")])
        assert torch.all(values[~mask] == 0), name


def test_adalora_cannot_train_sharded():
    from deltatune.run_config import RunConfig
    from deltatune.run_options import check_options

    with pytest.raises(ValueError, match="--fsdp shards the parameters"):
        check_options(RunConfig(method="adalora", fsdp=True), ())
