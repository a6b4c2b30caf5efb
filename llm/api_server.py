"""``llm serve``: an OpenAI-compatible HTTP server over ONNX Runtime, without PyTorch.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (whole answers or server-sent events),
``GET /v1/models``, and ``GET /health`` (open even with an API key). The request bodies and their checks
are in ``llm.inference.openai_api``; the decoding is a ``BatchEngine``, which decodes every request in flight
together. ``llm serve`` runs it in a process of its own (``llm.inference.engine_process``: the decoder's Python
and this event loop then never wait for each other's interpreter lock), whose events the loop reads; in-process
(tests, embedding) its worker thread hands them over. Each request's events go to its inbox, and the loop is
woken only when the request's handler waits for them (through one ``LoopWaker``: one wake-up for all the
requests woken together); a streamed answer's handler waits for a token only after a pause of
``stream_interval_s``, by which time the tokens of many steps have arrived, so most steps wake nothing. The
server detokenizes the events (control tokens are never shown), sends what arrived together as one piece,
and cuts the text at a stop string.

What a request may cost is bounded by ``ServeLimits``, checked as early as each can be: the body's bytes
before it is parsed (413), ``max_tokens`` before tokenizing, the prompt's tokens after (400), the queue
(429), a deadline for the whole request (504). A client that goes away cancels its request. Every error,
the unexpected ones included, is answered in OpenAI's shape without a traceback or an echo of the input.

The chat page: ``GET /`` serves ``llm/web/chat.html``, its script, style and icon under ``/ui/``, and
``/ui/config.json`` (the model id, whether ``/v1`` needs a key, the limits), all open without a key (the page
asks for the key and sends it on its ``/v1`` calls) and under a Content-Security-Policy that runs only the
page's own script; ``--no-ui`` leaves them out (404).

Before any route: ``HostGuard`` answers 421 to a ``Host`` outside ``--allowed-hosts``; a body must be
``application/json`` (415); a string that is not valid Unicode is a 400 naming its field; a body over
``OFFLOAD_BYTES`` is parsed and tokenized on a worker thread. The connections themselves are bounded by
``llm.connection_limits``; ``/health`` answers 503 naming an engine being replaced (``EnginePool``).

``run_server`` is what ``llm serve`` calls: it resolves the model URI (an export folder, ``models:/...`` or
``runs:/...`` through ``llm.mlops.lookup``), starts the engine process on the int8 model when the export has
one, and runs uvicorn.
An import-linter contract checks that none of this imports torch.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from llm.config import ServeLimits
from llm.connection_limits import connection_cap, guarded_protocol, quiet_accept_errors
from llm.data.chat_template import encode_chat, generation_stop_ids, prompt_ids
from llm.data.source_template import ChatTemplateError
from llm.inference import openai_api as api
from llm.inference.decoding import StopStrings
from llm.inference.engine import Engine, EngineFull, EngineStopped, Event
from llm.inference.engine_process import EVENT_FLUSH_S, EnginePool, EngineProcessError
from llm.inference.onnx_runtime import CONFIG_FILE

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a request waiting for its next token checks that its client is still there
DEADLINE_GRACE_S = 1.0  # the engine ends a late request itself; past this the server gives up on it too
OFFLOAD_BYTES = 64 << 10  # larger bodies are parsed and tokenized on a worker thread (about 5 ms of loop time)


class ServeError(Exception):
    """The server cannot start (no such model, no export); the message is the one line shown."""


class ClientGone(Exception):
    """The client closed the connection: its request is cancelled and nobody reads the answer."""


@dataclass
class Served:
    """What every request needs: the engine (any ``llm.inference.engine.Engine``: a ``BatchEngine`` in this process,
    an ``EngineProcess`` or an ``EnginePool``), the model's tokenizer and name, the limits, the API key, the host
    names a request may be addressed to."""

    engine: Engine
    model_name: str
    limits: ServeLimits
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values served ("*": any); see ``allowed_hosts``
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        self.context_length = self.engine.context_length
        self.stop_ids = generation_stop_ids(self.tokenizer)
        self._waker: LoopWaker | None = None

    def waker(self) -> LoopWaker:
        """The waker of the running event loop (made on first use, inside it)."""
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = LoopWaker(loop)
        return self._waker


class LoopWaker:
    """Runs callbacks from the engine's thread on the event loop, waking the loop once per burst.

    ``call_soon_threadsafe`` wakes the loop (a write to its self-pipe) and hands it the GIL; here the first
    callback of a burst schedules one delivery, and the callbacks posted before it runs ride along. Posted on
    the loop itself (the events of an engine process are read there), a callback runs at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._thread = threading.get_ident()  # made inside the loop (``Served.waker``): the loop's thread
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, callback: Callable[[], None]) -> None:
        """Called on the engine's thread (or the loop's); ``callback()`` runs on the event loop."""
        if threading.get_ident() == self._thread:
            callback()
            return
        with self._lock:
            self._pending.append(callback)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, collections.deque()
            self._scheduled = False
        for callback in pending:
            callback()


