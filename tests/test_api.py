"""The real app end to end: upload → job → search, re-uploads, deletes, bad input, tenants."""

from __future__ import annotations

import io
import json

import pytest

from tests.conftest import wait_for

ALPHA = (
    "# Volcanoes\n\nMount Etna is an active stratovolcano on the east coast of Sicily. "
    "It erupts frequently and its lava flows have shaped the surrounding farmland.\n\n"
    "# Glaciers\n\nThe Aletsch Glacier is the largest glacier in the Alps, flowing for twenty kilometres "
    "through the Bernese Oberland in Switzerland."
)
BETA = "Photosynthesis converts light energy into chemical energy stored in glucose inside chloroplasts."


def upload(client, name: str, data: bytes | str, tenant: str = "default", **fields):
    if isinstance(data, str):
        data = data.encode()
    resp = client.post("/v1/documents", files={"file": (name, io.BytesIO(data))}, data=fields or None,
                       headers={"X-Tenant": tenant})
    assert resp.status_code == 202, resp.text
    return resp.json()


def finish(client, job_id: str, tenant: str = "default") -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}", headers={"X-Tenant": tenant}).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=120)


def search(client, query: str, tenant: str = "default", **body):
    resp = client.post("/v1/search", json={"query": query, **body}, headers={"X-Tenant": tenant})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def live_chunks(client, document_id: str, tenant: str = "default") -> int:
    svc = client.services
    return svc.store.count(svc.collection, tenant=tenant, document_id=document_id)


def test_upload_job_search_finds_the_right_chunk(app_client):
    out = upload(app_client, "geo.md", ALPHA)
    assert out["document_ids"] == ["geo.md"]
    job = finish(app_client, out["job_ids"][0])
    assert job["status"] == "succeeded", job
    assert job["progress"]["documents_done"] == 1 and job["progress"]["chunks"] >= 1
    hits = search(app_client, "largest ice river in the Alps", top_k=3)
    top = hits[0]
    assert top["document_id"] == "geo.md"
    assert "Aletsch" in top["text"]
    start, end = top["offsets"]
    assert ALPHA[start:end] == top["text"]
    assert top["heading_path"] == ["Glaciers"]
    doc = app_client.get("/v1/documents/geo.md").json()
    assert doc["status"] == "indexed" and doc["chunk_count"] == live_chunks(app_client, "geo.md")
    assert doc["encoder_version"] == app_client.services.embedder.version


def test_reupload_identical_is_noop_and_changed_content_replaces(app_client):
    job = finish(app_client, upload(app_client, "notes.txt", BETA)["job_ids"][0])
    assert job["documents"][0]["status"] == "indexed"
    before = app_client.get("/v1/documents/notes.txt").json()
    again = finish(app_client, upload(app_client, "notes.txt", BETA)["job_ids"][0])
    assert again["status"] == "succeeded" and again["documents"][0]["status"] == "unchanged"
    assert app_client.get("/v1/documents/notes.txt").json()["updated_at"] == before["updated_at"]

    changed = "Mitochondria produce ATP through oxidative phosphorylation. " * 120  # several chunks
    job = finish(app_client, upload(app_client, "notes.txt", changed)["job_ids"][0])
    assert job["documents"][0]["status"] == "indexed"
    rec = app_client.get("/v1/documents/notes.txt").json()
    assert rec["chunk_count"] > 1
    assert live_chunks(app_client, "notes.txt") == rec["chunk_count"]  # nothing stale left
    texts = [h["text"] for h in search(app_client, "photosynthesis chloroplast glucose", top_k=20)]
    assert not any("Photosynthesis" in t for t in texts)


