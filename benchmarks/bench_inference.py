"""Inference with a LoRA adapter on SmolLM2-135M: forward latency and ``generate`` throughput.

Forward (no gradients, eval mode, batch 1 x 128 tokens by default): the base model, deltatune's
model with the adapter unmerged and merged (``merge_adapter()``: the wrapper layers stay but skip the
adapter), and the same two for HF PEFT. Reported: each one's overhead over the base model in % and
deltatune / PEFT.

``generate`` (greedy, exactly 32 new tokens, batch 4 left-padded prompts): tokens per second of the
base model, deltatune (unmerged) and PEFT (unmerged).

The adapter is LoRA r=16, alpha=32 on all linear layers, with random non-zero weights (so merging
changes the weights); PEFT gets the very same weights, and the outputs of the two are compared.

    .venv/bin/python benchmarks/bench_inference.py [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import common

PROMPTS = [
    "Write a short review of a film you liked.",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue, as if to a child who keeps asking questions.",
    "List three fruits.",
]


def build(env: common.Env) -> tuple[dict[str, nn.Module], object]:
    import peft

    import deltatune

    base, tokenizer = common.load_smollm(env)
    config = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    models: dict[str, nn.Module] = {"base": base}
    for name in ("deltatune_unmerged", "deltatune_merged"):
        torch.manual_seed(env.seed)
        model, _ = common.load_smollm(env)
        models[name] = deltatune.get_peft_model(model, deltatune.LoraConfig(init_lora_weights=False, **config))
    for name in ("peft_unmerged", "peft_merged"):
        model, _ = common.load_smollm(env)
        models[name] = peft.get_peft_model(model, peft.LoraConfig(**config))
        common.copy_adapter_weights(models["deltatune_unmerged"], models[name])
    common.copy_adapter_weights(models["deltatune_unmerged"], models["deltatune_merged"])
    models["deltatune_merged"].merge_adapter()
    models["peft_merged"].merge_adapter()
    for model in models.values():
        model.eval()
    return models, tokenizer


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return run


def generate_fn(model: nn.Module, inputs: dict, new_tokens: int, pad_id: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens

    return run


def main() -> None:
    parser = common.parser(__doc__, repeats=7, warmup=1)
    parser.add_argument("--batch", type=int, default=1, help="forward batch size")
    parser.add_argument("--length", type=int, default=128, help="forward sequence length")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    env = common.setup(args)
    batch, length = (1, 32) if env.quick else (args.batch, args.length)
    new_tokens = 8 if env.quick else args.new_tokens
    models, tokenizer = build(env)
    ids = common.random_ids(models["base"].config.vocab_size, batch, length, env)

    with torch.no_grad():
        logits = {name: model(input_ids=ids).logits.float() for name, model in models.items()}
    checks = {
        "max_abs_diff_deltatune_vs_peft_unmerged": (logits["deltatune_unmerged"] - logits["peft_unmerged"])
        .abs()
        .max()
        .item(),
        "max_abs_diff_deltatune_merged_vs_unmerged": (logits["deltatune_merged"] - logits["deltatune_unmerged"])
        .abs()
        .max()
        .item(),
        "max_abs_diff_adapter_vs_base": (logits["deltatune_unmerged"] - logits["base"]).abs().max().item(),
    }
    print(f"SmolLM2-135M + LoRA r=16 all-linear, {env.device} {env.dtype}, {env.threads} threads")
    for key, value in checks.items():
        print(f"  {key}: {value:.2e}")

    times: dict[str, dict[str, list[float]]] = {}
    cases = {name: forward_fn(model, ids) for name, model in models.items()}
    times["forward"] = common.alternate(cases, env, args.repeats, args.warmup)
    common.print_times(f"forward, batch {batch} x {length}", times["forward"])
    fwd = times["forward"]
    ratios = {
        "forward_unmerged/deltatune_over_peft": common.ratio(fwd, "deltatune_unmerged", "peft_unmerged"),
        "forward_merged/deltatune_over_peft": common.ratio(fwd, "deltatune_merged", "peft_merged"),
    }
    overhead = {
        name: 100 * (common.ratio(fwd, name, "base") - 1) for name in models if name != "base"
    }  # % over the base model
    print("\noverhead over the base model (forward)")
    for name, value in overhead.items():
        print(f"  {name:<28}{value:>+8.1f} %")

    prompts = (PROMPTS * 4)[:4]
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        inputs, pad_id = {k: v.to(env.device) for k, v in encoded.items()}, tokenizer.pad_token_id
    else:  # random weights (DELTATUNE_BENCH_RANDOM_WEIGHTS): random prompts of a typical length
        ids = common.random_ids(models["base"].config.vocab_size, len(prompts), 24, env)
        inputs, pad_id = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 0
    gen_cases = {
        name: generate_fn(models[key], inputs, new_tokens, pad_id)
        for name, key in (("base", "base"), ("deltatune", "deltatune_unmerged"), ("peft", "peft_unmerged"))
    }
    times["generate"] = common.alternate(gen_cases, env, args.repeats, 1)
    common.print_times(f"generate, batch 4, {new_tokens} new tokens, greedy", times["generate"])
    tokens_per_s = {
        name: len(prompts) * new_tokens / common.median(values) for name, values in times["generate"].items()
    }
    print("\ngenerate tokens/s: " + ", ".join(f"{k} {v:.1f}" for k, v in tokens_per_s.items()))
    ratios["generate_time/deltatune_over_peft"] = common.ratio(times["generate"], "deltatune", "peft")
    ratios["generate_time/deltatune_over_base"] = common.ratio(times["generate"], "deltatune", "base")
    ratios["generate_time/peft_over_base"] = common.ratio(times["generate"], "peft", "base")
    common.emit(
        "inference",
        env,
        args,
        ratios,
        times,
        forward_shape=[batch, length],
        forward_overhead_pct=overhead,
        generate={"batch": len(prompts), "new_tokens": new_tokens, "tokens_per_s": tokens_per_s},
        checks=checks,
    )


if __name__ == "__main__":
    main()
