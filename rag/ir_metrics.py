"""Ranking metrics per query, with the definitions of trec_eval / pytrec_eval as BEIR reports them.

The one home of nDCG, recall, precision and MRR: the evaluation harness (``eval/metrics.py``) and
the encoder gate of an adaptation (``ingest/gate.py``) both score with these, so a gate verdict and
an eval report never disagree on what a metric means.

Definitions (``rel(d)`` is the qrels grade, absent means 0; relevant means ``rel > 0``):

- ``ndcg@k``: ``DCG@k / IDCG@k`` with gain ``rel(d)`` (linear, not ``2^rel - 1``) and discount
  ``log2(rank + 1)``; the ideal ranking is the query's qrels sorted by grade, cut at ``k``.
  Judged documents with grade <= 0 add nothing. This is trec_eval's ``ndcg_cut`` and BEIR's nDCG.
- ``recall@k``: relevant documents in the top ``k`` / all relevant documents of the query.
- ``precision@k`` (``p@k``): relevant documents in the top ``k`` / ``k`` (also when fewer than
  ``k`` were retrieved, as trec_eval's ``P_k``).
- ``mrr@k``: ``1 / rank`` of the first relevant document within the top ``k``, else 0.

A query whose qrels hold no grade above 0 scores 0 on every metric, as in pytrec_eval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "FAMILIES",
    "METRIC_FUNCTIONS",
    "Qrels",
    "Run",
    "metric_at",
    "mrr_at_k",
    "ndcg_at_k",
    "parse_metric",
    "precision_at_k",
    "rank",
    "recall_at_k",
]

FAMILIES = ("ndcg", "recall", "mrr", "p")

Run = Mapping[str, float] | Sequence[tuple[str, float]]
Qrels = Mapping[str, int]


def rank(run: Run) -> list[str]:
    """Document ids best first: score descending, ties by document id descending (trec_eval's order)."""
    items = list(run.items()) if isinstance(run, Mapping) else list(run)
    # Two stable sorts: the secondary key first.
    items.sort(key=lambda item: item[0], reverse=True)
    items.sort(key=lambda item: item[1], reverse=True)
    return [doc for doc, _ in items]


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")


def ndcg_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Graded nDCG@k (linear gains, log2 discount), 0 when the query has no relevant document."""
    _check_k(k)
    dcg = sum(max(qrels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranking[:k]))
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Share of the query's relevant documents found in the top ``k`` (0 when it has none)."""
    _check_k(k)
    relevant = sum(1 for g in qrels.values() if g > 0)
    if not relevant:
        return 0.0
    return sum(1 for d in ranking[:k] if qrels.get(d, 0) > 0) / relevant


def precision_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Relevant documents in the top ``k``, divided by ``k``."""
    _check_k(k)
    return sum(1 for d in ranking[:k] if qrels.get(d, 0) > 0) / k


def mrr_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Reciprocal rank of the first relevant document within the top ``k``, else 0."""
    _check_k(k)
    for i, d in enumerate(ranking[:k]):
        if qrels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


METRIC_FUNCTIONS: dict[str, Callable[[Sequence[str], Qrels, int], float]] = {
    "ndcg": ndcg_at_k, "recall": recall_at_k, "p": precision_at_k, "mrr": mrr_at_k,
}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; accepts ``precision@k`` and ``P@k`` for ``p@k``."""
    family, sep, k_text = name.strip().lower().partition("@")
    family = {"precision": "p", "recip_rank": "mrr"}.get(family, family)
    if not sep or family not in FAMILIES or not k_text.isdigit() or int(k_text) < 1:
        raise ValueError(f"unknown metric {name!r}: use ndcg@k, recall@k, mrr@k or p@k (k a positive integer)")
    return family, int(k_text)


def metric_at(name: str, ranking: Sequence[str], qrels: Qrels) -> float:
    """One metric by name (``"ndcg@10"``) for one query's ranking."""
    family, k = parse_metric(name)
    return METRIC_FUNCTIONS[family](ranking, qrels, k)
