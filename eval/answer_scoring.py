"""Scoring answers of QA questions (SQuAD 2.0, or any QA JSONL), offline: the split, gold matching, per-question scores,
their summary, and the abstention calibration.

Answers are normalised like SQuAD's ``normalize_answer`` (lower case, no punctuation, no articles,
single spaces) before containment, exact match and token F1. Calibration and reporting use disjoint
halves of the questions (:func:`split_of`, a hash of the question id), so a threshold is never tuned
on the questions it is reported on.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

from eval.datasets import QAExample
from rag.answer import says_unknown

SEED = 13
SPLITS = ("calibration", "report")  # "all" in sample_questions: both halves (a file nothing is tuned on)

# ---------------------------------------------------------------------------------------------
# Split and sample
# ---------------------------------------------------------------------------------------------


def split_of(question_id: str) -> str:
    """``calibration`` or ``report``: a stable half of the questions, decided by a hash of the id."""
    digest = hashlib.sha256(f"rag-eval-split:{question_id}".encode()).digest()
    return SPLITS[digest[0] & 1]


def sample_questions(examples: Sequence[QAExample], *, split: str, limit: int, seed: int = SEED) -> list[QAExample]:
    """The first ``limit`` answerable and first ``limit`` unanswerable questions of ``split`` after a
    seeded shuffle (0: all of them), interleaved (answerable, unanswerable, …) so that a partial run
    holds both kinds."""
    pool = sorted((e for e in examples if split == "all" or split_of(e.id) == split), key=lambda e: e.id)
    random.Random(seed).shuffle(pool)
    answerable = [e for e in pool if not e.is_impossible]
    impossible = [e for e in pool if e.is_impossible]
    if limit:
        answerable, impossible = answerable[:limit], impossible[:limit]
    out: list[QAExample] = []
    for i in range(max(len(answerable), len(impossible))):
        out += answerable[i : i + 1] + impossible[i : i + 1]
    return out


# ---------------------------------------------------------------------------------------------
# Scoring (SQuAD normalisation)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—", "…"}
_CITE_MARK = re.compile(r"\[\d{1,3}\]")


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def strip_citations(text: str) -> str:
    return _CITE_MARK.sub(" ", text)


def contains_answer(text: str, golds: Iterable[str]) -> bool:
    """True when some normalised gold answer occurs in the normalised text as whole words."""
    hay = f" {normalize_answer(strip_citations(text))} "
    for g in golds:
        n = normalize_answer(g)
        if n and f" {n} " in hay:
            return True
    return False


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    p = normalize_answer(strip_citations(prediction))
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    p = normalize_answer(strip_citations(prediction)).split()
    scores = [_f1(p, normalize_answer(g).split()) for g in golds]
    return max(scores, default=0.0)


def citations_contain(citations: Sequence[dict[str, Any]], golds: Iterable[str]) -> bool:
    """Some cited source text contains a gold answer."""
    golds = list(golds)
    return any(contains_answer(c.get("text", ""), golds) for c in citations)


def citation_precision(citations: Sequence[dict[str, Any]], golds: Iterable[str]) -> float | None:
    """Share of the cited sources that contain a gold answer (None when nothing is cited)."""
    golds = list(golds)
    if not citations:
        return None
    return sum(contains_answer(c.get("text", ""), golds) for c in citations) / len(citations)


class AnswerRow(TypedDict, total=False):
    """One scored question of an answer report (report.json ``rows``; also what the HTML and ragas read)."""

    id: str
    question: str
    is_impossible: bool
    golds: list[str]
    answered: bool  # the service answered (answerable true), rather than abstaining
    mode: str | None  # generative | extractive
    answer: str
    latency_ms: float | None  # client-side, as the eval client measured it
    support_score: float | None
    answerable_probability: float | None  # the answerability model's (None: the threshold decided)
    server_ms: float | None  # the service's own latency_ms
    cited_docs: list[str | None]
    fallback_reason: str | None
    says_unknown: bool  # answered, yet the text says it does not know
    abstained: bool  # unanswerable questions only
    contains_gold: bool  # answerable questions only, from here down
    cited_contains_gold: bool
    citation_precision: float | None
    cited_gold_doc: bool  # only when the question names gold documents
    em: float
    f1: float
    error: Any  # a request that failed: counted, never scored
    ragas: dict[str, Any]  # per-row ragas scores, when that section ran


def score_one(example: QAExample, response: dict[str, Any]) -> AnswerRow:
    """Per-question scores from one /v1/answer JSON response."""
    answered = bool(response.get("answerable"))
    text = response.get("answer", "") if answered else ""
    cites = response.get("citations") or []
    row: AnswerRow = {
        "id": example.id, "question": example.question, "is_impossible": example.is_impossible,
        "golds": list(example.answers), "answered": answered, "mode": response.get("mode"),
        "answer": response.get("answer", ""), "latency_ms": response.get("_client_ms"),
        "support_score": (response.get("retrieval") or {}).get("support_score"),
        "answerable_probability": _probability(response), "server_ms": response.get("latency_ms"),
        "cited_docs": [c.get("document_id") for c in cites], "fallback_reason": response.get("fallback_reason"),
        # answered, yet the text says it does not know (a generative answer that abstains in words)
        "says_unknown": answered and says_unknown(text),
    }
    if example.is_impossible:
        row["abstained"] = not answered
    else:
        row.update({
            "contains_gold": answered and contains_answer(text, example.answers),
            "cited_contains_gold": answered and citations_contain(cites, example.answers),
            "citation_precision": citation_precision(cites, example.answers) if answered else None,
            "em": exact_match(text, example.answers) if answered else 0.0,
            "f1": f1_score(text, example.answers) if answered else 0.0,
        })
        if example.gold_doc_ids:
            row["cited_gold_doc"] = answered and any(c.get("document_id") in example.gold_doc_ids for c in cites)
    return row


def _probability(response: dict[str, Any]) -> float | None:
    """The response's ``answerable_probability`` (top level, or beside the support score), when it has one."""
    value = response.get("answerable_probability")
    if value is None:
        value = (response.get("retrieval") or {}).get("answerable_probability")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def score_all(pairs: Iterable[tuple[QAExample, dict[str, Any]]]) -> list[AnswerRow]:
    """:func:`score_one` per answered request; a failed request becomes an error row (counted, not scored)."""
    return [score_one(ex, body) if "error" not in body else
            {"id": ex.id, "is_impossible": ex.is_impossible, "error": body["error"]} for ex, body in pairs]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(rows: Sequence[AnswerRow]) -> dict[str, Any]:
    """Aggregate metrics over scored rows (errors excluded and counted)."""
    ok = [r for r in rows if not r.get("error")]
    ans = [r for r in ok if not r["is_impossible"]]
    imp = [r for r in ok if r["is_impossible"]]
    answered = [r for r in ans if r["answered"]]
    precisions = [r["citation_precision"] for r in answered if r.get("citation_precision") is not None]
    lat = [r["latency_ms"] for r in ok if r.get("latency_ms") is not None]
    return {
        "questions": len(rows), "errors": len(rows) - len(ok),
        "answerable": len(ans), "unanswerable": len(imp),
        "answer_rate": _mean([float(r["answered"]) for r in ans]),
        "abstain_rate_unanswerable": _mean([float(r["abstained"]) for r in imp]),
        "contains_gold": _mean([float(r["contains_gold"]) for r in ans]),
        "contains_gold_when_answered": _mean([float(r["contains_gold"]) for r in answered]),
        "cited_contains_gold": _mean([float(r["cited_contains_gold"]) for r in ans]),
        "cited_contains_gold_when_answered": _mean([float(r["cited_contains_gold"]) for r in answered]),
        "citation_precision": _mean(precisions),
        # over the answerable questions that name gold documents (None when none does)
        "cited_gold_doc": _mean([float(r["cited_gold_doc"]) for r in ans if "cited_gold_doc" in r]),
        "gold_document_questions": sum("cited_gold_doc" in r for r in ans),
        "em": _mean([r["em"] for r in ans]), "f1": _mean([r["f1"] for r in ans]),
        "answered_but_says_unknown": {"answerable": sum(r["says_unknown"] for r in ans),
                                      "unanswerable": sum(r["says_unknown"] for r in imp)},
        "modes": dict(collections.Counter(r["mode"] for r in ok if r["answered"])),
        "fallbacks": dict(collections.Counter(r["fallback_reason"] for r in ok if r["answered"] and r.get("fallback_reason"))),
        "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
        "server_p50_ms": percentile([r["server_ms"] for r in ok if r.get("server_ms") is not None], 50),
        # How well each signal separates answerable from unanswerable questions (None: not in the responses).
        "auc_support_score": _auc_of(ans, imp, "support_score"),
        "auc_answerable_probability": _auc_of(ans, imp, "answerable_probability"),
    }


