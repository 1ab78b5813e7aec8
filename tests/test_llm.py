"""The LLM client against a real HTTP server that injects faults (tests/llm_server.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from rag.errors import RagError, SettingsError
from rag.llm import (
    LLM,
    Completion,
    LLMError,
    LLMStreamInterrupted,
    LLMUnavailable,
    OpenAICompatibleLLM,
    StreamEvent,
    _SseParser,
)
from rag.settings import Settings
from tests.llm_server import (
    DEFAULT_REPLY,
    FakeLLMServer,
    cut_stream,
    malformed_chunk,
    malformed_json,
    ok,
    run_fake_llm,
    silent,
    sleep,
    status,
    trickle,
    words,
)

MESSAGES = [
    {"role": "system", "content": "Answer from the context."},
    {"role": "user", "content": "What is the answer?"},
]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with run_fake_llm() as s:
        yield s


def make_llm(base_url: str, **overrides) -> OpenAICompatibleLLM:
    options = dict(
        model="test-model",
        api_key="sk-test",
        connect_timeout_s=0.5,
        timeout_s=2.0,
        max_tokens=64,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
    )
    options.update(overrides)
    return OpenAICompatibleLLM(base_url, **options)


async def collect(llm: OpenAICompatibleLLM, tokens: list[str] | None = None, **kw) -> list[StreamEvent]:
    """All events of a stream; token texts also go to ``tokens`` as they arrive (kept when it raises)."""
    events = []
    async for event in llm.stream(MESSAGES, **kw):
        events.append(event)
        if tokens is not None and event.kind == "token":
            tokens.append(event.text)
    return events


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- success ------------------------------------------------------------------------------------


async def test_complete_returns_text_usage_model(server: FakeLLMServer) -> None:
    async with make_llm(server.base_url) as llm:
        assert isinstance(llm, LLM)
        result = await llm.complete(MESSAGES, max_tokens=32, temperature=0.5, stop=["\n\n"])
    assert isinstance(result, Completion)
    assert result.text == DEFAULT_REPLY
    assert result.finish_reason == "stop"
    assert result.model == "test-model"
    assert result.usage["completion_tokens"] == len(words(DEFAULT_REPLY))
    assert result.usage["total_tokens"] == result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    assert result.latency_ms > 0
    sent = server.requests[0]
    assert sent["messages"] == MESSAGES
    assert (sent["max_tokens"], sent["temperature"], sent["stop"], sent["stream"]) == (32, 0.5, ["\n\n"], False)
    assert server.headers[0]["authorization"] == "Bearer sk-test"
    assert server.count == 1


async def test_complete_uses_configured_defaults(server: FakeLLMServer) -> None:
    async with make_llm(server.base_url, max_tokens=7, temperature=0.2) as llm:
        await llm.complete(MESSAGES)
    sent = server.requests[0]
    assert (sent["model"], sent["max_tokens"], sent["temperature"]) == ("test-model", 7, 0.2)
    assert "stop" not in sent


async def test_stream_tokens_concatenate_to_reply_and_done_carries_usage(server: FakeLLMServer) -> None:
    async with make_llm(server.base_url) as llm:
        events = await collect(llm)
    tokens = [e for e in events if e.kind == "token"]
    assert "".join(e.text for e in tokens) == DEFAULT_REPLY
    assert len(tokens) == len(words(DEFAULT_REPLY))  # word by word, role-only chunk skipped
    done = events[-1]
    assert done.kind == "done" and [e.kind for e in events].count("done") == 1
    assert done.finish_reason == "stop"
    assert done.model == "test-model"
    assert done.usage is not None and done.usage["completion_tokens"] == len(tokens)
    assert server.requests[0]["stream"] is True
    assert server.requests[0]["stream_options"] == {"include_usage": True}


async def test_stream_without_usage_chunk_still_finishes(server: FakeLLMServer) -> None:
    server.script(ok("short answer", usage=False))
    async with make_llm(server.base_url) as llm:
        events = await collect(llm)
    assert "".join(e.text for e in events if e.kind == "token") == "short answer"
    assert events[-1].kind == "done" and events[-1].usage is None and events[-1].finish_reason == "stop"


async def test_reply_can_depend_on_the_request() -> None:
    with run_fake_llm(reply=lambda body: body["messages"][-1]["content"].upper()) as server:
        async with make_llm(server.base_url) as llm:
            assert (await llm.complete(MESSAGES)).text == "WHAT IS THE ANSWER?"


# --- retries -------------------------------------------------------------------------------------


async def test_429_with_retry_after_is_honoured_then_succeeds(server: FakeLLMServer) -> None:
    server.script(status(429, retry_after="0.3"))
    async with make_llm(server.base_url) as llm:
        started = time.monotonic()
        result = await llm.complete(MESSAGES)
        elapsed = time.monotonic() - started
    assert result.text == DEFAULT_REPLY
    assert server.count == 2
    assert 0.3 <= elapsed < 1.5  # backoff alone would be ~0.01 s


async def test_retry_after_is_capped(server: FakeLLMServer) -> None:
    server.script(status(429, retry_after="100"))
    async with make_llm(server.base_url, max_retry_after_s=0.05) as llm:
        started = time.monotonic()
        await llm.complete(MESSAGES)
    assert time.monotonic() - started < 1.0
    assert server.count == 2


async def test_retry_after_beyond_the_deadline_fails_at_once(server: FakeLLMServer) -> None:
    server.script(status(429, retry_after="10"))
    async with make_llm(server.base_url, timeout_s=1.0) as llm:
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="429"):
            await llm.complete(MESSAGES)
    assert time.monotonic() - started < 0.5
    assert server.count == 1


async def test_500_twice_then_success(server: FakeLLMServer) -> None:
    server.script(status(500), status(500))
    async with make_llm(server.base_url, max_retries=2) as llm:
        result = await llm.complete(MESSAGES)
    assert result.text == DEFAULT_REPLY
    assert server.count == 3


async def test_stream_retries_500_before_first_token(server: FakeLLMServer) -> None:
    server.script(status(500), status(502))
    async with make_llm(server.base_url) as llm:
        events = await collect(llm)
    assert "".join(e.text for e in events if e.kind == "token") == DEFAULT_REPLY
    assert server.count == 3


async def test_stream_cut_before_any_token_is_retried(server: FakeLLMServer) -> None:
    server.script(cut_stream(after_tokens=0))
    async with make_llm(server.base_url) as llm:
        events = await collect(llm)
    assert "".join(e.text for e in events if e.kind == "token") == DEFAULT_REPLY
    assert server.count == 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_503_forever_gives_llm_unavailable_after_all_attempts(streaming: bool) -> None:
    with run_fake_llm(default=status(503, {"error": {"message": "server overloaded"}})) as server:
        async with make_llm(server.base_url, max_retries=3) as llm:
            started = time.monotonic()
            with pytest.raises(LLMUnavailable) as info:
                await (collect(llm) if streaming else llm.complete(MESSAGES))
            elapsed = time.monotonic() - started
        assert server.count == 4  # max_retries + 1
    assert elapsed < 1.5
    err = info.value
    assert (err.status_code, err.code) == (503, "llm_unavailable")
    assert server.base_url in err.message and "503" in err.message and "server overloaded" in err.message


async def test_no_retries_when_max_retries_is_zero() -> None:
    with run_fake_llm(default=status(500)) as server:
        async with make_llm(server.base_url, max_retries=0) as llm:
            with pytest.raises(LLMUnavailable, match="after 1 attempt"):
                await llm.complete(MESSAGES)
        assert server.count == 1


# --- timeouts and silent servers -----------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
async def test_slow_server_times_out_with_llm_unavailable(server: FakeLLMServer, streaming: bool) -> None:
    server.script(sleep(5))
    async with make_llm(server.base_url, timeout_s=0.5) as llm:
        started = time.monotonic()
        with pytest.raises(LLMUnavailable, match="within 0.5s"):
            await (collect(llm) if streaming else llm.complete(MESSAGES))
    assert time.monotonic() - started < 1.5
    assert server.count == 1


@pytest.mark.parametrize("streaming", [False, True])
async def test_silent_server_fails_within_the_deadline(streaming: bool) -> None:
    with run_fake_llm(default=silent()) as server:
        async with make_llm(server.base_url, timeout_s=0.5) as llm:
            started = time.monotonic()
            with pytest.raises(LLMUnavailable):
                await (collect(llm) if streaming else llm.complete(MESSAGES))
        assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("streaming", [False, True])
async def test_trickling_server_cannot_outlive_the_deadline(streaming: bool) -> None:
    # Bytes keep arriving, so httpx's read timeout never fires; only the total deadline stops it.
    with run_fake_llm(default=trickle(0.05)) as server:
        async with make_llm(server.base_url, timeout_s=0.6) as llm:
            started = time.monotonic()
            with pytest.raises(LLMUnavailable):
                await (collect(llm) if streaming else llm.complete(MESSAGES))
        assert time.monotonic() - started < 1.5


async def test_deadline_after_tokens_interrupts_the_stream(server: FakeLLMServer) -> None:
    server.script(ok("one two three four five six seven eight", token_delay_s=0.15))
    tokens: list[str] = []
    async with make_llm(server.base_url, timeout_s=0.5) as llm:
        started = time.monotonic()
        with pytest.raises(LLMStreamInterrupted, match="deadline"):
            await collect(llm, tokens)
    assert time.monotonic() - started < 1.5
    assert 1 <= len(tokens) < 8


async def test_connection_refused_gives_llm_unavailable() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    async with make_llm(url) as llm:
        started = time.monotonic()
        with pytest.raises(LLMUnavailable) as info:
            await llm.complete(MESSAGES)
        with pytest.raises(LLMUnavailable):
            await collect(llm)
    assert time.monotonic() - started < 2.0
    assert url in info.value.message and "ConnectError" in info.value.message
    assert "3 attempt" in info.value.message


# --- errors that are not retried -----------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
async def test_400_gives_llm_error_without_retry(server: FakeLLMServer, streaming: bool) -> None:
    server.script(status(400, {"error": {"message": "context length 9000 exceeds 2048", "type": "invalid_request"}}))
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError) as info:
            await (collect(llm) if streaming else llm.complete(MESSAGES))
    assert type(info.value) is LLMError
    assert (info.value.status_code, info.value.code) == (502, "llm_error")
    assert "HTTP 400" in info.value.message and "context length 9000 exceeds 2048" in info.value.message
    assert server.base_url in info.value.message
    assert server.count == 1


async def test_error_text_is_truncated(server: FakeLLMServer) -> None:
    server.script(status(404, "x" * 5000))
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError) as info:
            await llm.complete(MESSAGES)
    assert "HTTP 404" in info.value.message and len(info.value.message) < 500


async def test_malformed_json_gives_llm_error(server: FakeLLMServer) -> None:
    server.script(malformed_json())
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError, match="malformed JSON") as info:
            await llm.complete(MESSAGES)
    assert type(info.value) is LLMError
    assert server.count == 1


async def test_json_that_is_not_a_completion_gives_llm_error(server: FakeLLMServer) -> None:
    server.script(status(200, {"object": "list", "data": []}))
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError, match="not a chat completion"):
            await llm.complete(MESSAGES)


async def test_malformed_stream_chunk_gives_llm_error(server: FakeLLMServer) -> None:
    server.script(malformed_chunk(after_tokens=2))
    tokens: list[str] = []
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError, match="malformed chunk") as info:
            await collect(llm, tokens)
    assert type(info.value) is LLMError
    assert tokens == words(DEFAULT_REPLY)[:2]
    assert server.count == 1


async def test_malformed_first_stream_chunk_gives_llm_error(server: FakeLLMServer) -> None:
    server.script(malformed_json())
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError, match="malformed chunk"):
            await collect(llm)
    assert server.count == 1


async def test_error_object_inside_a_stream_gives_llm_error(server: FakeLLMServer) -> None:
    server.script(status(200, "data: {\"error\": {\"message\": \"kv cache full\"}}\n\n"))
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMError, match="kv cache full"):
            await collect(llm)


# --- interrupted streams -------------------------------------------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["socket-dropped", "body-ended"])
async def test_cut_stream_after_tokens_raises_interrupted(server: FakeLLMServer, clean: bool) -> None:
    server.script(cut_stream(after_tokens=3, clean=clean))
    tokens: list[str] = []
    async with make_llm(server.base_url) as llm:
        with pytest.raises(LLMStreamInterrupted) as info:
            await collect(llm, tokens)
    assert tokens == words(DEFAULT_REPLY)[:3]  # what came before the cut reached the caller
    assert (info.value.status_code, info.value.code) == (502, "llm_stream_interrupted")
    assert "after 3 token" in info.value.message
    assert server.count == 1  # never retried once tokens were out


async def test_caller_can_stop_a_stream_early(server: FakeLLMServer) -> None:
    server.script(ok(token_delay_s=0.05))
    async with make_llm(server.base_url) as llm:
        stream = llm.stream(MESSAGES)
        first = await anext(stream)
        await stream.aclose()
        assert first.kind == "token"
        assert (await llm.complete(MESSAGES)).text == DEFAULT_REPLY  # the client is still usable


# --- health, settings, errors --------------------------------------------------------------------


async def test_health(server: FakeLLMServer) -> None:
    async with make_llm(server.base_url) as llm:
        assert await llm.health() is True
        server.healthy = False
        assert await llm.health() is False
    assert server.health_requests == 2
    async with make_llm(f"http://127.0.0.1:{closed_port()}/v1") as down:
        assert await down.health() is False


async def test_health_of_a_silent_host_is_bounded() -> None:
    with socket.socket() as sock:  # the kernel accepts connections; nobody ever answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        async with make_llm(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", health_timeout_s=0.3) as llm:
            started = time.monotonic()
            assert await llm.health() is False
            assert time.monotonic() - started < 1.0


def test_from_settings() -> None:
    settings = Settings(
        llm_base_url="http://127.0.0.1:8081/v1/",
        llm_model="smollm2",
        llm_timeout_s=12.0,
        llm_max_retries=4,
        llm_max_tokens=99,
        llm_temperature=0.3,
    )
    llm = OpenAICompatibleLLM.from_settings(settings)
    assert llm.endpoint == "http://127.0.0.1:8081/v1/chat/completions"
    assert (llm.model, llm.timeout_s, llm.max_retries, llm.max_tokens, llm.temperature) == (
        "smollm2", 12.0, 4, 99, 0.3
    )
    with pytest.raises(SettingsError, match="RAG_LLM_BASE_URL"):
        OpenAICompatibleLLM.from_settings(Settings())


def test_error_tree() -> None:
    for cls, status_code, code in [
        (LLMError, 502, "llm_error"),
        (LLMUnavailable, 503, "llm_unavailable"),
        (LLMStreamInterrupted, 502, "llm_stream_interrupted"),
    ]:
        err = cls("x")
        assert isinstance(err, RagError) and isinstance(err, LLMError)
        assert (err.status_code, err.code) == (status_code, code)


def test_sse_parser_tolerates_comments_fields_and_multiline_data() -> None:
    parser = _SseParser()
    lines = [
        ": keep-alive",
        "event: message",
        "id: 1",
        'data: {"model": "m", "choices": [{"delta": {"role": "assistant"}}]}',
        "",
        'data: {"choices": [{"delta": {"content": "He"}}]}',
        "",
        'data: {"choices": [{"delta": ',
        'data: {"content": "llo"}, "finish_reason": "length"}]}',
        "",
        'data:{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}',
        "",
        "data: [DONE]",
        "",
    ]
    events = [e for line in lines for e in parser.feed(line)]
    assert [e.text for e in events] == ["He", "llo"]
    assert parser.finished and parser.finish_reason == "length" and parser.model == "m"
    assert parser.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_llm_errors_live_in_the_one_error_tree() -> None:
    import rag.errors
    import rag.llm

    for name in ("LLMError", "LLMUnavailable", "LLMStreamInterrupted"):
        assert getattr(rag.llm, name) is getattr(rag.errors, name)


async def test_unknown_option_is_refused(server: FakeLLMServer) -> None:
    async with make_llm(server.base_url) as llm:
        with pytest.raises(TypeError, match="top_p"):
            await llm.complete(MESSAGES, top_p=0.9)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="top_p"):
            llm.stream(MESSAGES, top_p=0.9)  # type: ignore[call-arg]
    assert server.count == 0
