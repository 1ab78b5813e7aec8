"""Retrieval evaluation over many queries: means, bootstrap intervals and metric-vs-k curves.

The per-query metrics (nDCG, recall, precision, MRR, with trec_eval's definitions and tie order)
live in :mod:`rag.ir_metrics`, shared with the encoder gate of an adaptation; they are re-exported
here as the harness's public surface.

Ties: a run gives each document a score; documents are ranked by score descending and equal
scores by document id descending (byte order), which is exactly how trec_eval orders a run,
so the numbers equal pytrec_eval's for the same run whatever order the retriever listed ties in.

Queries: a query without qrels cannot be scored; it is skipped and counted (``skipped``). A
query with qrels but nothing retrieved scores 0 on every metric (it stays in the mean, like
``trec_eval -c``). A query whose qrels hold no grade above 0 scores 0, as in pytrec_eval; it is
counted in ``no_relevant`` so a report can say so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rag.ir_metrics import (
    FAMILIES,
    METRIC_FUNCTIONS,
    Qrels,
    Run,
    metric_at,
    mrr_at_k,
    ndcg_at_k,
    parse_metric,
    precision_at_k,
    rank,
    recall_at_k,
)

__all__ = [
    "CURVE_KS",
    "DEFAULT_METRICS",
    "MetricSummary",
    "bootstrap_ci",
    "evaluate",
    "metric_at",
    "mrr_at_k",
    "ndcg_at_k",
    "paired_bootstrap_ci",
    "parse_metric",
    "precision_at_k",
    "rank",
    "recall_at_k",
]

DEFAULT_METRICS = ("ndcg@10", "recall@10", "recall@100", "mrr@10", "p@1", "p@5", "p@10")
CURVE_KS = (1, 3, 5, 10, 20, 50, 100)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over queries (resampled with replacement, fixed seed)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(resamples, arr.size))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Interval of mean(b - a) over the same queries, resampling queries jointly."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return bootstrap_ci(diff, resamples=resamples, confidence=confidence, seed=seed)


@dataclass(slots=True)
class MetricSummary:
    """Means over the scored queries, their bootstrap intervals, and the per-query values."""

    metrics: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_query: dict[str, dict[str, float]]  # query id -> metric -> value
    curves: dict[str, dict[int, float]]  # family -> k -> mean (for the metric-vs-k plot)
    evaluated: int
    skipped: list[str] = field(default_factory=list)  # queries without qrels
    no_relevant: list[str] = field(default_factory=list)  # qrels present, no grade above 0
    no_results: list[str] = field(default_factory=list)  # nothing retrieved


def evaluate(
    runs: Mapping[str, Run],
    qrels: Mapping[str, Qrels],
    *,
    metrics: Iterable[str] = DEFAULT_METRICS,
    curve_ks: Iterable[int] = CURVE_KS,
    resamples: int = 1000,
    seed: int = 0,
) -> MetricSummary:
    """Score every query of ``runs`` (query id -> {doc id: score} or [(doc id, score)]) against ``qrels``."""
    names = list(dict.fromkeys(metrics))
    for n in names:
        parse_metric(n)
    ks = sorted(set(curve_ks))
    per_query: dict[str, dict[str, float]] = {}
    curve_values: dict[str, dict[int, list[float]]] = {f: {k: [] for k in ks} for f in FAMILIES}
    skipped: list[str] = []
    no_relevant: list[str] = []
    no_results: list[str] = []
    for qid, run in runs.items():
        judged = qrels.get(qid)
        if not judged:
            skipped.append(qid)
            continue
        ranking = rank(run)
        if not ranking:
            no_results.append(qid)
        if not any(g > 0 for g in judged.values()):
            no_relevant.append(qid)
        per_query[qid] = {n: metric_at(n, ranking, judged) for n in names}
        for family in FAMILIES:
            for k in ks:
                curve_values[family][k].append(METRIC_FUNCTIONS[family](ranking, judged, k))
    means: dict[str, float] = {}
    cis: dict[str, tuple[float, float]] = {}
    for n in names:
        values = [pq[n] for pq in per_query.values()]
        means[n] = float(np.mean(values)) if values else math.nan
        cis[n] = bootstrap_ci(values, resamples=resamples, seed=seed)
    curves = {f: {k: (float(np.mean(v)) if v else math.nan) for k, v in by_k.items()} for f, by_k in curve_values.items()}
    return MetricSummary(
        metrics=means, ci=cis, per_query=per_query, curves=curves, evaluated=len(per_query),
        skipped=skipped, no_relevant=no_relevant, no_results=no_results,
    )
