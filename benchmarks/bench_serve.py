"""``deltatune serve`` against the servers a PEFT user writes: many adapters, concurrent clients.

SmolLM2-135M-Instruct with 8 LoRA adapters (r=8 on ``q_proj``/``v_proj``, random weights); requests
spread round-robin over the 8 adapters and the base, fixed chat prompts, greedy, ``max_tokens``
fixed. N clients (1, 4, 16, 32) on loopback send them as fast as replies come back. Three servers
behind the same OpenAI chat endpoint (FastAPI + uvicorn), in this process, one at a time:

* ``serve``: deltatune's server (continuous batching, rows of different adapters in one pass);
* ``naive``: HF PEFT, one request at a time, ``set_adapter`` then ``generate`` (what a PEFT user
  writes first);
* ``per_adapter``: HF PEFT, static batches of the waiting requests of one adapter at a time
  (``set_adapter``, then ``generate`` on the left-padded batch, up to ``--max-batch`` rows).

Reported per server and client count: generated tokens/s, p50/p99 request latency; ratios
``serve/naive`` and ``serve/per_adapter`` throughput at each client count, and serve's
``p99@16 / p99@1``. Targets (issue 17): >= 3x naive at 16 clients, p99@16 <= 2x p99@1. Servers run
in turn for each client count, so drift on a shared machine hits them alike.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--clients 1,4,16,32] [--max-tokens 24]
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import common

ADAPTERS = [f"a{i}" for i in range(8)]
BASE = "smollm2"
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three ideas for a birthday party.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Describe how a bicycle works.",
    "List some good habits for programmers.",
]


def make_adapters(env: common.Env, folder: Path) -> dict[str, Path]:
    import deltatune

    model, _ = common.load_smollm(env)
    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    torch.manual_seed(env.seed)
    peft_model = deltatune.get_peft_model(model, deltatune.LoraConfig(**config), ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, deltatune.LoraConfig(**config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # small, so replies stay language, but every adapter changes them
                parameter.normal_(0, 0.02)
    peft_model.save_pretrained(folder)  # PEFT's layout: each adapter not named "default" in folder/name
    return {name: folder / name for name in ADAPTERS}


# -- the peers ----------------------------------------------------------------------------------
def peft_model_with(env: common.Env, paths: dict[str, Path]) -> tuple[Any, Any]:
    import peft

    base, tokenizer = common.load_smollm(env)
    model = peft.PeftModel.from_pretrained(base, str(paths[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    model.eval()
    return model, tokenizer


def generate_group(model: Any, tokenizer: Any, adapter: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Greedy replies of one adapter's prompts in one left-padded ``generate`` call."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if adapter == BASE:
            stack.enter_context(model.disable_adapter())
        else:
            model.set_adapter(adapter)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
        )
    replies = []
    eos = tokenizer.eos_token_id
    for row in out[:, width:].tolist():
        end = row.index(eos) if eos in row else len(row)
        replies.append({"text": tokenizer.decode(row[:end], skip_special_tokens=True), "tokens": end})
    return replies


class PeerServer:
    """HF PEFT behind the chat endpoint: one request at a time, or static batches of one adapter."""

    def __init__(self, model: Any, tokenizer: Any, max_batch: int) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.waiting: list[tuple[str, list[int], int, concurrent.futures.Future]] = []
        self.wake = threading.Condition()
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()

    def app(self) -> Any:
        from fastapi import FastAPI

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict) -> dict:
            ids = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
            future: concurrent.futures.Future = concurrent.futures.Future()
            with self.wake:
                self.waiting.append((body["model"], list(ids), body["max_tokens"], future))
                self.wake.notify()
            reply = await asyncio.wrap_future(future)
            return {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply["text"]}}],
                "usage": {"completion_tokens": reply["tokens"]},
            }

        return app

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.waiting:
                    self.wake.wait()
                adapter, _, max_tokens, _ = self.waiting[0]
                group = [w for w in self.waiting if w[0] == adapter and w[2] == max_tokens][: self.max_batch]
                self.waiting = [w for w in self.waiting if not any(w is g for g in group)]
            try:
                replies = generate_group(self.model, self.tokenizer, adapter, [g[1] for g in group], max_tokens)
                for (_, _, _, future), reply in zip(group, replies):
                    future.set_result(reply)
            except Exception as err:  # the benchmark reports it through the client
                for *_, future in group:
                    future.set_exception(err)


# -- servers on loopback and their clients -------------------------------------------------------
@contextlib.contextmanager
def listening(app: Any) -> Iterator[str]:
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def jobs(count: int, max_tokens: int) -> list[dict[str, Any]]:
    models = [BASE, *ADAPTERS]
    return [
        {
            "model": models[i % len(models)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[(i // len(models)) % len(PROMPTS)]}],
        }
        for i in range(count)
    ]


def load(url: str, clients: int, work: list[dict[str, Any]]) -> dict[str, Any]:
    """``clients`` threads send ``work`` in order, each its next request as soon as a reply arrives."""
    import httpx2

    lock = threading.Lock()
    todo = list(enumerate(work))
    replies: list[dict[str, Any] | None] = [None] * len(work)

    def client() -> None:
        with httpx2.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    index, body = todo.pop(0)
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                reply = response.json()
                replies[index] = {
                    "seconds": time.perf_counter() - start,
                    "tokens": reply["usage"]["completion_tokens"],
                    "text": reply["choices"][0]["message"]["content"],
                }

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = sorted(r["seconds"] for r in replies)
    tokens = sum(r["tokens"] for r in replies)
    return {
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "tokens": tokens,
        "requests": len(work),
        "wall_s": wall,
        "texts": [r["text"] for r in replies],
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = common.parser(__doc__, repeats=1, warmup=1)
    parser.add_argument("--clients", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests per run: this x clients, >= 18")
    args = parser.parse_args()
    env = common.setup(args)
    counts = [int(c) for c in args.clients.split(",")]
    max_tokens = args.max_tokens
    if env.quick:
        counts, max_tokens = [1, 4], 4
    from deltatune.serving.api import build_app
    from deltatune.serving.server import build_state

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(env, Path(tmp))
        ours, tokenizer = common.load_smollm(env)
        state = build_state(
            ours, tokenizer, base_name=BASE, adapters=list(paths.items()), max_batch=args.max_batch, max_queue=10_000
        )
        theirs, their_tokenizer = peft_model_with(env, paths)
        peers = {
            "naive": PeerServer(theirs, their_tokenizer, max_batch=1),
            "per_adapter": PeerServer(theirs, their_tokenizer, max_batch=args.max_batch),
        }
        print(
            f"SmolLM2-135M, 8 LoRA adapters + base, max_tokens {max_tokens}, {env.device} {env.dtype}, "
            f"{env.threads} threads"
        )
        results: dict[str, dict[str, Any]] = {}
        with (
            listening(build_app(state)) as serve_url,
            listening(peers["naive"].app()) as naive_url,
            listening(peers["per_adapter"].app()) as batch_url,
        ):
            urls = {"serve": serve_url, "naive": naive_url, "per_adapter": batch_url}
            for url in urls.values():  # warm-up: every adapter once
                load(url, 1, jobs(9 if not env.quick else 2, 2))
            for clients in counts:
                work = jobs(max(18, args.requests_per_client * clients), max_tokens)
                for name, url in urls.items():
                    results[f"{name}@{clients}"] = load(url, clients, work)
                    r = results[f"{name}@{clients}"]
                    print(
                        f"{clients:>3} clients {name:>12}: {r['tokens_per_s']:8.1f} tokens/s, p50 "
                        f"{r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s ({r['requests']} requests, "
                        f"{r['tokens']} tokens)",
                        flush=True,
                    )
        state.batcher.stop(60)
    ratios: dict[str, float] = {}
    for clients in counts:
        serve = results[f"serve@{clients}"]
        ratios[f"throughput_serve_over_naive@{clients}"] = (
            serve["tokens_per_s"] / results[f"naive@{clients}"]["tokens_per_s"]
        )
        ratios[f"throughput_serve_over_per_adapter@{clients}"] = (
            serve["tokens_per_s"] / results[f"per_adapter@{clients}"]["tokens_per_s"]
        )
    top = 16 if 16 in counts else counts[-1]
    ratios[f"serve_p99@{top}_over_p99@{counts[0]}"] = (
        results[f"serve@{top}"]["p99_s"] / results[f"serve@{counts[0]}"]["p99_s"]
    )
    # greedy replies of the same prompts and adapters: deltatune's batched server vs PEFT one at a time
    agree = [a == b for c in counts for a, b in zip(results[f"serve@{c}"]["texts"], results[f"naive@{c}"]["texts"])]
    checks = {"replies_equal_to_naive_share": sum(agree) / len(agree)}
    print(f"serve's replies equal to PEFT's one-at-a-time greedy replies: {sum(agree)} of {len(agree)}")
    for record in results.values():
        record.pop("texts")
    common.emit("serve", env, args, ratios, runs=results, checks=checks, max_tokens=max_tokens)


if __name__ == "__main__":
    main()
