"""The ``LLM`` seam: chat completions from any OpenAI-compatible endpoint over ``httpx.AsyncClient``.

llama.cpp's ``llama-server``, vLLM, Ollama and OpenAI all serve ``POST {base_url}/chat/completions``
(``base_url`` includes ``/v1``). :class:`OpenAICompatibleLLM` adds what a service needs around it:
retries with backoff on transient failures (only before the first token reaches the caller), a total
deadline per call so nothing can hang, and one error per failure mode:

- :class:`LLMUnavailable` (503): connect errors, timeouts, 429 and 5xx, once retries or time run out;
- :class:`LLMError` (502): the endpoint refused the request (4xx) or answered something unreadable;
- :class:`LLMStreamInterrupted` (502): a stream stopped after tokens were delivered.

``LLMUnavailable`` and ``LLMStreamInterrupted`` subclass ``LLMError``, so ``except LLMError`` catches
every LLM failure.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import anyio
import httpx
import msgspec

from rag.errors import RagError, SettingsError
from rag.logs import get_logger

if TYPE_CHECKING:
    from rag.settings import Settings

__all__ = [
    "LLM",
    "Completion",
    "LLMError",
    "LLMStreamInterrupted",
    "LLMUnavailable",
    "OpenAICompatibleLLM",
    "StreamEvent",
]

log = get_logger(__name__)

_ERROR_TEXT_CHARS = 300
_RETRY_STATUSES = frozenset({429})  # plus every 5xx


class LLMError(RagError):
    """The endpoint refused the request or answered something that is not a chat completion."""

    status_code = 502
    code = "llm_error"


class LLMUnavailable(LLMError):
    """The endpoint could not be reached or stayed overloaded/slow through every retry."""

    status_code = 503
    code = "llm_unavailable"


class LLMStreamInterrupted(LLMError):
    """A stream stopped (connection cut, deadline) after tokens had been delivered to the caller."""

    status_code = 502
    code = "llm_stream_interrupted"


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

    async def complete(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> Completion: ...

    def stream(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[StreamEvent]: ...

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

    async def complete(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """One whole answer. Raises :class:`LLMUnavailable` or :class:`LLMError`."""
        payload = self._payload(messages, max_tokens, temperature, stop, stream=False)
        started = time.perf_counter()
        deadline = anyio.current_time() + self.timeout_s
        attempt = 0
        last = "no attempt made"
        while True:
            attempt += 1
            try:
                with anyio.fail_after(_left(deadline)):
                    response = await self._client.post(self.endpoint, json=payload)
                    self._check_status(response.status_code, response.headers, response.text)
                    data = self._json(response.content)
            except _Retryable as exc:
                last = exc.reason
                await self._backoff(attempt, exc.retry_after, deadline, last, stream=False)
                continue
            except _TRANSIENT as exc:
                last = _describe(exc)
                await self._backoff(attempt, None, deadline, last, stream=False)
                continue
            except TimeoutError as exc:
                raise self._deadline_error(attempt, last) from exc
            completion = self._parse_completion(data, started)
            self._log_call(completion.model, completion.usage, started, attempt, stream=False)
            return completion

    async def stream(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Token events as they arrive, then one ``done`` event (finish reason, usage, model).

        Failures before the first token are retried like :meth:`complete`; after it, a cut stream or
        the deadline raise :class:`LLMStreamInterrupted`. Close the iterator early with ``aclose()``
        (or ``contextlib.aclosing``) to release the connection at once.
        """
        payload = self._payload(messages, max_tokens, temperature, stop, stream=True)
        started = time.perf_counter()
        deadline = anyio.current_time() + self.timeout_s
        attempt = 0
        last = "no attempt made"
        while True:
            attempt += 1
            parser = _SseParser()
            tokens = 0
            response: httpx.Response | None = None
            lines: AsyncIterator[str] | None = None
            try:
                # Each await is bounded by the deadline separately: a scope must never span a yield.
                with anyio.fail_after(_left(deadline)):
                    request = self._client.build_request("POST", self.endpoint, json=payload)
                    response = await self._client.send(request, stream=True)
                    if response.status_code != 200:
                        body = (await response.aread()).decode("utf-8", "replace")
                        self._check_status(response.status_code, response.headers, body)
                lines = response.aiter_lines()
                while not parser.finished:
                    with anyio.fail_after(_left(deadline)):
                        line = await anext(lines, None)
                    events = parser.feed(line)  # None: end of body
                    for event in events:
                        if event.kind == "token":
                            tokens += 1
                        yield event
                    if line is None:
                        break
            except _Retryable as exc:
                last = exc.reason
                await _close(response)
                await self._backoff(attempt, exc.retry_after, deadline, last, stream=True)
                continue
            except LLMError:
                await _close(response)
                raise
            except _TRANSIENT as exc:
                await _close(response)
                last = _describe(exc)
                if tokens:
                    raise self._interrupted(tokens, last) from exc
                await self._backoff(attempt, None, deadline, last, stream=True)
                continue
            except TimeoutError as exc:
                await _close(response)
                if tokens:
                    raise self._interrupted(tokens, f"no end within the {self.timeout_s}s deadline") from exc
                raise self._deadline_error(attempt, last) from exc
            finally:
                # Also on the caller's aclose() (GeneratorExit): release the connection at once.
                if lines is not None:
                    with anyio.CancelScope(shield=True):
                        await lines.aclose()  # type: ignore[attr-defined]
                await _close(response)
            if parser.finished or parser.finish_reason is not None:
                usage = parser.usage or {}
                self._log_call(parser.model or self.model, usage, started, attempt, stream=True, tokens=tokens)
                yield StreamEvent(
                    kind="done",
                    finish_reason=parser.finish_reason,
                    usage=parser.usage,
                    model=parser.model or self.model,
                )
                return
            # The body ended without [DONE] or a finish_reason.
            last = "stream ended before [DONE]"
            if tokens:
                raise self._interrupted(tokens, last)
            await self._backoff(attempt, None, deadline, last, stream=True)

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

    # --- private -----------------------------------------------------------------------------

    def _payload(
        self,
        messages: list[dict],
        max_tokens: int | None,
        temperature: float | None,
        stop: Sequence[str] | None,
        *,
        stream: bool,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
            "stream": stream,
        }
        if stop:
            payload["stop"] = list(stop)
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _check_status(self, status: int, headers: httpx.Headers, body: str) -> None:
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

    async def _backoff(
        self, attempt: int, retry_after: float | None, deadline: float, last: str, *, stream: bool
    ) -> None:
        """Sleep before the next attempt, or raise :class:`LLMUnavailable` when none is left."""
        if attempt > self.max_retries:
            log.warning("llm_unavailable", endpoint=self.endpoint, attempts=attempt, error=last, stream=stream)
            raise LLMUnavailable(f"LLM endpoint {self.endpoint} unavailable after {attempt} attempt(s): {last}")
        if retry_after is not None:
            delay = min(retry_after, self.max_retry_after_s)
        else:
            # Exponential with "equal jitter": at least half the step, so retries still spread out.
            step = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
            delay = step / 2 + random.uniform(0, step / 2)
        if anyio.current_time() + delay >= deadline:
            log.warning("llm_unavailable", endpoint=self.endpoint, attempts=attempt, error=last, stream=stream)
            raise LLMUnavailable(
                f"LLM endpoint {self.endpoint} unavailable: no time left for a retry within {self.timeout_s}s "
                f"after {attempt} attempt(s): {last}"
            )
        log.warning("llm_retry", endpoint=self.endpoint, attempt=attempt, error=last, delay_s=round(delay, 3))
        await anyio.sleep(delay)

    def _deadline_error(self, attempt: int, last: str) -> LLMUnavailable:
        log.warning(
            "llm_unavailable", endpoint=self.endpoint, attempts=attempt, error="deadline", timeout_s=self.timeout_s
        )
        previous = f"; earlier: {last}" if attempt > 1 else ""
        return LLMUnavailable(
            f"LLM endpoint {self.endpoint} gave no complete answer within {self.timeout_s}s "
            f"(attempt {attempt}){previous}"
        )

    def _interrupted(self, tokens: int, why: str) -> LLMStreamInterrupted:
        log.warning("llm_stream_interrupted", endpoint=self.endpoint, tokens=tokens, error=why)
        return LLMStreamInterrupted(f"LLM stream from {self.endpoint} interrupted after {tokens} token(s): {why}")

    def _log_call(
        self,
        model: str,
        usage: dict[str, int],
        started: float,
        attempt: int,
        *,
        stream: bool,
        tokens: int | None = None,
    ) -> None:
        log.info(
            "llm_call",
            model=model,
            ms=round((time.perf_counter() - started) * 1000, 1),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens", tokens),
            attempt=attempt,
            stream=stream,
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


def _left(deadline: float) -> float:
    return max(0.0, deadline - anyio.current_time())


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
