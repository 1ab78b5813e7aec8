"""Embedding drift: the statistics on synthetic samples (fixed seeds), the API's opt-in query sample,
snapshots of a collection, the CLI's reports, and the real encoder telling SciFact from SQuAD."""

from __future__ import annotations

import argparse
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from eval.drift import (
    DriftThresholds,
    SampleInfo,
    analyse,
    centroid_shift,
    classifier_test,
    mmd_permutation_test,
    mmd_rbf,
    neighbour_overlap_at_k,
    variance_stats,
)
from rag.query_sample import QuerySample
from rag.settings import Settings

DIM = 32
# The statistics' own defaults, except the MMD² floor: that one is calibrated for unit text embeddings.
SYNTHETIC = DriftThresholds(min_mmd2=0.0)


def gaussian(n: int, seed: int, shift: float = 0.0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)) + shift


def info(label: str, x: np.ndarray) -> SampleInfo:
    return SampleInfo(label=label, source="synthetic", kind="npy", count_available=len(x), count_used=len(x),
                      dimension=x.shape[1])


def run(x: np.ndarray, y: np.ndarray, thresholds: DriftThresholds = SYNTHETIC, **kw):
    return analyse(x, y, reference_info=info("reference", x), current_info=info("current", y),
                   thresholds=thresholds, permutations=200, seed=0, **kw)


# ---- statistics ----------------------------------------------------------------------------------


def test_unbiased_mmd_matches_the_direct_formula():
    x, y = gaussian(30, 1), gaussian(40, 2, shift=0.5)
    gamma = 0.01

    def k(a, b):
        return np.exp(-gamma * ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    direct = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
              - 2 * kxy.mean())
    assert mmd_rbf(x, y, gamma=gamma) == pytest.approx(direct, rel=1e-4, abs=1e-7)
    observed, _ = mmd_permutation_test(x, y, 50, seed=0, gamma=gamma)
    assert observed == pytest.approx(direct, rel=1e-3, abs=1e-6)


def test_unshifted_samples_are_not_drift():
    x, y = gaussian(300, 1), gaussian(300, 2)
    report = run(x, y)
    assert report.mmd.p_value > 0.05
    assert report.classifier.accuracy < 0.6 and report.classifier.p_value > 0.01
    assert report.variance.collapsed_dims == 0
    assert report.verdict == "ok", report.reasons


def test_mean_shifted_samples_are_drift():
    x, y = gaussian(300, 1), gaussian(300, 2, shift=0.3)
    report = run(x, y)
    assert report.mmd.p_value < 0.01
    assert report.mmd.p_value == pytest.approx(1 / 201)  # nothing in the null came close
    assert report.classifier.accuracy > 0.75
    assert report.verdict == "drift"
    assert any(r.startswith("distribution") for r in report.reasons)


def test_permutation_p_value_is_roughly_uniform_under_no_drift():
    # 20 pairs from one distribution: a 5 % test rejects about one of them.
    ps = [mmd_permutation_test(gaussian(60, 2 * i), gaussian(60, 2 * i + 1), 100, seed=i)[1] for i in range(20)]
    assert sum(p < 0.05 for p in ps) <= 3
    assert 0.25 < float(np.median(ps)) < 0.75


def test_collapsed_dimensions_are_detected():
    x, y = gaussian(300, 1), gaussian(300, 2)
    y[:, :5] *= 0.01  # five dimensions lose (almost) all of their variance
    stats = variance_stats(x, y, min_variance_ratio=0.1)
    assert stats.collapsed_dims == 5 and stats.ratio_min < 1e-3
    report = run(x, y)
    assert report.verdict == "drift"
    assert any(r.startswith("collapse: 5 of 32") for r in report.reasons)


def test_centroid_shift_of_unit_vectors():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(DIM)
    x = base + 0.5 * rng.standard_normal((400, DIM))
    same = centroid_shift(x[:200], x[200:])
    turned = centroid_shift(x, -base + 0.5 * rng.standard_normal((400, DIM)))
    assert same.cosine < 0.01 and turned.cosine > 1.9
    assert centroid_shift(x, x).l2 == pytest.approx(0.0, abs=1e-9)


