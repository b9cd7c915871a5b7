"""Continuous batching: one thread owns the model and decodes every running reply in one batch.

Each loop turn (1) runs the calls other threads queued (loading or unloading an adapter happens
between steps, never during one), (2) drops rows whose client went away or whose time ran out,
(3) admits waiting requests while the batch has room: each one's prompt runs alone through the
model (its *prefill*), giving its first token and its key/value cache, which joins the batch's
cache, and (4) runs one decoding step for the whole batch, each row through its own adapter (the
mixed-adapter path, ``adapter_names=``), and retires the rows that finished.

Rows of different lengths share one cache by left padding: the batch cache has the length of the
longest row, shorter rows are padded on the left and their padding is masked out of attention.
Each row's position ids count only its real tokens, so a row computes what it would compute
alone (``deltatune generate``'s greedy reply is reproduced whatever else is in the batch). When
rows leave, padding columns that no row needs any more are cut off the left.

The model sees ``input_ids`` of shape ``[B, 1]`` per step (one new token per row), an attention
mask ``[B, T + 1]`` and position ids ``[B, 1]``; the cost of a step grows slowly with ``B`` while
the per-step overhead (Python, kernel launches, reading every weight once) is shared by all rows:
that is where batching's throughput comes from.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from deltatune.peft_model import BASE_ROW, PeftModel
from deltatune.serving.decoding import Sampling, TextStream, generator_for, sample

logger = logging.getLogger("deltatune")


class ServeError(Exception):
    """An error a client gets as OpenAI's JSON error object, with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers or {}


# Events a request's consumer receives, in order: ("text", choice, piece) any number of times,
# then ("done", choice, finish_reason) once per choice; or a single ("error", ServeError).
Event = tuple[str, Any, Any]


class Request:
    """One prompt to answer ``n`` times with one adapter (``None``: the base model).

    ``emit`` receives the events; it is called from the batcher's thread and must not block.
    """

    _ids = itertools.count()

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str | None,
        sampling: Sampling,
        emit: Callable[[Event], None],
        n: int = 1,
        timeout: float | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.adapter = adapter
        self.sampling = sampling
        self.emit = emit
        self.n = n
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout if timeout else None
        self.cancelled = False
        self.completion_tokens = 0
        self.open_choices = n

    def cancel(self) -> None:
        """The client is gone: the rows of this request leave the batch at the next step."""
        self.cancelled = True


@dataclasses.dataclass
class _Row:
    request: Request
    choice: int
    text: TextStream
    generator: torch.Generator | None
    generated: int = 0


