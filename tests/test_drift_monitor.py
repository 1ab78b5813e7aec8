"""The production drift monitor on the real encoder and service: each encoder version's reference is frozen
(saved at its promotion, else its first live queries) and survives restarts and backups; recent queries that
change subject are flagged against it, queries that do not are not; the figures reach /metrics and GET
/v1/encoders."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from rag.drift_monitor import check_sample
from rag.drift_reference import (
    GATE_FILE, REFERENCE_FILE, adopt_at_promotion, load_reference, reference_path, save_gate_queries,
)
from rag.query_sample import QuerySample
from rag.settings import Settings

pytestmark = pytest.mark.slow


def _queries(shared_data: Path) -> tuple[list[str], list[str]]:
    scifact = [json.loads(line)["text"] for line in (shared_data / "scifact" / "queries.jsonl").read_text().splitlines()]
    squad = [json.loads(line)["question"] for line in
             (shared_data / "squad2-dev" / "qa.jsonl").read_text().splitlines()[:2000]]
    rng = random.Random(3)
    return rng.sample(scifact, 240), rng.sample(squad, 120)


def test_a_live_reference_is_frozen_once_and_recent_queries_are_judged_against_it(tmp_path, shared_data,
                                                                                   embedder) -> None:
    scifact, squad = _queries(shared_data)
    settings = Settings(data_dir=tmp_path / "data", drift_monitor_permutations=100, drift_reference_rows=100)
    sample = QuerySample(1000, encoder_version=embedder.version, first=settings.drift_reference_rows)
    first = embedder.embed_queries(scifact[:100])
    sample.add_many(first[:30])
    check = check_sample(sample, settings)  # fewer queries than a reference needs: nothing is saved yet
    assert check.verdict == "too_few" and check.reference_source == "" and check.reference_rows == 0
    assert load_reference(settings.encoders_dir, embedder.version) is None
    sample.add_many(first[30:])
    check = check_sample(sample, settings)
    assert check.verdict == "too_few" and check.reference_source == "live" and check.reference_rows == 100
    assert check.current_rows == 0  # the reference's own queries are not "recent"
    path = reference_path(settings.encoders_dir, embedder.version)
    frozen = path.read_bytes()
    assert np.array_equal(load_reference(settings.encoders_dir, embedder.version).vectors, first)

    sample.add_many(embedder.embed_queries(scifact[100:220]))  # more of the same subject
    check = check_sample(sample, settings)
    assert check.verdict == "ok" and check.reasons == [] and check.current_rows == 120, check
    sample.add_many(embedder.embed_queries(squad))  # then another subject
    check = check_sample(sample, settings)
    assert check.verdict == "drift" and check.p_value < 0.05 and check.current_rows == 240, check
    assert any(r.startswith("distribution") for r in check.reasons)
    assert path.read_bytes() == frozen  # the reference did not move with the sample

    # A new sample of that version (a restart) starts from the saved reference: every row of it is recent.
    restarted = QuerySample(1000, encoder_version=embedder.version, first=settings.drift_reference_rows)
    restarted.add_many(embedder.embed_queries(squad[:100]))
    check = check_sample(restarted, settings)
    assert check.verdict == "drift" and check.reference_source == "live" and check.current_rows == 100, check
    assert path.read_bytes() == frozen


def test_a_promotion_saves_the_gate_queries_as_the_reference(tmp_path, shared_data, embedder) -> None:
    """What the gate keeps and what ``promote`` makes of it, through the real ``promote`` of a version on disk."""
    from ingest.promotion import promote
    from rag.embedding import bundled_model_path
    from rag.encoders import EncoderRecord, EncoderRegistry
    from rag.index import ensure_collection_for
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    scifact, _ = _queries(shared_data)
    settings = Settings(data_dir=tmp_path / "data", log_format="json", llm_local="no", drift_reference_rows=60,
                        drift_monitor_permutations=100)
    settings.data_dir.mkdir(parents=True)
    registry_dir = EncoderRegistry(settings.encoders_dir)
    version = "v-acme"
    model = registry_dir.folder(version) / "model"
    shutil.copytree(bundled_model_path(), model)  # the base weights, named as an adapted version
    (model / "rag_version.txt").write_text(version + "\n")
    registry_dir.save(EncoderRecord(version=version, path=str(model), base_model="all-MiniLM-L6-v2", tenant="acme",
                                    created_at=time.time()))
    folder = registry_dir.folder(version)
    validation = embedder.embed_queries(scifact[:60])  # what the candidate (these weights) gave at the gate
    # Generated pairs (titles, corpus sentences) are not what users ask, and a handful of queries tells nothing.
    assert not save_gate_queries(folder, validation, validation="held-out generated pairs", labelled=False)
    assert not save_gate_queries(folder, validation[:20], validation="labelled:truth", labelled=True)
    assert not (folder / GATE_FILE).exists() and adopt_at_promotion(settings.encoders_dir, version) is None
    assert save_gate_queries(folder, validation, validation="labelled:truth", labelled=True)

    # The version served before and froze live queries: the promotion's reference replaces them.
    served = QuerySample(1000, encoder_version=version, first=60)
    served.add_many(embedder.embed_queries(scifact[120:180]))
    assert check_sample(served, settings).reference_source == "live"

    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    try:
        ensure_collection_for(store, embedder)
        result = promote(settings, store, version, pointers=registry, tenant="acme")
        assert result["switched"] and registry.get_tenant_encoder("acme") == version
    finally:
        registry.close()
        store.close()
    ref = load_reference(settings.encoders_dir, version)
    assert ref.source == "promotion" and ref.rows == 60 and np.allclose(ref.vectors, validation)
    assert ref.detail == {"validation": "labelled:truth"}

    live = QuerySample(1000, encoder_version=version, first=60)
    live.add_many(embedder.embed_queries(scifact[60:120]))  # other questions of the same kind
    check = check_sample(live, settings)
    assert check.verdict == "ok" and check.reference_source == "promotion" and check.reference_rows == 60, check
    assert check.current_rows == 60


@contextmanager
def _service(settings: Settings, embedder) -> Iterator:
    from litestar.testing import TestClient

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store
    from tests.conftest import build_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
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


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, worker_poll_s=0.05, log_format="json", llm_local="no", query_sample_size=1000,
                    query_cache_size=0, adapt_propose_min_pairs=2, drift_reference_rows=60)


def _search(client, queries: list[str]) -> None:
    for q in queries:
        assert client.post("/v1/search", json={"query": q, "mode": "dense"}).status_code == 200


def test_the_service_watches_its_live_queries_against_a_reference_that_outlives_it(tmp_path, shared_data,
                                                                                    embedder) -> None:
    from rag.backup import backup, restore
    from tests.conftest import wait_for

    scifact, squad = _queries(shared_data)
    settings = _settings(tmp_path / "data")
    version = embedder.version
    with _service(settings, embedder) as client:
        job = client.post("/v1/documents", json={"id": "nile", "text": "The Nile flows north. It is long."}).json()
        wait_for(lambda: client.get(f"/v1/jobs/{job['job_ids'][0]}").json()["status"] == "succeeded", timeout=120)
        for q in ("longest river", "river flowing north"):
            assert client.post("/v1/feedback", json={"query": q, "document_id": "nile", "helpful": True}).status_code == 201
        _search(client, scifact[:60])
        checks = client.services.check_drift()  # what the scheduled task runs
        assert checks[version].reference_source == "live" and checks[version].verdict == "too_few"
        _search(client, scifact[60:120])
        checks = client.services.check_drift()
        assert checks[version].verdict == "ok" and checks[version].current_rows == 60, checks[version]
        shown = client.get("/v1/encoders").json()["drift"]
        assert shown["verdict"] == "ok" and shown["reference_source"] == "live" and shown["reference_rows"] == 60
        assert f'rag_drift_detected{{encoder_version="{version}"}} 0.0' in client.get("/metrics").text
        assert client.get("/v1/encoders").json()["proposal"] is None

        _search(client, squad[:60])
        checks = client.services.check_drift()
        assert checks[version].verdict == "drift" and checks[version].current_rows == 120, checks[version]
        shown = client.get("/v1/encoders").json()["drift"]
        assert shown["verdict"] == "drift" and shown["encoder_version"] == version and shown["reasons"]
        assert shown["reference_source"] == "live" and shown["reference_rows"] == 60
        metrics = client.get("/metrics").text
        assert f'rag_drift_detected{{encoder_version="{version}"}} 1.0' in metrics
        assert f'rag_drift_mmd2{{encoder_version="{version}"}}' in metrics
        # Drift, and enough feedback pairs: an adaptation is proposed to the tenant (queued only with RAG_ADAPT_ON_DRIFT).
        proposal = client.get("/v1/encoders").json()["proposal"]
        assert proposal["pairs"] == 2 and proposal["job_id"] is None and proposal["encoder_version"] == version
        assert client.get("/v1/encoders", headers={"X-Tenant": "other"}).json()["proposal"] is None
        backup(settings, client.services.store, client.services.registry, tmp_path / "backup")
    saved = load_reference(settings.encoders_dir, version)
    frozen = reference_path(settings.encoders_dir, version).read_bytes()

    # A restart: the new process's queries are all recent, and judged against the reference the first one froze.
    with _service(settings, embedder) as client:
        _search(client, squad[60:120])
        checks = client.services.check_drift()
        assert checks[version].verdict == "drift" and checks[version].current_rows == 60, checks[version]
        assert checks[version].reference_created_at == saved.created_at
        assert client.get("/v1/encoders").json()["drift"]["reference_source"] == "live"
    assert reference_path(settings.encoders_dir, version).read_bytes() == frozen

    # A restore into another data dir brings the reference back as it was.
    restored = _settings(tmp_path / "restored")
    restore(tmp_path / "backup", restored)
    assert (restored.encoders_dir / version / REFERENCE_FILE).read_bytes() == frozen
    again = load_reference(restored.encoders_dir, version)
    assert again.source == "live" and again.rows == 60 and np.array_equal(again.vectors, saved.vectors)
