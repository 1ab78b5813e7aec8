"""The reconciler on the real service: the store and the registry are damaged behind its back in each way
it knows, it reports each, repairs each, and then finds nothing."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np

from rag.index import collection_name
from tests.conftest import wait_for

T = "default"
SENTENCE = "Glaciers carve deep valleys as they move slowly downhill over thousands of years. "


def _upload(client, doc_id: str, text: str) -> None:
    r = client.post("/v1/documents", json={"id": doc_id, "title": doc_id, "text": text})
    job = r.json()["job_ids"][0]
    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)


def _points(store, coll: str, doc_id: str) -> list:
    return [p for b in store.iter_points(coll, tenant=T) for p in b if p.payload["document_id"] == doc_id]


def test_each_kind_of_damage_is_found_repaired_and_then_gone(app_client) -> None:
    client = app_client
    svc = client.services
    texts = {f"d{i}": f"Document {i} is about topic number {i}. " + SENTENCE for i in range(1, 8)}
    texts["d2"] = " ".join(f"Paragraph {k} of a long report on river deltas and sediment." for k in range(120))
    for doc_id, text in texts.items():
        _upload(client, doc_id, text)
    store, registry = svc.store, svc.registry
    coll = collection_name(svc.embedder.version)
    clean = client.post("/v1/admin/reconcile", json={}).json()
    assert clean["findings"] == [] and clean["documents"] == 7 and clean["points"] >= 8

    # 1. missing_points: the store lost d1's points.
    store.delete_document(coll, T, "d1")
    # 2. incomplete: one chunk of the multi-chunk d2 is gone.
    d2 = _points(store, coll, "d2")
    assert len(d2) >= 3
    store.delete_document(coll, T, "d2")
    store.upsert(coll, [p for p in d2 if p.payload["chunk_index"] != 1])
    # 3. chunk_count and 4. content_hash: the registry's rows are wrong.
    rec3, rec4 = registry.get_document(T, "d3"), registry.get_document(T, "d4")
    registry.upsert_documents([msgspec.structs.replace(rec3, chunk_count=99),
                               msgspec.structs.replace(rec4, content_hash="0" * 64)])
    # 5. several_generations: a second live generation of d5.
    from rag.store import point_id

    d5 = _points(store, coll, "d5")
    store.upsert(coll, [msgspec.structs.replace(p, id=point_id(T, "d5", "f" * 64, i),
                                                payload={**p.payload, "content_hash": "f" * 64})
                        for i, p in enumerate(d5)])
    # 6. wrong_encoder: d6's vectors are another encoder's.
    d6 = _points(store, coll, "d6")
    original = np.asarray(d6[0].vector)
    rng = np.random.default_rng(0)
    store.upsert(coll, [msgspec.structs.replace(p, vector=rng.standard_normal(len(p.vector)).tolist(),
                                                payload={**p.payload, "encoder_version": "some-old-encoder"})
                        for p in d6])
    # 7. orphan_points: the registry forgot d7.
    registry.delete_document(T, "d7")

    found = client.post("/v1/admin/reconcile", json={}).json()
    assert found["counts"] == {"missing_points": 1, "incomplete": 1, "chunk_count": 1, "content_hash": 1,
                               "several_generations": 1, "wrong_encoder": 1, "orphan_points": 1}, found
    assert {(f["document_id"], f["problem"]) for f in found["findings"]} == {
        ("d1", "missing_points"), ("d2", "incomplete"), ("d3", "chunk_count"), ("d4", "content_hash"),
        ("d5", "several_generations"), ("d6", "wrong_encoder"), ("d7", "orphan_points")}
    assert not any(f["repaired"] for f in found["findings"])
    metrics = client.get("/metrics").text
    assert 'rag_index_inconsistencies{problem="orphan_points"} 1.0' in metrics

    repaired = client.post("/v1/admin/reconcile", json={"repair": True}).json()
    assert all(f["repaired"] for f in repaired["findings"]) and len(repaired["findings"]) == 7
    after = client.post("/v1/admin/reconcile", json={}).json()
    assert after["findings"] == [], after

    ids = {d["id"] for d in client.get("/v1/documents").json()["documents"]}
    assert ids == {"d3", "d4", "d5", "d6"}  # d1, d2 must be uploaded again; d7 was never known
    assert registry.get_document(T, "d3").chunk_count == len(_points(store, coll, "d3"))
    assert {p.payload["content_hash"] for p in _points(store, coll, "d5")} == {registry.get_document(T, "d5").content_hash}
    fixed = np.asarray(_points(store, coll, "d6")[0].vector)
    assert float(fixed @ original / np.linalg.norm(fixed) / np.linalg.norm(original)) > 0.999  # re-embedded alike
    hit = client.post("/v1/search", json={"query": "Document 6 is about topic number 6", "top_k": 1,
                                          "mode": "dense"}).json()["results"][0]
    assert hit["document_id"] == "d6"
    assert store.count(coll, tenant=T, document_id="d7") == 0


def test_doctor_command_runs_in_process(tmp_path) -> None:
    env = {"RAG_DATA_DIR": str(tmp_path / "data"), "RAG_LLM_LOCAL": "no", "RAG_LOG_LEVEL": "warning"}
    import os

    out = subprocess.run([sys.executable, "-m", "rag", "doctor", "--local"], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "0 documents" in out.stdout and "orphan_points" in out.stdout
