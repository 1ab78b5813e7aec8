"""Fair scheduling across tenants: one tenant's bulk import does not make another tenant's small upload
wait for it (issue: a one-chunk upload waited 948 s behind another tenant's 5,183-document import)."""

from __future__ import annotations

import io
import json

import pytest

import ingest.worker as worker_module
from rag.registry import JobItem, SqliteRegistry
from tests.conftest import wait_for


def _item(name: str) -> list[JobItem]:
    return [JobItem(filename=name, path=f"/nonexistent/{name}")]


def test_claims_go_round_robin_over_tenants_with_work(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    a1, a2, a3 = (registry.create_job("a", _item(f"a{i}.txt")) for i in range(3))
    b1 = registry.create_job("b", _item("b1.txt"))
    c1 = registry.create_job("c", _item("c1.txt"))
    claimed = [registry.claim_job(60).id for _ in range(5)]
    # a1 first (oldest); then the tenants with nothing running, before a's second and third job.
    assert claimed[0] == a1.id
    assert set(claimed[1:3]) == {b1.id, c1.id}
    assert claimed[3:] == [a2.id, a3.id]
    registry.close()


def test_a_yielded_job_resumes_with_its_results_and_without_spending_an_attempt(tmp_path):
    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    job = registry.create_job("a", _item("bulk.jsonl"))
    claimed = registry.claim_job(60)
    assert claimed.id == job.id and claimed.attempts == 1 and not claimed.resumed
    from rag.registry import DocumentResult

    registry.record_results(job.id, [DocumentResult(document_id="d1", status="indexed", chunks=1)], total=1)
    other = registry.create_job("b", _item("small.txt"))
    assert registry.others_waiting("a") and not registry.others_waiting("b")
    registry.yield_job(job.id)
    assert registry.claim_job(60).id == other.id  # the waiting tenant goes first
    again = registry.claim_job(60)
    assert again.id == job.id and again.resumed and again.attempts == 1
    assert again.done == 1 and [r.document_id for r in again.results] == ["d1"]
    registry.close()


def _corpus(n: int) -> bytes:
    lines = [json.dumps({"_id": f"bulk-{i}", "title": f"Record {i}",
                         "text": f"Bulk record number {i} about granite quarry {i % 17} and basalt."}) for i in range(n)]
    return "\n".join(lines).encode()


@pytest.mark.slow
def test_a_small_upload_starts_within_seconds_while_another_tenant_imports_in_bulk(app_client, monkeypatch):
    # Small slices so that the bulk job has many yield points in a test-sized corpus.
    monkeypatch.setattr(worker_module, "GROUP_CHUNKS", 16)
    bulk = app_client.post("/v1/documents", files={"file": ("bulk.jsonl", io.BytesIO(_corpus(600)))},
                           headers={"X-Tenant": "importer"})
    assert bulk.status_code == 202, bulk.text
    bulk_id = bulk.json()["job_ids"][0]

    def bulk_job():
        return app_client.get(f"/v1/jobs/{bulk_id}", headers={"X-Tenant": "importer"}).json()

    wait_for(lambda: bulk_job()["progress"]["documents_done"] >= 16, timeout=120)
    small = app_client.post("/v1/documents", json={"id": "note", "text": "The quarterly report is due on Friday."},
                            headers={"X-Tenant": "office"})
    assert small.status_code == 202
    small_id = small.json()["job_ids"][0]
    small_job = wait_for(lambda: (j := app_client.get(f"/v1/jobs/{small_id}", headers={"X-Tenant": "office"}).json())
                         ["status"] in ("succeeded", "failed") and j, timeout=120)
    assert small_job["status"] == "succeeded", small_job
    waited = small_job["started_at"] - small_job["created_at"]
    assert waited < 15, f"the small upload waited {waited:.1f} s behind the bulk import"
    assert bulk_job()["status"] in ("queued", "running"), "the bulk import should still be going"

    done = wait_for(lambda: (j := bulk_job())["status"] in ("succeeded", "failed") and j, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1  # yielding is not a failed attempt
    assert done["progress"]["documents_done"] == 600 and done["progress"]["documents_failed"] == 0
    # Every document reported once, indexed (not re-processed as "unchanged" after each yield).
    statuses = [d["status"] for d in done["documents"]]
    assert len(statuses) == 600 and set(statuses) == {"indexed"}
    hits = app_client.post("/v1/search", json={"query": "quarterly report", "top_k": 3},
                           headers={"X-Tenant": "office"}).json()["results"]
    assert hits[0]["document_id"] == "note"
    assert app_client.get("/v1/documents", headers={"X-Tenant": "importer"}).json()["total"] == 600
