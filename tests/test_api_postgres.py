"""The real service (API with the ingest worker inside, embedded Qdrant) with its registry on PostgreSQL.

The contract suite checks the registry's methods one by one; this runs the paths that use them together: an
upload's job claimed by the real worker (woken by NOTIFY), its lease renewed, results recorded, the document
published unless deleted, a re-upload found unchanged, and a delete with its mark.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

from rag.registry_factory import open_registry
from rag.registry_pg import PostgresRegistry
from rag.settings import Settings
from tests.conftest import build_app
from tests.test_api import ALPHA, BETA, finish, live_chunks, search, upload


@pytest.fixture
def pg_client(settings: Settings, postgres_url: str, embedder) -> Iterator:
    from litestar.testing import TestClient

    from rag.services import Services
    from rag.store import open_store

    settings = msgspec.structs.replace(settings, database_url=postgres_url, worker_poll_s=30.0)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    registry = open_registry(settings)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as client:
            client.services = services
            yield client
    finally:
        registry.close()
        store.close()


@pytest.mark.slow
def test_upload_search_reupload_and_delete_with_the_registry_on_postgres(pg_client):
    assert isinstance(pg_client.services.registry, PostgresRegistry)
    # worker_poll_s is 30 s: a job done within the timeout below was picked up by NOTIFY, not by a poll
    job = finish(pg_client, upload(pg_client, "geo.md", ALPHA)["job_ids"][0])
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert job["progress"]["documents_done"] == 1 and job["progress"]["chunks"] >= 1
    assert search(pg_client, "largest ice river in the Alps", top_k=3)[0]["document_id"] == "geo.md"
    doc = pg_client.get("/v1/documents/geo.md").json()
    assert doc["chunk_count"] == live_chunks(pg_client, "geo.md") and doc["bytes"] > 0

    again = finish(pg_client, upload(pg_client, "geo.md", ALPHA)["job_ids"][0])
    assert again["documents"][0]["status"] == "unchanged"

    finish(pg_client, upload(pg_client, "notes.txt", BETA, tenant="other")["job_ids"][0], tenant="other")
    assert search(pg_client, "photosynthesis", tenant="default") == [] or all(
        h["document_id"] != "notes.txt" for h in search(pg_client, "photosynthesis", tenant="default"))

    resp = pg_client.delete("/v1/documents/geo.md")
    assert resp.status_code == 200 and resp.json()["chunks_removed"] >= 1
    assert live_chunks(pg_client, "geo.md") == 0
    assert pg_client.get("/v1/documents/geo.md").status_code == 404


@pytest.mark.slow
def test_an_encoder_switch_reaches_every_api_instance(settings: Settings, postgres_url: str, embedder) -> None:
    """Two API instances share the registry (PostgreSQL) and the vector store, as API replicas do beside a
    Qdrant server; only A runs the worker. A tenant's promotion and rollback, and a new default, made
    through A, are what B's searches use within RAG_ENCODER_POLL_S."""
    from litestar.testing import TestClient

    from rag.index import ensure_collection_for
    from rag.services import Services
    from rag.store.server import QdrantServerStore
    from tests.conftest import wait_for
    from tests.test_encoder_pool import _version_folder

    shared = msgspec.structs.replace(settings, database_url=postgres_url, qdrant_url=":memory:", encoder_poll_s=0.2,
                                     worker_poll_s=0.05)
    shared.data_dir.mkdir(parents=True, exist_ok=True)  # uploads and encoder folders: a shared volume
    store = QdrantServerStore.from_url(":memory:")
    ensure_collection_for(store, embedder)
    from rag.encoders import EncoderRegistry

    encoders = EncoderRegistry(shared.encoders_dir)
    encoders.ensure_base(embedder.version, embedder.model_name)  # as adaptation records a version's parent
    for version, tenant in (("v-acme", "acme"), ("v-all", None)):
        _version_folder(shared, version, tenant)  # the base weights under a version of their own
        encoders.save(msgspec.structs.replace(encoders.get(version), parent=embedder.version))
    regs = [open_registry(shared), open_registry(shared)]
    settings_a = msgspec.structs.replace(shared, run_worker="yes")
    settings_b = msgspec.structs.replace(shared, run_worker="no")
    svc_a = Services(settings=settings_a, registry=regs[0], store=store, embedder=embedder)
    svc_b = Services(settings=settings_b, registry=regs[1], store=store, embedder=embedder)
    ACME = {"X-Tenant": "acme"}

    def version_seen(client, headers: dict) -> str:
        r = client.post("/v1/search", json={"query": "largest glacier in the Alps", "top_k": 1}, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["encoder_version"]

    def run(client, path: str, body: dict, headers: dict) -> dict:
        r = client.post(path, json=body, headers=headers)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["status"]
                       in ("succeeded", "failed", "cancelled") and j, timeout=180, interval=0.1)
        assert job["status"] == "succeeded", (job.get("error"), job.get("outcome"))
        return job

    try:
        with TestClient(build_app(settings_a, services=svc_a), timeout=60) as a, \
                TestClient(build_app(settings_b, services=svc_b), timeout=60) as b:
            job = finish(a, upload(a, "geo.md", ALPHA, tenant="acme")["job_ids"][0], tenant="acme")
            assert job["status"] == "succeeded", job
            base = embedder.version
            assert version_seen(a, ACME) == version_seen(b, ACME) == base
            assert search(b, "largest ice river in the Alps", tenant="acme", top_k=1)[0]["document_id"] == "geo.md"

            run(a, "/v1/encoders/promote", {"version": "v-acme", "force": True}, ACME)
            wait_for(lambda: version_seen(b, ACME) == "v-acme", timeout=30, interval=0.1)
            assert search(b, "largest ice river in the Alps", tenant="acme", top_k=1)[0]["document_id"] == "geo.md"
            assert version_seen(b, {"X-Tenant": "globex"}) == base  # other tenants keep the default

            run(a, "/v1/encoders/rollback", {}, ACME)
            wait_for(lambda: version_seen(b, ACME) == base, timeout=30, interval=0.1)

            run(a, "/v1/encoders/promote", {"version": "v-all", "force": True, "all_tenants": True}, ACME)
            wait_for(lambda: version_seen(b, {"X-Tenant": "globex"}) == "v-all", timeout=30, interval=0.1)
            wait_for(lambda: version_seen(b, ACME) == "v-all", timeout=30, interval=0.1)
            assert search(b, "largest ice river in the Alps", tenant="acme", top_k=1)[0]["document_id"] == "geo.md"
    finally:
        for r in regs:
            r.close()
        store.close()
