"""ragas answer metrics (eval/ragas_metrics.py) on hand-made answers with the real encoder, and a judge
endpoint that fails (the fault-injecting fake) or answers in ragas' JSON (plumbing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eval.datasets import QAExample
from eval.ragas_metrics import JudgeConfig, evaluate_answers, items_from, sample_of
from tests.llm_server import run_fake_llm, silent, status

ROOT = Path(__file__).resolve().parents[1]
GOLD = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, "
        "a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway.")
OTHER = ("Photosynthesis converts light energy into chemical energy that is stored in glucose; it takes place "
         "in the chloroplasts of plant cells and releases oxygen as a by-product.")


def qa(qid: str, *, impossible: bool = False, answer: str = "France") -> QAExample:
    return QAExample(id=qid, question="In what country is Normandy located?", answer="" if impossible else answer,
                     answers=() if impossible else (answer,), answer_starts=(), is_impossible=impossible,
                     gold_doc_ids=("Normans_0",), contexts=(GOLD,), title="Normans")


def answered(text: str, *contexts: str) -> dict:
    return {"answerable": True, "answer": text, "mode": "extractive",
            "citations": [{"n": i + 1, "document_id": f"d{i}", "text": c} for i, c in enumerate(contexts)]}


ABSTAINED = {"answerable": False, "answer": "I don't know.", "citations": []}


@pytest.fixture(scope="module")
def offline(embedder):
    pairs = [
        (qa("same"), answered("France [1]", GOLD)),  # identical to the gold answer, cites the gold paragraph
        (qa("unrelated"), answered("Chloroplasts release oxygen. [1]", OTHER)),  # off topic, wrong source
        (qa("second"), answered("France [2]", OTHER, GOLD)),  # gold paragraph cited second
        (qa("abstained"), ABSTAINED),  # answerable, abstained: outside every ragas population
        (qa("impossible", impossible=True), answered("Denmark [1]", GOLD)),  # unanswerable: outside too
        (qa("failed"), {"error": "HTTP 500"}),
    ]
    return evaluate_answers(pairs, embedder=embedder)


def test_population_is_answered_answerable(offline):
    section, per_row = offline
    assert section["population_size"] == 3
    assert set(per_row) == {"same", "unrelated", "second"}
    assert section["judge"] is None and section["judge_metrics"].startswith("skipped")
    assert "answer_correctness" not in section["metrics"] and "faithfulness" not in section["metrics"]
    for m in section["metrics"].values():
        assert m["scored"] == 3 and m["failed"] == 0 and m["population"].startswith("answered answerable")


def test_semantic_and_string_similarity(offline):
    _, rows = offline
    assert rows["same"]["semantic_similarity"] == pytest.approx(1.0, abs=1e-4)  # citation marks are stripped
    assert rows["same"]["string_similarity"] == pytest.approx(1.0)
    assert rows["unrelated"]["semantic_similarity"] < 0.5
    assert rows["unrelated"]["string_similarity"] < 0.5


def test_non_llm_context_precision_and_recall(offline):
    section, rows = offline
    assert rows["same"]["context_precision"] == pytest.approx(1.0) and rows["same"]["context_recall"] == 1.0
    assert rows["unrelated"]["context_precision"] == 0.0 and rows["unrelated"]["context_recall"] == 0.0
    # the gold paragraph at rank 2 of 2: recall 1, average precision 1/2
    assert rows["second"]["context_recall"] == 1.0
    assert rows["second"]["context_precision"] == pytest.approx(0.5)
    assert section["metrics"]["context_recall"]["mean"] == pytest.approx(2 / 3)


def test_sample_is_built_from_the_row():
    [item] = items_from([(qa("a"), answered("It is France [1].", GOLD))])
    s = sample_of(item)
    assert (s.user_input, s.response, s.reference) == ("In what country is Normandy located?", "It is France .", "France")
    assert s.retrieved_contexts == [GOLD] and s.reference_contexts == [GOLD]


@pytest.mark.parametrize("fault", [status(500), silent()], ids=["http-500", "timeout"])
def test_a_failing_judge_gives_none_with_a_reason(embedder, fault):
    pairs = [(qa(f"q{i}"), answered("France [1]", GOLD)) for i in range(4)]
    with run_fake_llm(default=fault) as server:
        judge = JudgeConfig(url=server.base_url, model="judge", timeout_s=0.5, max_consecutive_failures=2)
        section, rows = evaluate_answers(pairs, embedder=embedder, judge=judge)
    for name in ("answer_correctness", "faithfulness"):
        m = section["metrics"][name]
        assert m["mean"] is None and m["scored"] == 0 and m["failed"] == 4
        assert all(rows[f"q{i}"][name] is None for i in range(4))
        reasons = [rows[f"q{i}"]["errors"][name] for i in range(4)]
        assert any(("500" if fault.kind == "status" else "timed out") in r for r in reasons), reasons
        assert any(r.startswith("skipped") for r in reasons)  # a dead endpoint is not hammered per question
    # the offline metrics do not depend on the judge
    assert section["metrics"]["semantic_similarity"]["scored"] == 4
    assert server.count <= 2 * 3  # two failures per metric open the breaker (+ one in flight at concurrency 2)


def _judge_reply(body: dict) -> str:
    """ragas' structured outputs for its three prompts, as a good judge would give them."""
    prompt = body["messages"][-1]["content"]
    if "classify them in one of the following categories" in prompt:
        return json.dumps({"TP": [{"statement": "Normandy is in France.", "reason": "supported"}], "FP": [], "FN": []})
    if "judge the faithfulness of a series of statements" in prompt:
        return json.dumps({"statements": [{"statement": "Normandy is in France.", "reason": "stated", "verdict": 1}]})
    return json.dumps({"statements": ["Normandy is in France."]})


def test_a_judge_that_answers_gives_scores(embedder):
    with run_fake_llm(reply=_judge_reply) as server:
        judge = JudgeConfig(url=server.base_url, model="judge-model", api_key="k", timeout_s=10)
        section, rows = evaluate_answers([(qa("q"), answered("France [1]", GOLD))], embedder=embedder, judge=judge)
        assert server.count == 5  # correctness: 2 statement lists + 1 classification; faithfulness: 2
        assert server.requests[0]["model"] == "judge-model"
        assert server.headers[0]["authorization"] == "Bearer k"
    assert section["judge"]["model"] == "judge-model" and "k" not in json.dumps(section["judge"])
    assert rows["q"]["answer_correctness"] == pytest.approx(1.0, abs=1e-3)  # F1 1.0 and similarity 1.0
    assert rows["q"]["faithfulness"] == 1.0


def test_ragas_is_imported_lazily():
    code = ("import sys, eval.__main__, eval.answers, eval.ragas_metrics; "
            "print(sorted(m for m in ('ragas', 'langchain_core', 'langchain_community') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
