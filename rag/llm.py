"""The ``LLM`` seam: chat completions from any OpenAI-compatible endpoint over ``httpx.AsyncClient``.

llama.cpp's ``llama-server``, vLLM, Ollama and OpenAI all serve ``POST {base_url}/chat/completions``
(``base_url`` includes ``/v1``). :class:`OpenAICompatibleLLM` adds what a service needs around it:
retries with backoff on transient failures (only before the first token reaches the caller), a total
deadline per call so nothing can hang, and one error per failure mode (defined in :mod:`rag.errors`,
the one error tree, and re-exported here):

- :class:`LLMUnavailable` (503): connect errors, timeouts, 429 and 5xx, once retries or time run out;
- :class:`LLMError` (502): the endpoint refused the request (4xx) or answered something unreadable;
- :class:`LLMStreamInterrupted` (502): a stream stopped after tokens were delivered.

``LLMUnavailable`` and ``LLMStreamInterrupted`` subclass ``LLMError``, so ``except LLMError`` catches
every LLM failure.

How the code is laid out (httpx's ``BaseClient`` idea): :class:`_Call` holds one call's retry rules and
state and does no I/O (what is retried, the backoff, the deadline, which error ends the call);
:meth:`OpenAICompatibleLLM._retrying` is the one retry loop; ``complete`` and ``stream`` differ only in
the attempt they hand it (one POST read whole, or one POST read as server-sent events).
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict, TypeVar, Unpack, runtime_checkable

import anyio
import httpx
import msgspec

from rag.errors import LLMError, LLMStreamInterrupted, LLMUnavailable, SettingsError
from rag.logs import get_logger

if TYPE_CHECKING:
    from rag.settings import Settings

__all__ = [
    "LLM",
    "Completion",
    "GenerationOptions",
    "LLMError",
    "LLMStreamInterrupted",
    "LLMUnavailable",
    "OpenAICompatibleLLM",
    "StreamEvent",
]

log = get_logger(__name__)

_ERROR_TEXT_CHARS = 300
_RETRY_STATUSES = frozenset({429})  # plus every 5xx
_T = TypeVar("_T")


class GenerationOptions(TypedDict, total=False):
    """Per-call overrides of the client's defaults, the same for ``complete`` and ``stream``.

    One declaration for the protocol, the client and the request payload: an option added here
    reaches all of them.
    """

    max_tokens: int | None
    temperature: float | None
    stop: Sequence[str] | None


_OPTION_NAMES = GenerationOptions.__optional_keys__ | GenerationOptions.__required_keys__


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """One whole answer."""

    text: str
    finish_reason: str | None
    model: str
    usage: dict[str, int] = msgspec.field(default_factory=dict)  # prompt/completion/total_tokens when given
    latency_ms: float = 0.0


class StreamEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a streamed answer: ``token`` events carry ``text``; one final ``done`` event the rest."""

    kind: Literal["token", "done"]
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    model: str | None = None


@runtime_checkable
class LLM(Protocol):
    """A chat model behind some endpoint."""

    model: str

    async def complete(self, messages: list[dict], **options: Unpack[GenerationOptions]) -> Completion: ...

    def stream(self, messages: list[dict], **options: Unpack[GenerationOptions]) -> AsyncIterator[StreamEvent]: ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


