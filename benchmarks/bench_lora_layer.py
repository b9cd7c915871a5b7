"""One LoRA layer, forward + backward: deltatune vs HF PEFT (and the bare ``nn.Linear`` for scale).

``nn.Linear(576, 1536)`` (SmolLM2's hidden -> MLP width) with r=16, alpha=32 on 8 x 128 tokens,
train mode, lora_dropout 0 and 0.05. The input requires grad, as inside a network, so backward
computes the input gradient as well as the adapter's. With dropout 0 both libraries get identical
adapter weights and their outputs are compared; with dropout the two draw different masks, so only
the time is compared. ``low_rank_products`` times the rank-r products alone: the bare layer plus
them is the floor (``floor_over_peft``: the best ratio any implementation could reach here).

    .venv/bin/python benchmarks/bench_lora_layer.py [--quick] [--device auto|cpu|cuda]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import common

IN_FEATURES, OUT_FEATURES, RANK, ALPHA = 576, 1536, 16, 32


class Holder(nn.Module):
    """A module with one linear layer named ``proj`` for both libraries to wrap."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(env: common.Env, dropout: float) -> dict[str, nn.Module]:
    import peft

    import deltatune

    torch.manual_seed(env.seed)
    base = Holder(env.dtype, env.device)
    ours_base, peft_base = Holder(env.dtype, env.device), Holder(env.dtype, env.device)
    ours_base.load_state_dict(base.state_dict())
    peft_base.load_state_dict(base.state_dict())
    ours = deltatune.get_peft_model(
        ours_base,
        deltatune.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False
        ),
    )
    theirs = peft.get_peft_model(
        peft_base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=["proj"])
    )
    common.copy_adapter_weights(ours, theirs)
    base.proj.weight.requires_grad_(False)
    base.proj.bias.requires_grad_(False)
    models = {"base_linear": base, "deltatune": ours, "peft": theirs}
    for model in models.values():
        model.train()
    return models


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = common.trainable(model)

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        model(x).backward(grad)

    return step


def low_rank_products(x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """Only the rank-r matrix products LoRA adds to a frozen linear layer's forward and backward.

    Forward ``x A^T`` and ``(x A^T) B^T`` accumulated into the output; backward ``g B``, its product
    with ``A`` accumulated into the input gradient, ``(g B)^T x`` and ``g^T (x A^T)``. The bare
    linear layer plus this is the least any implementation can spend (no autograd, no copies).
    """
    generator = torch.Generator().manual_seed(2)
    A = torch.randn(RANK, IN_FEATURES, generator=generator).to(x.device, dtype)
    B = torch.randn(OUT_FEATURES, RANK, generator=generator).to(x.device, dtype)
    x2, g = x.detach().reshape(-1, IN_FEATURES), grad.reshape(-1, OUT_FEATURES)
    out, grad_x = torch.zeros_like(g), torch.zeros_like(x2)

    def products() -> None:
        low = x2 @ A.T
        out.addmm_(low, B.T)
        gB = g @ B
        grad_x.addmm_(gB, A)
        _ = gB.T @ x2, g.T @ low

    return products


def main() -> None:
    parser = common.parser(__doc__, repeats=15, warmup=3)
    args = parser.parse_args()
    env = common.setup(args)
    tokens = (2, 32) if env.quick else (8, 128)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*tokens, IN_FEATURES, generator=generator).to(env.device, env.dtype).requires_grad_(True)
    grad = torch.randn(*tokens, OUT_FEATURES, generator=generator).to(env.device, env.dtype)
    print(
        f"LoRA layer {IN_FEATURES}->{OUT_FEATURES}, r={RANK}, tokens {tokens[0]}x{tokens[1]}, {env.device} {env.dtype}"
    )

    ratios: dict[str, float] = {}
    times: dict[str, dict[str, list[float]]] = {}
    checks: dict[str, float] = {}
    for dropout in (0.0, 0.05):
        models = build(env, dropout)
        if dropout == 0.0:
            with torch.no_grad():
                diff = (models["deltatune"](x).float() - models["peft"](x).float()).abs().max().item()
            checks["max_abs_diff_output_dropout0"] = diff
            print(f"identical adapters, dropout 0: max |deltatune - peft| = {diff:.2e}")
        cases = {name: step_fn(model, x, grad) for name, model in models.items()}
        cases["low_rank_products"] = low_rank_products(x, grad, env.dtype)
        key = f"dropout_{dropout:g}"
        times[key] = common.alternate(cases, env, args.repeats, args.warmup)
        common.print_times(f"forward+backward, lora_dropout={dropout:g}", times[key])
        ratios[f"{key}/deltatune_over_peft"] = common.ratio(times[key], "deltatune", "peft")
        ratios[f"{key}/deltatune_over_base_linear"] = common.ratio(times[key], "deltatune", "base_linear")
        ratios[f"{key}/peft_over_base_linear"] = common.ratio(times[key], "peft", "base_linear")
        floor = common.median(times[key]["base_linear"]) + common.median(times[key]["low_rank_products"])
        ratios[f"{key}/floor_over_peft"] = floor / common.median(times[key]["peft"])
        ratios[f"{key}/deltatune_over_floor"] = common.median(times[key]["deltatune"]) / floor
    common.emit(
        "lora_layer",
        env,
        args,
        ratios,
        times,
        shape={"in": IN_FEATURES, "out": OUT_FEATURES, "r": RANK, "tokens": list(tokens)},
        checks=checks,
    )


if __name__ == "__main__":
    main()
