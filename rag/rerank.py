"""Rerankers: the ``Reranker`` protocol, a no-op default and a sentence-transformers CrossEncoder.

No cross-encoder weights ship offline, so the default is the no-op (hybrid fusion order). A user
who has weights points ``RAG_RERANKER_MODEL`` at a folder or hub name.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import msgspec
import structlog

from rag.errors import ModelError
from rag.types import ScoredPoint

log = structlog.get_logger("rag.rerank")


class RerankResult(msgspec.Struct, kw_only=True):
    hits: list[ScoredPoint]
    reranked: bool  # False when the reranker is a no-op or its latency budget ran out
    ms: float = 0.0
    reason: str = ""


class Reranker(Protocol):
    name: str

    def rerank(self, query: str, hits: Sequence[ScoredPoint], *, depth: int, budget_ms: float) -> RerankResult: ...


class NoopReranker:
    """Keeps the retrieval (fusion) order."""

    name = "none"

    def rerank(self, query: str, hits: Sequence[ScoredPoint], *, depth: int, budget_ms: float) -> RerankResult:
        return RerankResult(hits=list(hits), reranked=False, reason="no reranker configured")


class CrossEncoderReranker:
    """Scores (query, chunk) pairs with a CrossEncoder; returns the fused order when over budget.

    Pairs are scored in small batches and the budget is checked between batches, so an overrun
    costs at most one batch; the hits beyond ``depth`` keep their fused order after the reranked ones.
    """

    def __init__(self, model: str, *, device: str = "cpu", batch_size: int = 8, max_length: int = 256) -> None:
        from sentence_transformers import CrossEncoder

        try:
            self._model = CrossEncoder(model, device=device, max_length=max_length)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load cross-encoder {model!r}: {exc}") from exc
        self.name = f"cross-encoder:{os.path.basename(os.path.normpath(model)) or model}"
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def rerank(self, query: str, hits: Sequence[ScoredPoint], *, depth: int, budget_ms: float) -> RerankResult:
        started = time.perf_counter()
        head, tail = list(hits[:depth]), list(hits[depth:])
        scores: list[float] = []
        with self._lock:
            for start in range(0, len(head), self.batch_size):
                elapsed = (time.perf_counter() - started) * 1000
                if elapsed > budget_ms:
                    log.warning("rerank_budget_exceeded", ms=round(elapsed, 1), budget_ms=budget_ms, scored=len(scores))
                    return RerankResult(hits=list(hits), reranked=False, ms=elapsed, reason="latency budget exceeded")
                batch = head[start : start + self.batch_size]
                pairs = [(query, h.payload.get("text", "")) for h in batch]
                scores += [float(s) for s in self._model.predict(pairs, show_progress_bar=False)]
        elapsed = (time.perf_counter() - started) * 1000
        if elapsed > budget_ms:
            log.warning("rerank_budget_exceeded", ms=round(elapsed, 1), budget_ms=budget_ms, scored=len(scores))
            return RerankResult(hits=list(hits), reranked=False, ms=elapsed, reason="latency budget exceeded")
        order = sorted(range(len(head)), key=lambda i: -scores[i])
        reranked = [
            ScoredPoint(id=head[i].id, score=scores[i], payload={**head[i].payload, "fusion_score": head[i].score})
            for i in order
        ]
        return RerankResult(hits=reranked + tail, reranked=True, ms=elapsed)


def load_reranker(settings) -> Reranker:
    """The configured reranker (``RAG_RERANKER_MODEL``), or the no-op when none is set."""
    if not settings.reranker_model:
        return NoopReranker()
    return CrossEncoderReranker(settings.reranker_model, device=settings.encoder_device)