class _Retryable(Exception):
    """An attempt failed in a way worth another try (internal)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# Transport failures worth a retry; UnsupportedProtocol, InvalidURL and the like are configuration errors.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Every failure of an attempt that another attempt may cure (statuses: see ``_check_status``).
_RETRYABLE = (_Retryable, *_TRANSIENT)


class _Call:
    """One call's retry rules and state; no I/O.

    Everything ``complete`` and ``stream`` share lives here once: which failures are retried, the
    backoff between attempts, the total deadline, and the error a call ends with. Create it inside the
    running call (the deadline starts then).
    """

    def __init__(self, llm: OpenAICompatibleLLM, *, stream: bool) -> None:
        self.llm = llm
        self.stream = stream
        self.started = time.perf_counter()
        self.deadline = anyio.current_time() + llm.timeout_s
        self.attempt = 0
        self.last = "no attempt made"

    def left(self) -> float:
        """Seconds to the deadline: the bound of one await (an anyio scope must never span a ``yield``)."""
        return max(0.0, self.deadline - anyio.current_time())

    @staticmethod
    def reason(exc: Exception) -> tuple[str, float | None]:
        """What a retryable failure (one of ``_RETRYABLE``) says: its reason and its ``Retry-After`` seconds."""
        if isinstance(exc, _Retryable):
            return exc.reason, exc.retry_after
        return _describe(exc), None

    def next_delay(self, reason: str, retry_after: float | None) -> float:
        """The sleep before the next attempt; :class:`LLMUnavailable` when no attempt or time is left."""
        llm = self.llm
        self.last = reason
        if self.attempt > llm.max_retries:
            self._log_unavailable(reason)
            raise LLMUnavailable(f"LLM endpoint {llm.endpoint} unavailable after {self.attempt} attempt(s): {reason}")
        if retry_after is not None:
            delay = min(retry_after, llm.max_retry_after_s)
        else:
            # Exponential with "equal jitter": at least half the step, so retries still spread out.
            step = min(llm.backoff_max_s, llm.backoff_base_s * 2 ** (self.attempt - 1))
            delay = step / 2 + random.uniform(0, step / 2)
        if anyio.current_time() + delay >= self.deadline:
            self._log_unavailable(reason)
            raise LLMUnavailable(
                f"LLM endpoint {llm.endpoint} unavailable: no time left for a retry within {llm.timeout_s}s "
                f"after {self.attempt} attempt(s): {reason}"
            )
        log.warning("llm_retry", endpoint=llm.endpoint, attempt=self.attempt, error=reason, delay_s=round(delay, 3))
        return delay

    def deadline_error(self) -> LLMUnavailable:
        """The deadline passed before anything reached the caller."""
        llm = self.llm
        log.warning(
            "llm_unavailable", endpoint=llm.endpoint, attempts=self.attempt, error="deadline", timeout_s=llm.timeout_s
        )
        previous = f"; earlier: {self.last}" if self.attempt > 1 else ""
        return LLMUnavailable(
            f"LLM endpoint {llm.endpoint} gave no complete answer within {llm.timeout_s}s "
            f"(attempt {self.attempt}){previous}"
        )

    def interrupted(self, tokens: int, why: str) -> LLMStreamInterrupted:
        """A failure after ``tokens`` reached the caller: a retry would repeat them, so the call ends."""
        endpoint = self.llm.endpoint
        log.warning("llm_stream_interrupted", endpoint=endpoint, tokens=tokens, error=why)
        return LLMStreamInterrupted(f"LLM stream from {endpoint} interrupted after {tokens} token(s): {why}")

    def log_success(self, model: str, usage: dict[str, int], tokens: int | None = None) -> None:
        log.info(
            "llm_call",
            model=model,
            ms=round((time.perf_counter() - self.started) * 1000, 1),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", tokens),
            attempt=self.attempt,
            stream=self.stream,
        )

    def _log_unavailable(self, reason: str) -> None:
        log.warning(
            "llm_unavailable", endpoint=self.llm.endpoint, attempts=self.attempt, error=reason, stream=self.stream
        )


class OpenAICompatibleLLM:
    """:class:`LLM` over ``POST {base_url}/chat/completions``.

    ``timeout_s`` is a total deadline per call (all attempts and backoff sleeps together; for a stream,
    until its last event), on top of httpx's connect/read timeouts. Retries (``max_retries`` after the
    first attempt) use exponential backoff with jitter, or ``Retry-After`` when the endpoint sends one
    (capped at ``max_retry_after_s``); a retry that could not finish before the deadline is not tried.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "default",
        api_key: str = "",
        *,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 60.0,
        max_tokens: int = 256,
        max_retries: int = 2,
        temperature: float = 0.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        health_timeout_s: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise SettingsError(f"LLM base_url must start with http:// or https://, got {base_url!r}")
        if max_retries < 0 or timeout_s <= 0 or connect_timeout_s <= 0:
            raise SettingsError("LLM max_retries must be >= 0 and timeouts positive")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.temperature = temperature
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.health_timeout_s = health_timeout_s
        self.endpoint = f"{self.base_url}/chat/completions"
        headers = {"Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
            headers=headers,
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> OpenAICompatibleLLM:
        """Build from ``settings.llm_*``; an empty ``llm_base_url`` means no LLM is configured."""
        if not settings.llm_base_url:
            raise SettingsError("RAG_LLM_BASE_URL is empty: no LLM endpoint configured")
        return cls(
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            connect_timeout_s=settings.llm_connect_timeout_s,
            timeout_s=settings.llm_timeout_s,
            max_tokens=settings.llm_max_tokens,
            max_retries=settings.llm_max_retries,
            temperature=settings.llm_temperature,
            transport=transport,
        )

    # --- public ------------------------------------------------------------------------------

    async def complete(self, messages: list[dict], **options: Unpack[GenerationOptions]) -> Completion:
        """One whole answer. Raises :class:`LLMUnavailable` or :class:`LLMError`."""
        payload = self._payload(messages, options, stream=False)
        async with aclosing(self._retrying(partial(self._complete_attempt, payload), stream=False)) as results:
            return await anext(results)

    def stream(self, messages: list[dict], **options: Unpack[GenerationOptions]) -> AsyncIterator[StreamEvent]:
        """Token events as they arrive, then one ``done`` event (finish reason, usage, model).

        Failures before the first token are retried like :meth:`complete`; after it, a cut stream or
        the deadline raise :class:`LLMStreamInterrupted`. Close the iterator early with ``aclose()``
        (or ``contextlib.aclosing``) to release the connection at once.
        """
        payload = self._payload(messages, options, stream=True)
        return self._retrying(partial(self._stream_attempt, payload), stream=True)

    async def health(self) -> bool:
        """Whether ``GET {base_url}/models`` answers 200 within ``health_timeout_s``."""
        try:
            with anyio.fail_after(self.health_timeout_s):
                response = await self._client.get(f"{self.base_url}/models", timeout=self.health_timeout_s)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.info("llm_health_failed", endpoint=self.base_url, error=_describe(exc))
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> OpenAICompatibleLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- I/O: the one retry loop, and the attempt of each method ----------------------------------

    async def _retrying(self, attempt: Callable[[_Call], AsyncIterator[_T]], *, stream: bool) -> AsyncIterator[_T]:
        """What ``attempt`` yields, with the attempt retried per :class:`_Call` until it ends cleanly.

        A retryable failure (connect error, timeout, 429, 5xx, a body cut short) before anything reached
        the caller backs off and tries again; after something did, a retry would repeat it, so the call
        ends with :class:`LLMStreamInterrupted`. The deadline spent before that is :class:`LLMUnavailable`.
        Any other :class:`LLMError` (4xx, malformed answer) ends the call as it is.
        """
        call = _Call(self, stream=stream)
        while True:
            call.attempt += 1
            delivered = 0
            try:
                # aclosing: the caller's aclose() (GeneratorExit at our yield) closes the attempt at once,
                # which releases its connection.
                async with aclosing(attempt(call)) as items:
                    async for item in items:
                        delivered += 1
                        yield item
                return
            except TimeoutError as exc:  # the deadline, from anyio.fail_after around one await
                if delivered:
                    raise call.interrupted(delivered, f"no end within the {self.timeout_s}s deadline") from exc
                raise call.deadline_error() from exc
            except _RETRYABLE as exc:
                reason, retry_after = call.reason(exc)
                if delivered:
                    raise call.interrupted(delivered, reason) from exc
            await anyio.sleep(call.next_delay(reason, retry_after))

    async def _complete_attempt(self, payload: dict[str, Any], call: _Call) -> AsyncIterator[Completion]:
        """One POST read whole; yields the one completion."""
        with anyio.fail_after(call.left()):
            response = await self._client.post(self.endpoint, json=payload)
            self._check_status(response.status_code, response.headers, response.text)
            data = self._json(response.content)
        completion = self._parse_completion(data, call.started)
        call.log_success(completion.model, completion.usage)
        yield completion

    async def _stream_attempt(self, payload: dict[str, Any], call: _Call) -> AsyncIterator[StreamEvent]:
        """One POST read as server-sent events: token events, then the ``done`` event."""
        parser = _SseParser()
        tokens = 0
        response: httpx.Response | None = None
        lines: AsyncIterator[str] | None = None
        try:
            # Each await is bounded by the deadline separately: a scope must never span a yield.
            with anyio.fail_after(call.left()):
                request = self._client.build_request("POST", self.endpoint, json=payload)
                response = await self._client.send(request, stream=True)
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    self._check_status(response.status_code, response.headers, body)
            lines = response.aiter_lines()
            while not parser.finished:
                with anyio.fail_after(call.left()):
                    line = await anext(lines, None)
                for event in parser.feed(line):  # line None: end of body
                    tokens += 1
                    yield event
                if line is None:
                    break
        finally:
            # Also on the caller's aclose() (GeneratorExit): release the connection at once.
            if lines is not None:
                with anyio.CancelScope(shield=True):
                    await lines.aclose()  # type: ignore[attr-defined]
            await _close(response)
        if not parser.finished and parser.finish_reason is None:
            raise _Retryable("stream ended before [DONE]")
        model = parser.model or self.model
        call.log_success(model, parser.usage or {}, tokens)
        yield StreamEvent(kind="done", finish_reason=parser.finish_reason, usage=parser.usage, model=model)

    # --- no I/O ------------------------------------------------------------------------------

    def _payload(self, messages: list[dict], options: GenerationOptions, *, stream: bool) -> dict[str, Any]:
        unknown = options.keys() - _OPTION_NAMES
        if unknown:  # **options is not checked by Python itself
            raise TypeError(f"unexpected LLM option(s): {', '.join(sorted(unknown))}")
        max_tokens, temperature = options.get("max_tokens"), options.get("temperature")
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
            "stream": stream,
        }
        if options.get("stop"):
            payload["stop"] = list(options["stop"])
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _check_status(self, status: int, headers: httpx.Headers, body: str) -> None:
        """Which outcome an HTTP status is: 200 goes on, 429/5xx is retryable, any other is an :class:`LLMError`."""
        if status == 200:
            return
        text = _error_text(body)
        if status in _RETRY_STATUSES or status >= 500:
            raise _Retryable(f"HTTP {status}: {text}", _retry_after(headers.get("retry-after")))
        raise LLMError(f"LLM endpoint {self.endpoint} answered HTTP {status}: {text}")

    def _json(self, content: bytes) -> Any:
        try:
            return json.loads(content)
        except ValueError as exc:
            raise LLMError(
                f"LLM endpoint {self.endpoint} answered malformed JSON: {_truncate(content.decode('utf-8', 'replace'))}"
            ) from exc

    def _parse_completion(self, data: Any, started: float) -> Completion:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise LLMError(
                f"LLM endpoint {self.endpoint} answered JSON that is not a chat completion: "
                f"{_truncate(json.dumps(data))}"
            ) from exc
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason"),
            model=data.get("model") or self.model,
            usage=_usage(data.get("usage")) or {},
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )


