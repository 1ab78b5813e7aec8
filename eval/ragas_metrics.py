"""ragas answer metrics over the rows of ``python -m eval answers`` — the only module that imports ragas.

Offline, always: semantic similarity of the answer to the gold answer with our encoder, Levenshtein
string similarity, and ragas' non-LLM context precision and recall of the cited sources against the
gold paragraph. With a judge (any OpenAI-compatible endpoint): answer correctness and faithfulness.

Population: every ragas metric covers the *answered answerable* questions (an abstention has no answer
to score and no cited context); the context metrics further need at least one citation. The report
states each metric's population and count. A metric that fails on a question is ``None`` there, with its
reason; it never stops the run.

ragas and langchain are imported inside functions, so ``python -m eval --help`` stays fast and the rest
of the harness works without the ``eval`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "rag-eval/ragas/1"
POPULATION = "answered answerable questions"
CONTEXT_POPULATION = "answered answerable questions with at least one citation"

# name -> (population, what it compares)
OFFLINE_METRICS: dict[str, tuple[str, str]] = {
    "semantic_similarity": (POPULATION,
                            "cosine of encoder vectors: answer (citation marks stripped) vs first gold answer"),
    "string_similarity": (POPULATION, "1 - normalised Levenshtein distance: answer vs first gold answer"),
    "context_precision": (CONTEXT_POPULATION,
                          "non-LLM, cited source texts in order vs the gold paragraph (similarity >= 0.5)"),
    "context_recall": (CONTEXT_POPULATION,
                       "non-LLM, gold paragraph found among the cited source texts (similarity > 0.5)"),
}
JUDGE_METRICS: dict[str, tuple[str, str]] = {
    "answer_correctness": (POPULATION,
                           "LLM judge: factual overlap with the first gold answer (+ 0.25 semantic similarity)"),
    "faithfulness": (CONTEXT_POPULATION, "LLM judge: share of the answer's claims supported by the cited sources"),
}
_CITE_MARK = re.compile(r"\[\d{1,3}\]")
_TAG = re.compile(r"</?[a-z_]+(?: [a-z_]+=\"[^\"]*\")*>")


def _quiet_ragas() -> None:
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")


@dataclass(frozen=True)
class JudgeConfig:
    """An OpenAI-compatible chat endpoint used as the judge LLM (base URL including ``/v1``)."""

    url: str
    model: str = "default"
    api_key: str = ""
    timeout_s: float = 120.0
    limit: int = 0  # judge only the first N questions of the population (0: all)
    concurrency: int = 2
    max_consecutive_failures: int = 5  # then the endpoint is taken as down and the rest is skipped

    @classmethod
    def from_args(cls, args) -> JudgeConfig | None:
        """From ``--judge-*`` flags, else ``EVAL_JUDGE_URL``, ``EVAL_JUDGE_MODEL``, ``EVAL_JUDGE_API_KEY``."""
        url = getattr(args, "judge_url", None) or os.environ.get("EVAL_JUDGE_URL", "")
        if not url:
            return None
        return cls(url=url.rstrip("/"),
                   model=getattr(args, "judge_model", None) or os.environ.get("EVAL_JUDGE_MODEL", "default"),
                   api_key=getattr(args, "judge_api_key", None) or os.environ.get("EVAL_JUDGE_API_KEY", ""),
                   timeout_s=getattr(args, "judge_timeout", None) or 120.0,
                   limit=getattr(args, "judge_limit", 0) or 0)


@dataclass
class Item:
    """One answered answerable question, as ragas sees it."""

    id: str
    question: str
    answer: str
    reference: str
    retrieved_contexts: list[str]
    reference_contexts: list[str]


@dataclass
class MetricScores:
    values: dict[str, float | None] = field(default_factory=dict)  # id -> score
    errors: dict[str, str] = field(default_factory=dict)  # id -> reason


def items_from(pairs: Sequence[tuple[Any, dict[str, Any]]]) -> list[Item]:
    """Answered answerable questions of ``(QAExample, /v1/answer response)`` pairs."""
    out = []
    for ex, resp in pairs:
        if ex.is_impossible or "error" in resp or not resp.get("answerable"):
            continue
        answer = " ".join(_CITE_MARK.sub(" ", resp.get("answer", "")).split())
        out.append(Item(id=ex.id, question=ex.question, answer=answer, reference=ex.answer or (ex.answers or ("",))[0],
                        retrieved_contexts=[c.get("text", "") for c in resp.get("citations") or [] if c.get("text")],
                        reference_contexts=[c for c in ex.contexts if c]))
    return out


def sample_of(item: Item):
    """The ragas ``SingleTurnSample`` of one item."""
    _quiet_ragas()
    from ragas import SingleTurnSample

    return SingleTurnSample(user_input=item.question, response=item.answer, reference=item.reference,
                            retrieved_contexts=item.retrieved_contexts or None,
                            reference_contexts=item.reference_contexts or None)


def encoder_embeddings(embedder):
    """A ragas embedding (``BaseRagasEmbedding``) over one of our ``Embedder``\\ s; ``prime(texts)`` encodes
    a batch up front so that ragas' one-text-at-a-time calls are look-ups."""
    _quiet_ragas()
    from ragas.embeddings.base import BaseRagasEmbedding

    class EncoderEmbedding(BaseRagasEmbedding):
        def __init__(self) -> None:
            super().__init__()
            self.embedder = embedder
            self._cache: dict[str, list[float]] = {}

        def prime(self, texts: Sequence[str]) -> None:
            todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if todo:
                for text, vec in zip(todo, embedder.embed_documents(todo), strict=True):
                    self._cache[text] = vec.tolist()

        def embed_text(self, text: str, **kwargs: Any) -> list[float]:
            if text not in self._cache:
                self.prime([text])
            return self._cache[text]

        async def aembed_text(self, text: str, **kwargs: Any) -> list[float]:
            if text in self._cache:
                return self._cache[text]
            return await asyncio.to_thread(self.embed_text, text)

        def embed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
            self.prime(texts)
            return [self._cache[t] for t in texts]

        async def aembed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
            return await asyncio.to_thread(self.embed_texts, texts)

    return EncoderEmbedding()


