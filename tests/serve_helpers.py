"""Helpers for the ``deltatune serve`` tests: adapters to serve, a server in a thread, reference replies."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import torch
import uvicorn

import deltatune as dt
from deltatune.models import load_model
from deltatune.serving.api import ServerState, build_app
from deltatune.serving.server import build_state
from tiny_assets import free_port

BASE = "tiny"
CHAT_PROMPTS = [
    "hello there",
    "what is two and two",
    "name a colour",
    "tell me a story about a cat who learned to sail across the sea",
    "why?",
    "list three fruits",
]
TEXT_PROMPTS = ["one two three", "The capital of France is", "def add(a, b):", "Once upon"]


def lora_family() -> dict[str, Any]:
    """LoRA, DoRA and rsLoRA adapters, and one prompt-tuning adapter."""
    return {
        "alpha": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "beta": dt.LoraConfig(r=8, target_modules="all-linear", use_dora=True),
        "gamma": dt.LoraConfig(r=16, lora_alpha=4, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True),
        "prompted": dt.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }


def other_methods() -> dict[str, Any]:
    """Layer methods beside LoRA, on modules of their own (one base layer takes one method)."""
    return {
        "ia3": dt.IA3Config(
            target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "loha": dt.LoHaConfig(r=4, target_modules=["q_proj", "gate_proj"]),
        "vera": dt.VeraConfig(r=8, target_modules=["o_proj"]),
    }


def make_adapters(llama: Path, folder: Path, configs: dict[str, Any], noise: float = 0.5) -> dict[str, Path]:
    """Each config's adapter with random weights far from its identity, saved in ``folder/name``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (name, config) in enumerate(configs.items()):
        paths[name] = folder / name
        if (paths[name] / "adapter_config.json").exists():
            continue
        model, _ = load_model(str(llama), allow_hub=False)
        peft_model = dt.get_peft_model(model, config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in peft_model.parameters():
                if parameter.requires_grad:  # far from the identity, so each adapter changes the replies
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
        peft_model.save_pretrained(paths[name])
    return paths


@dataclass
class Served:
    state: ServerState
    url: str
    server: uvicorn.Server

    def client(self, **kwargs: Any) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=120, **kwargs)


@contextlib.contextmanager
def serving(llama: Path, adapters: dict[str, Path] | None = None, **options: Any) -> Iterator[Served]:
    """A server on loopback in a thread of this process, stopped (and its batcher drained) on exit."""
    model, tokenizer = load_model(str(llama), allow_hub=False)
    options.setdefault("base_name", BASE)
    state = build_state(model, tokenizer, adapters=list((adapters or {}).items()), **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield Served(state, f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        thread.join(60)
        state.batcher.stop(60)


def wait_for(condition: Callable[[], Any], what: str, deadline_s: float = 60.0) -> Any:
    """Poll ``condition`` until it is true (a bound on a hang, not a timing assertion)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


class Reference:
    """Sequential greedy replies: ``generate`` on a separate model with one adapter active at a time."""

    def __init__(self, llama: Path, adapters: dict[str, Path]) -> None:
        base, self.tokenizer = load_model(str(llama), allow_hub=False)
        names = list(adapters)
        self.model = dt.PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()
        self._cache: dict[tuple, tuple[str, int, str]] = {}
        self._lock = threading.Lock()  # set_adapter is the whole model's state: one reply at a time

    def chat(self, text: str, model: str, max_tokens: int) -> tuple[str, int, str]:
        turns = [{"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=True)["input_ids"]
        return self.reply(list(ids), model, max_tokens)

    def completion(self, text: str, model: str, max_tokens: int) -> tuple[str, int, str]:
        return self.reply(list(self.tokenizer(text)["input_ids"]), model, max_tokens)

    def reply(self, ids: list[int], model: str, max_tokens: int) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of greedy decoding."""
        key = (tuple(ids), model, max_tokens)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._generate(ids, model, max_tokens)
            return self._cache[key]

    def _generate(self, ids: list[int], model: str, max_tokens: int) -> tuple[str, int, str]:
        inputs = torch.tensor([ids])
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if model == BASE:
                stack.enter_context(self.model.disable_adapter())
            else:
                self.model.set_adapter(model)
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, inputs.shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        stopped = bool(new) and new[-1] in eos
        tokens = len(new) - (1 if stopped else 0)
        return (self.tokenizer.decode(new, skip_special_tokens=True), tokens, "stop" if stopped else "length")


def read_stream(response: httpx2.Response) -> tuple[list[dict[str, Any]], bool]:
    """The chunks of a server-sent event stream, and whether it ended with ``[DONE]``."""
    chunks, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        chunks.append(json.loads(data))
    return chunks, done


def streamed_text(chunks: list[dict[str, Any]], chat: bool) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text and finish reason from its chunks."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if chat else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
            if choice["finish_reason"] is not None:
                reasons[choice["index"]] = choice["finish_reason"]
    return texts, reasons
