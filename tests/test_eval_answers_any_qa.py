"""``python -m eval answers`` on any QA JSONL (``--qa``, ``--corpus``): the file's validation, and the report
with its reliability and trade-off plots, end to end through the real service (real encoder, embedded
Qdrant, SQLite registry) on a small corpus of SQuAD 2.0 dev paragraphs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.answer_curves import reliability, tradeoff
from eval.answer_scoring import score_one, split_of
from eval.datasets import DatasetError, QAExample, load_qa_jsonl, question_id
from rag.settings import Settings
from tests.conftest import serving

DOCS = [f"Normans_{i}" for i in range(10)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------
# The file's validation
# ---------------------------------------------------------------------------------------------

GOOD = {"id": "a", "question": "In what country is Normandy located?", "answers": ["France"]}


@pytest.mark.parametrize("bad, reason", [
    ('{"id": "x", "question": "q?", "answers": ["a"]', "invalid JSON"),
    ({"id": "x", "answers": ["a"]}, "missing 'question'"),
    ({"id": "x", "question": "  ", "answers": ["a"]}, "empty 'question'"),
    ({"id": "x", "question": "q?"}, "missing 'answers'"),
    ({"id": "x", "question": "q?", "answers": "France"}, "'answers' must be a list of strings"),
    ({"id": "x", "question": "q?", "answers": [1]}, "'answers' must be a list of strings"),
    ({"id": "x", "question": "q?", "answers": ["", " "]}, "'answers' holds no non-empty answer"),
    ({"id": "x", "question": "q?", "answers": ["a"], "unanswerable": True}, "'answers' must be empty"),
    ({"id": "x", "question": "q?", "answers": [], "unanswerable": "yes"}, "'unanswerable' must be true or false"),
    ({"id": "x", "question": "q?", "answers": ["a"], "gold_document_ids": "d1"}, "'gold_document_ids' must be a list"),
    ({"id": ["x"], "question": "q?", "answers": ["a"]}, "'id' must be a string or an integer"),
    ({"id": "a", "question": "q?", "answers": ["a"]}, "duplicate 'id' 'a' (first on line 1)"),
    ({"question": GOOD["question"], "answers": ["a"], "id": None}, None),  # fine: an id derived from the question
    ([1, 2], "expected a JSON object"),
])
def test_a_malformed_line_is_named_with_its_field(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "qa.jsonl", [GOOD, {"id": "b", "question": "q2?", "answers": [], "unanswerable": True},
                                              bad])
    if reason is None:
        examples = load_qa_jsonl(path)
        assert examples[2].id == question_id(GOOD["question"]) and examples[1].is_impossible
        return
    with pytest.raises(DatasetError) as err:
        load_qa_jsonl(path)
    assert err.value.line == 3 and reason in str(err.value) and str(err.value).startswith(f"{path}:3: ")


def test_gold_documents_must_be_in_the_corpus_and_give_the_contexts(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {**GOOD, "gold_document_ids": ["Normans_0"]},
        {"question": "Who ruled?", "answers": ["Rollo"], "gold_doc_ids": ["Normans_1"], "is_impossible": False},
        {"question": "Where?", "answers": ["here"], "gold_document_ids": ["Normans_0", "nowhere_7"]},
    ])
    docs = {"Normans_0": "Normandy, a region in France.", "Normans_1": "Rollo ruled."}
    with pytest.raises(DatasetError, match=r"qa.jsonl:3: 'gold_document_ids' names documents the corpus does not "
                                           r"hold: \['nowhere_7'\]"):
        load_qa_jsonl(path, documents=docs)
    first, second = load_qa_jsonl(path, documents={**docs, "nowhere_7": ""})[:2]
    assert first.contexts == ("Normandy, a region in France.",) and first.gold_doc_ids == ("Normans_0",)
    assert second.gold_doc_ids == ("Normans_1",) and second.answers == ("Rollo",)  # SQuAD's field names read too


def test_the_command_names_the_bad_line_before_starting_anything(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "Normandy is in France."}])
    qa = write_jsonl(tmp_path / "qa.jsonl", [GOOD, GOOD | {"id": "b"}, {"id": "c", "question": "Why?", "answers": "x"}])
    args = ["answers", "--qa", str(qa), "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--no-ragas"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{qa}:3: 'answers' must be a list of strings" in err
    assert not (tmp_path / "out").exists()
    write_jsonl(qa, [GOOD])
    assert main(["answers", "--qa", str(qa), "--out", str(tmp_path / "out")]) == 2  # no corpus, no --no-upload
    assert "give --corpus PATH, or --no-upload" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Curves on hand-made rows (no service)
# ---------------------------------------------------------------------------------------------


def _row(qid: str, support: float, *, impossible: bool, answered: bool, correct: bool = False, prob=None):
    ex = QAExample(id=qid, question="q?", answer="" if impossible else "France", answers=() if impossible else ("France",),
                   answer_starts=(), is_impossible=impossible, gold_doc_ids=(), contexts=(), title="")
    text = "It is France." if correct else "It is Spain."
    body = {"answer": text if answered else "I don't know.", "answerable": answered, "mode": "extractive",
            "citations": [{"n": 1, "document_id": "d", "text": text}] if answered else [],
            "retrieval": {"support_score": support}}
    if prob is not None:
        body["answerable_probability"] = prob
    return score_one(ex, body)


def test_curves_from_rows():
    rows = [_row("a1", 0.95, impossible=False, answered=True, correct=True),
            _row("a2", 0.75, impossible=False, answered=True, correct=False),
            _row("a3", 0.30, impossible=False, answered=False),
            _row("u1", 0.72, impossible=True, answered=True),
            _row("u2", 0.10, impossible=True, answered=False),
            _row("u3", -0.2, impossible=True, answered=False)]  # clipped to 0
    rel = reliability(rows)
    assert rel["source"] == "support_score" and rel["note"]
    counts = {round(b["lo"], 1): b["count"] for b in rel["bins"]}
    assert counts[0.9] == 1 and counts[0.7] == 2 and counts[0.0] == 1 and sum(counts.values()) == 6
    seven = next(b for b in rel["bins"] if b["lo"] == 0.7)
    assert seven["answerable_share"] == 0.5 and seven["correct_share"] == 0.0
    tr = tradeoff(rows)
    assert tr["kind"] == "answer_vs_abstain" and tr["auc"] == pytest.approx(8 / 9)
    assert tr["operating_point"] == {"answer_rate": pytest.approx(2 / 3), "abstain_rate_unanswerable": pytest.approx(2 / 3)}
    assert tr["points"][0] == {"threshold": 0.0, "answer_rate": 1.0, "abstain_rate_unanswerable": 0.0}
    assert tr["points"][-1]["answer_rate"] == 0.0 and tr["points"][-1]["abstain_rate_unanswerable"] == 1.0
    at = {p["threshold"]: p for p in tr["points"]}
    assert at[0.75] == {"threshold": 0.75, "answer_rate": pytest.approx(2 / 3), "abstain_rate_unanswerable": 1.0}
    # the service's own probability is used once every response carries one
    probs = [_row("a1", 0.1, impossible=False, answered=True, correct=True, prob=0.9),
             _row("u1", 0.9, impossible=True, answered=False, prob=0.2)]
    assert reliability(probs)["source"] == "answerable_probability" and tradeoff(probs)["auc"] == 1.0
    # answerable only: answer rate against precision, over the answered ones
    only = [r for r in rows if not r["is_impossible"]]
    pr = tradeoff(only)
    assert pr["kind"] == "answer_vs_precision" and pr["auc"] is None and "no unanswerable" in pr["note"]
    assert pr["points"] == [{"threshold": 0.75, "answer_rate": pytest.approx(2 / 3), "precision": 0.5},
                            {"threshold": 0.95, "answer_rate": pytest.approx(1 / 3), "precision": 1.0}]


# ---------------------------------------------------------------------------------------------
# End to end through the real service
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squad_corpus(shared_data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Ten SQuAD dev paragraphs as a BEIR folder, and every question on them (both halves)."""
    root = tmp_path_factory.mktemp("any-qa")
    folder = root / "normans"
    folder.mkdir()
    lines = [json.loads(line) for line in (shared_data / "squad2-dev" / "corpus.jsonl").read_text().splitlines()]
    write_jsonl(folder / "corpus.jsonl", [d for d in lines if d["_id"] in DOCS])
    (folder / "queries.jsonl").write_text('{"_id": "not-a-document", "text": "a query, never uploaded"}\n')
    qa = [json.loads(line) for line in (shared_data / "squad2-dev" / "qa.jsonl").read_text().splitlines()]
    return folder, [q for q in qa if q["gold_doc_ids"] and q["gold_doc_ids"][0] in DOCS]


