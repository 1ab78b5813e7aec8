"""A fault-injecting, OpenAI-compatible HTTP server on 127.0.0.1 for tests.

This is the one kind of fake the project allows: an external edge that injects faults. It is a real
HTTP/1.1 server (raw asyncio streams, so it can misbehave at the byte level) running its own event loop
in a background thread, so it works from sync tests, ``anyio`` tests and tests of the Litestar app alike.

Usage::

    from tests.llm_server import run_fake_llm, ok, status, silent, cut_stream

    with run_fake_llm(status(500), status(500), reply="Paris is the capital.") as server:
        llm = OpenAICompatibleLLM(base_url=server.base_url, ...)
        ...                               # two 500s, then normal answers
        assert server.count == 3          # chat-completion requests received
        assert server.requests[-1]["messages"][0]["content"] == ...

API
---
``run_fake_llm(*script, default=None, reply=DEFAULT_REPLY, model="fake-model") -> ContextManager[FakeLLMServer]``
    Start a server on a free port, yield it, stop it (cancelling any request still held open).

``FakeLLMServer``
    ``base_url`` (``http://127.0.0.1:PORT/v1``), ``port``,
    ``count`` (chat-completion requests received so far), ``requests`` (their JSON bodies, in order;
    a body that is not JSON is kept as ``{"_raw": text}``), ``headers`` (their headers, lower-case names),
    ``health_requests`` (GETs of /models or /health),
    ``reply`` (the default answer text; a ``str`` or a ``callable(request_body) -> str``), ``model``,
    ``healthy`` (``False`` makes ``GET /v1/models`` and ``/health`` answer 503),
    ``default`` (the behaviour used when the script is empty; ``ok()`` unless set),
    ``script(*behaviours, default=...)`` (replace the queue: one behaviour is consumed per chat request),
    ``reset()`` (empty the script, zero the counters, restore ``ok()`` as default), ``start()``, ``stop()``.

Behaviours (each answers one ``POST /v1/chat/completions``; stream or not follows the request's ``stream``):

``ok(text=None, *, token_delay_s=0.0, usage=True)``
    A normal answer (``text`` or the server's ``reply``). Streams word by word as SSE ``data:`` chunks —
    a role-only first chunk, one chunk per word, a ``finish_reason`` chunk, a usage chunk
    (``choices: []``) when ``stream_options.include_usage`` is asked, then ``data: [DONE]`` — with
    an SSE comment (``: keep-alive``) and blank lines mixed in, as real servers do.
``sleep(seconds, then=None)``
    Accept, read the request, wait ``seconds``, then behave as ``then`` (default ``ok()``).
``silent()``
    Accept, read the request, then send nothing until the server stops.
``trickle(interval_s=0.05)``
    Send a 200 header, then one harmless byte (SSE comment / JSON whitespace) per interval, forever.
``status(code, body=None, *, retry_after=None)``
    Answer ``code`` with ``body`` (a dict is sent as JSON; default an OpenAI-style error object), and a
    ``Retry-After`` header when given (e.g. ``"1"`` or ``"0.2"``).
``malformed_json()``
    Answer 200 with a truncated JSON body (a stream request gets it as a single ``data:`` chunk).
``malformed_chunk(after_tokens=2)``
    Stream ``after_tokens`` good word chunks, then ``data: {not json``, then keep the connection
    correct (a ``[DONE]`` follows) — the client must reject it rather than skip it.
``cut_stream(after_tokens=3, *, clean=False)``
    Stream ``after_tokens`` words, then close the connection without ``finish_reason`` or ``[DONE]``.
    ``clean=False`` drops the socket mid chunked body (the client sees a protocol error);
    ``clean=True`` ends the HTTP body properly, so only the missing ``[DONE]`` tells.

Every response carries ``Connection: close``; streams use chunked transfer encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = "The answer is forty two, according to the context."

__all__ = [
    "DEFAULT_REPLY",
    "Behaviour",
    "FakeLLMServer",
    "cut_stream",
    "malformed_chunk",
    "malformed_json",
    "ok",
    "run_fake_llm",
    "silent",
    "sleep",
    "status",
    "trickle",
    "words",
]


@dataclass(frozen=True)
class Behaviour:
    """How the server answers one chat-completion request. Build with the functions below."""

    kind: str
    text: str | None = None
    token_delay_s: float = 0.0
    usage: bool = True
    seconds: float = 0.0
    then: Behaviour | None = None
    code: int = 200
    body: Any = None
    retry_after: str | None = None
    after_tokens: int = 0
    clean: bool = False
    interval_s: float = 0.05


def ok(text: str | None = None, *, token_delay_s: float = 0.0, usage: bool = True) -> Behaviour:
    return Behaviour("ok", text=text, token_delay_s=token_delay_s, usage=usage)


def sleep(seconds: float, then: Behaviour | None = None) -> Behaviour:
    return Behaviour("sleep", seconds=seconds, then=then)


def silent() -> Behaviour:
    return Behaviour("silent")


def trickle(interval_s: float = 0.05) -> Behaviour:
    return Behaviour("trickle", interval_s=interval_s)


def status(code: int, body: Any = None, *, retry_after: str | float | None = None) -> Behaviour:
    return Behaviour("status", code=code, body=body, retry_after=None if retry_after is None else str(retry_after))


def malformed_json() -> Behaviour:
    return Behaviour("malformed_json")


def malformed_chunk(after_tokens: int = 2) -> Behaviour:
    return Behaviour("malformed_chunk", after_tokens=after_tokens)


def cut_stream(after_tokens: int = 3, *, clean: bool = False) -> Behaviour:
    return Behaviour("cut_stream", after_tokens=after_tokens, clean=clean)


def words(text: str) -> list[str]:
    """The pieces the server streams: words with their trailing whitespace; ``"".join`` gives ``text`` back."""
    return re.findall(r"\S+\s*|\s+", text)


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
    422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


class _Request:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body


@dataclass
class FakeLLMServer:
    """See the module docstring. Thread-safe counters; the server runs in its own thread and loop."""

    default: Behaviour = field(default_factory=ok)
    reply: str | Callable[[dict], str] = DEFAULT_REPLY
    model: str = "fake-model"
    healthy: bool = True
    port: int = 0
    requests: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    health_requests: int = 0

    def __post_init__(self) -> None:
        self._script: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    # --- control, from the test's thread -------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def script(self, *behaviours: Behaviour, default: Behaviour | None = None) -> None:
        with self._lock:
            self._script = deque(behaviours)
            if default is not None:
                self.default = default

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.headers.clear()
            self.health_requests = 0
            self.default = ok()
            self.healthy = True

    def start(self) -> FakeLLMServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-llm", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- inside the server's loop --------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            request = await _read_request(reader)
            if request is not None:
                await self._dispatch(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (it timed out or gave up): nothing to answer
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _dispatch(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        path = request.path.split("?", 1)[0].rstrip("/")
        if request.method == "GET" and path in ("/v1/models", "/models", "/health"):
            with self._lock:
                self.health_requests += 1
            if not self.healthy:
                await _send_json(writer, 503, {"error": {"message": "loading model", "type": "unavailable"}})
            elif path == "/health":
                await _send_json(writer, 200, {"status": "ok"})
            else:
                await _send_json(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return
        if request.method != "POST" or path not in ("/v1/chat/completions", "/chat/completions"):
            await _send_json(writer, 404, {"error": {"message": f"no route {request.method} {path}"}})
            return
        try:
            body = json.loads(request.body)
        except ValueError:
            body = {"_raw": request.body.decode("utf-8", "replace")}
        with self._lock:
            self.requests.append(body)
            self.headers.append(request.headers)
            behaviour = self._script.popleft() if self._script else self.default
        await self._answer(behaviour, body, writer)

    async def _answer(self, b: Behaviour, body: dict, writer: asyncio.StreamWriter) -> None:
        streaming = bool(body.get("stream"))
        if b.kind == "sleep":
            await asyncio.sleep(b.seconds)
            await self._answer(b.then or ok(), body, writer)
        elif b.kind == "silent":
            await asyncio.Event().wait()  # until the server stops and cancels us
        elif b.kind == "trickle":
            await _send_head(writer, 200, "text/event-stream" if streaming else "application/json", chunked=True)
            while True:
                await _send_chunk(writer, b": keep-alive\n\n" if streaming else b" ")
                await asyncio.sleep(b.interval_s)
        elif b.kind == "status":
            payload = b.body if b.body is not None else {
                "error": {"message": f"fake error {b.code}", "type": "fake", "code": b.code}
            }
            extra = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            if isinstance(payload, (dict, list)):
                await _send_json(writer, b.code, payload, extra)
            else:
                await _send_body(writer, b.code, str(payload).encode(), "text/plain", extra)
        elif b.kind == "malformed_json":
            if streaming:
                await _send_head(writer, 200, "text/event-stream", chunked=True)
                await _send_chunk(writer, b'data: {"choices": [{"delta": {"content": "x"\n\n')
                await _send_chunk(writer, b"")
            else:
                truncated = b'{"id": "x", "choices": [{"message": {"content": "trunc'
                await _send_body(writer, 200, truncated, "application/json")
        elif b.kind in ("ok", "malformed_chunk", "cut_stream"):
            text = self._reply_for(b, body)
            if streaming:
                await self._stream(b, body, text, writer)
            else:
                await _send_json(writer, 200, self._completion(body, text))
        else:  # pragma: no cover - a typo in a test
            raise ValueError(f"unknown behaviour {b.kind!r}")

    def _reply_for(self, b: Behaviour, body: dict) -> str:
        if b.text is not None:
            return b.text
        return self.reply(body) if callable(self.reply) else self.reply

    def _usage(self, body: dict, text: str) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []) if isinstance(m, dict))
        completion = len(words(text))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, body: dict, text: str) -> dict:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": self._usage(body, text),
        }

    async def _stream(self, b: Behaviour, body: dict, text: str, writer: asyncio.StreamWriter) -> None:
        model = body.get("model") or self.model

        def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
            data = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage is not None:
                data["usage"] = usage
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        await _send_head(writer, 200, "text/event-stream", chunked=True)
        await _send_chunk(writer, b": keep-alive\n\n")
        await _send_chunk(writer, chunk({"role": "assistant", "content": ""}))
        pieces = words(text)
        limit = b.after_tokens if b.kind in ("cut_stream", "malformed_chunk") else len(pieces)
        for piece in pieces[:limit]:
            if b.token_delay_s:
                await asyncio.sleep(b.token_delay_s)
            await _send_chunk(writer, chunk({"content": piece}))
        if b.kind == "cut_stream":
            if b.clean:
                await _send_chunk(writer, b"")  # a well-formed end of the HTTP body, without [DONE]
            # else: drop the socket mid chunked body
            return
        if b.kind == "malformed_chunk":
            await _send_chunk(writer, b"data: {not json\n\n")
        await _send_chunk(writer, b"\n" + chunk({}, finish="stop"))
        if b.usage and (body.get("stream_options") or {}).get("include_usage"):
            await _send_chunk(writer, chunk(None, usage=self._usage(body, text)))
        await _send_chunk(writer, b"data: [DONE]\n\n")
        await _send_chunk(writer, b"")


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return _Request(method, path, headers, body)


def _head(code: int, content_type: str, extra: dict[str, str] | None, *, length: int | None) -> bytes:
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}", f"Content-Type: {content_type}", "Connection: close"]
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_head(writer: asyncio.StreamWriter, code: int, content_type: str, *, chunked: bool) -> None:
    writer.write(_head(code, content_type, None, length=None if chunked else 0))
    await writer.drain()


async def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    """One chunk of a chunked body; ``b""`` is the terminating chunk."""
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _send_body(
    writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
) -> None:
    writer.write(_head(code, content_type, extra, length=len(body)) + body)
    await writer.drain()


async def _send_json(
    writer: asyncio.StreamWriter, code: int, payload: Any, extra: dict[str, str] | None = None
) -> None:
    await _send_body(writer, code, json.dumps(payload).encode(), "application/json", extra)


@contextlib.contextmanager
def run_fake_llm(
    *script: Behaviour,
    default: Behaviour | None = None,
    reply: str | Callable[[dict], str] = DEFAULT_REPLY,
    model: str = "fake-model",
) -> Iterator[FakeLLMServer]:
    """Start a :class:`FakeLLMServer` on a free port with ``script`` queued; stop it on exit."""
    server = FakeLLMServer(default=default or ok(), reply=reply, model=model)
    server.script(*script)
    server.start()
    try:
        yield server
    finally:
        server.stop()
