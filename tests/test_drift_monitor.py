"""The production drift monitor on the real service: live queries that change subject are flagged, queries
that do not are not; the figures reach /metrics and GET /v1/encoders."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag.drift_monitor import check_sample
from rag.query_sample import QuerySample
from rag.settings import Settings

pytestmark = pytest.mark.slow


def _queries(shared_data: Path) -> tuple[list[str], list[str]]:
    scifact = [json.loads(line)["text"] for line in (shared_data / "scifact" / "queries.jsonl").read_text().splitlines()]
    squad = [json.loads(line)["question"] for line in
             (shared_data / "squad2-dev" / "qa.jsonl").read_text().splitlines()[:2000]]
    rng = random.Random(3)
    return rng.sample(scifact, 120), rng.sample(squad, 60)


def test_a_change_of_subject_is_drift_and_a_steady_stream_is_not(shared_data, embedder) -> None:
    scifact, squad = _queries(shared_data)
    settings = Settings(drift_monitor_permutations=100)
    steady = QuerySample(1000, encoder_version=embedder.version)
    steady.add_many(embedder.embed_queries(scifact))
    check = check_sample(steady, settings)
    assert check.verdict == "ok" and check.reasons == [] and check.reference_rows == 60, check
    changed = QuerySample(1000, encoder_version=embedder.version)
    changed.add_many(embedder.embed_queries(scifact[:60]))
    changed.add_many(embedder.embed_queries(squad))
    check = check_sample(changed, settings)
    assert check.verdict == "drift" and check.p_value < 0.05, check
    assert any(r.startswith("distribution") for r in check.reasons)
    few = QuerySample(1000, encoder_version=embedder.version)
    few.add_many(embedder.embed_queries(scifact[:20]))
    assert check_sample(few, settings).verdict == "too_few"


@pytest.fixture
def sampled(tmp_path, embedder) -> Iterator:
    from litestar.testing import TestClient

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store
    from tests.conftest import build_app

    settings = Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no",
                        query_sample_size=1000, query_cache_size=0, adapt_propose_min_pairs=2)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    try:
        with TestClient(build_app(settings, services=services), timeout=60) as client:
            client.services = services
            yield client
    finally:
        registry.close()
        store.close()


def test_the_service_watches_its_live_queries(sampled, shared_data) -> None:
    from tests.conftest import wait_for

    client = sampled
    scifact, squad = _queries(shared_data)
    job = client.post("/v1/documents", json={"id": "nile", "text": "The Nile flows north. It is long."}).json()
    wait_for(lambda: client.get(f"/v1/jobs/{job['job_ids'][0]}").json()["status"] == "succeeded", timeout=120)
    for q in ("longest river", "river flowing north"):
        assert client.post("/v1/feedback", json={"query": q, "document_id": "nile", "helpful": True}).status_code == 201
    for q in scifact[:60] + squad:
        assert client.post("/v1/search", json={"query": q, "mode": "dense"}).status_code == 200
    checks = client.services.check_drift()  # what the scheduled task runs
    version = client.services.embedder.version
    assert checks[version].verdict == "drift"
    shown = client.get("/v1/encoders").json()["drift"]
    assert shown["verdict"] == "drift" and shown["encoder_version"] == version and shown["reasons"]
    metrics = client.get("/metrics").text
    assert f'rag_drift_detected{{encoder_version="{version}"}} 1.0' in metrics
    assert f'rag_drift_mmd2{{encoder_version="{version}"}}' in metrics
    # Drift, and enough feedback pairs: an adaptation is proposed to the tenant (queued only with RAG_ADAPT_ON_DRIFT).
    proposal = client.get("/v1/encoders").json()["proposal"]
    assert proposal["pairs"] == 2 and proposal["job_id"] is None and proposal["encoder_version"] == version
    assert client.get("/v1/encoders", headers={"X-Tenant": "other"}).json()["proposal"] is None