@pytest.fixture(scope="module")
def service_url(squad_corpus, embedder, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("any-qa-data"), worker_poll_s=0.05, log_format="json",
                        llm_local="no")
    with serving(settings, embedder) as (url, _):
        yield url


def _svgs(page: str) -> dict[str, str]:
    out = {}
    for part in page.split("<svg")[1:]:
        svg = "<svg" + part.split("</svg>")[0] + "</svg>"
        out[svg.split('id="')[1].split('"')[0]] = svg
    return out


def test_report_on_a_qa_file_with_unanswerable_questions(squad_corpus, service_url, tmp_path):
    folder, questions = squad_corpus
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"id": q["id"], "question": q["question"], "answers": q["answers"], "gold_document_ids": q["gold_doc_ids"],
         "unanswerable": q["is_impossible"]} for q in questions])
    out = tmp_path / "out"
    assert main(["answers", "--qa", str(qa), "--corpus", str(folder), "--url", service_url, "--split", "calibration",
                 "--limit", "5", "--no-ragas", "--out", str(out)]) == 0
    asked = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {q["id"]: q["is_impossible"] for q in questions}
    assert len(asked) == 10 and sum(kinds[i] for i in asked) == 5
    assert all(split_of(i) == "calibration" for i in asked)  # the report half is never asked here
    report = json.loads((out / "report.json").read_text())
    s, curves = report["summary"], report["curves"]
    assert s["errors"] == 0 and s["answerable"] == 5 and s["unanswerable"] == 5
    assert s["gold_document_questions"] == 5 and s["cited_gold_doc"] is not None
    assert report["meta"]["corpus"] == str(folder / "corpus.jsonl")  # the folder's corpus, not its queries
    rel, tr = curves["reliability"], curves["tradeoff"]
    rows = report["rows"]
    assert rel["source"] in ("support_score", "answerable_probability") and rel["questions"] == 10
    assert sum(b["count"] for b in rel["bins"]) == 10
    assert round(sum(b["count"] * b["correct_share"] for b in rel["bins"] if b["count"])) == \
        sum(bool(r.get("contains_gold")) for r in rows)
    assert round(sum(b["count"] * b["answerable_share"] for b in rel["bins"] if b["count"])) == 5
    assert tr["kind"] == "answer_vs_abstain" and 0 <= tr["auc"] <= 1
    assert tr["operating_point"] == {"answer_rate": s["answer_rate"],
                                     "abstain_rate_unanswerable": s["abstain_rate_unanswerable"]}
    rates = [p["answer_rate"] for p in tr["points"]]
    assert rates[0] == 1.0 and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)
    page = (out / "report.html").read_text()
    svgs = _svgs(page)
    assert set(svgs) == {"reliability", "tradeoff"}
    assert "<polyline" in svgs["reliability"] and "<circle" in svgs["reliability"]
    assert 'class="operating-point"' in svgs["tradeoff"] and "abstains on unanswerable" in svgs["tradeoff"]
    assert "<script" not in page and "https://" not in page and 'src="' not in page  # self-contained


