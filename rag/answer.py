"""The answer pipeline: retrieve → rerank → context → grounded prompt → LLM (or extractive) → citations.

A small local model must be helped, not trusted: the best-supported sentences are found first
(extractively) and every answer quotes its supporting sentence with its citation, whether an LLM
wrote the rest or not. When no LLM is configured, or it stays down, the extractive answer *is* the
answer (``mode: "extractive"``) — never a canned text.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import anyio.to_thread
import msgspec
import structlog

from rag.context import Context, build_context, render_source
from rag.embedding import Embedder
from rag.extractive import ExtractiveAnswer, SupportingSentence, answer_from_ranked, rank_sentences
from rag.llm import LLM, LLMError, LLMStreamInterrupted
from rag.prompts import PromptSet
from rag.rerank import Reranker
from rag.settings import Settings
from rag.tokens import get_encoding
from rag.types import ScoredPoint

log = structlog.get_logger("rag.answer")

_CITE = re.compile(r"\[(\d{1,3})\]")
_DONT_KNOW = re.compile(r"\b(i don'?t know|i do not know|not (?:mentioned|stated|provided) in the sources)\b", re.I)
HISTORY_MESSAGES = 4  # earlier turns kept for a follow-up question (the model's context is small)
# The LLM sees only the best-supported sentences, not whole chunks: a 135M model loses its way in a
# long context, while the sentence ranking already finds the answer's sentence most of the time.
EVIDENCE_SENTENCES = 3


class Citation(msgspec.Struct, kw_only=True):
    n: int
    document_id: str
    chunk_id: str
    title: str
    text: str
    offsets: tuple[int, int]
    score: float
    source: str = ""


class AnswerRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    question: str
    top_k: int = 8
    filter: dict[str, Any] | None = None
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    stream: bool = False
    history: list[dict[str, str]] = msgspec.field(default_factory=list)


class Answer(msgspec.Struct, kw_only=True):
    answer: str
    citations: list[Citation]
    mode: Literal["generative", "extractive"]
    answerable: bool
    usage: dict[str, int]
    encoder_version: str
    prompt: str
    model: str | None = None
    retrieval: dict[str, Any] = msgspec.field(default_factory=dict)
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    fallback_reason: str | None = None
    latency_ms: float = 0.0
    # Where the time went: retrieve, rerank, context (assembly + sentence ranking), llm (first token and total).
    timings: dict[str, float] = msgspec.field(default_factory=dict)


class Prepared(msgspec.Struct, kw_only=True):
    """Everything decided before generation."""

    question: str
    hits: list[ScoredPoint]
    context: Context
    extractive: ExtractiveAnswer
    evidence: list[SupportingSentence]
    answerable: bool
    retrieval: dict[str, Any]
    timings: dict[str, float]
    encoder_version: str = ""  # of the retriever that served this question (one encoder per request)


def citations_for(context: Context, numbers: Sequence[int]) -> list[Citation]:
    by_n = {s.n: s for s in context.sources}
    out = []
    for n in dict.fromkeys(numbers):
        s = by_n.get(n)
        if s is not None:
            out.append(Citation(n=n, document_id=s.document_id, chunk_id=s.chunk_ids[0], title=s.title, text=s.text,
                                offsets=(s.start, s.end), score=s.score, source=s.source))
    return out


def cited_numbers(text: str, context: Context) -> list[int]:
    valid = {s.n for s in context.sources}
    return [n for n in (int(m) for m in _CITE.findall(text)) if n in valid]


class AnswerPipeline:
    """Owns the answer path's components; ``answer`` and ``stream`` share ``prepare``."""

    def __init__(self, *, retriever, reranker: Reranker, embedder: Embedder, prompts: PromptSet, llm: LLM | None,
                 settings: Settings) -> None:
        self.retriever = retriever
        self.reranker = reranker
        self.embedder = embedder
        self.prompts = prompts
        self.llm = llm
        self.settings = settings
        self.encoding = get_encoding(settings.context_encoding)

    @property
    def prompt_version(self) -> str:
        return self.prompts.version

    async def prepare(self, req: AnswerRequest, tenant: str) -> Prepared:
        question = req.question.strip()
        t0 = time.perf_counter()
        depth = max(req.top_k, self.settings.rerank_depth)
        retriever = self.retriever  # a promotion may swap it; this request keeps the one it started with
        hits = await retriever.asearch(question, tenant=tenant, top_k=depth, mode=req.mode, filter=req.filter)
        retrieve_ms = (time.perf_counter() - t0) * 1000
        rr = await anyio.to_thread.run_sync(
            lambda: self.reranker.rerank(question, hits, depth=self.settings.rerank_depth,
                                         budget_ms=self.settings.rerank_budget_ms)
        )
        top = rr.hits[: req.top_k]
        t1 = time.perf_counter()
        context = build_context(top, budget_tokens=self.settings.context_tokens, encoding=self.encoding)
        ranked = await anyio.to_thread.run_sync(lambda: rank_sentences(question, None, context, self.embedder))
        extractive = answer_from_ranked(ranked, max_sentences=2)
        answerable = bool(context.sources) and extractive.best_score >= self.settings.abstain_threshold
        timings = {"retrieve_ms": round(retrieve_ms, 2), "rerank_ms": round(rr.ms, 2), "context_ms": _ms(t1)}
        retrieval = {
            "mode": req.mode or self.settings.search_mode, "hits": len(hits), "retrieve_ms": round(retrieve_ms, 2),
            "reranker": self.reranker.name, "reranked": rr.reranked, "rerank_ms": round(rr.ms, 2),
            "support_score": round(extractive.best_score, 4), "abstain_threshold": self.settings.abstain_threshold,
        }
        return Prepared(question=question, hits=top, context=context, extractive=extractive,
                        evidence=ranked[:EVIDENCE_SENTENCES], answerable=answerable, retrieval=retrieval,
                        timings=timings, encoder_version=retriever.embedder.version)

    def _messages(self, prep: Prepared, history: list[dict[str, str]]) -> list[dict[str, str]]:
        by_n = {s.n: s for s in prep.context.sources}
        grouped: dict[int, list[str]] = {}
        for sentence in prep.evidence:
            grouped.setdefault(sentence.n, []).append(sentence.text)
        sources = "".join(render_source(n, by_n[n].title, by_n[n].source, " … ".join(texts)) for n, texts in grouped.items())
        evidence = " ".join(f"{s.text} [{s.n}]" for s in prep.evidence)
        messages = self.prompts.answer_messages(question=prep.question, sources=sources, evidence=evidence)
        turns = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")][-HISTORY_MESSAGES:]
        return [messages[0], *turns, *messages[1:]]

    def _context_info(self, prep: Prepared) -> dict[str, Any]:
        return {"tokens": prep.context.tokens, "sources": len(prep.context.sources), "truncated": prep.context.truncated,
                "left_out": [msgspec.to_builtins(x) for x in prep.context.left_out]}

    def _no_answer(self, prep: Prepared) -> str:
        return self.prompts.no_answer.render(question=prep.question)

    def _finish(self, prep: Prepared, generated: str) -> tuple[str, list[Citation]]:
        """Ground a generated answer: keep its valid citations and quote the supporting sentence."""
        text = generated.strip()
        quote = prep.extractive.sentences[0] if prep.extractive.sentences else None
        if quote is not None and quote.text not in text:
            text = f'{text}\n\n"{quote.text}" [{quote.n}]' if text else f"{quote.text} [{quote.n}]"
        numbers = cited_numbers(text, prep.context)
        return text, citations_for(prep.context, numbers)

    def _extractive(self, prep: Prepared) -> tuple[str, list[Citation]]:
        ex = prep.extractive
        return ex.text, citations_for(prep.context, [s.n for s in ex.sentences])

    async def answer(self, req: AnswerRequest, tenant: str) -> Answer:
        started = time.perf_counter()
        prep = await self.prepare(req, tenant)
        common = {"encoder_version": prep.encoder_version, "prompt": self.prompt_version,
                  "retrieval": prep.retrieval, "context": self._context_info(prep), "timings": prep.timings}
        if not prep.answerable:
            return Answer(answer=self._no_answer(prep), citations=[], mode="extractive", answerable=False,
                          usage={}, latency_ms=_ms(started), **common)
        fallback = "no LLM configured"
        if self.llm is not None:
            t_llm = time.perf_counter()
            try:
                done = await self.llm.complete(self._messages(prep, req.history))
            except LLMError as exc:
                fallback = f"LLM failed: {exc.message}"
                log.warning("answer_llm_fallback", error=exc.message)
            else:
                prep.timings["llm_ms"] = _ms(t_llm)
                if _DONT_KNOW.search(done.text):
                    # Retrieval found support above the threshold; a tiny model's refusal is less
                    # trustworthy than the best-supported sentences, which are returned instead.
                    fallback = "the LLM said it does not know"
                    text, cites = self._extractive(prep)
                    return Answer(answer=text, citations=cites, mode="extractive", answerable=True, usage=done.usage,
                                  model=done.model, fallback_reason=fallback, latency_ms=_ms(started), **common)
                text, cites = self._finish(prep, done.text)
                return Answer(answer=text, citations=cites, mode="generative", answerable=True, usage=done.usage,
                              model=done.model, latency_ms=_ms(started), **common)
        text, cites = self._extractive(prep)
        return Answer(answer=text, citations=cites, mode="extractive", answerable=True, usage={},
                      fallback_reason=fallback, latency_ms=_ms(started), **common)

    async def stream(self, req: AnswerRequest, tenant: str) -> AsyncIterator[tuple[str, Any]]:
        """Events: ("token", {"text"}) …, ("citations", [..]), ("done", {...}); or ("error", {...})."""
        started = time.perf_counter()
        prep = await self.prepare(req, tenant)
        meta = {"encoder_version": prep.encoder_version, "prompt": self.prompt_version,
                "retrieval": prep.retrieval, "context": self._context_info(prep), "timings": prep.timings}
        if not prep.answerable:
            yield "token", {"text": self._no_answer(prep)}
            yield "citations", []
            yield "done", {"mode": "extractive", "answerable": False, "usage": {}, "latency_ms": _ms(started), **meta}
            return
        fallback = "no LLM configured"
        if self.llm is not None:
            pieces: list[str] = []
            usage: dict[str, int] = {}
            model = None
            t_llm = time.perf_counter()
            try:
                async for ev in self.llm.stream(self._messages(prep, req.history)):
                    if ev.kind == "token":
                        if not pieces:
                            prep.timings["llm_first_token_ms"] = _ms(t_llm)
                        pieces.append(ev.text)
                        yield "token", {"text": ev.text}
                    else:
                        usage, model = ev.usage or {}, ev.model
            except LLMStreamInterrupted as exc:
                log.warning("answer_stream_interrupted", error=exc.message, tokens=len(pieces))
                yield "error", {"code": exc.code, "message": exc.message}
                return
            except LLMError as exc:
                if pieces:  # defensive: any failure after tokens went out is an error event
                    yield "error", {"code": exc.code, "message": exc.message}
                    return
                fallback = f"LLM failed: {exc.message}"
                log.warning("answer_llm_fallback", error=exc.message)
            else:
                prep.timings["llm_ms"] = _ms(t_llm)
                generated = "".join(pieces)
                text, cites = self._finish(prep, generated)
                if text != generated.strip():
                    yield "token", {"text": text[len(generated.strip()):] if text.startswith(generated.strip()) else "\n\n" + text}
                yield "citations", [msgspec.to_builtins(c) for c in cites]
                yield "done", {"mode": "generative", "answerable": True, "usage": usage, "model": model,
                               "answer": text, "latency_ms": _ms(started), **meta}
                return
        text, cites = self._extractive(prep)
        yield "token", {"text": text}
        yield "citations", [msgspec.to_builtins(c) for c in cites]
        yield "done", {"mode": "extractive", "answerable": True, "usage": {}, "answer": text,
                       "fallback_reason": fallback, "latency_ms": _ms(started), **meta}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
