"""``qwenvl serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the online engine.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (server-sent events with ``"stream": true``),
``/v1/models``, ``/health``, ``/metrics`` (Prometheus). Host preprocessing (chat template, images) runs on one
worker thread, the device loop on the online engine's thread, and text deltas are made on the event loop with a
tokenizer of its own (a tokenizer object is not safe to share between threads). Every error is OpenAI's JSON
(``server_protocol.ApiError``); a client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from qwenvl_jax.engine import Request, TokenEvent
from qwenvl_jax.generate import TextStream
from qwenvl_jax.online import EngineClosed, OnlineEngine, QueueFull
from qwenvl_jax.processing import load_tokenizer
from qwenvl_jax.server_metrics import ServerMetrics
from qwenvl_jax.server_protocol import (ApiError, ChatBody, CompletionBody, Prompt, chat_messages,
                                        completion_prompts, engine_requests, generation_defaults, parse_body,
                                        sampling_params)

if TYPE_CHECKING:
    from qwenvl_jax.qwenvl import QwenVL

DISCONNECT_POLL_S = 0.5  # while a request waits for tokens, how often to check that its client is still there


@dataclasses.dataclass(frozen=True)
class _Format:
    """How one endpoint writes its choices: a whole one, and a streamed delta."""

    kind: str  # the response's "object"
    chunk_kind: str  # a streamed chunk's "object"
    choice: Callable[[int, TextStream], dict]
    delta: Callable[[int, str, str | None], dict]


CHAT = _Format("chat.completion", "chat.completion.chunk",
               lambda k, out: {"index": k, "message": {"role": "assistant", "content": out.text},
                               "finish_reason": out.finish_reason, "logprobs": None},
               lambda k, text, reason: {"index": k, "delta": {"content": text} if text else {},
                                        "finish_reason": reason, "logprobs": None})
COMPLETION = _Format("text_completion", "text_completion",
                     lambda k, out: {"index": k, "text": out.text, "finish_reason": out.finish_reason,
                                     "logprobs": None},
                     lambda k, text, reason: {"index": k, "text": text, "finish_reason": reason, "logprobs": None})


class _Generation:
    """One HTTP request's choices in the online engine. Their events come from the engine's thread through the
    event loop and become text deltas; a stop string ends a choice (and cancels it in the engine), and leaving
    ``deltas`` early (a client gone, an error) cancels every choice still running."""

    def __init__(self, server: _Server, requests: list[Request], stops: list[str], prompt_tokens: int,
                 received: float):
        self.server, self.received, self.prompt_tokens = server, received, prompt_tokens
        self.outputs = [TextStream(server.detokenizer, server.online.engine.eos_ids, stops) for _ in requests]
        self._first_at: list[float | None] = [None] * len(requests)
        self._events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self._ids: list[int] = []  # the engine's id of each choice submitted
        self._pending = set(range(len(requests)))  # choices not ended
        # Called on the engine's thread: the event goes to this event loop's queue.
        put = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self._events.put_nowait)
        try:
            for k, request in enumerate(requests):
                self._ids.append(server.online.submit(request, lambda event, k=k: put((k, event))))
        except QueueFull as e:
            self._cancel()
            raise ApiError(429, str(e), kind="rate_limit_error", code="queue_full") from e
        except EngineClosed as e:
            self._cancel()
            raise ApiError(503, str(e), kind="server_error", code="unavailable") from e
        except ValueError as e:
            self._cancel()
            raise ApiError(400, str(e)) from e
        server.metrics.prompt(prompt_tokens)

    @property
    def done(self) -> bool:
        return not self._pending

    def usage(self) -> dict:
        completion = sum(len(out.token_ids) for out in self.outputs)
        cached = max((out.cached_tokens for out in self.outputs), default=0)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def _cancel(self) -> None:
        """Cancels the choices submitted and not ended (their last events then go unread)."""
        for k, request_id in enumerate(self._ids):
            if k in self._pending:
                self._pending.discard(k)
                self.server.online.cancel(request_id)
                self.server.metrics.finished("cancelled", len(self.outputs[k].token_ids), 0.0)

    async def deltas(self, client: HttpRequest) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, text delta, finish reason once it ended) until every choice has ended."""
        try:
            while self._pending:
                try:
                    k, event = await asyncio.wait_for(self._events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await client.is_disconnected():
                        return
                    continue
                if k not in self._pending:  # events after a stop string, before the cancel took effect
                    continue
                yield k, *self._take(k, event)
        finally:
            self._cancel()

    def _take(self, k: int, event: TokenEvent) -> tuple[str, str | None]:
        out, now = self.outputs[k], time.perf_counter()
        delta = out.push(event)
        if event.tokens and self._first_at[k] is None:
            self._first_at[k] = now
            self.server.metrics.first_token(now - self.received)
        if out.finish_reason is None:
            return delta, None
        self._pending.discard(k)
        if not event.finished:  # a stop string: the engine would go on
            self.server.online.cancel(self._ids[k])
        self.server.metrics.finished(out.finish_reason, len(out.token_ids), now - (self._first_at[k] or now))
        if out.finish_reason == "error":
            raise ApiError(500, f"the engine failed: {self.server.online.error!r}", kind="server_error")
        return delta, out.finish_reason


class _Server:
    """What the endpoints share: the model, its online engine, the preprocessing thread, metrics."""

    def __init__(self, model: QwenVL, online: OnlineEngine, name: str):
        self.model, self.online, self.name = model, online, name
        self.detokenizer = load_tokenizer(model.path)  # the event loop's own (see the module docstring)
        self.defaults = generation_defaults(model.path)
        self.metrics = ServerMetrics(lambda: online.waiting, lambda: online.running, lambda: online.decode_calls,
                                     lambda: online.host_gap_s)
        # One thread: the processor's tokenizer is not shared between threads either.
        self.preprocessing = ThreadPoolExecutor(1, thread_name_prefix="qwenvl-preprocess")
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise ApiError(400, f"model {model!r} is not served here; this server serves {self.name!r} (GET "
                                "/v1/models)", param="model", code="model_not_found")

    async def preprocess(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.preprocessing, fn)

    async def respond(self, form: _Format, generation: _Generation, body: Any, client: HttpRequest) -> Any:
        """The whole response, or a stream of server-sent events."""
        response_id = f"{'chatcmpl' if form is CHAT else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": response_id, "created": int(time.time()), "model": self.name}
        if not body.stream:
            async for _ in generation.deltas(client):
                pass
            if not generation.done:  # the client left
                return PlainTextResponse("", status_code=499)
            return JSONResponse({**head, "object": form.kind, "usage": generation.usage(),
                                 "choices": [form.choice(k, out) for k, out in enumerate(generation.outputs)]})
        return StreamingResponse(self._events(form, generation, body, client, {**head, "object": form.chunk_kind}),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _events(form: _Format, generation: _Generation, body: Any, client: HttpRequest, head: dict
                      ) -> AsyncIterator[str]:
        def event(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        if form is CHAT:  # OpenAI opens each choice with the role
            yield event({**head, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None, "logprobs": None}
                                             for k in range(len(generation.outputs))]})
        try:
            async for k, delta, reason in generation.deltas(client):
                chunk = {**head, "choices": [form.delta(k, delta, reason)]}
                # Usage goes with the last choice's end, or (stream_options.include_usage) in OpenAI's own last
                # chunk with no choices.
                if generation.done and not body.include_usage:
                    chunk["usage"] = generation.usage()
                if delta or reason:
                    yield event(chunk)
        except ApiError as e:  # the stream has begun: the error is its last event
            yield event(e.body())
            return
        if body.include_usage and generation.done:
            yield event({**head, "choices": [], "usage": generation.usage()})
        yield "data: [DONE]\n\n"