class _SseParser:
    """Server-sent events of chat-completion chunks, line by line.

    Keeps what the final ``done`` event needs; yields token events for non-empty content deltas.
    """

    def __init__(self) -> None:
        self.data: list[str] = []
        self.finished = False  # [DONE] seen
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.model: str | None = None

    def feed(self, line: str | None) -> list[StreamEvent]:
        """One line without its newline; ``None`` at the end of the body flushes a pending event."""
        if line is None or line == "":
            return self._dispatch()
        if line.startswith(":"):
            return []  # comment / keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self.data.append(value[1:] if value.startswith(" ") else value)
        return []  # event:, id:, retry: carry nothing we use

    def _dispatch(self) -> list[StreamEvent]:
        if not self.data:
            return []
        raw = "\n".join(self.data)
        self.data = []
        if raw.strip() == "[DONE]":
            self.finished = True
            return []
        try:
            chunk = json.loads(raw)
        except ValueError as exc:
            raise LLMError(f"LLM stream sent a malformed chunk: {_truncate(raw)}") from exc
        if not isinstance(chunk, dict):
            raise LLMError(f"LLM stream sent a chunk that is not an object: {_truncate(raw)}")
        if "error" in chunk:
            raise LLMError(f"LLM stream sent an error: {_error_text(json.dumps(chunk))}")
        if chunk.get("model"):
            self.model = chunk["model"]
        usage = _usage(chunk.get("usage"))
        if usage:
            self.usage = usage
        events = []
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise LLMError(f"LLM stream sent a chunk with malformed choices: {_truncate(raw)}")
        for choice in choices[:1]:
            if not isinstance(choice, dict):
                raise LLMError(f"LLM stream sent a chunk with malformed choices: {_truncate(raw)}")
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                events.append(StreamEvent(kind="token", text=text))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events


async def _close(response: httpx.Response | None) -> None:
    if response is not None and not response.is_closed:
        with anyio.CancelScope(shield=True):
            await response.aclose()


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    usage = {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}
    return usage or None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds, fractional tolerated, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error_text(body: str) -> str:
    """The endpoint's own message when it sent an OpenAI-style error object, else the raw body; truncated."""
    try:
        data = json.loads(body)
    except ValueError:
        return _truncate(body.strip() or "(empty body)")
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _truncate(err["message"])
        if isinstance(err, str):
            return _truncate(err)
        if isinstance(data.get("detail"), str):
            return _truncate(data["detail"])
    return _truncate(body.strip())


def _truncate(text: str, limit: int = _ERROR_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