def test_report_on_a_file_without_unanswerable_questions(squad_corpus, service_url, tmp_path):
    folder, questions = squad_corpus
    answerable = [q for q in questions if not q["is_impossible"]][:6]
    # the documents are already in the service; no ids, no gold documents
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": q["question"], "answers": q["answers"]} for q in answerable])
    out = tmp_path / "out"
    assert main(["answers", "--qa", str(qa), "--no-upload", "--url", service_url, "--split", "all", "--limit", "0",
                 "--no-ragas", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    s, tr = report["summary"], report["curves"]["tradeoff"]
    assert s["answerable"] == 6 and s["unanswerable"] == 0 and s["abstain_rate_unanswerable"] is None
    assert s["cited_gold_doc"] is None and s["gold_document_questions"] == 0
    assert {r["id"] for r in report["rows"]} == {question_id(q["question"]) for q in answerable}
    assert tr["kind"] == "answer_vs_precision" and tr["auc"] is None
    assert tr["operating_point"] == {"answer_rate": s["answer_rate"], "precision": s["contains_gold_when_answered"]}
    if s["answer_rate"]:  # the lowest threshold keeps every answered question: the operating point itself
        assert tr["points"][0]["answer_rate"] == pytest.approx(s["answer_rate"])
        assert tr["points"][0]["precision"] == pytest.approx(s["contains_gold_when_answered"])
    page = (out / "report.html").read_text()
    assert set(_svgs(page)) == {"reliability", "tradeoff"}
    assert "no unanswerable questions" in page and "contains-gold precision" in _svgs(page)["tradeoff"]