class Batcher:
    """The decoding loop. ``submit`` queues a request; ``call`` runs a function between steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        context_length: int,
        metrics: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = context_length
        self.metrics = metrics
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        forward = inspect.signature(model.get_base_model().forward if isinstance(model, PeftModel) else model.forward)
        self._cache_argument = "cache" if "cache" in forward.parameters else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in forward.parameters
        self._waiting: deque[Request] = deque()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._after: list[tuple[str | None, Callable[[], Any], concurrent.futures.Future]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # The running batch: one entry of _rows per batch row, aligned with the tensors below.
        self._rows: list[_Row] = []
        self._cache: Any = None  # the model's key/value cache object, rows left-padded
        self._mask: torch.Tensor | None = None  # [B, T] 1 for real tokens
        self._positions: torch.Tensor | None = None  # [B] position id of each row's next token
        self._last: torch.Tensor | None = None  # [B] each row's newest token, the next step's input
        self.in_flight: dict[str | None, int] = {}  # requests per adapter, waiting or running
        self.average_seconds = 1.0  # a finished request's time, for Retry-After

    # -- other threads ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deltatune-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the loop."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._stopping:
                raise ServeError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                retry = max(1, round(self.average_seconds * (1 + len(self._waiting) / self.max_batch)))
                raise ServeError(
                    429,
                    f"the queue is full ({self.max_queue} requests wait); retry in {retry} s",
                    kind="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(retry)},
                )
            self._waiting.append(request)
            self.in_flight[request.adapter] = self.in_flight.get(request.adapter, 0) + 1
            self._wake.notify()
        self._gauge()

    def call(self, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` in the batcher's thread between two steps; its result comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                future.set_exception(ServeError(503, "the server is not running", kind="server_error"))
                return future
            self._calls.append((function, future))
            self._wake.notify()
        return future

    def call_when_done(self, adapter: str | None, function: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``function`` in the batcher's thread once no request for ``adapter`` waits or runs."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._after.append((adapter, function, future))
            self._wake.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    # -- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._waiting or self._rows or self._calls or self._after or self._stopping):
                        self._wake.wait()
                    if self._stopping and not (self._waiting or self._rows or self._calls or self._after):
                        return
                    calls, self._calls = self._calls, []
                    ready = [entry for entry in self._after if entry[0] not in self.in_flight]
                    self._after = [entry for entry in self._after if entry[0] in self.in_flight]
                calls += [(function, future) for _, function, future in ready]
                for function, future in calls:
                    try:
                        future.set_result(function())
                    except BaseException as err:  # noqa: B036 - handed to the caller, not swallowed
                        future.set_exception(err)
                try:
                    self._drop_gone()
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as err:  # a failed step fails its rows, never the server
                    logger.exception("a decoding step failed")
                    self._fail_all(ServeError(500, f"generation failed: {err}", kind="server_error"))
                self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running_rows.set(len(self._rows))

    def _drop_gone(self) -> None:
        now = time.monotonic()
        with self._wake:
            waiting = list(self._waiting)
            self._waiting = deque(r for r in waiting if not _gone(r, now))
        for request in waiting:
            if _gone(request, now):
                self._end(request, None if request.cancelled else _timeout_error(request))
        gone = [i for i, row in enumerate(self._rows) if _gone(row.request, now)]
        if gone:
            for request in {self._rows[i].request for i in gone}:
                self._end(request, None if request.cancelled else _timeout_error(request))
            self._keep([i for i in range(len(self._rows)) if i not in set(gone)])

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._waiting or len(self._rows) + self._waiting[0].n > self.max_batch:
                    return
                request = self._waiting.popleft()
            try:
                self._prefill(request)
            except Exception as err:  # this request fails alone; the batch goes on
                logger.exception("a prompt's prefill failed")
                self._end(request, ServeError(500, f"generation failed: {err}", kind="server_error"))

    def _forward(self, adapters: list[str | None], **inputs: Any) -> Any:
        if not isinstance(self.model, PeftModel):
            return self.model(**inputs)
        only = adapters[0]
        if only is not None and all(a == only for a in adapters):
            # one adapter for every row: the plain active-adapter forward, ~15 % faster than per-row routing
            if self.model.active_adapters != [only]:
                self.model.set_adapter(only)
            return self.model(**inputs)
        return self.model(**inputs, adapter_names=[BASE_ROW if a is None else a for a in adapters])

    def _prefill(self, request: Request) -> None:
        ids = torch.tensor([request.prompt_ids], device=self.device)
        extra = {"logits_to_keep": 1} if self._keep_last_logits else {}
        out = self._forward(
            [request.adapter], input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **extra
        )
        cache = out.get("cache", None) or out.get("past_key_values", None)
        logits = out.logits[:, -1].float()
        n = request.n
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.expand(n, -1)
        rows = [
            _Row(
                request,
                c,
                TextStream(self.tokenizer, request.sampling.stop),
                generator_for(request.sampling, c, self.device),
            )
            for c in range(n)
        ]
        length = ids.shape[1]
        self._join(cache, length, n, torch.full((n,), length, device=self.device))
        self._rows.extend(rows)
        start = len(self._rows) - n
        first = [sample(logits[i], r.request.sampling, r.generator) for i, r in enumerate(rows)]
        self._last = (
            torch.cat([self._last, torch.tensor(first, device=self.device)])
            if start
            else torch.tensor(first, device=self.device)
        )
        if self.metrics is not None:
            self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted)
        self._advance(list(range(start, start + n)), first)

    def _join(self, cache: Any, length: int, rows: int, positions: torch.Tensor) -> None:
        """Append ``rows`` rows (a cache of ``length`` tokens) to the batch, padding on the left."""
        mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._positions = cache, mask, positions
            return
        old = self._mask.shape[1]
        longest = max(old, length)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, longest - old), _pad_left(theirs.keys, longest - length)])
            mine.values = torch.cat([_pad_left(mine.values, longest - old), _pad_left(theirs.values, longest - length)])
        self._mask = torch.cat([F.pad(self._mask, (longest - old, 0)), F.pad(mask, (longest - length, 0))])
        self._positions = torch.cat([self._positions, positions])

    def _step(self) -> None:
        batch = len(self._rows)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        out = self._forward(
            [row.request.adapter for row in self._rows],
            input_ids=self._last[:, None],
            attention_mask=self._mask,
            position_ids=self._positions[:, None],
            use_cache=True,
            **{self._cache_argument: self._cache},
        )
        self._positions = self._positions + 1
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(-1).tolist()
        tokens = [
            greedy[i] if row.request.sampling.greedy else sample(logits[i], row.request.sampling, row.generator)
            for i, row in enumerate(self._rows)
        ]
        self._last = torch.tensor(tokens, device=self.device)
        if self.metrics is not None:
            self.metrics.batch_rows.observe(batch)
        self._advance(list(range(batch)), tokens)

    def _advance(self, indices: list[int], tokens: list[int]) -> None:
        """Hand each row's new token to its request; rows that finished leave the batch."""
        finished: set[int] = set()
        counts: dict[str | None, int] = {}
        for i, token in zip(indices, tokens):
            row = self._rows[i]
            request = row.request
            reason = None
            if token in self.eos_ids:
                reason = "stop"
            else:
                row.generated += 1
                request.completion_tokens += 1
                counts[request.adapter] = counts.get(request.adapter, 0) + 1
                piece = row.text.add(token)
                if piece:
                    request.emit(("text", row.choice, piece))
                if row.text.stopped:
                    reason = "stop"
                elif row.generated >= request.sampling.max_tokens or int(self._positions[i]) >= self.context_length:
                    reason = "length"
            if reason is not None:
                piece = row.text.flush()
                if piece:
                    request.emit(("text", row.choice, piece))
                request.emit(("done", row.choice, reason))
                finished.add(i)
                request.open_choices -= 1
                if request.open_choices == 0:
                    self._end(request, None)
        if self.metrics is not None:
            for adapter, count in counts.items():
                self.metrics.count_tokens(adapter, count)
        if finished:
            self._keep([i for i in range(len(self._rows)) if i not in finished])

    def _keep(self, keep: list[int]) -> None:
        """Only these rows stay; padding columns no remaining row needs are cut off the left."""
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = self._mask[:, first:]
        self._positions = self._positions[index]
        self._last = self._last[index]

    def _end(self, request: Request, error: ServeError | None) -> None:
        if error is not None:
            request.emit(("error", error, None))
        with self._wake:
            left = self.in_flight.get(request.adapter, 1) - 1
            if left:
                self.in_flight[request.adapter] = left
            else:
                self.in_flight.pop(request.adapter, None)
        seconds = time.monotonic() - request.submitted
        self.average_seconds = 0.9 * self.average_seconds + 0.1 * seconds

    def _fail_all(self, error: ServeError) -> None:
        for request in {row.request for row in self._rows}:
            self._end(request, error)
        self._rows = []
        self._cache = self._mask = self._positions = self._last = None


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """Zeros in front of a ``[B, H, T, D]`` cache tensor's T axis."""
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


def _gone(request: Request, now: float) -> bool:
    return request.cancelled or (request.deadline is not None and now > request.deadline)


def _timeout_error(request: Request) -> ServeError:
    seconds = request.deadline - request.submitted
    return ServeError(
        504, f"the request took longer than the server's timeout ({seconds:g} s)", kind="timeout_error", code="timeout"
    )
