"""QLoRA: one LoRA training step on fp32, nf4 and int8 bases, deltatune vs HF PEFT; and the biggest model that trains.

Part 1 (``--part step``): SmolLM2-135M-Instruct (the embedded weights), LoRA on every linear layer
of the blocks (r=16, alpha=32), a batch of 4 x 128 random tokens, forward with ``labels=``, backward
and an AdamW step. Each base (``fp32``, ``nf4`` double-quantized with float32 compute, ``int8``)
is loaded once per library (quantizing is deterministic: both see the same weights); the cases
alternate in this process for time, and each runs alone in a child process for peak memory.

Part 3 (``--part layer``): SmolLM2's MLP projections in nf4 under LoRA, forward and backward,
deltatune's fused function against its own unfused graph (what the fused 4-bit path saves).

Part 2 (``--part scale``): Llama-architecture models of 1.7B (SmolLM2-1.7B's shape), 3B (Llama 3.2
3B's) and 7B (Llama 2 7B's) parameters with random weights. Each is written once, shard by shard
in bfloat16, so the whole float model never exists in memory (cached under
``~/.cache/deltatune/bench-models``, 3.4 / 6.4 / 13.5 GB), then loaded in a child process in nf4
(or float32, where it fits) and given LoRA training steps (batch 1 x 64); seconds per step and
peak resident memory per size and base. A float32 load that would not fit in this machine's
memory is not attempted and is reported as such.

    .venv/bin/python benchmarks/bench_quantized.py [--part step|layer|scale|all] [--sizes 1.7b,3b,7b] [--quick]
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import common

BASES = ("fp32", "nf4", "int8")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
SIZES = {
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 49152, "tie_word_embeddings": True},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
}  # fmt: skip
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltatune" / "bench-models"


# -- part 1: one step on SmolLM2 --------------------------------------------------------------------
def load_base(base: str, env: common.Env, folder: Path | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from deltatune.models import resolve_model_path
    from deltatune.quantization import bitsandbytes_config

    common.quiet_transformers()
    path = folder or resolve_model_path(common.MODEL)
    extra = {} if base == "fp32" else {"quantization_config": bitsandbytes_config(base), "device_map": {"": env.device}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    return model.to(env.device) if base == "fp32" else model


def build(case: str, env: common.Env) -> tuple[nn.Module, torch.optim.Optimizer]:
    base, library = case.split("/")
    model = load_base(base, env)
    torch.manual_seed(0)
    if library == "deltatune":
        import deltatune

        model = deltatune.get_peft_model(model, deltatune.LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        import peft

        from deltatune.base_layers import keep_trainable_layout

        keep_trainable_layout(model)  # the same layout for both (see deltatune.base_layers.Bnb4bitBase)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    model.train()
    return model, torch.optim.AdamW(common.trainable(model), lr=1e-4)


def step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor):
    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_shape(env: common.Env) -> tuple[int, int]:
    return (1, 32) if env.quick else (4, 128)


def run_step_child(case: str, env: common.Env) -> None:
    model, optimizer = build(case, env)
    ids = common.random_ids(model.config.vocab_size, *step_shape(env), env)
    step = step_fn(model, optimizer, ids)
    load_peak = common.reset_peak_rss()  # the training's own peak from here on: not the load's transient
    for _ in range(2):
        step()
    common.report_child_memory(env, load_peak_rss_mib=load_peak)


def part_step(args, env: common.Env) -> tuple[dict, dict, dict]:
    cases = [f"{base}/{lib}" for base in BASES for lib in ("deltatune", "peft")]
    memory = common.children_memory(__file__, cases) if not args.no_memory else {}
    ratios: dict[str, float] = {}
    for base in BASES:
        if memory:
            ours, theirs = memory[f"{base}/deltatune"], memory[f"{base}/peft"]
            ratios[f"{base}/memory_over_peft"] = common.memory_of(ours) / common.memory_of(theirs)
    if memory:
        ratios["nf4_memory_over_fp32"] = common.memory_of(memory["nf4/deltatune"]) / common.memory_of(
            memory["fp32/deltatune"]
        )
    times: dict[str, dict[str, list[float]]] = {}
    batch, length = step_shape(env)
    for base in BASES:
        steps = {}
        for lib in ("deltatune", "peft"):
            model, optimizer = build(f"{base}/{lib}", env)
            ids = common.random_ids(model.config.vocab_size, batch, length, env)
            steps[f"{base}/{lib}"] = step_fn(model, optimizer, ids)
        times[base] = common.alternate(steps, env, args.repeats, args.warmup)
        common.print_times(f"LoRA training step on a {base} base, batch {batch} x {length}", times[base])
        ratios[f"{base}/time_over_peft"] = common.ratio(times[base], f"{base}/deltatune", f"{base}/peft")
        del steps
    return ratios, times, memory


# -- part 2: the biggest model that trains -------------------------------------------------------------
def parameter_count(shape: dict) -> int:
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * block + v * h * (1 if shape["tie_word_embeddings"] else 2) + h


def write_random_checkpoint(size: str) -> Path:
    """A random-weight Llama of ``size`` in bf16 shards, written one tensor at a time (never whole in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = CACHE / f"llama-{size}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(max_position_embeddings=2048, **SIZES[size])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, number = {}, 0, {}, 0
    names = [n for n, _ in skeleton.named_parameters()]

    def flush() -> None:
        nonlocal shard, shard_bytes, number
        if shard:
            number += 1
            name = f"model-{number:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({key: name for key in shard})
            shard, shard_bytes = {}, 0

    for name in names:
        param = skeleton.get_parameter(name)
        if "norm" in name:
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes > 2 * 2**30:
            flush()
    flush()
    config.save_pretrained(folder)
    total = sum(p.numel() * 2 for p in skeleton.parameters())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    return folder


def memory_limit_mib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def run_scale_child(case: str, env: common.Env) -> None:
    size, base = case.split("@")
    folder = write_random_checkpoint(size)
    import deltatune

    started = time.perf_counter()
    model = load_base(base, env, folder)
    loaded = time.perf_counter() - started
    load_peak = common.reset_peak_rss()
    model = deltatune.get_peft_model(model, deltatune.LoraConfig(task_type="CAUSAL_LM", **LORA))
    from deltatune.train import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(common.trainable(model), lr=1e-4)
    ids = common.random_ids(model.config.vocab_size, 1, 16 if env.quick else 64, env)
    step = step_fn(model, optimizer, ids)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    common.report_child_memory(
        env, load_s=loaded, load_peak_rss_mib=load_peak, step_s=seconds, parameters=parameter_count(SIZES[size])
    )


def part_scale(args, env: common.Env) -> dict:
    results = {}
    for size in args.sizes:
        write_random_checkpoint(size)
        for base in ("fp32", "nf4"):
            float_mib = parameter_count(SIZES[size]) * 4 / 2**20
            if base == "fp32" and float_mib > 0.8 * memory_limit_mib():
                results[f"{size}@{base}"] = {"skipped": f"float32 weights alone take {float_mib:,.0f} MiB"}
                print(f"  {size} {base}: not attempted ({results[f'{size}@{base}']['skipped']})", flush=True)
                continue
            try:
                results[f"{size}@{base}"] = common.child_memory(__file__, f"{size}@{base}", timeout=3600)
            except RuntimeError as err:
                results[f"{size}@{base}"] = {"failed": str(err)[-500:]}
            print(f"  {size} {base}: {results[f'{size}@{base}']}", flush=True)
    return results


# -- part 3: one adapted 4-bit layer pair, fused against unfused ---------------------------------
def part_layer(args, env: common.Env) -> tuple[dict[str, float], dict[str, list[float]]]:  # noqa: ANN001
    """SmolLM2's MLP projections (576 -> 1536 -> 576) in nf4 under LoRA r=16, 512 rows, forward and
    backward: deltatune's fused function against its own unfused graph, alternating."""
    import deltatune as dt
    from deltatune.methods.lora import LoraLinear
    from deltatune.quantization import quantize_frozen_linear_layers

    torch.manual_seed(env.seed)
    mlp = nn.Sequential(nn.Linear(576, 1536, bias=False), nn.ReLU(), nn.Linear(1536, 576, bias=False)).to(env.device)
    mlp.requires_grad_(False)
    quantize_frozen_linear_layers(mlp, "nf4", [])
    model = dt.get_peft_model(mlp, dt.LoraConfig(r=16, lora_alpha=32, target_modules=["0", "2"])).train()
    x = torch.randn(512, 576, device=env.device, requires_grad=True)

    def step(fused: bool) -> None:
        LoraLinear.fused = fused
        model(x).sum().backward()
        LoraLinear.fused = True

    times = common.alternate(
        {"layer/fused": lambda: step(True), "layer/unfused": lambda: step(False)}, env, args.repeats * 8, args.warmup
    )
    common.print_times("nf4 MLP pair under LoRA, forward and backward", times)
    return {"layer/fused_over_unfused": common.ratio(times, "layer/fused", "layer/unfused")}, times


def main() -> None:
    parser = common.parser(__doc__, repeats=5, warmup=1)
    parser.add_argument("--part", choices=["step", "scale", "layer", "all"], default="all")
    parser.add_argument("--sizes", type=lambda t: t.split(","), default=list(SIZES))
    parser.add_argument("--no-memory", action="store_true", help="skip the memory child processes of part 1")
    args = parser.parse_args()
    env = common.setup(args)
    if args.child:
        (run_scale_child if "@" in args.child else run_step_child)(args.child, env)
        return
    ratios, times, memory, scale = {}, {}, {}, {}
    if args.part in ("step", "all"):
        ratios, times, memory = part_step(args, env)
    if args.part in ("layer", "all"):
        layer_ratios, layer_times = part_layer(args, env)
        ratios.update(layer_ratios)
        times["layer"] = layer_times
    if args.part in ("scale", "all"):
        scale = part_scale(args, env)
        for size in args.sizes:
            nf4, fp32 = scale.get(f"{size}@nf4", {}), scale.get(f"{size}@fp32", {})
            if "peak_rss_mib" in nf4 and "peak_rss_mib" in fp32:
                ratios[f"{size}/nf4_peak_over_fp32"] = nf4["peak_rss_mib"] / fp32["peak_rss_mib"]
    common.emit("quantized", env, args, ratios, times, memory=memory, scale=scale)


if __name__ == "__main__":
    main()
