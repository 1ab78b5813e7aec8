"""Retrieval evaluation end to end on a SciFact slice (real worker, store, retriever), and ``compare``'s exit codes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.report import build_report, write_reports
from eval.retrieval import EvalOptions, run_retrieval_eval
from rag.settings import Settings

SLICE_QUERIES = 40
SLICE_DISTRACTORS = 150


def _scifact_slice(src: Path, dst: Path) -> Path:
    """The first 40 test queries, their relevant abstracts and 150 other abstracts (fixed seed)."""
    (dst / "qrels").mkdir(parents=True)
    lines = (src / "qrels" / "test.tsv").read_bytes().decode().splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    qids = list(dict.fromkeys(r[0] for r in rows))[:SLICE_QUERIES]
    keep = [r for r in rows if r[0] in qids]
    relevant = {r[1] for r in keep}
    corpus = [json.loads(line) for line in (src / "corpus.jsonl").open()]
    others = [d for d in corpus if d["_id"] not in relevant]
    random.Random(0).shuffle(others)
    docs = [d for d in corpus if d["_id"] in relevant] + others[:SLICE_DISTRACTORS]
    (dst / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [json.loads(line) for line in (src / "queries.jsonl").open()]
    (dst / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries if q["_id"] in qids))
    (dst / "qrels" / "test.tsv").write_bytes(("query-id\tcorpus-id\tscore\r\n"
                                              + "".join("\t".join(r) + "\r\n" for r in keep)).encode())
    return dst


@pytest.fixture(scope="module")
def evaluated(shared_data, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dataset = _scifact_slice(shared_data / "scifact", root / "scifact-slice")
    settings = Settings(data_dir=root / "unused", log_format="json", log_level="warning")
    options = EvalOptions(dataset=dataset, modes=["dense", "sparse", "hybrid"], data_dir=root / "eval-data",
                          progress=False, resamples=200)
    run = run_retrieval_eval(settings, options, embedder=embedder)
    paths = write_reports(run, root / "out")
    return run, paths, options, settings


@pytest.mark.slow
def test_scifact_slice_through_the_real_pipeline(evaluated):
    run, paths, _, _ = evaluated
    assert run.index is not None and not run.index.reused
    assert run.index.failed_documents == 0
    relevant = {d for judged in run.dataset.qrels.values() for d in judged}
    assert run.index.documents == len(relevant) + SLICE_DISTRACTORS
    assert run.index.chunks >= run.index.documents
    assert len(run.query_ids) == SLICE_QUERIES
    dense = run.results["dense"].summary
    # Random ranking of ~190 documents would give nDCG@10 around 0.03.
    assert dense.metrics["ndcg@10"] > 0.4, dense.metrics
    assert dense.metrics["recall@100"] > 0.8
    assert run.results["sparse"].summary.metrics["ndcg@10"] > 0.4
    assert run.results["hybrid"].summary.metrics["ndcg@10"] > 0.4
    assert dense.evaluated == SLICE_QUERIES and not dense.skipped
    lo, hi = dense.ci["ndcg@10"]
    assert lo <= dense.metrics["ndcg@10"] <= hi
    # Documents, not chunks: no document twice in a ranking, and at most 100.
    for ranking in run.results["dense"].runs.values():
        ids = [d for d, _ in ranking]
        assert len(ids) == len(set(ids)) <= 100


@pytest.mark.slow
def test_report_files(evaluated):
    run, paths, _, _ = evaluated
    report = json.loads(paths["json"].read_text())
    assert report["dataset"]["hash"] == run.dataset.hash
    assert report["encoder_version"] == run.encoder_version
    assert report["git"]["commit"]
    assert report["settings"]["chunk_tokens"] == 200
    assert set(report["modes"]) == {"dense", "sparse", "hybrid"}
    dense = report["modes"]["dense"]
    assert set(dense["metrics"]) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10", "p@1", "p@5", "p@10"}
    assert set(dense["curves"]["ndcg"]) == {"1", "3", "5", "10", "20", "50", "100"}
    assert len(dense["per_query"]) == SLICE_QUERIES
    assert dense["per_query"][0]["top"]
    page = paths["html"].read_text()
    assert page.count("<svg") >= 4 + 3  # four metric-vs-k plots, a histogram per mode
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    trec = paths["run-dense"].read_text().splitlines()
    assert trec[0].split()[1] == "Q0" and len(trec[0].split()) == 6


@pytest.mark.slow
def test_rerun_reuses_the_index_and_http_gives_the_same_numbers(evaluated, embedder):
    run, _, options, settings = evaluated
    again = run_retrieval_eval(settings, EvalOptions(**{**_fields(options), "modes": ["dense"],
                                                        "limit_queries": 10}), embedder=embedder)
    assert again.index.reused and again.index.ingest_s == 0
    assert again.results["dense"].runs == {q: run.results["dense"].runs[q] for q in again.query_ids}

    # The service, over the same data directory, measured from outside over HTTP.
    from litestar.testing import TestClient

    from tests.conftest import build_app
    from rag.services import Services
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    service_settings = Settings(data_dir=options.data_dir, log_format="json", log_level="warning", run_worker="no",
                                llm_local="no")
    store = open_store(service_settings)
    registry = SqliteRegistry(service_settings.registry_path)
    services = Services(settings=service_settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(service_settings, services=services), timeout=60) as client:
            http = run_retrieval_eval(settings, EvalOptions(**{**_fields(options), "upload": False,
                                                               "modes": ["dense", "hybrid"]}),
                                      http_client=client)
    finally:
        registry.close()
        store.close()
    assert http.encoder_version == run.encoder_version
    for mode in ("dense", "hybrid"):
        for name, value in run.results[mode].summary.metrics.items():
            assert http.results[mode].summary.metrics[name] == pytest.approx(value, abs=1e-9), (mode, name)
    assert "hybrid" in build_report(http)["modes"]


def _fields(options: EvalOptions) -> dict:
    return {name: getattr(options, name) for name in EvalOptions.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def _report(path: Path, ndcg: float, *, modes=("dense", "hybrid"), per_query=(0.5, 0.7)) -> Path:
    modes_out = {}
    for mode in modes:
        modes_out[mode] = {
            "metrics": {"ndcg@10": ndcg, "recall@100": 0.9}, "ci95": {"ndcg@10": [ndcg - 0.05, ndcg + 0.05]},
            "curves": {"ndcg": {"5": ndcg - 0.02, "10": ndcg}}, "queries_evaluated": len(per_query),
            "per_query": [{"id": f"q{i}", "metrics": {"ndcg@10": v}} for i, v in enumerate(per_query)],
        }
    path.write_text(json.dumps({"schema": "rag-eval/retrieval/1", "encoder_version": "enc", "git": {"commit": "abc"},
                                "dataset": {"name": "d", "split": "test", "hash": "h"}, "modes": modes_out}))
    return path


def test_compare_exit_codes(tmp_path, capsys):
    base = _report(tmp_path / "a.json", 0.650)
    same = _report(tmp_path / "b.json", 0.645, per_query=(0.49, 0.70))  # -0.005: within 0.01
    worse = _report(tmp_path / "c.json", 0.630, per_query=(0.45, 0.70))  # -0.020
    assert main(["compare", str(base), str(same), "--metric", "ndcg@10", "--max-drop", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0.6500" in out and "0.6450" in out and "paired" in out
    assert main(["compare", str(base), str(worse), "--metric", "ndcg@10", "--max-drop", "0.01"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["compare", str(base), str(worse), "--max-drop", "0.05", "--mode", "hybrid"]) == 0
    # Improvements never fail; a metric found only in the curves (ndcg@5) can gate too.
    assert main(["compare", str(worse), str(base), "--metric", "nDCG@5"]) == 0
    # A folder holding report.json works as well.
    (tmp_path / "run").mkdir()
    _report(tmp_path / "run" / "report.json", 0.65)
    assert main(["compare", str(tmp_path / "run"), str(base)]) == 0


def test_compare_usage_errors_exit_2(tmp_path, capsys):
    base = _report(tmp_path / "a.json", 0.65)
    dense_only = _report(tmp_path / "d.json", 0.65, modes=("dense",))
    (tmp_path / "broken.json").write_text("{not json")
    cases = [
        [str(base), str(tmp_path / "missing.json")],
        [str(base), str(tmp_path / "broken.json")],
        [str(base), str(base), "--metric", "map@10"],
        [str(base), str(base), "--metric", "recall@7"],
        [str(base), str(dense_only), "--mode", "hybrid"],
        [str(base), str(base), "--max-drop", "-1"],
    ]
    for args in cases:
        assert main(["compare", *args]) == 2, args
        assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # argparse: a missing operand
        main(["compare", str(base)])
    assert err.value.code == 2
