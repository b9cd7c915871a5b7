"""Starting a server: the base model, the operator's adapters, the batcher, then uvicorn.

SIGTERM (or Ctrl-C) drains: the server stops accepting connections, ``/health`` answers 503
"draining" and new completions are refused with 503, every request already taken runs to its end,
then the batcher stops and the process exits 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import uvicorn

from deltatune.models import load_model
from deltatune.serving.adapters import AdapterCatalog
from deltatune.serving.api import ServerState, build_app
from deltatune.serving.batcher import Batcher, ServeError
from deltatune.serving.metrics import ServerMetrics

logger = logging.getLogger("deltatune")


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the application as draining when the exit signal comes."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.serve_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.serve_state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn raises the signal again once it has shut down, which would kill the process before
        # the batcher is stopped; a drained server exits 0 on its own instead.
        self._captured_signals.clear()


def parse_adapters(values: tuple[str, ...] | list[str]) -> list[tuple[str, Path]]:
    """``--adapter name=path`` options (a bare path is named after its folder)."""
    parsed = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).resolve().name, value
        if not name or not path:
            raise ValueError(f"--adapter {value!r}: give NAME=PATH (a run folder or an adapter folder)")
        parsed.append((name, Path(path)))
    names = [n for n, _ in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--adapter names are used twice: {', '.join(repeated)}")
    return parsed


def context_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest sequence the model takes: its position table, else the tokenizer's limit."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def build_state(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    base_name: str,
    adapters: list[tuple[str, Path]] = (),
    adapter_dir: Path | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    api_key: str | None = None,
    request_timeout: float | None = 600.0,
    default_max_tokens: int = 256,
) -> ServerState:
    """A running batcher over ``model`` with the operator's adapters loaded; stop it with ``state.batcher.stop()``."""
    if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ValueError(f"{base_name} is not a decoder-only language model; deltatune serve generates with those")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = ServerMetrics(base_name)
    batcher = Batcher(
        model,
        tokenizer,
        max_batch=max_batch,
        max_queue=max_queue,
        context_length=context_length(model, tokenizer),
        metrics=metrics,
    )
    catalog = AdapterCatalog(batcher, base_name, adapter_dir)
    batcher.start()
    try:
        for name, path in adapters:
            try:
                catalog.load(name, path, confined=False)
            except ServeError as err:
                raise ValueError(f"--adapter {name}={path}: {err.message}") from None
    except BaseException:
        batcher.stop()
        raise
    return ServerState(
        batcher=batcher,
        catalog=catalog,
        tokenizer=tokenizer,
        metrics=metrics,
        base_name=base_name,
        api_key=api_key,
        request_timeout=request_timeout,
        default_max_tokens=default_max_tokens,
    )


def run_server(options: dict[str, Any]) -> None:
    """``deltatune serve``: load, serve until SIGTERM, drain."""
    adapters = parse_adapters(options.get("adapter") or ())
    adapter_dir = Path(options["adapter_dir"]) if options.get("adapter_dir") else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise ValueError(f"--adapter-dir {adapter_dir}: no such folder")
    base_name = options["model"]
    device = options.get("device") or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(
        base_name, task="causal-lm", allow_hub=False, quantize=options.get("quantize") or "none", device=device
    )
    if (options.get("quantize") or "none") == "none":
        model.to(device)
    state = build_state(
        model,
        tokenizer,
        base_name=base_name,
        adapters=adapters,
        adapter_dir=adapter_dir,
        max_batch=options["max_batch"],
        max_queue=options["max_queue"],
        api_key=options.get("api_key"),
        request_timeout=options.get("request_timeout") or None,
        default_max_tokens=options["max_tokens"],
    )
    config = uvicorn.Config(
        build_app(state),
        host=options["host"],
        port=options["port"],
        log_level="warning",
        timeout_graceful_shutdown=options.get("drain_timeout") or None,
    )
    server = DrainingServer(config, state)
    names = ", ".join(state.catalog.names()) or "none"
    logger.info("serving %s (adapters: %s) on http://%s:%d/v1", base_name, names, options["host"], options["port"])
    try:
        server.run()
    finally:
        state.draining = True
        state.batcher.stop()
        logger.info("stopped")
