"""Answer endpoints: ``POST /v1/answer`` (JSON or Server-Sent Events) and an OpenAI-compatible
``POST /v1/chat/completions`` so existing chat frontends and OpenAI SDKs work as they are."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog
from litestar import Request, Response, post
from litestar.response import Stream

from rag.api.errors import error_responses
from rag.answer import AnswerPipeline, AnswerRequest
from rag.errors import BadRequest, RagError
from rag.store import parse_filter

log = structlog.get_logger("rag.api.answers")


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(msgspec.Struct, kw_only=True):
    """OpenAI's request shape; fields an SDK may send that we don't use are accepted and ignored."""

    messages: list[ChatMessage]
    model: str | None = None
    stream: bool = False
    # RAG extensions (optional): how to retrieve.
    top_k: int = 8
    filter: dict[str, Any] | None = None
    mode: str | None = None


def _pipeline(request: Request) -> AnswerPipeline:
    return request.app.state.services.answers


def _check(request: Request, question: str, top_k: int, filter: dict[str, Any] | None) -> None:
    """Everything that can be wrong with a request, checked before a stream starts: once the 200 and the first
    event have gone out, a bad filter could only end the stream, not become a 400."""
    settings = request.app.state.services.settings
    parse_filter(filter)
    if not question.strip():
        raise BadRequest("question must not be empty", code="empty_question")
    if len(question) > settings.max_query_chars:
        raise BadRequest(f"question is {len(question)} characters; the limit is {settings.max_query_chars}",
                         code="query_too_long")
    if not 1 <= top_k <= settings.max_top_k:
        raise BadRequest(f"top_k must be between 1 and {settings.max_top_k}", code="invalid_top_k")


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@post("/v1/answer", status_code=200, summary="Answer a question from the documents, with citations",
      responses=error_responses(415))
async def answer(request: Request, data: AnswerRequest) -> Response:
    """JSON ``{answer, citations, mode, answerable, usage, encoder_version, prompt}``; with
    ``stream: true``, Server-Sent Events: ``token`` …, ``citations``, then ``done`` (or ``error``)."""
    from rag.api.app import tenant_of

    tenant = tenant_of(request)
    _check(request, data.question, data.top_k, data.filter)
    pipeline = _pipeline(request)
    if not data.stream:
        result = await pipeline.answer(data, tenant)
        log.info("answered", mode=result.mode, answerable=result.answerable, prompt=result.prompt,
                 encoder_version=result.encoder_version, ms=result.latency_ms)
        return Response(result)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event, payload in pipeline.stream(data, tenant):
                yield _sse(event, payload)
        except RagError as exc:
            yield _sse("error", {"code": exc.code, "message": exc.message})

    return Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


@post("/v1/chat/completions", status_code=200, summary="OpenAI-compatible chat over the documents",
      responses=error_responses(415))
async def chat_completions(request: Request, data: ChatRequest) -> Response:
    """The last user message is the question; earlier turns are history. Citations travel in the
    extra ``citations`` field of the response (or of the final stream chunk)."""
    from rag.api.app import tenant_of

    tenant = tenant_of(request)
    users = [i for i, m in enumerate(data.messages) if m.role == "user"]
    if not users:
        raise BadRequest("messages must contain a user message", code="no_question")
    last = users[-1]
    question = _text(data.messages[last].content)
    history = [{"role": m.role, "content": _text(m.content)} for m in data.messages[:last] if m.role in ("user", "assistant")]
    if data.mode not in (None, "dense", "sparse", "hybrid"):
        raise BadRequest("mode must be dense, sparse or hybrid", code="invalid_mode")
    _check(request, question, data.top_k, data.filter)
    req = AnswerRequest(question=question, top_k=data.top_k, filter=data.filter, mode=data.mode, history=history)
    pipeline = _pipeline(request)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = data.model or "rag"

    if not data.stream:
        result = await pipeline.answer(req, tenant)
        usage = {"prompt_tokens": result.usage.get("prompt_tokens", 0),
                 "completion_tokens": result.usage.get("completion_tokens", 0),
                 "total_tokens": result.usage.get("total_tokens", 0)}
        return Response({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage,
            "citations": [msgspec.to_builtins(c) for c in result.citations],
            "rag": {"mode": result.mode, "answerable": result.answerable, "prompt": result.prompt,
                    "encoder_version": result.encoder_version, "fallback_reason": result.fallback_reason},
        })

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        citations: list[Any] = []
        try:
            async for event, payload in pipeline.stream(req, tenant):
                if event == "token":
                    yield chunk({"content": payload["text"]})
                elif event == "citations":
                    citations = payload
                elif event == "done":
                    rag = {k: payload.get(k) for k in ("mode", "answerable", "prompt", "encoder_version", "fallback_reason")}
                    yield chunk({}, "stop", citations=citations, rag=rag)
                elif event == "error":
                    yield f"data: {json.dumps({'error': payload})}\n\n".encode()
                    return
        except RagError as exc:
            yield f"data: {json.dumps({'error': {'code': exc.code, 'message': exc.message}})}\n\n".encode()
            return
        yield b"data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
