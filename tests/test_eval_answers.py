"""Scoring and calibration helpers of the answer evaluation (``eval.answer_scoring``) and its reports
(``eval.answer_report``) on hand-made cases (no service, no model)."""

from __future__ import annotations

import pytest

from eval.answer_scoring import (
    auc,
    citation_precision,
    citations_contain,
    contains_answer,
    exact_match,
    f1_score,
    normalize_answer,
    pick_threshold,
    rate_at,
    roc_table,
    sample_questions,
    score_one,
    split_of,
    summarise,
)
from eval.datasets import QAExample


def qa(qid: str, *, impossible: bool = False, answers: tuple[str, ...] = ("France",)) -> QAExample:
    return QAExample(id=qid, question=f"q {qid}?", answer="" if impossible else answers[0],
                     answers=() if impossible else answers, answer_starts=(), is_impossible=impossible,
                     gold_doc_ids=() if impossible else ("Normans_0",), contexts=(), title="Normans")


def test_normalize_answer_like_squad():
    assert normalize_answer("The  Normans, of France!") == "normans of france"
    assert normalize_answer("An apple; a pear.") == "apple pear"
    assert normalize_answer("“Rollo” — 911") == "rollo 911"
    assert normalize_answer("") == ""


def test_contains_answer_whole_words_and_citation_marks():
    assert contains_answer("Normandy is a region in France [1].", ["france"])
    assert contains_answer("in the 10th and 11th centuries[2]", ["10th and 11th centuries"])
    assert not contains_answer("Francesca went home", ["France"])  # no partial-word hits
    assert not contains_answer("anything", ["", "  "])  # empty golds never match
    assert contains_answer("It was Denmark, Iceland, and Norway.", ["Denmark Iceland and Norway"])


def test_exact_match_and_f1():
    assert exact_match("the France [1]", ["France"]) == 1.0
    assert exact_match("France and Italy", ["France"]) == 0.0
    assert f1_score("France", ["France"]) == 1.0
    assert f1_score("Paris", ["France"]) == 0.0
    # pred "france and italy" vs gold "france": P=1/3, R=1 -> F1=0.5; best over golds
    assert f1_score("France and Italy", ["Germany", "France"]) == pytest.approx(0.5)
    assert f1_score("", ["France"]) == 0.0


def test_citations():
    cites = [{"text": "Normandy, a region in France."}, {"text": "Rollo was a Viking."}]
    assert citations_contain(cites, ["France"])
    assert not citations_contain(cites, ["Denmark"])
    assert citation_precision(cites, ["France"]) == pytest.approx(0.5)
    assert citation_precision([], ["France"]) is None


def test_score_one_and_summarise_abstention():
    good = {"answer": "Normandy is in France [1].", "answerable": True, "mode": "extractive",
            "citations": [{"n": 1, "document_id": "Normans_0", "text": "a region in France"}],
            "retrieval": {"support_score": 0.7}, "_client_ms": 10.0}
    abstained = {"answer": "I don't know: ...", "answerable": False, "mode": "extractive", "citations": [],
                 "retrieval": {"support_score": 0.1}, "_client_ms": 30.0}
    rows = [
        score_one(qa("a1"), good),
        score_one(qa("a2"), abstained),  # answerable but abstained: counts against answer rate and contains
        score_one(qa("u1", impossible=True), abstained),
        score_one(qa("u2", impossible=True), good),  # unanswerable but answered
    ]
    assert rows[0]["contains_gold"] and rows[0]["cited_contains_gold"] and rows[0]["cited_gold_doc"]
    assert rows[1]["contains_gold"] is False and rows[1]["f1"] == 0.0
    s = summarise(rows)
    assert s["answer_rate"] == 0.5
    assert s["abstain_rate_unanswerable"] == 0.5
    assert s["contains_gold"] == 0.5 and s["contains_gold_when_answered"] == 1.0
    assert s["cited_contains_gold"] == 0.5
    assert s["modes"] == {"extractive": 2}
    assert s["latency_p50_ms"] in (10.0, 30.0)


def test_split_is_stable_and_disjoint():
    ids = [f"id{i}" for i in range(2000)]
    splits = [split_of(i) for i in ids]
    assert splits == [split_of(i) for i in ids]
    assert 900 < splits.count("calibration") < 1100
    examples = [qa(f"a{i}") for i in range(50)] + [qa(f"u{i}", impossible=True) for i in range(50)]
    cal = sample_questions(examples, split="calibration", limit=5)
    rep = sample_questions(examples, split="report", limit=5)
    assert not {e.id for e in cal} & {e.id for e in rep}
    assert sum(e.is_impossible for e in rep) == 5 and sum(not e.is_impossible for e in rep) == 5
    assert rep == sample_questions(examples, split="report", limit=5)  # deterministic
    assert rep[:6] == sample_questions(examples, split="report", limit=3)  # a prefix of a longer sample
    assert [e.is_impossible for e in rep[:4]] == [False, True, False, True]  # interleaved