def test_classifier_test_alone():
    flat = classifier_test(gaussian(200, 1), gaussian(200, 2), seed=0)
    shifted = classifier_test(gaussian(200, 1), gaussian(200, 2, shift=0.5), seed=0)
    assert flat.p_value > 0.01 and shifted.p_value < 1e-6 and shifted.auc > 0.9


def test_neighbour_overlap_identical_rotated_and_shuffled():
    x = gaussian(300, 3)
    assert neighbour_overlap_at_k(x, x, 10).mean() == 1.0
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((DIM, DIM)))
    assert neighbour_overlap_at_k(x, x @ q, 10).mean() == pytest.approx(1.0)  # cosine neighbours survive a rotation
    shuffled = x[np.random.default_rng(5).permutation(len(x))]
    assert neighbour_overlap_at_k(x, shuffled, 10).mean() < 0.1  # ~ k / n by chance
    noisy = neighbour_overlap_at_k(x, x + 0.5 * gaussian(300, 6), 10).mean()
    assert 0.1 < noisy < 1.0


def test_paired_report_of_two_encoders():
    x = gaussian(200, 7) * np.linspace(0.2, 3.0, DIM)  # anisotropic, as text embeddings are
    same = run(x, x.copy(), paired=True)
    assert same.overlap.mean == 1.0 and same.overlap.paired_cosine == pytest.approx(1.0)
    assert same.verdict == "ok", same.reasons
    # A rotated space is another space (the distribution test tells them apart) with the same neighbours: ok.
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((DIM, DIM)))
    rotated = run(x, x @ q, paired=True)
    assert rotated.mmd.p_value < 0.01 and rotated.overlap.mean > 0.9 and rotated.verdict == "ok"
    shuffled = run(x, x[np.random.default_rng(8).permutation(len(x))], paired=True)
    assert shuffled.overlap.mean < SYNTHETIC.min_neighbour_overlap
    assert any(r.startswith("neighbours") for r in shuffled.reasons)
    # Different dimensions: no shared space, so only the overlap is computed.
    other = run(x, gaussian(200, 9, dim=16), paired=True)
    assert other.mmd is None and other.overlap is not None and other.notes


def test_subsampling_bounds_the_work():
    report = run(gaussian(500, 1), gaussian(400, 2), max_samples=100)
    assert (report.reference.count_used, report.current.count_used) == (100, 100)


# ---- the API's query sample ----------------------------------------------------------------------


