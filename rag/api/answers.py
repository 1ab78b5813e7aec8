"""Answer endpoints: ``POST /v1/answer`` (JSON or Server-Sent Events) and an OpenAI-compatible
``POST /v1/chat/completions`` so existing chat frontends and OpenAI SDKs work as they are."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Response, post
from litestar.response import Stream

from rag.answer import AnswerRequest
from rag.api.deps import Caller, access, check_query
from rag.errors import BadRequest, RagError
from rag.quotas import check_llm_tokens
from rag.services import Services

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


async def _check_llm_quota(svc: Services, caller: Caller) -> None:
    if svc.answers is not None and svc.answers.llm is not None:  # extractive answers spend no LLM tokens
        await anyio.to_thread.run_sync(check_llm_tokens, svc.registry, svc.settings, caller.tenant)


async def _count_llm_tokens(svc: Services, caller: Caller, usage: dict[str, Any]) -> None:
    svc.metrics.llm_tokens.labels(direction="in").inc(int(usage.get("prompt_tokens") or 0))
    svc.metrics.llm_tokens.labels(direction="out").inc(int(usage.get("completion_tokens") or 0))
    tokens = int(usage.get("total_tokens") or 0)
    if tokens:
        await anyio.to_thread.run_sync(svc.registry.add_llm_tokens, caller.tenant, tokens)


def _observe(svc: Services, mode: str, timings: dict[str, Any]) -> None:
    svc.metrics.answers.labels(mode=mode).inc()
    svc.metrics.stages_from_timings(timings)


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


@post("/v1/answer", status_code=200, summary="Answer a question from the documents, with citations", **access("read", 413, 415))
async def answer(data: AnswerRequest, svc: Services, caller: Caller) -> Response:
    """JSON ``{answer, citations, mode, answerable, usage, encoder_version, prompt}``; with
    ``stream: true``, Server-Sent Events: ``token`` …, ``citations``, then ``done`` (or ``error``)."""
    check_query(svc.settings, data.question, data.top_k, data.filter, what="question")
    await _check_llm_quota(svc, caller)
    pipeline = svc.answers
    if not data.stream:
        result = await pipeline.answer(data, caller.tenant)
        await _count_llm_tokens(svc, caller, result.usage)
        _observe(svc, result.mode, result.timings)
        log.info("answered", mode=result.mode, answerable=result.answerable, prompt=result.prompt,
                 encoder_version=result.encoder_version, ms=result.latency_ms)
        return Response(result)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event, payload in pipeline.stream(data, caller.tenant):
                if event == "done":
                    await _count_llm_tokens(svc, caller, payload.get("usage") or {})
                    _observe(svc, str(payload.get("mode", "")), payload.get("timings") or {})
                yield _sse(event, payload)
        except RagError as exc:
            svc.metrics.llm_errors.labels(kind=exc.code).inc()
            yield _sse("error", {"code": exc.code, "message": exc.message})

    return Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


@post("/v1/chat/completions", status_code=200, summary="OpenAI-compatible chat over the documents", **access("read", 413, 415))
async def chat_completions(data: ChatRequest, svc: Services, caller: Caller) -> Response:
    """The last user message is the question; earlier turns are history (a follow-up is made
    standalone for retrieval: ``rag.retrieval_query``, ``rag.query_rewrite``). Citations travel in the
    extra ``citations`` field of the response (or of the final stream chunk)."""
    users = [i for i, m in enumerate(data.messages) if m.role == "user"]
    if not users:
        raise BadRequest("messages must contain a user message", code="no_question")
    last = users[-1]
    question = _text(data.messages[last].content)
    history = [{"role": m.role, "content": _text(m.content)} for m in data.messages[:last] if m.role in ("user", "assistant")]
    if data.mode not in (None, "dense", "sparse", "hybrid"):
        raise BadRequest("mode must be dense, sparse or hybrid", code="invalid_mode")
    check_query(svc.settings, question, data.top_k, data.filter, what="question")
    await _check_llm_quota(svc, caller)
    req = AnswerRequest(question=question, top_k=data.top_k, filter=data.filter, mode=data.mode, history=history)
    pipeline = svc.answers
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = data.model or "rag"

    if not data.stream:
        result = await pipeline.answer(req, caller.tenant)
        await _count_llm_tokens(svc, caller, result.usage)
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
                    "encoder_version": result.encoder_version, "fallback_reason": result.fallback_reason,
                    "retrieval_query": result.retrieval_query, "query_rewrite": result.query_rewrite,
                    "citation_checks": [msgspec.to_builtins(c) for c in result.citation_checks]},
        })

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        citations: list[Any] = []
        try:
            async for event, payload in pipeline.stream(req, caller.tenant):
                if event == "token":
                    yield chunk({"content": payload["text"]})
                elif event == "citations":
                    citations = payload
                elif event == "done":
                    await _count_llm_tokens(svc, caller, payload.get("usage") or {})
                    rag = {k: payload.get(k) for k in ("mode", "answerable", "prompt", "encoder_version", "fallback_reason",
                                                       "retrieval_query", "query_rewrite", "citation_checks")}
                    yield chunk({}, "stop", citations=citations, rag=rag)
                elif event == "error":
                    yield f"data: {json.dumps({'error': payload})}\n\n".encode()
                    return
        except RagError as exc:
            yield f"data: {json.dumps({'error': {'code': exc.code, 'message': exc.message}})}\n\n".encode()
            return
        yield b"data: [DONE]\n\n"

    return Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


ROUTES = [answer, chat_completions]