def judge_llm(judge: JudgeConfig):
    """ragas' instructor LLM (JSON mode) over an ``AsyncOpenAI`` client pointed at the judge's base URL."""
    _quiet_ragas()
    from openai import AsyncOpenAI
    from ragas.llms import llm_factory

    # Retries are ours to decide: one try per call, a bounded time, no silent 3x backoff per question.
    client = AsyncOpenAI(base_url=judge.url, api_key=judge.api_key or "not-needed", timeout=judge.timeout_s,
                         max_retries=0)
    return llm_factory(judge.model, provider="openai", client=client, max_retries=1, temperature=0.0)


def _reason(exc: BaseException) -> str:
    # instructor wraps the last error in XML-ish tags; keep the words
    text = " ".join(_TAG.sub(" ", str(exc)).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:300]


async def _score_each(items: Sequence[Item], score: Callable[[Item], Any], *, timeout_s: float | None,
                      concurrency: int = 1, max_consecutive_failures: int = 0) -> MetricScores:
    """Run ``score(item)`` (a coroutine giving a float) per item; failures become None with a reason."""
    out = MetricScores()
    sem = asyncio.Semaphore(max(1, concurrency))
    streak = [0]

    async def one(item: Item) -> None:
        async with sem:
            if max_consecutive_failures and streak[0] >= max_consecutive_failures:
                out.values[item.id] = None
                out.errors[item.id] = f"skipped: {streak[0]} consecutive failures before it"
                return
            try:
                value = await asyncio.wait_for(score(item), timeout=timeout_s)
            except TimeoutError:
                out.values[item.id], out.errors[item.id] = None, f"TimeoutError: no score within {timeout_s:g}s"
                streak[0] += 1
            except Exception as exc:  # noqa: BLE001 - any library error is one metric's failure, reported as such
                out.values[item.id], out.errors[item.id] = None, _reason(exc)
                streak[0] += 1
            else:
                value = None if value is None or math.isnan(float(value)) else round(float(value), 6)
                out.values[item.id] = value
                if value is None:
                    out.errors[item.id] = "ragas returned no score (NaN)"
                streak[0] = 0

    await asyncio.gather(*(one(it) for it in items))
    return out