def test_query_sample_reservoir_is_bounded_uniform_and_thread_safe():
    sample = QuerySample(50, encoder_version="v", seed=1)
    vectors = np.arange(1000 * 4, dtype=np.float32).reshape(1000, 4)

    def feed(part):
        for row in part:
            sample.add_many(row)

    threads = [threading.Thread(target=feed, args=(vectors[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept, seq, times = sample.arrays()
    assert len(kept) == len(sample) == 50 and sample.seen == 1000
    assert list(seq) == sorted(seq) and len(set(seq.tolist())) == 50
    assert 200 < float(np.median(seq)) < 800  # drawn from the whole stream, not its start
    snap = sample.snapshot()
    assert snap.count == 50 and snap.dimension == 4 and len(snap.vectors) == 50 and snap.seen == 1000
    with pytest.raises(ValueError):
        QuerySample(0)


def test_query_sampling_is_off_by_default(app_client):
    assert Settings().query_sample_size == 0
    assert app_client.services.retriever.query_sample is None
    app_client.post("/v1/search", json={"query": "anything", "top_k": 3})
    resp = app_client.get("/v1/admin/query-sample")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "query_sample_disabled"


@pytest.fixture
def settings(tmp_path: Path, request) -> Settings:
    # conftest's settings, plus RAG_QUERY_SAMPLE_SIZE when a test parametrizes it.
    return Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no",
                    query_sample_size=getattr(request, "param", 0))


@pytest.mark.parametrize("settings", [6], indirect=True)
def test_query_sample_keeps_vectors_not_text(app_client, embedder, tmp_path):
    questions = ["where do glaciers form", "how do vaccines work", "what is dark matter", "who built the pyramids",
                 "why is the ocean salty", "when did rome fall", "which metals conduct heat"]
    for i, q in enumerate(questions):
        mode = "hybrid" if i % 2 else "dense"
        assert app_client.post("/v1/search", json={"query": q, "top_k": 3, "mode": mode}).status_code == 200
    assert app_client.post("/v1/search", json={"query": "bm25 only", "mode": "sparse"}).status_code == 200
    resp = app_client.get("/v1/admin/query-sample")
    assert resp.status_code == 200
    body = resp.json()
    assert body["count"] == 6 and body["seen"] == 7 and body["capacity"] == 6  # sparse queries are not embedded
    assert body["dimension"] == embedder.dimension and body["encoder_version"] == embedder.version
    text = json.dumps(body)
    assert not any(re.search(rf"\b{word}\b", text) for q in questions for word in q.split() if len(word) > 3)
    expected = embedder.embed_queries(questions)
    for seq, vec in zip(body["seq"], body["vectors"], strict=True):
        assert np.allclose(vec, expected[seq], atol=1e-4)

    out = app_client.post("/v1/admin/query-sample/export")
    assert out.status_code == 200
    path = Path(out.json()["path"])
    assert path == app_client.services.settings.data_dir / "query-sample.npy"
    assert np.load(path).shape == (6, embedder.dimension)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seq"] == body["seq"] and meta["encoder_version"] == embedder.version

    # ... and `python -m eval drift --queries` reads it (earlier half vs later half by default).
    from eval.__main__ import main

    saved = tmp_path / "served.json"
    saved.write_text(json.dumps(body))
    assert main(["drift", "--queries", str(saved), "--out", str(tmp_path / "q"), "--no-progress",
                 "--permutations", "100"]) == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["kind"] == "queries" and report["reference"]["count_used"] == 3
    assert report["current"]["count_used"] == 3 and report["reference"]["encoder_version"] == embedder.version


# ---- snapshots and the CLI -----------------------------------------------------------------------


def test_export_snapshot_of_the_active_collection(tmp_path):
    from eval.drift_run import export_snapshot, load_source
    from rag.store import EdgeVectorStore, point_id
    from rag.types import PointRecord

    data_dir = tmp_path / "data"
    vectors = gaussian(60, 11, dim=8).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # the store keeps unit vectors (cosine)
    with EdgeVectorStore(data_dir / "qdrant") as store:
        store.ensure_collection("chunks-test-v1", 8)
        store.set_active("chunks-test-v1")
        store.upsert("chunks-test-v1", [
            PointRecord(id=point_id("t", f"doc{i // 3}", "h", i), vector=vectors[i].tolist(),
                        payload={"tenant": "t", "document_id": f"doc{i // 3}", "content_hash": "h", "live": i < 57,
                                 "chunk_index": i % 3})
            for i in range(60)])
    meta = export_snapshot(Settings(data_dir=data_dir), tmp_path / "snap.npy", progress=False)
    assert meta["collection"] == "chunks-test-v1" and meta["encoder_version"] == "test-v1"
    assert meta["count"] == 57  # live points only
    saved = np.load(tmp_path / "snap.npy")
    assert saved.shape == (57, 8)
    assert {tuple(np.round(v, 5)) for v in saved} == {tuple(np.round(v, 5)) for v in vectors[:57]}
    sample = load_source(str(tmp_path / "snap.npy"), "reference", Settings(), get_embedder=None, max_samples=0,
                         seed=0, progress=False)
    assert len(sample.vectors) == 19 and sample.info.detail["unit"] == "one random vector per document"


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")
def test_both_stores_scroll_every_live_dense_vector(tmp_path):
    from qdrant_client import QdrantClient

    from rag.store import EdgeVectorStore, QdrantServerStore, point_id
    from rag.types import PointRecord

    vectors = gaussian(1100, 12, dim=8).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    points = [PointRecord(id=point_id(t, f"d{i}", "h", 0), vector=vectors[i].tolist(),
                          payload={"tenant": t, "document_id": f"d{i}", "content_hash": "h", "live": True,
                                   "chunk_index": 0})
              for i in range(1100) for t in ["a" if i % 2 else "b"]]
    for store in (EdgeVectorStore(tmp_path / "edge"), QdrantServerStore(QdrantClient(":memory:"))):
        try:
            store.ensure_collection("c", 8)
            store.upsert("c", points)
            batches = list(store.iter_dense("c", tenant="a", batch_size=200))
            ids = [d for doc_ids, _ in batches for d in doc_ids]
            got = np.array([v for _, vs in batches for v in vs])
            assert len(batches) >= 3 and sorted(ids) == sorted(f"d{i}" for i in range(1, 1100, 2))
            by_id = dict(zip(ids, got, strict=True))
            assert np.allclose(by_id["d7"], vectors[7], atol=1e-6)
            assert sum(len(v) for _, v in store.iter_dense("c")) == 1100
            assert list(store.iter_dense("c", tenant="nobody")) == []
        finally:
            store.close()


def test_cli_writes_reports_and_gates_on_request(tmp_path, capsys):
    from eval.__main__ import main

    unit = gaussian(300, 1)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    shifted = gaussian(300, 2, shift=0.4)
    shifted /= np.linalg.norm(shifted, axis=1, keepdims=True)
    np.save(tmp_path / "ref.npy", unit)
    np.save(tmp_path / "cur.npy", shifted)
    out = tmp_path / "report"
    argv = ["drift", "--reference", str(tmp_path / "ref.npy"), "--current", str(tmp_path / "cur.npy"),
            "--out", str(out), "--no-progress", "--permutations", "100"]
    assert main(argv) == 0  # drift is reported, not an error ...
    assert main([*argv, "--fail-on-drift"]) == 1  # ... unless asked to gate
    printed = capsys.readouterr().out
    assert "VERDICT: DRIFT" in printed and "MMD²" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "rag-eval/drift/1" and report["verdict"] == "drift"
    assert report["reference"]["dataset_hash"] and "commit" in report["git"]
    assert report["settings"]["drift_p_value"] == Settings().drift_p_value
    assert {"p_value", "min_mmd2", "max_centroid_shift"} <= set(report["thresholds"])
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("<svg") >= 3 and "DRIFT" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained

    assert main(["drift", "--reference", str(tmp_path / "ref.npy"), "--split-half", "--out", str(tmp_path / "half"),
                 "--no-progress", "--permutations", "100", "--fail-on-drift"]) == 0
    assert json.loads((tmp_path / "half" / "report.json").read_text())["verdict"] == "ok"
    # usage errors exit 2
    assert main(["drift", "--reference", str(tmp_path / "ref.npy"), "--out", str(tmp_path / "x")]) == 2
    assert main(["drift", "--encoders", "a", "b", "--out", str(tmp_path / "x")]) == 2


# ---- the real encoder on real corpora ------------------------------------------------------------


def _head(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True)
    with src.open(encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(n)]
    (dst / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    return dst


def _args(**kw) -> argparse.Namespace:
    base = {"reference": None, "current": None, "split_half": False, "queries": None, "encoders": None,
            "dataset": None, "encoder": None, "max_samples": None, "permutations": 200, "seed": 0, "k": 10,
            "no_classifier": False, "no_progress": True, "cache_dir": None, "no_cache": False}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
def test_scifact_vs_squad_alarms_and_scifact_halves_do_not(shared_data, embedder, tmp_path):
    from eval.drift_run import build_drift_report

    scifact = _head(shared_data / "scifact" / "corpus.jsonl", tmp_path / "scifact", 120)
    squad = _head(shared_data / "squad2-dev" / "corpus.jsonl", tmp_path / "squad", 60)
    settings = Settings(data_dir=tmp_path / "data")
    cache = str(tmp_path / "cache")  # SciFact's chunks are embedded once for both comparisons

    halves = build_drift_report(_args(reference=str(scifact), split_half=True, cache_dir=cache), settings,
                                embedder=embedder)
    assert (halves.reference.count_used, halves.current.count_used) == (60, 60)
    assert halves.verdict == "ok", halves.reasons
    assert halves.mmd.p_value > 0.05

    shifted = build_drift_report(_args(reference=str(scifact), current=str(squad), max_samples=60, cache_dir=cache),
                                 settings, embedder=embedder)
    assert shifted.verdict == "drift"
    assert shifted.mmd.p_value < 0.01 and shifted.mmd.mmd2 > settings.drift_min_mmd2
    assert shifted.centroid.cosine > settings.drift_max_centroid_shift
    assert shifted.classifier.accuracy > 0.85
    assert shifted.reference.encoder_version == embedder.version == shifted.current.encoder_version

    same = build_drift_report(_args(encoders=["default", "default"], dataset=str(scifact), max_samples=60,
                                    cache_dir=cache), settings, embedder=embedder)
    assert same.overlap.mean == 1.0 and same.verdict == "ok"
