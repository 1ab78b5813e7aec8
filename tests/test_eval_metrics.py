"""Retrieval metrics against hand-computed values (trec_eval / BEIR definitions)."""

from __future__ import annotations

import math

import pytest

from eval.metrics import (
    bootstrap_ci,
    evaluate,
    mrr_at_k,
    ndcg_at_k,
    paired_bootstrap_ci,
    parse_metric,
    precision_at_k,
    rank,
    recall_at_k,
)
from eval.retrieval import chunks_to_documents


def test_graded_ndcg_uses_linear_gains_and_log2_discount():
    qrels = {"a": 2, "b": 1, "c": 0}
    # DCG@3 = 1/log2(2) + 0 + 2/log2(4) = 2; IDCG@3 = 2/log2(2) + 1/log2(3)
    expected = 2 / (2 + 1 / math.log2(3))
    assert ndcg_at_k(["b", "x", "a"], qrels, 3) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b"], qrels, 10) == pytest.approx(1.0)
    # The ideal is cut at k too: only the grade-2 document fits at k=1.
    assert ndcg_at_k(["b"], qrels, 1) == pytest.approx(0.5)
    # A judged-but-irrelevant (grade 0) or negative document adds nothing.
    assert ndcg_at_k(["c", "n"], {"a": 1, "c": 0, "n": -1}, 2) == 0.0


def test_recall_precision_mrr():
    qrels = {"a": 1, "b": 2, "c": 1, "z": 0}
    ranking = ["x", "a", "y", "b", "z"]
    assert recall_at_k(ranking, qrels, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, qrels, 100) == pytest.approx(2 / 3)
    assert precision_at_k(ranking, qrels, 2) == pytest.approx(0.5)
    # P@k divides by k even when fewer than k documents were retrieved (trec_eval's P_k).
    assert precision_at_k(ranking, qrels, 10) == pytest.approx(0.2)
    assert mrr_at_k(ranking, qrels, 1) == 0.0
    assert mrr_at_k(ranking, qrels, 10) == pytest.approx(0.5)
    assert mrr_at_k(["z", "x"], qrels, 10) == 0.0  # grade 0 is not relevant


def test_ties_break_by_document_id_descending_whatever_the_input_order():
    assert rank({"d1": 0.5, "d2": 0.5, "d3": 0.9}) == ["d3", "d2", "d1"]
    assert rank([("d2", 0.5), ("d1", 0.5), ("d3", 0.9)]) == ["d3", "d2", "d1"]
    assert rank([("d1", 0.5), ("d2", 0.5), ("d3", 0.9)]) == ["d3", "d2", "d1"]
    # So a tie at the cut-off decides deterministically: d2 wins the second place.
    summary = evaluate({"q": [("d1", 0.5), ("d2", 0.5), ("d3", 0.9)]}, {"q": {"d1": 1}}, metrics=["mrr@10", "p@2"])
    assert summary.metrics["mrr@10"] == pytest.approx(1 / 3)
    assert summary.metrics["p@2"] == 0.0


def test_evaluate_skips_queries_without_qrels_and_counts_them():
    runs = {
        "q1": {"a": 3.0, "b": 2.0},  # perfect
        "q2": {"x": 1.0},  # judged, nothing relevant retrieved
        "q3": {"a": 1.0},  # no qrels: skipped
        "q4": {},  # nothing retrieved: 0, kept
        "q5": {"a": 1.0},  # qrels hold only grade 0: 0, kept and counted
    }
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"y": 1}, "q4": {"a": 1}, "q5": {"a": 0}, "unrun": {"a": 1}}
    s = evaluate(runs, qrels, metrics=["ndcg@10", "recall@10"], resamples=200)
    assert s.evaluated == 4
    assert s.skipped == ["q3"]
    assert s.no_results == ["q4"]
    assert s.no_relevant == ["q5"]
    assert s.metrics["ndcg@10"] == pytest.approx(1 / 4)
    assert s.metrics["recall@10"] == pytest.approx(1 / 4)
    assert set(s.per_query) == {"q1", "q2", "q4", "q5"}
    assert s.per_query["q1"]["ndcg@10"] == pytest.approx(1.0)
    # Curves hold every family at every k.
    assert s.curves["ndcg"][10] == pytest.approx(1 / 4)
    assert s.curves["p"][1] == pytest.approx(1 / 4)


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    values = [0.0, 1.0, 0.5, 0.25, 0.75, 1.0, 0.0, 0.5]
    lo, hi = bootstrap_ci(values, resamples=1000, seed=0)
    assert (lo, hi) == bootstrap_ci(values, resamples=1000, seed=0)
    assert lo < sum(values) / len(values) < hi
    assert 0.0 <= lo and hi <= 1.0
    assert bootstrap_ci([0.3] * 20) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    lo, hi = paired_bootstrap_ci([0.5] * 10, [0.6] * 10)
    assert (lo, hi) == pytest.approx((0.1, 0.1))


def test_metric_names():
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    assert parse_metric("P@5") == ("p", 5)
    assert parse_metric("precision@5") == ("p", 5)
    for bad in ("ndcg", "ndcg@0", "map@10", "recall@x"):
        with pytest.raises(ValueError):
            parse_metric(bad)


def test_chunks_become_documents_by_best_chunk():
    hits = [("d1", 0.9), ("d2", 0.8), ("d1", 0.7), ("q", 0.6), ("d3", 0.5), ("d4", 0.4)]
    assert chunks_to_documents(hits) == [("d1", 0.9), ("d2", 0.8), ("q", 0.6), ("d3", 0.5), ("d4", 0.4)]
    assert chunks_to_documents(hits, top_docs=2, exclude="q") == [("d1", 0.9), ("d2", 0.8)]
    assert chunks_to_documents(hits, exclude="q")[2] == ("d3", 0.5)