def test_delete_removes_every_chunk(app_client):
    finish(app_client, upload(app_client, "geo.md", ALPHA)["job_ids"][0])
    assert live_chunks(app_client, "geo.md") >= 1
    resp = app_client.delete("/v1/documents/geo.md")
    assert resp.status_code == 200 and resp.json()["chunks_removed"] >= 1
    assert live_chunks(app_client, "geo.md") == 0
    assert search(app_client, "Mount Etna volcano") == []
    assert app_client.get("/v1/documents/geo.md").status_code == 404
    missing = app_client.delete("/v1/documents/geo.md")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_bad_files_fail_their_own_job_and_lose_nothing(app_client):
    finish(app_client, upload(app_client, "keep.txt", BETA)["job_ids"][0])
    files = [
        ("file", ("good.md", io.BytesIO(ALPHA.encode()))),
        ("file", ("empty.txt", io.BytesIO(b"   \n"))),
        ("file", ("broken.pdf", io.BytesIO(b"%PDF-1.7\n1 0 obj <<\ngarbage"))),
        ("file", ("latin1.txt", io.BytesIO("caf\xe9 cr\xe8me".encode("latin-1")))),
        ("file", ("keep.txt", io.BytesIO(b"\x00\x01\x02binary\x00"))),
    ]
    resp = app_client.post("/v1/documents", files=files)
    assert resp.status_code == 202, resp.text
    jobs = {ref["filename"]: finish(app_client, ref["job_id"]) for ref in resp.json()["jobs"]}
    assert jobs["good.md"]["status"] == "succeeded"
    for name in ("empty.txt", "broken.pdf", "latin1.txt", "keep.txt"):
        assert jobs[name]["status"] == "failed", (name, jobs[name])
        assert jobs[name]["errors"] and jobs[name]["errors"][0]["error"], name
    assert "empty" in jobs["empty.txt"]["errors"][0]["error"].lower()
    # The earlier good version of keep.txt still serves; the bad re-upload did not touch it.
    rec = app_client.get("/v1/documents/keep.txt").json()
    assert rec["status"] == "indexed" and live_chunks(app_client, "keep.txt") == rec["chunk_count"]
    assert search(app_client, "photosynthesis", top_k=1)[0]["document_id"] == "keep.txt"


def test_oversized_upload_is_413_and_loses_nothing(app_client):
    finish(app_client, upload(app_client, "keep.txt", BETA)["job_ids"][0])
    limit = app_client.services.settings.max_upload_bytes
    big = b"a" * (limit + 1)
    resp = app_client.post("/v1/documents", files={"file": ("big.txt", io.BytesIO(big))})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"
    text = app_client.post("/v1/documents", json={"text": "x" * (app_client.services.settings.max_text_chars + 1)})
    assert text.status_code == 413
    assert live_chunks(app_client, "keep.txt") >= 1


def test_json_text_upload_with_metadata_and_filter(app_client):
    r1 = app_client.post("/v1/documents", json={"id": "etna", "title": "Etna", "text": ALPHA, "metadata": {"lang": "en", "year": 2020}})
    r2 = app_client.post("/v1/documents", json={"id": "photo", "text": BETA, "metadata": {"lang": "de", "year": 2024}})
    assert r1.status_code == 202 and r2.status_code == 202
    finish(app_client, r1.json()["job_ids"][0])
    finish(app_client, r2.json()["job_ids"][0])
    hits = search(app_client, "volcano", top_k=10, filter={"metadata.lang": "de"})
    assert {h["document_id"] for h in hits} == {"photo"}
    hits = search(app_client, "volcano", top_k=10, filter={"metadata.year": {"gte": 2021}})
    assert {h["document_id"] for h in hits} == {"photo"}
    hits = search(app_client, "volcano", top_k=10, filter={"document_id": ["etna"]})
    assert hits and {h["document_id"] for h in hits} == {"etna"}
    assert hits[0]["metadata"].items() >= {"lang": "en", "year": 2020}.items() and hits[0]["title"] == "Etna"
    bad = app_client.post("/v1/search", json={"query": "x", "filter": {"tenant": "other"}})
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_bulk_jsonl_documents_keep_their_ids(app_client):
    lines = [
        {"_id": "4983", "title": "Microstructural development", "text": "Alterations of the architecture of cerebral white matter in the developing human brain."},
        {"_id": "5836", "title": "Induction of myelodysplasia", "text": "Myelodysplastic syndromes are clonal disorders of hematopoietic stem cells."},
    ]
    body = "\n".join(json.dumps(x) for x in lines) + "\n{not json}\n"
    out = upload(app_client, "corpus.jsonl", body)
    assert out["document_ids"] == [None]
    job = finish(app_client, out["job_ids"][0])
    assert job["progress"]["documents_total"] == 3 and job["progress"]["documents_failed"] == 1
    assert job["status"] == "failed" and "line 3" in job["errors"][0]["error"]
    hits = search(app_client, "white matter brain development", top_k=1)
    assert hits[0]["document_id"] == "4983" and hits[0]["title"] == "Microstructural development"
    listing = app_client.get("/v1/documents", params={"limit": 1}).json()
    assert listing["total"] == 2 and len(listing["documents"]) == 1 and listing["next_offset"] == 1


