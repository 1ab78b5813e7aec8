"""Backups that restore: a running service is backed up while it ingests, the backup is restored into a new
data dir, and the restored service answers every search exactly as the original, with nothing to repair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.backup import restore
from rag.errors import RagError
from rag.settings import Settings
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


def _corpus(shared_data: Path, start: int, n: int) -> list[dict]:
    lines = (shared_data / "scifact" / "corpus.jsonl").read_text().splitlines()[start:start + n]
    return [json.loads(line) for line in lines]


def _post_jsonl(client, docs: list[dict]) -> str:
    body = "\n".join(json.dumps(d) for d in docs).encode()
    r = client.post("/v1/documents", files={"file": ("corpus.jsonl", body, "application/jsonl")})
    assert r.status_code == 202, r.text
    return r.json()["job_ids"][0]


def _done(client, job_id: str) -> dict:
    return wait_for(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout=600, interval=0.2)


def _rankings(client, queries: list[str]) -> list[list[tuple[str, float]]]:
    out = []
    for q in queries:
        r = client.post("/v1/search", json={"query": q, "top_k": 5, "mode": "hybrid"}).json()
        out.append([(h["chunk_id"], round(h["score"], 5)) for h in r["results"]])
    return out


def test_a_backup_taken_during_ingest_restores_to_identical_results(app_client, shared_data, embedder, tmp_path):
    from litestar.testing import TestClient

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store
    from tests.conftest import build_app

    client = app_client
    first = _corpus(shared_data, 0, 20)
    assert _done(client, _post_jsonl(client, first))["status"] == "succeeded"
    later = _corpus(shared_data, 20, 80)
    in_flight = _post_jsonl(client, later)
    wait_for(lambda: client.get(f"/v1/jobs/{in_flight}").json()["status"] == "running", timeout=120, interval=0.05)
    made = client.post("/v1/admin/backup")
    assert made.status_code == 201, made.text
    manifest = made.json()
    assert client.get(f"/v1/jobs/{in_flight}").json()["status"] in ("running", "succeeded")
    assert _done(client, in_flight)["status"] == "succeeded"
    assert sum(manifest["points"].values()) > 0 and manifest["writes_paused_s"] < 30

    settings = Settings(data_dir=tmp_path / "restored", worker_poll_s=0.05, log_format="json", llm_local="no")
    restored = restore(Path(manifest["path"]), settings)
    assert restored["points"] == manifest["points"]
    with pytest.raises(RagError, match="already holds"):
        restore(Path(manifest["path"]), settings)  # never over a data dir in use

    queries = [d["title"] for d in first[:8] + later[:8]]
    original = _rankings(client, queries)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as twin:
            # The job that was running at the backup is queued again and runs from its saved upload.
            assert _done(twin, in_flight)["status"] == "succeeded"
            docs = twin.get("/v1/documents", params={"limit": 500}).json()
            assert docs["total"] == len(first) + len(later)
            assert _rankings(twin, queries) == original
            check = twin.post("/v1/admin/reconcile", json={}).json()
            assert check["findings"] == [] and check["documents"] == len(first) + len(later)
    finally:
        registry.close()
        store.close()
