"""The HTTP API: OpenAI's chat and text completions, models, adapters, health and metrics.

Every reply to a bad request is OpenAI's error object ``{"error": {"message", "type", "param",
"code"}}`` with a 4xx status, so the ``openai`` client raises its usual exceptions. A streamed
reply is server-sent events in OpenAI's chunk format ending with ``data: [DONE]``; an error after
the stream has started (a timeout) arrives as one ``data: {"error": ...}`` event.

The handlers never touch the model: they tokenize, submit a
:class:`~deltatune.serving.batcher.Request` and read its events from an ``asyncio.Queue`` that the
batcher's thread fills. A client that goes away cancels its request, which frees its rows at the
next decoding step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune.serving.adapters import AdapterCatalog
from deltatune.serving.batcher import Batcher, Request, ServeError
from deltatune.serving.decoding import Sampling
from deltatune.serving.metrics import ServerMetrics
from deltatune.serving.schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest

DISCONNECT_POLL_SECONDS = 0.25


@dataclass
class ServerState:
    """What the routes share: the batcher, the adapters, the tokenizer and the server's options."""

    batcher: Batcher
    catalog: AdapterCatalog
    tokenizer: Any
    metrics: ServerMetrics
    base_name: str
    api_key: str | None = None
    request_timeout: float | None = 600.0
    default_max_tokens: int = 256
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def error_body(error: ServeError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state``; ``--api-key`` guards every route."""

    async def check_key(request: HTTPRequest) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ServeError(
                401,
                "a valid API key is needed: send the header Authorization: Bearer KEY",
                kind="authentication_error",
                code="invalid_api_key",
            )

    app = FastAPI(title="deltatune serve", dependencies=[Depends(check_key)], docs_url=None, redoc_url=None)
    app.state.serve = state

    @app.exception_handler(ServeError)
    async def _serve_error(_: HTTPRequest, error: ServeError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_error(error)), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(ServeError(error.status_code, str(error.detail), kind=kind)), status_code=error.status_code
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: HTTPRequest, error: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(ServeError(500, f"internal error: {error}", kind="server_error")), status_code=500
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {
            "status": "draining" if state.draining else "ok",
            "model": state.base_name,
            "adapters": len(state.catalog.names()),
            "queue_depth": state.batcher.queue_depth,
            "running_rows": state.batcher.running_rows,
        }
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [model_card(state, None)] + [model_card(state, name) for name in state.catalog.names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model:path}")
    async def one_model(model: str) -> dict[str, Any]:
        return model_card(state, state.catalog.route(model))

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        return {"object": "list", "data": state.catalog.describe()}

    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        folder = state.catalog.client_path(body.path)
        return await asyncio.to_thread(state.catalog.load, body.name, folder)

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.wrap_future(state.catalog.unload(name))
        return {"name": name, "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest) -> Response:
        adapter = state.catalog.route(body.model)
        turns = [{"role": m.role, "content": m.text} for m in body.messages]
        if not getattr(state.tokenizer, "chat_template", None):
            raise ServeError(
                400, f"{state.base_name} has no chat template; send the prompt to /v1/completions", param="messages"
            )
        ids = state.tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_dict=True)["input_ids"]
        return await complete(state, request, body, adapter, [list(ids)], "chat", "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest) -> Response:
        adapter = state.catalog.route(body.model)
        prompts = [list(state.tokenizer(p)["input_ids"]) for p in body.prompts]
        return await complete(state, request, body, adapter, prompts, "text", "prompt")

    return app


def model_card(state: ServerState, adapter: str | None) -> dict[str, Any]:
    card = {"id": adapter or state.base_name, "object": "model", "created": state.created, "owned_by": "deltatune"}
    if adapter is not None:
        card["parent"] = state.base_name
    return card


def validation_error(error: RequestValidationError) -> ServeError:
    """FastAPI's validation error as one OpenAI error naming the first bad field."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return ServeError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union's failed member type is not a field: "stop.str" -> "stop"
    location = [p for p in location if not p.startswith(("str", "list[", "int", "float", "bool", "function-"))]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return ServeError(400, f"{param}: {message}" if param else message, param=param)


def _sampling(state: ServerState, body: Any, prompt_tokens: int, prompt_field: str) -> Sampling:
    context = state.batcher.context_length
    if prompt_tokens >= context:
        raise ServeError(
            400,
            f"the prompt has {prompt_tokens} tokens; the model's context is {context} tokens",
            param=prompt_field,
            code="context_length_exceeded",
        )
    room = context - prompt_tokens
    limit = body.token_limit
    if limit is None:
        limit = min(state.default_max_tokens, room)
    elif limit > room:
        raise ServeError(
            400,
            f"max_tokens is {limit}, but the prompt has {prompt_tokens} of the model's {context} tokens: at most "
            f"{room} here",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return Sampling(
        max_tokens=limit, temperature=body.temperature, top_p=body.top_p, stop=body.stop_strings, seed=body.seed
    )


async def complete(
    state: ServerState,
    http: HTTPRequest,
    body: Any,
    adapter: str | None,
    prompts: list[list[int]],
    kind: str,
    prompt_field: str,
) -> Response:
    """Submit one request per prompt and answer in one reply, or as a stream."""
    if state.draining:
        raise ServeError(503, "the server is shutting down", kind="server_error", code="shutting_down")
    endpoint = "chat.completions" if kind == "chat" else "completions"
    samplings = [_sampling(state, body, len(ids), prompt_field) for ids in prompts]
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests: list[Request] = []
    try:
        for k, (ids, sampling) in enumerate(zip(prompts, samplings)):
            request = Request(
                ids, adapter, sampling, _emitter(loop, events, k), n=body.n, timeout=state.request_timeout
            )
            state.batcher.submit(request)
            requests.append(request)
    except ServeError as err:
        for request in requests:
            request.cancel()
        state.metrics.requests.labels(endpoint, body.model, str(err.status)).inc()
        raise
    prompt_tokens = sum(len(ids) for ids in prompts)
    state.metrics.prompt_tokens.labels(state.metrics.label(adapter)).inc(prompt_tokens)
    reply = _Reply(state, body, kind, endpoint, requests, events, prompt_tokens)
    if body.stream:
        return StreamingResponse(
            reply.stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return JSONResponse(await reply.whole(http))


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, prompt: int):
    def emit(event: tuple) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (prompt, event))

    return emit


class _Reply:
    """The events of a completion's requests, as one OpenAI reply or as its stream of chunks."""

    def __init__(
        self,
        state: ServerState,
        body: Any,
        kind: str,
        endpoint: str,
        requests: list[Request],
        events: asyncio.Queue,
        prompt_tokens: int,
    ) -> None:
        self.state, self.body, self.kind, self.endpoint = state, body, kind, endpoint
        self.requests, self.events = requests, events
        self.prompt_tokens = prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.start = time.monotonic()
        self.open = len(requests) * body.n

    def usage(self) -> dict[str, int]:
        completion = sum(r.completion_tokens for r in self.requests)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _record(self, status: int) -> None:
        self.state.metrics.requests.labels(self.endpoint, self.body.model, str(status)).inc()
        if status == 200:
            self.state.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.start)

    def _cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def _next(self) -> tuple[int, tuple]:
        prompt, event = await self.events.get()
        if event[0] == "error":
            raise event[1]
        return prompt, event

    async def whole(self, http: HTTPRequest) -> dict[str, Any]:
        n = self.body.n
        texts = [""] * (len(self.requests) * n)
        reasons: list[str | None] = [None] * len(texts)
        try:
            while self.open:
                try:
                    prompt, (what, choice, value) = await asyncio.wait_for(self._next(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await http.is_disconnected():
                        self._cancel()
                        self._record(499)
                        return {}
                    continue
                index = prompt * n + choice
                if what == "text":
                    texts[index] += value
                else:
                    reasons[index] = value
                    self.open -= 1
        except ServeError as err:
            self._cancel()
            self._record(err.status)
            raise
        except BaseException:
            self._cancel()
            raise
        self._record(200)
        if self.kind == "chat":
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            obj = "chat.completion"
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons))
            ]
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def _choice(self, index: int, text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    async def stream(self) -> AsyncIterator[str]:
        n = self.body.n
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        status = 499  # until the stream ends as it should: the client left
        try:
            if self.kind == "chat":
                for index in range(len(self.requests) * n):
                    yield self._chunk([self._choice(index, None, None, first=True)])
            while self.open:
                prompt, (what, choice, value) = await self._next()
                index = prompt * n + choice
                if what == "text":
                    yield self._chunk([self._choice(index, value, None)])
                    continue
                self.open -= 1
                last = not self.open and not include_usage
                yield self._chunk([self._choice(index, None, value)], self.usage() if last else None)
            if include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
            status = 200
        except ServeError as err:
            status = err.status
            yield f"data: {json.dumps(error_body(err))}\n\n"
        finally:
            if status != 200:
                self._cancel()
            self._record(status)