# ---------------------------------------------------------------------------------------------- one request

_NOTHING, _ANY, _FINAL = 0, 1, 2  # what a waiting handler waits for: no event, any event, the final event


class Generation:
    """One request in the engine, seen from the event loop: ``pieces()`` yields its text as it decodes.

    Submitting raises APIError 429 when the queue is full and 503 when the engine is not running.
    ``pieces()`` raises APIError 504 past the deadline, 503 when the engine stopped it, 500 when decoding
    failed, ClientGone when the client left; however it ends, the job is cancelled (a no-op when done).
    """

    def __init__(self, served: Served, request: Request, prompt_ids: list[int], params, stops: list[str]):
        self.served, self.request, self.prompt_ids, self.params = served, request, prompt_ids, params
        self.stops = StopStrings(stops)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last_piece = 0.0  # when the last piece went out (time.monotonic)
        self.deadline = time.monotonic() + served.limits.request_timeout_s
        # the engine's thread appends, the loop pops (a deque's append and popleft are atomic)
        self._inbox: collections.deque[Event] = collections.deque()
        self._waiting = _NOTHING  # set (on the loop) before the inbox is checked, read (on the engine) after appending
        self._waiter: asyncio.Future | None = None
        waker, wake, inbox = served.waker(), self._wake, self._inbox

        def on_event(event: Event) -> None:  # on the engine's worker thread
            inbox.append(event)
            waiting = self._waiting
            if waiting == _ANY or (waiting == _FINAL and event.finish_reason is not None):
                waker.post(wake)

        try:
            self.job = served.engine.submit(prompt_ids, params, on_event=on_event, deadline=self.deadline)
        except EngineFull:
            raise api.APIError(429, "the server is busy: too many requests are waiting; retry later",
                               type="rate_limit_error", code="queue_full") from None
        except EngineStopped:
            raise _unavailable() from None

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it decodes: the first piece as soon as it decodes, then one piece for the tokens that
        decoded within ``stream_interval_s`` of the last (each chunk is a write to the client's socket: eight
        streams at a token each per decoder step would spend the CPU on writes that batching saved).
        ``finish_reason`` is set before the last piece is yielded."""
        async for piece in self._pieces(whole=False):
            self._last_piece = time.monotonic()
            yield piece

    async def _pieces(self, whole: bool) -> AsyncIterator[str]:
        decoder = self.served.tokenizer.stream_decoder(skip_special=True)
        try:
            while True:
                text, final = "", None
                for event in await self._next_events(whole):
                    if event.token_id is None:
                        final = event
                        break
                    self.completion_tokens += 1
                    text += self.stops.feed(decoder.feed(event.token_id))
                    if self.stops.stopped:
                        break
                if self.stops.stopped:
                    self.finish_reason = "stop"  # before the last piece: it tells the caller that piece is the last
                    if text:
                        yield text
                    return
                if final is None:
                    if text:
                        yield text
                    continue
                if final.finish_reason not in ("stop", "length"):
                    raise _engine_failure(final)
                text += self.stops.feed(decoder.finish()) + self.stops.finish()
                self.finish_reason = "stop" if self.stops.stopped else final.finish_reason
                if text:
                    yield text
                return
        finally:
            self.job.cancel()

    async def text(self) -> str:
        """The whole answer, once its last token has decoded (one wake-up, not one per piece)."""
        return "".join([piece async for piece in self._pieces(whole=True)])

    def usage(self) -> dict[str, int]:
        return api.usage(len(self.prompt_ids), self.completion_tokens)

    def _arrived(self, wanted: int) -> bool:
        return bool(self._inbox) and (wanted == _ANY or self._inbox[-1].finish_reason is not None)

    def _wake(self) -> None:  # on the loop, posted by on_event; a late one wakes a later wait early: harmless
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def _wait(self, wanted: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``wanted`` (_ANY or _FINAL) to arrive; False if it has not."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._waiting = wanted  # from here on, the engine's thread wakes this wait (see on_event)
        try:
            if self._arrived(wanted):
                return True
            timer = loop.call_later(timeout, _resolve, waiter, False)  # a timer, not a task per wait (wait_for)
            try:
                await waiter
            finally:
                timer.cancel()
            return self._arrived(wanted)
        finally:
            self._waiting, self._waiter = _NOTHING, None

    async def _next_events(self, whole: bool) -> list[Event]:
        """Every event that has arrived, waiting for the first (for ``whole``, for the final one), checking
        the deadline and the client."""
        wanted = _FINAL if whole else _ANY
        pause = self._last_piece + self.served.limits.stream_interval_s - time.monotonic()
        if not whole and pause > 0 and self._last_piece:
            # let a few more tokens join this piece; never delays the first piece or the end of the answer
            await self._wait(_FINAL, min(pause, self.deadline - time.monotonic()))
        while not self._arrived(wanted):
            left = self.deadline + DEADLINE_GRACE_S - time.monotonic()
            if left <= 0:
                raise _timeout()
            if not await self._wait(wanted, min(POLL_S, left)) and await self.request.is_disconnected():
                raise ClientGone()
        events = []
        while self._inbox:
            events.append(self._inbox.popleft())
        return events


def _resolve(waiter: asyncio.Future, value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _unavailable() -> api.APIError:
    return api.APIError(503, "the engine is not running", type="server_error", code="engine_unavailable")


def _timeout() -> api.APIError:
    return api.APIError(504, "the request did not finish before its deadline", type="timeout",
                        code="request_timeout")


def _engine_failure(event: Event) -> api.APIError:
    if event.finish_reason == "timeout":
        return _timeout()
    if event.finish_reason == "cancelled":
        return _unavailable()
    log.error("generation failed: %s", event.error)
    return api.APIError(500, "generation failed", type="server_error", code="generation_failed")


# ---------------------------------------------------------------------------------------------- routes


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body's bytes, refused with 415 unless it says ``Content-Type: application/json`` (a web page
    can post ``text/plain`` to a local server without asking the browser first), and with 413 past
    ``max_bytes`` (by its Content-Length, and by counting while reading), before anything is read or parsed."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise api.APIError(415, "the request body must be JSON sent with Content-Type: application/json",
                           code="unsupported_media_type")
    too_large = api.APIError(413, f"the request body is larger than {max_bytes} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise too_large if length.isdigit() else api.invalid("invalid Content-Length header")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_large
    except ClientDisconnect:  # gone, or cut for sending its body too slowly (``llm.connection_limits``)
        raise ClientGone() from None
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """``body`` decoded as JSON; raises APIError 400 when it is not JSON."""
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise api.invalid("the request body is not valid JSON", code="invalid_json") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; JSON has neither


async def _prepared(request: Request, served: Served, prepare: Callable[[bytes], Any]) -> Any:
    """``prepare(body)`` (parse, check, tokenize) of the request's body: on a worker thread for a body over
    ``OFFLOAD_BYTES``, so that a 1 MiB body's 80 ms of parsing and tokenizing never holds up the other clients."""
    body = await read_body(request, int(served.limits.max_request_bytes))
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(prepare, body)
    return prepare(body)


