"""Prompt tuning and prefix tuning training steps on SmolLM2-135M: deltatune vs HF PEFT.

A step is forward with ``labels=`` and an attention mask (causal-LM loss over the real tokens;
the virtual positions get no loss in either library), backward and an AdamW step, on a batch of
8 x 64 random token ids. Prompt tuning: 20 virtual tokens, random init. Prefix tuning: 20 virtual
tokens, no projection (PEFT's defaults). HF PEFT 0.21's prefix tuning breaks ``generate`` under
transformers 5, but its training forward works, which is all this measures.

Peak memory of each case in its own child process, as in ``bench_train_step.py``.

    .venv/bin/python benchmarks/bench_prompt_prefix.py [--quick] [--device auto|cpu|cuda] [--no-memory]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import common

VIRTUAL_TOKENS = 20
METHODS = ("prompt", "prefix")


def build(case: str, env: common.Env) -> tuple[nn.Module, torch.optim.Optimizer]:
    method, library = case.split("/")
    model, _ = common.load_smollm(env, train=True)
    torch.manual_seed(env.seed)
    if library == "deltatune":
        import deltatune as lib
    else:
        import peft as lib
    if method == "prompt":
        config = lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    else:
        config = lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)
    model = lib.get_peft_model(model, config)
    model.train()
    return model, torch.optim.AdamW(common.trainable(model), lr=1e-3)


def step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> Callable[[], None]:
    mask = torch.ones_like(ids)

    def step() -> None:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def shape(env: common.Env) -> tuple[int, int]:
    return (2, 16) if env.quick else (8, 64)


def run_child(case: str, env: common.Env) -> None:
    if case == "load_forward":
        common.load_forward_child(env, *shape(env))
        return
    model, optimizer = build(case, env)
    step = step_fn(model, optimizer, common.random_ids(model.config.vocab_size, *shape(env), env))
    common.reset_cuda_peak(env)
    for _ in range(1 if env.quick else 2):
        step()
    common.report_child_memory(env, trainable=sum(p.numel() for p in common.trainable(model)))


def main() -> None:
    parser = common.parser(__doc__, repeats=7, warmup=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory child processes")
    args = parser.parse_args()
    env = common.setup(args)
    if args.child:
        run_child(args.child, env)
        return
    batch, length = shape(env)
    print(f"SmolLM2-135M, {VIRTUAL_TOKENS} virtual tokens, batch {batch} x {length}, {env.device} {env.dtype}")

    ratios: dict[str, float] = {}
    memory: dict[str, dict] = {}
    if not args.no_memory:  # first, while this process is small (see common.peak_rss_mib)
        print("\npeak memory, one case per child process:")
        cases = ["load_forward"] + [f"{m}/{lib}" for m in METHODS for lib in ("deltatune", "peft")]
        memory = common.children_memory(__file__, cases)
        floor = common.memory_of(memory["load_forward"])
        for method in METHODS:
            ours, theirs = (common.memory_of(memory[f"{method}/{lib}"]) for lib in ("deltatune", "peft"))
            ratios[f"{method}/memory_deltatune_over_peft"] = ours / theirs
            if not env.cuda:
                ratios[f"{method}/memory_above_load_deltatune_over_peft"] = (ours - floor) / max(theirs - floor, 1e-9)

    times: dict[str, dict[str, list[float]]] = {}
    trainable: dict[str, int] = {}
    for method in METHODS:
        cases = {}
        for library in ("deltatune", "peft"):
            name = f"{method}/{library}"
            model, optimizer = build(name, env)
            trainable[name] = sum(p.numel() for p in common.trainable(model))
            cases[name] = step_fn(model, optimizer, common.random_ids(model.config.vocab_size, batch, length, env))
        times[method] = common.alternate(cases, env, args.repeats, args.warmup)
        common.print_times(f"{method} tuning training step", times[method])
        ratios[f"{method}/time_deltatune_over_peft"] = common.ratio(
            times[method], f"{method}/deltatune", f"{method}/peft"
        )
        del cases, model, optimizer
    print("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in trainable.items()))
    common.emit("prompt_prefix", env, args, ratios, times, batch=[batch, length], trainable=trainable, memory=memory)


if __name__ == "__main__":
    main()