def test_tenants_are_isolated(app_client):
    job_id = upload(app_client, "secret.txt", BETA, tenant="acme")["job_ids"][0]
    finish(app_client, job_id, tenant="acme")
    assert search(app_client, "photosynthesis", tenant="acme")
    assert search(app_client, "photosynthesis", tenant="globex") == []
    assert search(app_client, "photosynthesis", tenant="globex", filter={"document_id": "secret.txt"}) == []
    assert app_client.get(f"/v1/jobs/{job_id}", headers={"X-Tenant": "globex"}).status_code == 404
    assert app_client.get("/v1/documents/secret.txt", headers={"X-Tenant": "globex"}).status_code == 404
    assert app_client.delete("/v1/documents/secret.txt", headers={"X-Tenant": "globex"}).status_code == 404
    assert search(app_client, "photosynthesis", tenant="acme")
    bad = app_client.post("/v1/search", json={"query": "x"}, headers={"X-Tenant": "../etc"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_tenant"


def test_search_modes(app_client):
    finish(app_client, upload(app_client, "geo.md", ALPHA)["job_ids"][0])
    finish(app_client, upload(app_client, "notes.txt", BETA)["job_ids"][0])
    resp = app_client.post("/v1/search", json={"query": "largest glacier in the Alps"})
    assert resp.status_code == 200 and resp.json()["mode"] == app_client.services.settings.search_mode == "hybrid"
    for mode in ("dense", "sparse", "hybrid"):
        body = app_client.post("/v1/search", json={"query": "largest glacier in the Alps", "mode": mode, "top_k": 3}).json()
        assert body["mode"] == mode
        assert "Aletsch" in body["results"][0]["text"], mode
        assert [h["score"] for h in body["results"]] == sorted((h["score"] for h in body["results"]), reverse=True)
        # Filters and tenants hold in every mode.
        assert {h["document_id"] for h in search(app_client, "glacier", mode=mode, filter={"document_id": "notes.txt"})} \
            <= {"notes.txt"}
        assert search(app_client, "glacier", tenant="globex", mode=mode) == []
    # BM25 matches words only: an exact rare term is found, a word in no document finds nothing.
    assert search(app_client, "stratovolcano", mode="sparse", top_k=1)[0]["document_id"] == "geo.md"
    assert search(app_client, "xylophone", mode="sparse") == []
    assert search(app_client, "xylophone", mode="hybrid")  # the dense branch still answers
    nulled = app_client.post("/v1/search", json={"query": "glacier", "mode": None})
    assert nulled.status_code == 200 and nulled.json()["mode"] == "hybrid"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"query": "x", "unknown": 1}, 400),
        ({"query": "x" * 5000}, 400),
        ({"query": "x", "top_k": 0}, 400),
        ({"query": "x", "top_k": 1000}, 400),
        ({"query": "   "}, 400),
        ({"top_k": 3}, 400),
        ({"query": "x", "mode": "fuzzy"}, 400),
        ({"query": "x", "mode": 1}, 400),
    ],
)
def test_search_rejects_bad_requests(app_client, body, code):
    resp = app_client.post("/v1/search", json=body)
    assert resp.status_code == code
    err = resp.json()["error"]
    assert err["code"] and err["message"]


def test_upload_rejects_bad_requests(app_client):
    assert app_client.post("/v1/documents", content=b"hello", headers={"Content-Type": "text/plain"}).status_code == 415
    r = app_client.post("/v1/documents", json={"text": "x", "colour": "red"})
    assert r.status_code == 400 and "colour" in r.json()["error"]["message"]
    r = app_client.post("/v1/documents", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = app_client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hi"))}, data={"metadata": "[1]"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_metadata"
    assert app_client.get("/v1/jobs/nope").status_code == 404


def test_health_ready_and_openapi(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    ready = app_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["encoder_version"] == app_client.services.embedder.version
    assert ready.headers["x-request-id"]
    spec = app_client.get("/docs/openapi.json").json()
    assert "/v1/search" in spec["paths"] and "/v1/documents" in spec["paths"]
    assert app_client.get("/docs").status_code == 200


def test_cancel_a_queued_job(app_client):
    svc = app_client.services
    from rag.registry import JobItem

    job = svc.registry.create_job("default", [JobItem(filename="x.txt", path="/nonexistent")])
    svc.registry.request_cancel(job.id)
    out = app_client.post(f"/v1/jobs/{job.id}/cancel").json()
    assert out["status"] in ("cancelled", "failed")
