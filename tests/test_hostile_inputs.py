"""Hostile and careless requests: each gets a 4xx naming the problem, nothing stored is lost, and the
service (its worker included) goes on indexing afterwards.

The hostile *files* (decompression bombs, corrupt archives, deep JSONL) are in
``tests/test_worker_resilience.py`` and ``tests/test_loaders.py``; this module covers the requests.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from rag.settings import Settings
from tests.conftest import wait_for

MARKER = "The Aletsch Glacier is the largest glacier in the Alps, flowing twenty kilometres through Switzerland."
DEEP = "[" * 10_000 + "]" * 10_000


@pytest.fixture(scope="module")
def client(tmp_path_factory, embedder) -> Iterator:
    """One real app for the module (worker inside, embedded Qdrant), with one document already indexed."""
    from litestar.testing import TestClient

    from tests.conftest import build_app
    from rag.services import Services
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("hostile") / "data", worker_poll_s=0.05,
                        log_format="json", llm_local="no", max_upload_bytes=200_000)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as c:
            c.services = services
            job = c.post("/v1/documents", json={"id": "marker", "text": MARKER}).json()["job_ids"][0]
            assert _finish(c, job)["status"] == "succeeded"
            yield c
    finally:
        registry.close()
        store.close()


def _finish(client, job_id: str, tenant: str = "default") -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}", headers={"X-Tenant": tenant}).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=120)


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _raw_json(client, path: str, body: str, **headers):
    return client.post(path, content=body.encode(), headers={"Content-Type": "application/json", **headers})


# ---- JSON nested 10,000 deep, on every JSON route and in multipart metadata ------------------------

JSON_ROUTES = [
    ("/v1/documents", '{"text": "x", "metadata": {"a": %s}}'),
    ("/v1/search", '{"query": "x", "filter": {"metadata.a": %s}}'),
    ("/v1/answer", '{"question": "x", "filter": {"metadata.a": %s}}'),
    ("/v1/answer", '{"question": "x", "stream": true, "filter": {"metadata.a": %s}}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}'),
    ("/v1/encoders/adapt", '{"pairs": %s}'),
    ("/v1/encoders/promote", '{"version": %s}'),
    ("/v1/encoders/rollback", '{"version": %s}'),
    ("/v1/encoders/prune", '{"keep": %s}'),
]


@pytest.mark.parametrize(("path", "template"), JSON_ROUTES)
def test_deeply_nested_json_is_a_400_on_every_json_route(client, path, template):
    error = _error(_raw_json(client, path, template % DEEP), 400, "json_too_deep")
    assert "RAG_MAX_JSON_DEPTH" in error["message"]


def test_deeply_nested_multipart_metadata_is_a_4xx(client):
    # 10,000 levels are over the metadata size limit already; 1,000 levels fit it and meet the depth limit.
    resp = client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hello"))},
                       data={"metadata": '{"a": %s}' % DEEP})
    _error(resp, 413, "metadata_too_large")
    resp = client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hello"))},
                       data={"metadata": '{"a": %s}' % ("[" * 1000 + "]" * 1000)})
    _error(resp, 400, "json_too_deep")


# ---- filter values beyond what the engine stores ------------------------------------------------


@pytest.mark.parametrize("body", [
    '{"query": "glacier", "filter": {"chunk_index": 9223372036854775808}}',
    '{"query": "glacier", "filter": {"metadata.n": 18446744073709551616}}',
    '{"query": "glacier", "filter": {"metadata.n": [1, 18446744073709551616]}}',
    '{"query": "glacier", "filter": {"chunk_index": {"gt": 1e400}}}',
    '{"query": "glacier", "filter": {"metadata.n": {"lt": -1e400}}}',
])
def test_filter_numbers_beyond_int64_or_float64_are_a_400(client, body):
    _error(_raw_json(client, "/v1/search", body), 400)


def test_huge_but_finite_integer_range_bounds_still_work(client):
    body = '{"query": "glacier", "filter": {"chunk_index": {"lt": 100000000000000000000}}}'
    resp = _raw_json(client, "/v1/search", body)
    assert resp.status_code == 200, resp.text
    assert [h["document_id"] for h in resp.json()["results"]] == ["marker"]


@pytest.mark.parametrize("path", ["/v1/answer", "/v1/chat/completions"])
def test_a_streamed_answer_with_a_bad_filter_is_a_400_before_the_stream(client, path):
    bad = {"chunk_index": 2**63}
    body = ({"question": "largest glacier?", "stream": True, "filter": bad} if path == "/v1/answer" else
            {"messages": [{"role": "user", "content": "largest glacier?"}], "stream": True, "filter": bad})
    error = _error(client.post(path, json=body), 400, "invalid_filter")
    assert "64-bit" in error["message"]


# ---- paging, ids, versions ----------------------------------------------------------------------


def test_offset_beyond_int64_is_a_400(client):
    _error(client.get("/v1/documents", params={"offset": "10000000000000000000"}), 400)


@pytest.mark.parametrize("document_id", ["a/b", "x" * 300, "tab\there", "nul\x01"])
def test_bad_multipart_document_ids_are_a_400(client, document_id):
    resp = client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hello there"))},
                       data={"document_id": document_id})
    _error(resp, 400)


def test_invalid_utf8_in_a_multipart_field_is_a_400(client):
    boundary = "hostileboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"document_id\"\r\n\r\n".encode()
        + b"id-\xff\xfe\r\n"
        + f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
          "Content-Type: text/plain\r\n\r\nhello there\r\n".encode()
        + f"--{boundary}--\r\n".encode()
    )
    resp = client.post("/v1/documents", content=body,
                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _error(resp, 400)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/encoders/promote", {"version": "v" * 300}),
    ("/v1/encoders/rollback", {"version": "v" * 300}),
    ("/v1/encoders/rollback", {"version": ""}),
    ("/v1/encoders/promote", {"version": "../etc"}),
    ("/v1/encoders/prune", {"keep": ["v" * 300]}),
])
def test_bad_encoder_versions_are_a_400_not_a_queued_job(client, path, body):
    _error(client.post(path, json=body), 400)


def test_a_body_field_of_the_wrong_type_is_a_400_naming_it(client):
    # Found by the schemathesis suite: a body field that shares a name with an injected dependency
    # (`tenant`) was reported by Litestar as a server error.
    error = _error(client.post("/v1/encoders/adapt", json={"tenant": {}}), 400)
    assert "tenant" in error["message"]


# ---- amplification: metadata and titles are bounded on every upload path ------------------------


def test_oversized_metadata_and_titles_are_a_413_naming_the_setting(client):
    big_meta = json.dumps({"blob": "x" * 1_000_000})
    resp = client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hello"))}, data={"metadata": big_meta})
    assert "RAG_MAX_METADATA_BYTES" in _error(resp, 413, "metadata_too_large")["message"]
    resp = client.post("/v1/documents", json={"text": "hello", "metadata": {"blob": "x" * 100_000}})
    assert "RAG_MAX_METADATA_BYTES" in _error(resp, 413, "metadata_too_large")["message"]
    resp = client.post("/v1/documents", files={"file": ("a.txt", io.BytesIO(b"hello"))}, data={"title": "t" * 1_000_000})
    assert "RAG_MAX_TITLE_CHARS" in _error(resp, 413, "title_too_long")["message"]
    resp = client.post("/v1/documents", json={"text": "hello", "title": "t" * 5000})
    assert "RAG_MAX_TITLE_CHARS" in _error(resp, 413, "title_too_long")["message"]


def test_a_rejected_upload_leaves_none_of_its_files_behind(client):
    uploads = client.services.settings.uploads_dir
    before = sorted(p for p in uploads.rglob("*")) if uploads.exists() else []
    files = [("file", ("small.txt", io.BytesIO(b"small and fine"))),
             ("file", ("big.txt", io.BytesIO(b"x" * 300_000)))]
    error = _error(client.post("/v1/documents", files=files), 413, "payload_too_large")
    assert "RAG_MAX_UPLOAD_BYTES" in error["message"]
    after = sorted(p for p in uploads.rglob("*")) if uploads.exists() else []
    assert after == before


# ---- smaller ones ---------------------------------------------------------------------------------


def test_duplicate_tenant_headers_are_refused(client):
    resp = client.post("/v1/search", json={"query": "glacier"}, headers=[("X-Tenant", "a"), ("X-Tenant", "b")])
    _error(resp, 400, "duplicate_tenant_header")


def test_media_types_are_case_insensitive(client):
    resp = client.post("/v1/search", content=json.dumps({"query": "largest glacier"}).encode(),
                       headers={"Content-Type": "APPLICATION/JSON"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["document_id"] == "marker"
    resp = client.post("/v1/documents", content=json.dumps({"id": "upper", "text": "Loud media type."}).encode(),
                       headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert resp.status_code == 202, resp.text
    assert _finish(client, resp.json()["job_ids"][0])["status"] == "succeeded"


def test_nul_in_json_text_is_removed_not_refused(client):
    resp = client.post("/v1/documents", json={"id": "nul", "text": "Basalt\x00 columns form as lava cools."})
    assert resp.status_code == 202, resp.text
    job = _finish(client, resp.json()["job_ids"][0])
    assert job["status"] == "succeeded", job
    hits = client.post("/v1/search", json={"query": "basalt columns", "filter": {"document_id": "nul"}}).json()
    assert hits["results"][0]["text"] == "Basalt columns form as lava cools."


def test_unsupported_media_type_is_a_415_json_error(client):
    resp = client.post("/v1/documents", content=b"hello", headers={"Content-Type": "text/plain"})
    _error(resp, 415, "unsupported_media_type")


def test_settings_command_prints_json_and_hides_secrets(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RAG_DATA_DIR": str(tmp_path), "RAG_LLM_API_KEY": "sk-secret-value"}
    out = subprocess.run([sys.executable, "-m", "rag", "settings"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["data_dir"] == str(tmp_path)
    assert "sk-secret-value" not in out.stdout + out.stderr and shown["llm_api_key"] == "***"


# ---- after all of the above: nothing lost, and the worker still indexes ------------------------------


def test_zz_after_the_hostile_requests_nothing_is_lost_and_uploads_still_index(client):
    hits = client.post("/v1/search", json={"query": "largest glacier in the Alps"}).json()["results"]
    assert hits[0]["document_id"] == "marker" and hits[0]["text"] == MARKER
    resp = client.post("/v1/documents", files={"file": ("fresh.txt", io.BytesIO(b"Fresh granite quarries in Aberdeen."))})
    assert resp.status_code == 202, resp.text
    assert _finish(client, resp.json()["job_ids"][0])["status"] == "succeeded"
    hits = client.post("/v1/search", json={"query": "granite quarries"}).json()["results"]
    assert hits[0]["document_id"] == "fresh.txt"