def _parse(body: bytes, served: Served, kind: type[api.Request]) -> api.Request:
    request = api.parse_request(kind, parse_json(body))
    if request.model != served.model_name:
        raise api.APIError(404, f"model: unknown model; this server serves '{served.model_name}'", param="model",
                           code="model_not_found")
    return request


def _sampling(served: Served, body: api.Request):
    return api.sampling_params(body, default_max_tokens=served.limits.default_max_tokens,
                               max_tokens=served.limits.max_tokens, stop_ids=served.stop_ids)


def _check_prompt_length(served: Served, ids: list[int], param: str) -> list[int]:
    limit = min(served.limits.max_prompt_tokens, served.context_length)
    if len(ids) > limit:
        raise api.invalid(f"{param}: the prompt is {len(ids)} tokens; at most {limit} fit", param,
                          "context_length_exceeded")
    return ids


def _prepare_chat(served: Served, raw: bytes) -> tuple[api.ChatCompletionRequest, Any, list[int]]:
    body = _parse(raw, served, api.ChatCompletionRequest)
    params = _sampling(served, body)
    messages = [m.template_message() for m in body.messages]
    try:
        ids = encode_chat(served.tokenizer, messages, add_generation_prompt=True)
    except ChatTemplateError as err:  # the model's own template refuses the conversation (a role it lacks)
        raise api.invalid(f"messages: {err}", "messages") from None
    return body, params, _check_prompt_length(served, ids, "messages")


