"""Mixed-adapter batches on SmolLM2-135M: 8 LoRA adapters, one per row group, in one forward pass.

Eight LoRA adapters (r=16, alpha=32, random non-zero weights) on ``q_proj``/``v_proj`` or on all
linear layers; a batch of 8 x 128 token ids (inference, no gradients) where row group ``i`` uses
adapter ``i`` via ``adapter_names=``. Compared with deltatune running one adapter on the whole
batch (the cost a mixed batch adds) and with HF PEFT's own ``adapter_names`` path (same adapters,
same weights; the outputs are compared). PEFT's single-adapter time is printed for reference.

Reported: ``ours_mixed / ours_single`` and ``ours_mixed / peft_mixed``.

    .venv/bin/python benchmarks/bench_mixed_batch.py [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import common

ADAPTERS = 8
TARGETS = {"qv": ["q_proj", "v_proj"], "all_linear": "all-linear"}


def build(env: common.Env, targets: object) -> tuple[nn.Module, nn.Module, list[str]]:
    import peft

    import deltatune

    names = [f"a{i}" for i in range(ADAPTERS)]
    config = {"r": 16, "lora_alpha": 32, "target_modules": targets, "task_type": "CAUSAL_LM"}
    torch.manual_seed(env.seed)
    model, _ = common.load_smollm(env)
    ours = deltatune.get_peft_model(model, deltatune.LoraConfig(init_lora_weights=False, **config), names[0])
    for name in names[1:]:
        ours.add_adapter(name, deltatune.LoraConfig(init_lora_weights=False, **config))
    model, _ = common.load_smollm(env)
    theirs = peft.get_peft_model(model, peft.LoraConfig(**config), names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**config))
    common.copy_adapter_weights(ours, theirs)
    ours.set_adapter(names[0])
    theirs.set_adapter(names[0])
    ours.eval()
    theirs.eval()
    return ours, theirs, names


def forward_fn(model: nn.Module, ids: torch.Tensor, adapter_names: list[str] | None) -> Callable[[], None]:
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}

    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids, **extra)

    return run


def main() -> None:
    parser = common.parser(__doc__, repeats=7, warmup=1)
    parser.add_argument("--targets", choices=[*TARGETS, "both"], default="both")
    args = parser.parse_args()
    env = common.setup(args)
    batch, length = (8, 16) if env.quick else (8, 128)
    groups = list(TARGETS) if args.targets == "both" else [args.targets]
    if env.quick and args.targets == "both":
        groups = ["qv"]
    print(f"SmolLM2-135M, {ADAPTERS} LoRA adapters, batch {batch} x {length}, {env.device} {env.dtype}")

    ratios: dict[str, float] = {}
    times: dict[str, dict[str, list[float]]] = {}
    checks: dict[str, float] = {}
    for group in groups:
        ours, theirs, names = build(env, TARGETS[group])
        ids = common.random_ids(ours.config.vocab_size, batch, length, env)
        per_row = [names[i * ADAPTERS // batch] for i in range(batch)]  # row groups of batch / 8 rows
        with torch.no_grad():
            mixed = ours(input_ids=ids, adapter_names=per_row).logits.float()
            checks[f"{group}/max_abs_diff_mixed_deltatune_vs_peft"] = (
                (mixed - theirs(input_ids=ids, adapter_names=per_row).logits.float()).abs().max().item()
            )
            last = names[-1]
            ours.set_adapter(last)
            alone = ours(input_ids=ids[-1:]).logits.float()
            ours.set_adapter(names[0])
            checks[f"{group}/max_abs_diff_mixed_row_vs_alone"] = (mixed[-1:] - alone).abs().max().item()
            single = ours(input_ids=ids).logits.float()  # adapter a0 on every row: must differ on other rows
            checks[f"{group}/max_abs_diff_mixed_vs_all_a0_expected_nonzero"] = (mixed - single).abs().max().item()
        for key in [k for k in checks if k.startswith(group)]:
            print(f"  {key}: {checks[key]:.2e}")
        cases = {
            "ours_mixed": forward_fn(ours, ids, per_row),
            "ours_single": forward_fn(ours, ids, None),
            "peft_mixed": forward_fn(theirs, ids, per_row),
            "peft_single": forward_fn(theirs, ids, None),
        }
        times[group] = common.alternate(cases, env, args.repeats, args.warmup)
        common.print_times(f"forward, {group}, {ADAPTERS} adapters", times[group])
        ratios[f"{group}/ours_mixed_over_ours_single"] = common.ratio(times[group], "ours_mixed", "ours_single")
        ratios[f"{group}/ours_mixed_over_peft_mixed"] = common.ratio(times[group], "ours_mixed", "peft_mixed")
        ratios[f"{group}/peft_mixed_over_peft_single"] = common.ratio(times[group], "peft_mixed", "peft_single")
        ratios[f"{group}/ours_single_over_peft_single"] = common.ratio(times[group], "ours_single", "peft_single")
        del ours, theirs, cases
    common.emit("mixed_batch", env, args, ratios, times, batch=[batch, length], adapters=ADAPTERS, checks=checks)


if __name__ == "__main__":
    main()