def _auc_of(ans: Sequence[AnswerRow], imp: Sequence[AnswerRow], key: str) -> float | None:
    pos = [r[key] for r in ans if r.get(key) is not None]  # type: ignore[literal-required]
    neg = [r[key] for r in imp if r.get(key) is not None]  # type: ignore[literal-required]
    return auc(pos, neg)


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def pick_threshold(answerable: Sequence[float], unanswerable: Sequence[float], target_answer_rate: float) -> float:
    """The largest threshold (answer when score >= threshold) that still answers at least
    ``target_answer_rate`` of the answerable questions; the largest abstains on the most unanswerable."""
    if not answerable:
        raise ValueError("no answerable scores")
    if not 0 < target_answer_rate <= 1:
        raise ValueError("target_answer_rate must be in (0, 1]")
    ordered = sorted(answerable, reverse=True)
    k = math.ceil(target_answer_rate * len(ordered) - 1e-9)
    return ordered[max(k, 1) - 1]


def rate_at(scores: Sequence[float], threshold: float) -> float:
    return sum(s >= threshold for s in scores) / len(scores) if scores else 0.0


def roc_table(answerable: Sequence[float], unanswerable: Sequence[float], thresholds: Iterable[float]) -> list[dict[str, float]]:
    return [{"threshold": round(t, 4), "answer_rate": rate_at(answerable, t),
             "abstain_rate_unanswerable": 1 - rate_at(unanswerable, t) if unanswerable else 0.0}
            for t in sorted(set(thresholds))]


