"""Rate limits per key and quotas per tenant (OWASP LLM10, unbounded consumption): over a limit a 429 with
``Retry-After`` and a JSON error naming it; nothing already stored is lost and no job is left half-done."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest

from rag.auth import new_key
from rag.errors import TooManyRequests
from rag.quotas import check_llm_tokens, effective_quotas
from rag.registry import SqliteRegistry
from rag.settings import Settings
from tests.conftest import wait_for

TENANT = "acme"


@pytest.fixture
def limited(tmp_path, embedder) -> Iterator:
    """The real app with keys on, a small rate limit, a read/write key of ``acme`` and an operator key."""
    from litestar.testing import TestClient

    from rag.services import Services
    from rag.store import open_store
    from tests.conftest import build_app

    settings = Settings(data_dir=tmp_path / "data", auth="keys", llm_local="no", worker_poll_s=0.05,
                        log_format="json", rate_limit_per_s=2, rate_limit_burst=4)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    user, user_secret = new_key(TENANT, ["read", "write"])
    op, op_secret = new_key("ops", ["operator"])
    registry.create_key(user)
    registry.create_key(op)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as client:
            client.user = {"Authorization": f"Bearer {user_secret}"}
            client.operator = {"Authorization": f"Bearer {op_secret}"}
            client.services = services
            yield client
    finally:
        registry.close()
        store.close()


def _finish(client, job_id: str) -> dict:
    def done():
        resp = client.get(f"/v1/jobs/{job_id}", headers=client.user)
        if resp.status_code == 429:  # polling is rate-limited like any request: not done yet
            return None
        job = resp.json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=120, interval=0.6)


def _set_quota(client, **limits) -> dict:
    resp = client.put(f"/v1/quotas/{TENANT}", json=limits, headers=client.operator)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_burst_over_the_rate_gets_429_with_retry_after_and_the_key_recovers(limited):
    statuses = [limited.post("/v1/search", json={"query": "granite"}, headers=limited.user) for _ in range(6)]
    codes = [r.status_code for r in statuses]
    assert codes[:4] == [200] * 4 and 429 in codes[4:], codes
    over = next(r for r in statuses if r.status_code == 429)
    assert int(over.headers["Retry-After"]) >= 1
    error = over.json()["error"]
    assert error["code"] == "rate_limited" and "RAG_RATE_LIMIT_PER_S" in error["message"]
    time.sleep(1.1)  # two tokens a second
    assert limited.post("/v1/search", json={"query": "granite"}, headers=limited.user).status_code == 200
    # The operator's key has a bucket of its own.
    assert limited.get("/v1/quotas", headers=limited.operator).status_code == 200


def test_rate_buckets_are_shared_by_every_process_through_the_registry(tmp_path):
    first = SqliteRegistry(tmp_path / "registry.sqlite3")
    second = SqliteRegistry(tmp_path / "registry.sqlite3")  # another API process on the same registry
    assert [first.take_token("key:k", 0.001, 2), second.take_token("key:k", 0.001, 2)] == [0.0, 0.0]
    assert first.take_token("key:k", 0.001, 2) > 0 and second.take_token("key:k", 0.001, 2) > 0
    first.close()
    second.close()


def test_a_documents_quota_stops_an_upload_cleanly(limited):
    report = _set_quota(limited, documents=2)
    assert report["quotas"]["documents"] == 2 and report["usage"]["documents"] == 0
    for name in ("a.txt", "b.txt"):
        time.sleep(0.5)  # stay under the rate limit
        resp = limited.post("/v1/documents", files={"file": (name, io.BytesIO(f"{name} basalt".encode()))},
                            headers=limited.user)
        assert resp.status_code == 202, resp.text
        assert _finish(limited, resp.json()["job_ids"][0])["status"] == "succeeded"
    time.sleep(0.5)
    over = limited.post("/v1/documents", files={"file": ("c.txt", io.BytesIO(b"c basalt"))}, headers=limited.user)
    assert over.status_code == 429 and "Retry-After" in over.headers
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded" and "documents" in error["message"] and "RAG_QUOTA_DOCUMENTS" in error["message"]
    time.sleep(0.5)
    listing = limited.get("/v1/documents", headers=limited.user).json()
    assert sorted(d["id"] for d in listing["documents"]) == ["a.txt", "b.txt"]  # nothing lost, nothing half-done
    uploads = limited.services.settings.uploads_dir
    assert not uploads.exists() or not any(uploads.iterdir())  # the refused upload left no files


def test_a_chunks_quota_fails_the_document_that_would_exceed_it(limited):
    _set_quota(limited, chunks=1)
    first = limited.post("/v1/documents", json={"id": "one", "text": "Basalt columns form as lava cools."},
                         headers=limited.user)
    assert _finish(limited, first.json()["job_ids"][0])["status"] == "succeeded"
    time.sleep(0.5)
    second = limited.post("/v1/documents", json={"id": "two", "text": "Granite cools slowly underground."},
                          headers=limited.user)
    job = _finish(limited, second.json()["job_ids"][0])
    assert job["status"] == "failed" and "chunks quota" in job["errors"][0]["error"]
    assert "RAG_QUOTA_CHUNKS" in job["errors"][0]["error"]
    time.sleep(0.5)
    # The first document is intact; replacing it with one of the same size still fits (its old chunk is freed).
    again = limited.post("/v1/documents", json={"id": "one", "text": "Basalt columns form as thick lava cools."},
                         headers=limited.user)
    assert _finish(limited, again.json()["job_ids"][0])["status"] == "succeeded"
    time.sleep(0.5)
    usage = limited.get("/v1/quotas", headers=limited.operator, params={"tenant": TENANT}).json()["usage"]
    assert usage["chunks"] == 1 and usage["documents"] == 1


def test_a_stored_bytes_quota_fails_the_document_that_would_exceed_it_and_then_refuses_uploads(limited):
    first_text = "Basalt columns form as lava cools."  # 34 bytes, one chunk
    _set_quota(limited, stored_bytes=50)
    first = limited.post("/v1/documents", json={"id": "one", "text": first_text}, headers=limited.user)
    assert _finish(limited, first.json()["job_ids"][0])["status"] == "succeeded"
    time.sleep(0.5)
    second = limited.post("/v1/documents", json={"id": "two", "text": "Granite cools slowly, deep underground."},
                          headers=limited.user)
    job = _finish(limited, second.json()["job_ids"][0])
    assert job["status"] == "failed" and "stored_bytes quota" in job["errors"][0]["error"]
    assert "RAG_QUOTA_STORED_BYTES" in job["errors"][0]["error"]
    time.sleep(0.5)
    report = limited.get("/v1/quotas", headers=limited.operator, params={"tenant": TENANT}).json()
    assert report["usage"]["stored_bytes"] == len(first_text) and report["usage"]["documents"] == 1
    # Once the tenant holds its quota, an upload is refused up front and keeps nothing.
    _set_quota(limited, stored_bytes=len(first_text))
    time.sleep(0.5)
    over = limited.post("/v1/documents", json={"id": "three", "text": "x"}, headers=limited.user)
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
    assert "stored_bytes" in over.json()["error"]["message"] and "Retry-After" in over.headers
    time.sleep(0.5)
    listing = limited.get("/v1/documents", headers=limited.user).json()
    assert [d["id"] for d in listing["documents"]] == ["one"]


def test_concurrent_jobs_quota(tmp_path, embedder):
    from litestar.testing import TestClient

    from rag.services import Services
    from rag.store import open_store
    from tests.conftest import build_app

    # No worker in this process: uploads stay queued, as behind a busy worker.
    settings = Settings(data_dir=tmp_path / "data", llm_local="no", run_worker="no", quota_concurrent_jobs=1,
                        log_format="json")
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as client:
            headers = {"X-Tenant": TENANT}
            assert client.post("/v1/documents", json={"text": "first"}, headers=headers).status_code == 202
            over = client.post("/v1/documents", json={"text": "second"}, headers=headers)
            assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"
            assert "concurrent_jobs" in over.json()["error"]["message"]
            # Another tenant is not limited by acme's jobs.
            assert client.post("/v1/documents", json={"text": "other"}, headers={"X-Tenant": "other"}).status_code == 202
    finally:
        registry.close()
        store.close()


def test_llm_token_quotas_per_minute_and_per_day(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    settings = Settings(data_dir=tmp_path, quota_llm_tokens_per_minute=100, quota_llm_tokens_per_day=1000)
    check_llm_tokens(registry, settings, TENANT)  # nothing used yet
    registry.add_llm_tokens(TENANT, 60)
    check_llm_tokens(registry, settings, TENANT)
    registry.add_llm_tokens(TENANT, 60)
    with pytest.raises(TooManyRequests) as over:
        check_llm_tokens(registry, settings, TENANT)
    assert over.value.code == "quota_exceeded" and "llm_tokens_per_minute" in over.value.message
    assert over.value.headers["Retry-After"] == "60"
    check_llm_tokens(registry, settings, "someone-else")  # per tenant
    registry.set_quotas(TENANT, {"llm_tokens_per_minute": 0, "llm_tokens_per_day": 100})
    assert effective_quotas(registry, settings, TENANT)["llm_tokens_per_minute"] == 0
    with pytest.raises(TooManyRequests) as daily:
        check_llm_tokens(registry, settings, TENANT)
    assert "llm_tokens_per_day" in daily.value.message
    registry.close()
