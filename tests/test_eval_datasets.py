"""BEIR and QA loaders: the real benchmark files, and malformed ones that must fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.datasets import DatasetError, dataset_hash, load_beir, load_qa, load_qrels, load_queries, qa_as_retrieval


def _beir(root: Path, *, corpus: str | None = None, queries: str | None = None, qrels: str | None = None) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(corpus if corpus is not None else (
        '{"_id": "d1", "title": "T1", "text": "one"}\n{"_id": "d2", "title": "", "text": "two"}\n'
        '{"_id": 3, "text": "three"}\n'))
    (root / "queries.jsonl").write_text(queries if queries is not None else (
        '{"_id": "q1", "text": "first?"}\n{"_id": "q2", "text": "second?"}\n'))
    (root / "qrels" / "test.tsv").write_bytes((qrels if qrels is not None else (
        "query-id\tcorpus-id\tscore\r\nq1\td1\t2\r\nq1\td2\t1\r\nq2\t3\t0\r\n")).encode())
    return root


def test_loads_a_beir_folder_with_crlf_qrels_and_graded_scores(tmp_path):
    ds = load_beir(_beir(tmp_path / "mini"), "test")
    assert ds.name == "mini"
    assert ds.qrels == {"q1": {"d1": 2, "d2": 1}, "q2": {"3": 0}}
    assert ds.split_query_ids == ["q1", "q2"]
    assert ds.queries["q2"] == "second?"
    assert len(ds.hash) == 64 and len(ds.corpus_hash) == 64


def test_dataset_hash_follows_the_content(tmp_path):
    root = _beir(tmp_path / "a")
    files = [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / "test.tsv"]
    first = dataset_hash(files, root)
    assert dataset_hash(files, root) == first
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert dataset_hash(files, root) != first


def test_bad_json_line_names_file_and_line(tmp_path):
    root = _beir(tmp_path / "bad", corpus='{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": "cut\n')
    with pytest.raises(DatasetError) as err:
        load_beir(root, "test")
    assert err.value.line == 2
    assert "corpus.jsonl:2" in str(err.value) and "invalid JSON" in str(err.value)


@pytest.mark.parametrize(("body", "line", "words"), [
    ("query-id\tcorpus-id\tscore\r\nq1\td1\r\n", 2, "3 tab-separated columns"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1 d2 1\n", 3, "got 1"),
    ("query-id\tcorpus-id\r\nq1\td1\r\n", 1, "header"),
    ("query-id\tcorpus-id\tscore\nq1\td1\thigh\n", 2, "integer"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", 3, "duplicate"),
    ("query-id\tcorpus-id\tscore\n\tdl\t1\n", 2, "empty"),
])
def test_malformed_qrels(tmp_path, body, line, words):
    path = tmp_path / "qrels.tsv"
    path.write_bytes(body.encode())
    with pytest.raises(DatasetError) as err:
        load_qrels(path)
    assert err.value.line == line
    assert str(path) in str(err.value) and words in str(err.value)


def test_malformed_queries_and_corpus(tmp_path):
    q = tmp_path / "queries.jsonl"
    q.write_text('{"_id": "q1", "text": "a"}\n\n{"_id": "q2"}\n')
    with pytest.raises(DatasetError, match=r"queries.jsonl:3: missing 'text'"):
        load_queries(q)
    q.write_text('{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n')
    with pytest.raises(DatasetError, match=r":2: duplicate _id 'q1' \(first on line 1\)"):
        load_queries(q)
    q.write_text('["not", "an", "object"]\n')
    with pytest.raises(DatasetError, match=r":1: expected a JSON object, got list"):
        load_queries(q)
    root = _beir(tmp_path / "c", corpus='{"_id": "d1", "text": 5}\n')
    with pytest.raises(DatasetError, match=r"corpus.jsonl:1: 'text' must be a string"):
        load_beir(root)


def test_dangling_ids_and_missing_split(tmp_path):
    root = _beir(tmp_path / "d", qrels="query-id\tcorpus-id\tscore\nq1\tnope\t1\n")
    with pytest.raises(DatasetError, match=r"judged doc ids are not in corpus.jsonl.*nope"):
        load_beir(root)
    root = _beir(tmp_path / "e", qrels="query-id\tcorpus-id\tscore\nq9\td1\t1\n")
    with pytest.raises(DatasetError, match=r"not in queries.jsonl"):
        load_beir(root)
    with pytest.raises(DatasetError, match=r"split 'dev' not found; available: test"):
        load_beir(root, "dev")


def test_real_scifact(shared_data):
    ds = load_beir(shared_data / "scifact", "test")
    assert len(ds.qrels) == 300
    assert sum(len(v) for v in ds.qrels.values()) == 339
    assert len(ds.queries) == 1109
    train = load_beir(shared_data / "scifact", "train", validate_corpus=False)
    assert sum(len(v) for v in train.qrels.values()) == 919
    assert train.corpus_hash == ds.corpus_hash and train.hash != ds.hash


def test_real_squad_qa(shared_data):
    examples = load_qa(shared_data / "squad2-dev" / "qa.jsonl")
    assert len(examples) == 6078
    answerable = [e for e in examples if not e.is_impossible]
    assert len(answerable) == 2910
    first = examples[0]
    assert first.question == "In what country is Normandy located?"
    assert first.answer == "France" and first.gold_doc_ids == ("Normans_0",)
    queries, qrels = qa_as_retrieval(examples)
    assert len(queries) == len(qrels) == 2910
    assert qrels[first.id] == {"Normans_0": 1}


def test_malformed_qa(tmp_path):
    path = tmp_path / "qa.jsonl"
    good = {"id": "a", "question": "Q?", "answer": "x", "answers": ["x"], "answer_starts": [0],
            "is_impossible": False, "gold_doc_ids": ["d"], "contexts": ["x"], "title": "t"}
    lines = [good, {**good, "id": "b", "answer": "", "answers": []}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DatasetError, match=r"qa.jsonl:2: question 'b' is answerable but has no answer"):
        load_qa(path)
    path.write_text(json.dumps({**good, "answer_starts": ["0"]}) + "\n")
    with pytest.raises(DatasetError, match=r":1: 'answer_starts' must be a list of integers"):
        load_qa(path)
    # Unanswerable questions load with no answer.
    path.write_text(json.dumps({**good, "answer": "", "answers": [], "is_impossible": True, "gold_doc_ids": []}) + "\r\n")
    [ex] = load_qa(path)
    assert ex.is_impossible and ex.answers == ()
