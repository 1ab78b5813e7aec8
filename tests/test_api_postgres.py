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