def _legacy_context_metrics():
    """ragas' non-LLM context precision/recall: in 0.4.3 they exist only as the legacy ``SingleTurnSample``
    metrics (``ragas.metrics.collections`` has LLM versions only), reached through a deprecated alias."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from ragas.metrics import NonLLMContextPrecisionWithReference, NonLLMContextRecall
    return NonLLMContextPrecisionWithReference(), NonLLMContextRecall()


async def _offline(items: Sequence[Item], embedder) -> dict[str, MetricScores]:
    from ragas.metrics.collections import NonLLMStringSimilarity, SemanticSimilarity

    embeddings = encoder_embeddings(embedder)
    await asyncio.to_thread(embeddings.prime, [t for it in items for t in (it.answer or " ", it.reference or " ")])
    semantic = SemanticSimilarity(embeddings=embeddings)
    strings = NonLLMStringSimilarity()
    precision, recall = _legacy_context_metrics()
    with_ctx = [it for it in items if it.retrieved_contexts and it.reference_contexts]

    async def sem(it: Item) -> float:
        return (await semantic.ascore(reference=it.reference, response=it.answer)).value

    async def lev(it: Item) -> float:
        return (await strings.ascore(reference=it.reference, response=it.answer)).value

    return {
        "semantic_similarity": await _score_each(items, sem, timeout_s=None),
        "string_similarity": await _score_each(items, lev, timeout_s=None),
        "context_precision": await _score_each(with_ctx, lambda it: precision.single_turn_ascore(sample_of(it)),
                                               timeout_s=None),
        "context_recall": await _score_each(with_ctx, lambda it: recall.single_turn_ascore(sample_of(it)),
                                            timeout_s=None),
    }


async def _judged(items: Sequence[Item], embedder, judge: JudgeConfig) -> dict[str, MetricScores]:
    from ragas.metrics.collections import AnswerCorrectness, Faithfulness

    # instructor logs every failed attempt; the report keeps each failure's reason instead
    logging.getLogger("instructor").setLevel(logging.CRITICAL)
    llm = judge_llm(judge)
    embeddings = encoder_embeddings(embedder)
    correctness = AnswerCorrectness(llm=llm, embeddings=embeddings)
    faithfulness = Faithfulness(llm=llm)
    pool = list(items[: judge.limit] if judge.limit else items)
    with_ctx = [it for it in pool if it.retrieved_contexts]

    async def corr(it: Item) -> float:
        s = sample_of(it)
        return (await correctness.ascore(user_input=s.user_input, response=s.response, reference=s.reference)).value

    async def faith(it: Item) -> float:
        s = sample_of(it)
        return (await faithfulness.ascore(user_input=s.user_input, response=s.response,
                                          retrieved_contexts=s.retrieved_contexts)).value

    opts = {"timeout_s": judge.timeout_s * 4, "concurrency": judge.concurrency,
            "max_consecutive_failures": judge.max_consecutive_failures}
    return {"answer_correctness": await _score_each(pool, corr, **opts),
            "faithfulness": await _score_each(with_ctx, faith, **opts)}


def _aggregate(name: str, scores: MetricScores, described: tuple[str, str]) -> dict[str, Any]:
    values = [v for v in scores.values.values() if v is not None]
    reasons: dict[str, int] = {}
    for r in scores.errors.values():
        key = r.split(":")[0] if r.startswith("skipped") else r[:160]
        reasons[key] = reasons.get(key, 0) + 1
    return {"mean": sum(values) / len(values) if values else None, "scored": len(values),
            "failed": len(scores.errors), "population": described[0], "compares": described[1],
            "failure_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])}


def ragas_version() -> str:
    _quiet_ragas()
    import ragas

    return ragas.__version__


def evaluate_answers(pairs: Sequence[tuple[Any, dict[str, Any]]], *, embedder, judge: JudgeConfig | None = None,
                     encoder_version: str = "") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """ragas metrics for ``(QAExample, response)`` pairs: ``(section for report.json, {row id: per-row scores})``.

    Offline metrics always; ``answer_correctness`` and ``faithfulness`` only with a ``judge``. Per-row
    scores are ``{"metric": value or None, "errors": {"metric": reason}}``.
    """
    _quiet_ragas()
    items = items_from(pairs)
    t0 = time.perf_counter()
    scores = asyncio.run(_offline(items, embedder))
    offline_s = time.perf_counter() - t0
    judged: dict[str, MetricScores] = {}
    judge_s = 0.0
    if judge is not None:
        t1 = time.perf_counter()
        judged = asyncio.run(_judged(items, embedder, judge))
        judge_s = time.perf_counter() - t1
    metrics = {name: _aggregate(name, s, OFFLINE_METRICS[name]) for name, s in scores.items()}
    metrics |= {name: _aggregate(name, s, JUDGE_METRICS[name]) for name, s in judged.items()}
    section = {
        "schema": SCHEMA, "ragas_version": ragas_version(), "population_size": len(items),
        "similarity_encoder": encoder_version or getattr(embedder, "version", ""),
        "judge": None if judge is None else {"url": judge.url, "model": judge.model, "timeout_s": judge.timeout_s,
                                             "limit": judge.limit},
        "judge_metrics": "computed" if judge is not None else
                         "skipped: no judge configured (--judge-url or EVAL_JUDGE_URL)",
        "metrics": metrics, "seconds": {"offline": round(offline_s, 1), "judge": round(judge_s, 1)},
    }
    per_row: dict[str, dict[str, Any]] = {}
    for name, s in {**scores, **judged}.items():
        for rid, value in s.values.items():
            row = per_row.setdefault(rid, {})
            row[name] = value
            if rid in s.errors:
                row.setdefault("errors", {})[name] = s.errors[rid]
    return section, per_row