async def chat_completions(request: Request) -> Any:
    return await _answer(request, "chatcmpl", lambda served, raw: _prepare_chat(served, raw), _chat_chunks,
                         api.chat_completion)


def _prepare_completion(served: Served, raw: bytes) -> tuple[api.CompletionRequest, Any, list[int]]:
    body = _parse(raw, served, api.CompletionRequest)
    params = _sampling(served, body)
    return body, params, _check_prompt_length(served, prompt_ids(served.tokenizer, body.prompt), "prompt")


async def completions(request: Request) -> Any:
    return await _answer(request, "cmpl", lambda served, raw: _prepare_completion(served, raw), _completion_chunks,
                         api.completion)


async def _answer(request: Request, prefix: str, prepare: Callable[[Served, bytes], tuple[Any, Any, list[int]]],
                  chunks: Callable[..., Any], whole: Callable[..., Any]) -> Any:
    """A completion route: the body ``prepare``d (checked, tokenized), then the answer streamed as ``chunks``
    or returned ``whole``, under an id starting with ``prefix``."""
    served: Served = request.app.state.served
    body, params, ids = await _prepared(request, served, lambda raw: prepare(served, raw))
    generation = Generation(served, request, ids, params, body.stop_strings())
    head = _head(prefix, served)
    if body.stream:
        return _event_stream(chunks(generation, head, body.include_usage()), generation)
    text = await generation.text()
    return whole(head, text, generation.finish_reason, generation.usage())


def _head(prefix: str, served: Served) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.model_name,
            "system_fingerprint": None}


async def _chat_chunks(generation: Generation, head: dict, include_usage: bool) -> AsyncIterator[tuple[list, bool]]:
    """The chunks of a streamed chat completion, in groups that are ready together, each sent in one write
    (True with the last group): the role with the first piece, each piece, the last with the finish reason
    and the usage."""
    extra = {"usage": None} if include_usage else {}
    group = [{**api.chat_chunk(head, {"role": "assistant", "content": ""}), **extra}]
    async for piece in generation.pieces():
        group.append({**api.chat_chunk(head, {"content": piece}), **extra})
        if generation.finish_reason is None:  # set before the last piece
            yield group, False
            group = []
    group.append({**api.chat_chunk(head, {}, generation.finish_reason), **extra})
    if include_usage:
        group.append(api.usage_chunk(head, "chat.completion.chunk", generation.usage()))
    yield group, True


async def _completion_chunks(generation: Generation, head: dict,
                             include_usage: bool) -> AsyncIterator[tuple[list, bool]]:
    """The chunks of a streamed completion, grouped as ``_chat_chunks`` groups them."""
    extra = {"usage": None} if include_usage else {}
    group = []
    async for piece in generation.pieces():
        group.append({**api.completion(head, piece, None), **extra})
        if generation.finish_reason is None:
            yield group, False
            group = []
    group.append({**api.completion(head, "", generation.finish_reason), **extra})
    if include_usage:
        group.append(api.usage_chunk(head, "text_completion", generation.usage()))
    yield group, True


