"""The answer pipeline: retrieve → rerank → context → grounded prompt → LLM (or extractive) → citations.

A small local model must be helped, not trusted: the best-supported sentences are found first
(extractively) and every answer quotes its supporting sentence with its citation, whether an LLM
wrote the rest or not. When no LLM is configured, or it stays down, the extractive answer *is* the
answer (``mode: "extractive"``) — never a canned text.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.to_thread
import msgspec
import numpy as np
import structlog

from rag.answerability import features as answerability_features
from rag.answerability import load_model as load_answerability_model
from rag.citations import CitationCheck, verify_citations
from rag.context import Context, build_context, render_source
from rag.conversation import QueryRewriter, Rewrite
from rag.embedding import Embedder
from rag.errors import StoreError
from rag.extractive import ExtractiveAnswer, SupportingSentence, answer_from_ranked, rank_sentences
from rag.llm import LLM, LLMError, LLMStreamInterrupted
from rag.prompts import PromptSet
from rag.rerank import Reranker
from rag.sentence_vectors import stored_sentence_vectors
from rag.settings import Settings
from rag.tokens import get_encoding
from rag.types import ScoredPoint
from rag.tracing import span
from rag.vector_cache import VectorCache

log = structlog.get_logger("rag.answer")

_CITE = re.compile(r"\[(\d{1,3})\]")
# A reply that says it does not know, in the words the system prompt asks for or a model's own:
# the one definition, used by the pipeline below and by the answer evaluation (eval/answer_scoring.py).
_DONT_KNOW = re.compile(
    r"\b(i don'?t know|i do not know|not (?:mentioned|stated|provided) in the (?:sources|text|context))\b", re.I)
HISTORY_MESSAGES = 4  # earlier turns kept for a follow-up question (the model's context is small)
# The LLM sees only the best-supported sentences, not whole chunks: a 135M model loses its way in a
# long context, while the sentence ranking already finds the answer's sentence most of the time.
EVIDENCE_SENTENCES = 3


# The fallback_reason of an answer whose LLM reply said it does not know (see AnswerPipeline.finish).
REFUSED = "the LLM said it does not know"


def says_unknown(text: str) -> bool:
    """True when ``text`` says it does not know (``I don't know``, ``not stated in the sources/text/context``)."""
    return _DONT_KNOW.search(text) is not None


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
    # The answerability decision: its probability (None when RAG_ANSWERABILITY_MODEL is off and the
    # support_score threshold decides) and the model version that decided.
    answerable_probability: float | None = None
    answerability_model: str | None = None
    # Where the time went: retrieve, rerank, context (assembly + sentence ranking), llm (first token and total).
    timings: dict[str, float] = msgspec.field(default_factory=dict)
    # The query retrieval used (a follow-up made standalone) and how: "llm", "carried_terms" or "none".
    retrieval_query: str = ""
    query_rewrite: str = "none"
    # What became of each [n] of a generative reply: kept, repointed (to) or dropped (rag/citations.py).
    citation_checks: list[CitationCheck] = msgspec.field(default_factory=list)


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    """How a request ends, whichever path asked (see :meth:`AnswerPipeline.finish`)."""

    text: str
    citations: list[Citation]
    mode: Literal["generative", "extractive"]
    answerable: bool = True
    fallback_reason: str | None = None
    citation_checks: list[CitationCheck] = msgspec.field(default_factory=list)


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
    answerable_probability: float | None = None
    rewrite: Rewrite | None = None  # the standalone query retrieval used (rag/conversation.py)
    # Sentence text -> vector stored at ingest, for the context's chunks (citation checks reuse them).
    sentence_vectors: dict[str, Any] = msgspec.field(default_factory=dict)


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
                 settings: Settings, retriever_for: Callable[[str], Any] | None = None) -> None:
        self.retriever = retriever
        # The tenant's retriever (its own encoder once it adapted one); without it every tenant uses ``retriever``.
        self.retriever_for = retriever_for
        self.reranker = reranker
        self.embedder = embedder
        self.prompts = prompts
        self.llm = llm
        self.settings = settings
        self.encoding = get_encoding(settings.context_encoding)
        # Context sentences embedded once per tenant and encoder (RAG_SENTENCE_CACHE_SIZE), not at every question.
        self.sentence_cache = VectorCache(settings.sentence_cache_size)
        self._limiter: anyio.CapacityLimiter | None = None  # made on first use: it belongs to the running event loop
        # The learned answerability decision and its sentence ranking weights (rag/answerability.py); None:
        # the support_score threshold decides. A configured file that cannot be used fails here, at start.
        self.answerability = load_answerability_model(settings.answerability_model,
                                                      settings.answerability_operating_point)
        self.rewriter = QueryRewriter.from_settings(settings, llm=llm, prompts=prompts, history_messages=HISTORY_MESSAGES)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Answers past retrieval at once (RAG_ANSWER_CONCURRENCY): rerank, context and sentence ranking take the
        cores and the GIL for hundreds of milliseconds each, so more of them at once only slows every search."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.answer_concurrency)
        return self._limiter

    def _stored_vectors(self, retriever: Any, question: str, tenant: str, hits: list[ScoredPoint],
                        ctx: Context) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """What sentence ranking need not embed again: the question's vector from retrieval's query cache and the
        context sentences' vectors stored at ingest (rag/sentence_vectors.py), when the retriever's encoder is the
        one sentences are ranked with."""
        version = self.embedder.version
        if retriever.embedder.version != version:
            return None, {}
        question_vec = retriever.query_cache.lookup(version, question, namespace=tenant)
        used = {cid for source in ctx.sources for cid in source.chunk_ids}
        chunks = [(h.id, str(h.payload.get("text", ""))) for h in hits if h.id in used]
        if not self.settings.sentence_vectors or not chunks:
            return question_vec, {}
        try:
            known = stored_sentence_vectors(retriever.store, retriever.collection, tenant, chunks, version)
        except StoreError as exc:  # ranking embeds them instead: slower, same answer
            log.warning("sentence_vectors_unavailable", collection=retriever.collection, error=str(exc))
            known = {}
        return question_vec, known

    @property
    def prompt_version(self) -> str:
        return self.prompts.version

    async def prepare(self, req: AnswerRequest, tenant: str) -> Prepared:
        rewrite = await self.rewriter.rewrite(req.question.strip(), req.history)
        question = rewrite.query  # retrieval and sentence ranking use the standalone query
        t0 = time.perf_counter()
        depth = max(req.top_k, self.settings.rerank_depth)
        # One retriever for the whole request (a promotion may swap the tenant's): encoder and collection match.
        retriever = (self.retriever if self.retriever_for is None
                     else await anyio.to_thread.run_sync(self.retriever_for, tenant))
        hits = await retriever.asearch(question, tenant=tenant, top_k=depth, mode=req.mode, filter=req.filter)
        retrieve_ms = (time.perf_counter() - t0) * 1000
        model = self.answerability
        weights = model.retrieval_weights if model is not None else (0.0, 0.0)
        async with self.limiter:
            t_wait = time.perf_counter()
            with span("rerank", reranker=self.reranker.name, hits=len(hits)):
                rr = await anyio.to_thread.run_sync(
                    lambda: self.reranker.rerank(question, hits, depth=self.settings.rerank_depth,
                                                 budget_ms=self.settings.rerank_budget_ms)
                )
            top = rr.hits[: req.top_k]
            t1 = time.perf_counter()

            def context_and_rank() -> tuple[Context, list[SupportingSentence], dict[str, float] | None,
                                            dict[str, np.ndarray]]:
                # In a thread: tokenising the context and ranking its sentences must not hold the event loop.
                ctx = build_context(top, budget_tokens=self.settings.context_tokens, encoding=self.encoding)
                question_vec, known = self._stored_vectors(retriever, question, tenant, top, ctx)
                ranked = rank_sentences(question, question_vec, ctx, self.embedder, cache=self.sentence_cache,
                                        namespace=tenant, retrieval_weights=weights, known=known)
                feats = None if model is None else answerability_features(question, ctx.sources, ranked)
                return ctx, ranked, feats, known

            with span("context", chunks=len(top)):
                context, ranked, feats, known = await anyio.to_thread.run_sync(context_and_rank)
        extractive = answer_from_ranked(ranked, max_sentences=2)
        probability = None
        if model is None or feats is None:
            answerable = bool(context.sources) and extractive.best_score >= self.settings.abstain_threshold
        else:
            decision = model.decide(feats)
            probability = round(decision.probability, 4)
            answerable = bool(context.sources) and decision.answerable
        timings = {"retrieve_ms": round(retrieve_ms, 2), "queue_ms": round((t_wait - t0) * 1000 - retrieve_ms, 2),
                   "rerank_ms": round(rr.ms, 2), "context_ms": _ms(t1)}
        if rewrite.method != "none" or rewrite.error:
            timings["rewrite_ms"] = rewrite.ms
        retrieval = {
            "mode": req.mode or self.settings.search_mode, "hits": len(hits), "retrieve_ms": round(retrieve_ms, 2),
            "reranker": self.reranker.name, "reranked": rr.reranked, "rerank_ms": round(rr.ms, 2),
            "support_score": round(extractive.best_score, 4), "abstain_threshold": self.settings.abstain_threshold,
        }
        if model is not None:
            retrieval["answerability"] = {"model": model.version, "operating_point": model.operating_point,
                                          "threshold": round(model.threshold, 4), "features": feats}
        if self.settings.answer_explain:
            retrieval["explain"] = _explain(context, ranked)
        if rewrite.error:
            retrieval["rewrite_error"] = rewrite.error
        return Prepared(question=req.question.strip(), rewrite=rewrite, hits=top, context=context, extractive=extractive,
                        evidence=ranked[:EVIDENCE_SENTENCES], answerable=answerable, retrieval=retrieval,
                        sentence_vectors=known,
                        timings=timings, encoder_version=retriever.embedder.version,
                        answerable_probability=probability)

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

    def _meta(self, prep: Prepared) -> dict[str, Any]:
        """What every answer reports besides its text, on both paths (traceability: encoder and prompt)."""
        ctx = prep.context
        context = {"tokens": ctx.tokens, "sources": len(ctx.sources), "truncated": ctx.truncated,
                   "left_out": [msgspec.to_builtins(x) for x in ctx.left_out]}
        rewrite = prep.rewrite or Rewrite(query=prep.question, method="none")
        return {"encoder_version": prep.encoder_version, "prompt": self.prompt_version, "retrieval": prep.retrieval,
                "context": context, "timings": prep.timings, "answerable_probability": prep.answerable_probability,
                "answerability_model": None if self.answerability is None else self.answerability.version,
                "retrieval_query": rewrite.query, "query_rewrite": rewrite.method}

    def _no_answer(self, prep: Prepared) -> str:
        return self.prompts.no_answer.render(question=prep.question)

    def verify(self, prep: Prepared, generated: str | None, tenant: str) -> tuple[str, list[CitationCheck]] | None:
        """The reply's citations checked against their sources (rag/citations.py), when it will be the answer."""
        if generated is None or not prep.answerable or says_unknown(generated):
            return None
        return verify_citations(generated, prep.question, prep.context, self.embedder,
                                threshold=self.settings.citation_threshold, cache=self.sentence_cache,
                                namespace=tenant, known=prep.sentence_vectors)

    def finish(self, prep: Prepared, generated: str | None, *, streamed: bool,
               fallback_reason: str = "no LLM configured",
               verified: tuple[str, list[CitationCheck]] | None = None) -> Outcome:
        """How a request ends: the one finishing policy of :meth:`answer` (JSON) and :meth:`stream` (SSE).

        ``generated`` is the LLM's whole reply, or None when there is none (no LLM configured, or it
        failed before its first token: ``fallback_reason`` says which). The rules, in order:

        1. Retrieval found no support above ``abstain_threshold``: the "no answer" text, answerable false.
        2. No reply: the extractive answer (the best-supported sentences), with ``fallback_reason``.
        3. A reply that says it does not know (:func:`says_unknown`): retrieval did find support above
           the threshold (else rule 1), and a tiny model's refusal is less trustworthy than those
           sentences, so the extractive answer is the answer (mode extractive, answerable true,
           fallback_reason ``REFUSED``). JSON replaces the refusal with it. The stream path cannot:
           its tokens are with the client already and a sent SSE event cannot be taken back, so it
           *appends* the extractive answer after a blank line; citations, mode, answerable and
           fallback_reason are the same as on the JSON path.
        4. Otherwise a generative answer, grounded: its citations checked against their sources
           (``verified``, from :meth:`verify`: each ``[n]`` kept, re-pointed or dropped, reported in
           ``citation_checks``) and the supporting sentence quoted after it when it does not contain it
           (appended, so both paths can). JSON returns the corrected text; a stream has sent the
           reply's own markers already, so only its citations list and ``citation_checks`` follow the checks.

        With ``streamed`` the outcome's text always starts with ``generated`` unchanged, so the stream
        sends only ``text[len(generated):]`` more and its ``done.answer`` equals the tokens it sent.
        """
        if not prep.answerable:
            return Outcome(text=self._no_answer(prep), citations=[], mode="extractive", answerable=False)
        ex = prep.extractive
        if generated is None or says_unknown(generated):
            reason = fallback_reason if generated is None else REFUSED
            text = ex.text if generated is None or not streamed else _append(generated, ex.text)
            return Outcome(text=text, citations=citations_for(prep.context, [s.n for s in ex.sentences]),
                           mode="extractive", fallback_reason=reason)
        checked, checks = verified if verified is not None else (generated, [])
        text = generated if streamed else checked.strip()
        quote = ex.sentences[0] if ex.sentences else None
        if quote is not None and quote.text not in text:
            cite = f"[{quote.n}]"
            text = _append(text, f'"{quote.text}" {cite}') if text.strip() else f"{text}{quote.text} {cite}"
        cited = cited_numbers(text, prep.context)
        if streamed and verified is not None:  # the sent markers stand; the citations follow the checks
            added = cited_numbers(text[len(generated):], prep.context)
            cited = [c.to for c in checks if c.to is not None] + added
        return Outcome(text=text, citations=citations_for(prep.context, cited), mode="generative",
                       citation_checks=checks)

    async def answer(self, req: AnswerRequest, tenant: str) -> Answer:
        started = time.perf_counter()
        prep = await self.prepare(req, tenant)
        generated, usage, model, why = None, {}, None, "no LLM configured"
        if prep.answerable and self.llm is not None:
            t_llm = time.perf_counter()
            try:
                with span("llm", model=str(getattr(self.llm, "model", ""))):
                    done = await self.llm.complete(self._messages(prep, req.history))
            except LLMError as exc:
                why = f"LLM failed: {exc.message}"
                log.warning("answer_llm_fallback", error=exc.message)
            else:
                prep.timings["llm_ms"] = _ms(t_llm)
                generated, usage, model = done.text, done.usage, done.model
        verified = await anyio.to_thread.run_sync(self.verify, prep, generated, tenant)
        out = self.finish(prep, generated, streamed=False, fallback_reason=why, verified=verified)
        usage = _with_rewrite(usage, prep)
        return Answer(answer=out.text, citations=out.citations, mode=out.mode, answerable=out.answerable,
                      usage=usage, model=model, fallback_reason=out.fallback_reason, latency_ms=_ms(started),
                      citation_checks=out.citation_checks, **self._meta(prep))

    async def stream(self, req: AnswerRequest, tenant: str) -> AsyncIterator[tuple[str, Any]]:
        """Events: ("token", {"text"}) …, ("citations", [..]), ("done", {...}); or ("error", {...}).

        The tokens, joined, are the whole answer (``done.answer``); how it ends is :meth:`finish`'s
        policy, the same as :meth:`answer`'s except that sent tokens are never taken back.
        """
        started = time.perf_counter()
        prep = await self.prepare(req, tenant)
        generated, usage, model, why = None, {}, None, "no LLM configured"
        if prep.answerable and self.llm is not None:
            pieces: list[str] = []
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
            except LLMError as exc:
                if pieces or isinstance(exc, LLMStreamInterrupted):
                    # Part of an answer is with the client and cannot be finished or replaced.
                    log.warning("answer_stream_interrupted", error=exc.message, tokens=len(pieces))
                    yield "error", {"code": exc.code, "message": exc.message}
                    return
                why = f"LLM failed: {exc.message}"
                log.warning("answer_llm_fallback", error=exc.message)
            else:
                prep.timings["llm_ms"] = _ms(t_llm)
                generated = "".join(pieces)
        verified = await anyio.to_thread.run_sync(self.verify, prep, generated, tenant)
        out = self.finish(prep, generated, streamed=True, fallback_reason=why, verified=verified)
        rest = out.text[len(generated or ""):]  # finish(streamed=True) only appends to what was sent
        if rest:
            yield "token", {"text": rest}
        yield "citations", [msgspec.to_builtins(c) for c in out.citations]
        usage = _with_rewrite(usage, prep)
        yield "done", {"mode": out.mode, "answerable": out.answerable, "usage": usage, "model": model,
                       "answer": out.text, "fallback_reason": out.fallback_reason, "latency_ms": _ms(started),
                       "citation_checks": [msgspec.to_builtins(c) for c in out.citation_checks], **self._meta(prep)}


def _append(text: str, more: str) -> str:
    """``more`` after ``text`` with a blank line between; ``text`` itself never changes (it may be sent already)."""
    return f"{text}\n\n{more}" if text.strip() else f"{text}{more}"


def _explain(context: Context, ranked: Sequence[SupportingSentence]) -> dict[str, Any]:
    """Every source and ranked sentence with its score parts (RAG_ANSWER_EXPLAIN): what ``python -m eval
    calibrate`` re-ranks and re-featurises offline to choose the sentence ranking weights and train the model."""
    return {"sources": [{"n": s.n, "score": s.score, "text": s.text} for s in context.sources],
            "sentences": [{"n": s.n, "start": s.start, "end": s.end, "cosine": s.cosine,
                           "lexical": s.lexical} for s in ranked]}


def _with_rewrite(usage: dict[str, int], prep: Prepared) -> dict[str, int]:
    """The answer's LLM tokens plus those of the follow-up's LLM rewrite, if any (the quota counts both)."""
    extra = prep.rewrite.usage if prep.rewrite is not None else {}
    if not extra:
        return usage
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {**usage, **{k: int(usage.get(k) or 0) + int(extra.get(k) or 0) for k in keys}}


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
