"""One LoRA training step on SmolLM2-135M: deltatune vs HF PEFT, time and peak memory.

A step is forward with ``labels=`` (causal-LM loss over all positions), backward and an AdamW
step, on a batch of 8 x 128 random token ids. Two adapter configs:

* ``all_linear``: every linear layer of the blocks, r=16, alpha=32, dropout 0;
* ``qv``: ``q_proj`` and ``v_proj``, r=8, alpha=16, dropout 0.05.

``<config>/deltatune_fused`` is the same deltatune model with the loss as ``deltatune train``
computes it for causal-LM data (``deltatune.losses.HeadLoss``: the LM head fused with the
cross-entropy, a chunk of positions at a time, no full logits tensor); the loss is the same mean
over the same tokens (the script checks the two losses agree). With ``--compile``,
``<config>/deltatune_fused_compiled`` adds the same step with ``torch.compile`` on each block
(``deltatune train --compile``); the compilation happens in the warm-up round. With
``--checkpointing``, ``<config>/deltatune_fused_checkpointed`` adds it with gradient checkpointing
(``--gradient-checkpointing``: activations recomputed in backward), time and memory.

For scale, the same step with full fine-tuning (every weight trained, AdamW over all of them) and
with the base frozen and no adapter at all (input embeddings require grad, so backward runs
through every layer but computes no weight gradient: the floor any adapter method pays) run in the
``all_linear`` alternation; their times are reported relative to deltatune's.

Peak memory: each case runs alone in a child process (peak RSS on CPU, CUDA peak allocation on
GPU); ``load_forward`` is a child that loads the model and runs one forward pass without
gradients, the floor under every RSS figure (libraries, weights, one pass of activations).

    .venv/bin/python benchmarks/bench_train_step.py [--quick] [--device auto|cpu|cuda] [--no-memory]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import common

CONFIGS = {
    "all_linear": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "qv": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
}
LR = 1e-4
LIBRARIES = ("deltatune", "deltatune_fused", "peft")


def build(case: str, env: common.Env) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """``<config>/deltatune``, ``<config>/peft``, ``full_ft`` or ``frozen_base``: a model in train mode."""
    model, _ = common.load_smollm(env, train=True)
    torch.manual_seed(env.seed)
    if case == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
    elif case == "frozen_base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # a graph through every layer, no weight gradients
        return model, None
    else:
        config, library = case.split("/")
        if library.startswith("deltatune"):
            import deltatune

            model = deltatune.get_peft_model(model, deltatune.LoraConfig(task_type="CAUSAL_LM", **CONFIGS[config]))
            if library.endswith("_compiled"):
                from deltatune.train import compile_blocks

                compile_blocks(model)  # compiles at the first (warm-up) step
            if library.endswith("_checkpointed"):
                from deltatune.train import enable_gradient_checkpointing

                enable_gradient_checkpointing(model)
        else:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **CONFIGS[config]))
        model.train()
    return model, torch.optim.AdamW(common.trainable(model), lr=LR)


def variants(args: argparse.Namespace, memory: bool = False) -> tuple[str, ...]:
    """Extra deltatune cases asked for: compiled (timing only: compiling dominates one child), checkpointed."""
    names = () if memory or not args.compile else ("deltatune_fused_compiled",)
    return names + (("deltatune_fused_checkpointed",) if args.checkpointing else ())


def loss_fn(case: str, model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The mean next-token loss over all positions: the model's own (``labels=``) or deltatune's fused one."""
    if "/deltatune_fused" in case:
        from deltatune.losses import HeadLoss

        head_loss, targets = HeadLoss(), ids[:, 1:]
        return lambda: head_loss.loss_sum(model, {"input_ids": ids}, targets, lambda out: out[:, :-1]) / targets.numel()
    return lambda: model(input_ids=ids, labels=ids).loss


def step_fn(
    case: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor
) -> Callable[[], None]:
    compute_loss = loss_fn(case, model, ids)

    def step() -> None:
        loss = compute_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def shape(env: common.Env) -> tuple[int, int]:
    return (2, 32) if env.quick else (8, 128)


def run_child(case: str, env: common.Env) -> None:
    if case == "load_forward":
        common.load_forward_child(env, *shape(env))
        return
    model, optimizer = build(case, env)
    ids = common.random_ids(model.config.vocab_size, *shape(env), env)
    step = step_fn(case, model, optimizer, ids)
    common.reset_cuda_peak(env)
    for _ in range(1 if env.quick else 2):
        step()
    common.report_child_memory(env, trainable=sum(p.numel() for p in common.trainable(model)))