class _EventStream(StreamingResponse):
    """A streamed response that cancels its request however it ends: even a client gone before the first
    chunk, when the chunks' generator never started and so never runs its own cleanup."""

    def __init__(self, content: AsyncIterator[str], generation: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.job.cancel()


def _event_stream(chunks: AsyncIterator[tuple[list, bool]], generation: Generation) -> StreamingResponse:
    """Server-sent events: one ``data: {json}`` per chunk, then ``data: [DONE]``, each group of chunks in one
    write (a socket write per event was a third of the loop's time). An error after the stream began is sent
    as a last ``data: {"error": ...}`` event, and the stream closes without ``[DONE]``."""

    async def events() -> AsyncIterator[str]:
        try:
            async for group, last in chunks:
                yield "".join([_sse(chunk) for chunk in group]) + ("data: [DONE]\n\n" if last else "")
        except api.APIError as err:
            yield _sse(err.body())
        except ClientGone:
            return
        except Exception:  # noqa: BLE001 - the client gets one line, the log the traceback
            log.exception("streaming a response failed")
            yield _sse(_internal_error().body())

    return _EventStream(events(), generation)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def list_models(request: Request) -> dict[str, Any]:
    served: Served = request.app.state.served
    return {"object": "list", "data": [_model_card(served)]}


async def get_model(request: Request, model: str) -> dict[str, Any]:
    served: Served = request.app.state.served
    if model != served.model_name:
        raise api.APIError(404, "unknown model", param="model", code="model_not_found")
    return _model_card(served)


def _model_card(served: Served) -> dict[str, Any]:
    return {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "llm"}


async def health(request: Request) -> JSONResponse:
    """200 while every engine runs and beats; else 503 with ``problems`` naming each engine being replaced."""
    served: Served = request.app.state.served
    running, problems = served.engine.health()
    body = {"status": "ok" if running else "unavailable", "model": served.model_name, "engine": served.engine.stats()}
    if problems:
        body["problems"] = problems
    return JSONResponse(body, status_code=200 if running else 503)


# ---------------------------------------------------------------------------------------------- the chat page

WEB_DIR = Path(__file__).resolve().parent / "web"  # package data (pyproject: [tool.setuptools.package-data])
PAGE_FILES = {"/": ("chat.html", "text/html; charset=utf-8"), "/ui/chat.js": ("chat.js", "text/javascript"),
              "/ui/chat.css": ("chat.css", "text/css"), "/ui/icon.svg": ("icon.svg", "image/svg+xml")}
# the page runs only its own script and style, talks only to this server, and cannot be framed
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_config(served: Served) -> dict[str, Any]:
    """What the chat page needs to follow the server's limits: the model id, whether ``/v1`` needs a key (never
    the key), and the limits on a request (``ui/config.json``)."""
    limits = served.limits
    return {"model": served.model_name, "api_key_required": served.api_key is not None,
            "max_tokens": limits.max_tokens, "default_max_tokens": limits.default_max_tokens,
            "max_request_bytes": int(limits.max_request_bytes), "context_length": served.context_length,
            "max_prompt_tokens": min(limits.max_prompt_tokens, served.context_length)}


def _static(content: bytes, media_type: str) -> Callable[[], Any]:
    """A route answering ``content`` (a closure: a parameter with a default would be a query parameter)."""

    async def page_file() -> Response:
        return Response(content, media_type=media_type, headers=PAGE_HEADERS)

    return page_file


def _add_chat_page(app: FastAPI, served: Served) -> None:
    """Serve the chat page's files (read once, here: a missing file fails at start, not on a visit)."""
    for route, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(route, _static((WEB_DIR / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)

    async def config() -> JSONResponse:
        return JSONResponse(page_config(served), headers=PAGE_HEADERS)

    app.add_api_route("/ui/config.json", config, methods=["GET"], include_in_schema=False)


# ---------------------------------------------------------------------------------------------- the app


async def _authorize(request: Request) -> None:
    """Checks ``Authorization: Bearer <key>`` when the server has a key (in constant time). Async, so that
    FastAPI calls it on the loop rather than handing every request to its thread pool and back."""
    key = request.app.state.served.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise api.APIError(401, "invalid or missing API key: send Authorization: Bearer <key>",
                           type="authentication_error", code="invalid_api_key")


def _internal_error() -> api.APIError:
    return api.APIError(500, "internal server error", type="server_error", code="internal_error")


def _error_handlers() -> dict[Any, Callable]:
    """Every error in OpenAI's shape: ours, FastAPI's (unknown route, wrong method), and anything else as a
    bare 500 (the traceback goes to the log only)."""

    def reply(err: api.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def on_api_error(request: Request, err: api.APIError) -> JSONResponse:
        return reply(err)

    async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = "unknown route" if err.status_code == 404 else "method not allowed" if err.status_code == 405 \
            else "request refused"
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return reply(api.APIError(err.status_code, message, code=code))

    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return reply(api.invalid("invalid request"))

    async def on_client_gone(request: Request, err: ClientGone) -> JSONResponse:
        return reply(api.APIError(499, "client closed the request", code="client_closed"))

    async def on_anything(request: Request, err: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return reply(_internal_error())

    return {api.APIError: on_api_error, HTTPException: on_http_error, RequestValidationError: on_validation_error,
            ClientGone: on_client_gone, Exception: on_anything}


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, given: list[str] | None = None) -> tuple[str, ...]:
    """The ``Host`` header names served when bound to ``host``: ``given`` (``--allowed-hosts``), else the
    loopback names and ``host`` itself; any name (``*``) when bound to every interface, where an API key is
    required (``check_exposure``) and so a page that rebinds a name to this machine gets nowhere anyway."""
    if given:
        return tuple(name.strip().lower().strip("[]") for name in given)
    if host in WILDCARD_ADDRESSES:
        return ("*",)
    return (*LOOPBACK_NAMES, host.lower().strip("[]"))


def check_exposure(host: str, api_key: str | None, no_auth: bool) -> None:
    """Raises ServeError when ``host`` reaches beyond this machine and there is no API key (an empty one
    included), unless ``no_auth`` says that is meant."""
    if is_loopback(host) or no_auth:
        return
    if api_key == "":
        raise ServeError(f"--host {host}: the API key is empty (LLM_API_KEY=\"\"?); set one, or pass --no-auth "
                         "to serve every interface without authentication")
    if api_key is None:
        raise ServeError(f"--host {host} reaches beyond this machine without an API key: set --api-key or "
                         "LLM_API_KEY, or pass --no-auth to serve without authentication")


class HostGuard:
    """ASGI middleware: a request whose ``Host`` header names none of ``allowed`` gets 421 (a web page that
    rebinds its own domain name to 127.0.0.1 reaches this server with its own name in ``Host``)."""

    def __init__(self, app: Callable, allowed: tuple[str, ...]):
        self.app, self.allowed = app, frozenset(allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or "*" in self.allowed or _host_name(scope) in self.allowed:
            await self.app(scope, receive, send)
            return
        error = api.APIError(421, "this server does not answer for the host named in the Host header (see "
                             "--allowed-hosts)", code="misdirected_request")
        await JSONResponse(error.body(), status_code=421)(scope, receive, send)


def _host_name(scope) -> str | None:
    """The name in the request's ``Host`` header, without its port or IPv6 brackets (None when missing)."""
    value = next((v for k, v in scope["headers"] if k == b"host"), None)
    if value is None:
        return None
    name = value.decode("latin-1").strip().lower()
    if name.startswith("["):
        return name[1:name.find("]")] if "]" in name else name
    return name.rpartition(":")[0] if name.count(":") == 1 else name


def create_app(served: Served, ui: bool = True) -> FastAPI:
    """The FastAPI app serving ``served`` (with the chat page at ``/`` when ``ui``); it starts the engine on
    startup and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop())
        served.engine.start()
        try:
            yield
        finally:
            served.engine.stop()

    app = FastAPI(title="llm", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None,
                  exception_handlers=_error_handlers())
    app.state.served = served
    guarded = [Depends(_authorize)]
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=guarded)
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=guarded)
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"], dependencies=guarded)
    app.add_api_route("/health", health, methods=["GET"])
    if ui:
        _add_chat_page(app, served)
    app.add_middleware(HostGuard, allowed=served.allowed_hosts)
    return app


# ---------------------------------------------------------------------------------------------- llm serve


def resolve_export(uri: str) -> Path:
    """The local ONNX export folder for ``uri``: a folder holding ``generation_config.json`` (or its ``onnx/``
    subfolder), or a ``models:/``/``runs:/`` URI downloaded through ``llm.mlops.lookup``. Raises ServeError."""
    if uri.startswith(("models:/", "runs:/")):
        try:
            from llm.mlops.lookup import RegistryError, resolve_onnx
        except ImportError as err:  # the registry needs mlflow, which a serving box may lack
            raise ServeError(f"cannot resolve {uri}: the model registry is unavailable ({err}); install mlflow "
                             "or pass --model with an ONNX export folder") from None
        try:
            return resolve_onnx(uri)
        except RegistryError as err:
            raise ServeError(f"cannot resolve {uri}: {err}") from None
    for folder in (Path(uri), Path(uri) / "onnx"):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise ServeError(f"{uri}: not an ONNX export folder (no {CONFIG_FILE}); export one with `llm export onnx` "
                     "(or `dvc repro`), or pass a models:/ or runs:/ URI")


def default_model_name(uri: str) -> str:
    """The model id clients name: ``gpt/Production`` for ``models:/gpt/Production``, the run id for
    ``runs:/<run id>``, the folder's name for a folder."""
    if uri.startswith(("models:/", "runs:/")):
        return uri.partition(":/")[2].strip("/")
    return Path(uri).resolve().name


def _protocol(limits: ServeLimits) -> type:
    """uvicorn's HTTP protocol (httptools where installed, else h11) with the header and body deadlines and
    the connection cap of ``limits`` (``llm.connection_limits``)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return guarded_protocol(AutoHTTPProtocol, max_connections=connection_cap(limits.max_connections),
                            header_timeout_s=limits.header_timeout_s, body_timeout_s=limits.body_timeout_s)


def run_server(model: str, *, host: str = "127.0.0.1", port: int = 8000, fp32: bool = False,
               api_key: str | None = None, model_name: str | None = None, threads: int | None = None,
               engines: int = 1, limits: ServeLimits | None = None, hosts: list[str] | None = None,
               no_auth: bool = False, ui: bool = True) -> None:
    """Serve ``model`` (see ``resolve_export``) with ``engines`` engine processes until interrupted, answering
    requests addressed to ``hosts`` (see ``allowed_hosts``), with the chat page at ``/`` when ``ui``. Raises
    ServeError when it cannot load, or when ``host`` reaches beyond this machine without an API key and without
    ``no_auth``."""
    import uvicorn

    check_exposure(host, api_key, no_auth)
    limits = limits or ServeLimits()
    export = resolve_export(model)
    servers: list[uvicorn.Server] = []  # the one uvicorn server, which the engines' supervisor stops on giving up
    try:
        engine = EnginePool(export, engines=engines, fp32=fp32, threads=threads, max_batch=limits.max_batch,
                            max_queue=limits.max_queue,  # tokens wait there a quarter of a stream's pause at most
                            flush_s=min(EVENT_FLUSH_S, limits.stream_interval_s / 4),
                            heartbeat_timeout_s=limits.engine_heartbeat_timeout_s,
                            max_restarts=limits.engine_max_restarts, restart_window_s=limits.engine_restart_window_s,
                            on_give_up=lambda why: [setattr(s, "should_exit", True) for s in servers]).start()
    except (FileNotFoundError, ValueError, EngineProcessError) as err:
        raise ServeError(f"cannot load {model}: {err}") from None
    try:
        served = Served(engine, model_name or default_model_name(model), limits, api_key or None,
                        allowed_hosts(host, hosts))
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
        print(f"serving {served.model_name} ({engine.model_file}) at {url}", flush=True)
        key = '"<your key>"' if served.api_key else '"none"'
        print(f'  from openai import OpenAI; OpenAI(base_url="{url}", api_key={key})', flush=True)
        if ui:
            print(f"  chat in the browser: {url.removesuffix('v1')}", flush=True)
        servers.append(uvicorn.Server(uvicorn.Config(create_app(served, ui), host=host, port=port, log_level="info",
                                                     http=_protocol(limits), timeout_keep_alive=limits.keep_alive_s)))
        try:
            servers[0].run()
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down in order and raises it again; as uvicorn.run does
            pass
        if engine.gave_up:  # exit non-zero: Docker's or systemd's restart policy takes over
            raise ServeError(engine.gave_up)
    finally:
        engine.stop()  # the app's shutdown stopped it already, unless uvicorn never started it