def create_app(model: QwenVL, online: OnlineEngine, name: str) -> FastAPI:
    """The FastAPI application serving ``model`` (as ``name``) through ``online``, which it closes at shutdown."""
    server = _Server(model, online, name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        online.close()
        server.preprocessing.shutdown()

    app = FastAPI(title="qwenvl-jax", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def generate(client: HttpRequest, kind: type, form: _Format, prompts: Callable[[Any], list[Prompt]]
                       ) -> Any:
        received = time.perf_counter()
        body = parse_body(await client.body(), kind)
        server.check_model(body.model)
        sampling = sampling_params(body, server.defaults)

        def prepare() -> list[list[Request]]:  # on the preprocessing thread: choices of each prompt
            return [engine_requests(model, prompt, body, sampling) for prompt in prompts(body)]

        per_prompt = await server.preprocess(prepare)
        generation = _Generation(server, [r for choices in per_prompt for r in choices], body.stops,
                                 sum(len(choices[0].input_ids) for choices in per_prompt), received)
        return await server.respond(form, generation, body, client)

    @app.post("/v1/chat/completions")
    async def chat(client: HttpRequest) -> Any:
        return await generate(client, ChatBody, CHAT, lambda body: [chat_messages(body.messages)])

    @app.post("/v1/completions")
    async def completions(client: HttpRequest) -> Any:
        return await generate(client, CompletionBody, COMPLETION,
                              lambda body: completion_prompts(body, model.tokenizer))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                            "owned_by": "qwenvl-jax",
                                            "max_model_len": online.engine.config.max_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if online.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": repr(online.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def serve(model: QwenVL, *, name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 256,
          shutdown_timeout: float = 30.0) -> None:
    """Serves ``model`` until SIGINT / SIGTERM: then no new connections are taken, requests in flight get up to
    ``shutdown_timeout`` seconds to finish, and those still running are cancelled."""
    import uvicorn

    online = OnlineEngine(model.engine(), max_queue=max_queue)
    uvicorn.run(create_app(model, online, name), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=int(shutdown_timeout))