def test_pick_threshold_meets_target_and_maximises_abstention():
    pos = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    neg = [0.1, 0.2, 0.3, 0.35, 0.45]
    t = pick_threshold(pos, neg, 0.9)
    assert t == 0.1 and rate_at(pos, t) == 0.9
    assert rate_at(pos, t + 1e-9) < 0.9  # any higher threshold misses the target
    assert pick_threshold(pos, neg, 0.5) == 0.5
    assert pick_threshold(pos, neg, 1.0) == 0.05
    assert pick_threshold([0.3, 0.3, 0.3], [], 0.9) == 0.3  # ties
    with pytest.raises(ValueError):
        pick_threshold([], neg, 0.9)
    with pytest.raises(ValueError):
        pick_threshold(pos, neg, 0.0)


def test_roc_table_and_auc():
    pos, neg = [0.8, 0.6], [0.2, 0.6]
    table = roc_table(pos, neg, [0.0, 0.5, 0.7, 0.5])
    assert [r["threshold"] for r in table] == [0.0, 0.5, 0.7]
    assert table[0] == {"threshold": 0.0, "answer_rate": 1.0, "abstain_rate_unanswerable": 0.0}
    assert table[1]["answer_rate"] == 1.0 and table[1]["abstain_rate_unanswerable"] == 0.5
    assert table[2]["answer_rate"] == 0.5 and table[2]["abstain_rate_unanswerable"] == 1.0
    assert auc(pos, neg) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert auc(pos, []) is None


def test_report_files(tmp_path):
    from eval.answer_report import format_summary, write_answer_report

    said = {"answer": "I don't know. [1]", "answerable": True, "mode": "generative",
            "citations": [{"n": 1, "document_id": "d", "text": "x"}], "retrieval": {"support_score": 0.5},
            "_client_ms": 5.0}
    rows = [score_one(qa("a1"), said), score_one(qa("u1", impossible=True), said),
            {"id": "a2", "is_impossible": False, "error": "HTTP 500"}]
    report = write_answer_report(tmp_path, {"dataset": "squad"}, rows)
    s = report["summary"]
    assert s["errors"] == 1 and s["answerable"] == 1
    assert s["answered_but_says_unknown"] == {"answerable": 1, "unanswerable": 1}
    assert (tmp_path / "report.json").exists() and "<html>" in (tmp_path / "report.html").read_text()
    assert "answer contains gold" in format_summary(s)


def test_report_carries_the_ragas_section(tmp_path):
    from types import SimpleNamespace

    from eval.answer_report import format_ragas, write_answer_report
    from eval.answers import ragas_section

    m = lambda mean, scored, failed=0, reasons=None: {  # noqa: E731
        "mean": mean, "scored": scored, "failed": failed, "population": "answered answerable questions",
        "compares": "x", "failure_reasons": reasons or {}}
    section = {"schema": "rag-eval/ragas/1", "ragas_version": "0.4.3", "population_size": 2, "similarity_encoder": "enc-1",
               "judge": {"url": "http://judge/v1", "model": "j", "timeout_s": 5, "limit": 0}, "judge_metrics": "computed",
               "metrics": {"semantic_similarity": m(0.5, 2), "context_recall": m(1.0, 2),
                           "faithfulness": m(None, 0, 2, {"TimeoutError: no score within 5s": 2})}}
    rows = [score_one(qa("a1"), {"answer": "France", "answerable": True, "citations": []})]
    report = write_answer_report(tmp_path, {"dataset": "squad"}, rows, section)
    assert report["ragas"]["metrics"]["context_recall"]["mean"] == 1.0
    text = format_ragas(section)
    assert "semantic similarity" in text and "0.500" in text and "2 × TimeoutError" in text
    page = (tmp_path / "report.html").read_text()
    assert "ragas 0.4.3" in page and "faithfulness (judge)" in page and "TimeoutError" in page
    assert ragas_section(SimpleNamespace(no_ragas=True), [], rows) is None and "skipped" in format_ragas(None)
    assert "not installed" in format_ragas({"error": "ragas not installed: x"})