def main() -> None:
    parser = common.parser(__doc__, repeats=5, warmup=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    parser.add_argument("--no-scale", action="store_true", help="skip the full fine-tuning and frozen-base cases")
    parser.add_argument(
        "--compile", action="store_true", help="add deltatune's fused step with torch.compile per block (timing only)"
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="add deltatune's fused step with gradient checkpointing"
    )
    parser.add_argument(
        "--configs", type=lambda text: text.split(","), default=list(CONFIGS), help="comma-separated adapter configs"
    )
    args = parser.parse_args()
    env = common.setup(args)
    if args.child:
        run_child(args.child, env)
        return
    batch, length = shape(env)
    print(f"SmolLM2-135M training step, batch {batch} x {length}, {env.device} {env.dtype}, {env.threads} threads")

    ratios: dict[str, float] = {}
    memory: dict[str, dict] = {}
    if not args.no_memory:  # first, while this process is small (see common.peak_rss_mib)
        print("\npeak memory, one case per child process:")
        configs = ["all_linear"] if env.quick else args.configs
        cases = ["load_forward"] + [f"{c}/{lib}" for c in configs for lib in LIBRARIES + variants(args, memory=True)]
        if not args.no_scale and not env.quick:
            cases += ["full_ft", "frozen_base"]
        memory = common.children_memory(__file__, cases)
        floor = common.memory_of(memory["load_forward"])
        for config in configs:
            theirs = common.memory_of(memory[f"{config}/peft"])
            for lib in ("deltatune", "deltatune_fused", *variants(args, memory=True)):
                ours = common.memory_of(memory[f"{config}/{lib}"])
                ratios[f"{config}/memory_{lib}_over_peft"] = ours / theirs
                if not env.cuda:  # RSS includes the loaded model and libraries; the increment is the step's own
                    ratios[f"{config}/memory_above_load_{lib}_over_peft"] = (ours - floor) / max(theirs - floor, 1e-9)

    times: dict[str, dict[str, list[float]]] = {}
    trainable: dict[str, int] = {}
    checks: dict[str, float] = {}
    for config in args.configs:
        names = [f"{config}/{lib}" for lib in LIBRARIES + variants(args)]
        if config == "all_linear" and not args.no_scale:
            names += ["full_ft", "frozen_base"]
        cases = {}
        for name in names:
            model, optimizer = build(name, env)
            trainable[name] = sum(p.numel() for p in common.trainable(model))
            ids = common.random_ids(model.config.vocab_size, batch, length, env)
            cases[name] = step_fn(name, model, optimizer, ids)
            if name.endswith("/deltatune_fused"):  # the fused loss is the model's own loss
                with torch.no_grad():
                    fused, plain = loss_fn(name, model, ids)(), model(input_ids=ids, labels=ids).loss
                checks[f"{config}/fused_loss_minus_model_loss"] = float(fused - plain)
                print(f"{config}: fused loss {float(fused):.6f}, model's own loss {float(plain):.6f}")
        assert trainable[names[0]] == trainable[names[2]], f"trainable parameters differ: {trainable}"
        times[config] = common.alternate(cases, env, args.repeats, args.warmup)
        common.print_times(f"training step, {config} {CONFIGS[config]}", times[config])
        for lib in ("deltatune", "deltatune_fused"):
            ratios[f"{config}/time_{lib}_over_peft"] = common.ratio(times[config], f"{config}/{lib}", f"{config}/peft")
        for variant in variants(args):
            name = variant.removeprefix("deltatune_fused_")
            ratios[f"{config}/time_{name}_over_fused"] = common.ratio(
                times[config], f"{config}/{variant}", f"{config}/deltatune_fused"
            )
        if "full_ft" in cases:
            ratios["full_ft_time_over_deltatune"] = common.ratio(times[config], "full_ft", names[0])
            ratios["frozen_base_time_over_deltatune"] = common.ratio(times[config], "frozen_base", names[0])
        del cases, model, optimizer

    common.emit(
        "train_step", env, args, ratios, times, batch=[batch, length], trainable=trainable, memory=memory, checks=checks
    )


if __name__ == "__main__":
    main()