def auc(answerable: Sequence[float], unanswerable: Sequence[float]) -> float | None:
    """P(score of an answerable > score of an unanswerable), ties count half."""
    if not answerable or not unanswerable:
        return None
    wins = 0.0
    for a in answerable:
        for u in unanswerable:
            wins += 1.0 if a > u else 0.5 if a == u else 0.0
    return wins / (len(answerable) * len(unanswerable))


def calibrate(answerable: Sequence[float], unanswerable: Sequence[float], target_answer_rate: float) -> dict[str, Any]:
    """The abstention threshold for ``target_answer_rate`` (as the service compares it), its rates, the
    ROC table from the lowest to the highest score (the chosen threshold included) and the AUC."""
    t = pick_threshold(answerable, unanswerable, target_answer_rate)
    # The response rounds support_score to 4 decimals while the service compares the raw score: step
    # down one unit so a question scored exactly at the threshold is still answered.
    chosen = round(t - 1e-4, 4)
    scores = [*answerable, *unanswerable]
    lo, hi = min(scores), max(scores)
    grid = [lo + (hi - lo) * i / 20 for i in range(21)] + [chosen]
    return {"threshold": chosen, "answer_rate": rate_at(answerable, chosen),
            "abstain_rate_unanswerable": 1 - rate_at(unanswerable, chosen), "auc": auc(answerable, unanswerable),
            "table": roc_table(answerable, unanswerable, grid)}
