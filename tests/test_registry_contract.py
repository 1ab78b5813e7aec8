"""One contract for every ``Registry`` (rag/registry.py): SQLite and PostgreSQL (rag/registry_pg.py).

Every test takes the ``registry`` fixture (or ``open_registry``, which opens further handles on the same
storage, as a second process would), parametrized over ``IMPLEMENTATIONS``. A new engine is one entry
there: a factory that, given the test's ``request`` and ``tmp_path``, returns a callable opening a handle.
The tests use only the protocol's methods, never an engine's tables; leases are exercised with small real
lease values and sleeps, not a mocked clock.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest

from rag.datasets import DatasetRecord
from rag.registry import (
    GAVE_UP,
    DocumentRecord,
    DocumentResult,
    JobItem,
    JobKind,
    Registry,
    SqliteRegistry,
)
from rag.registry_pg import PostgresRegistry

Opener = Callable[[], Registry]


class Implementation(NamedTuple):
    cls: type
    # (request, tmp_path) -> a callable that opens a new handle on one shared, empty storage
    storage: Callable[[pytest.FixtureRequest, Path], Opener]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    path = tmp_path / "registry.sqlite3"
    return lambda: SqliteRegistry(path)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    # A database of its own per test, on the session's server (skipped where PostgreSQL is not installed).
    url = request.getfixturevalue("postgres_url")
    return lambda: PostgresRegistry(url, max_size=4)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "sqlite": Implementation(SqliteRegistry, _sqlite),
    "postgres": Implementation(PostgresRegistry, _postgres),
}

EXPIRED_LEASE_S = 0.05  # claimed with this, a job's lease has run out after a sleep of EXPIRE_SLEEP_S
EXPIRE_SLEEP_S = 0.15
LONG_LEASE_S = 60.0  # outlives any test: a job claimed with it is held for the whole test


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def open_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    make = IMPLEMENTATIONS[request.param].storage(request, tmp_path)
    opened: list[Registry] = []

    def open_() -> Registry:
        handle = make()
        opened.append(handle)
        return handle

    yield open_
    for handle in opened:
        handle.close()


@pytest.fixture
def registry(open_registry: Opener) -> Registry:
    return open_registry()


@pytest.fixture
def uploads(tmp_path: Path) -> Callable[..., JobItem]:
    """Make one uploaded file the way the API saves it: in a folder of its own, named by a random hex id."""

    def make(document_id: str | None = None, *, folder: Path | None = None, name: str = "doc.txt") -> JobItem:
        where = folder or tmp_path / "uploads" / uuid.uuid4().hex
        where.mkdir(parents=True, exist_ok=True)
        path = where / name
        path.write_text("some text")
        return JobItem(filename=name, path=str(path), document_id=document_id, title=f"title of {document_id}",
                       metadata={"lang": "en"})

    return make


def doc(id: str, *, tenant: str = "t1", chunks: int = 3, **kw: Any) -> DocumentRecord:
    base: dict[str, Any] = dict(title=f"Title {id}", source=f"{id}.txt", content_hash=f"h-{id}", chunk_count=chunks,
                                encoder_version="v1", status="indexed")
    return DocumentRecord(tenant=tenant, id=id, **(base | kw))


def without_times(record: DocumentRecord) -> DocumentRecord:
    return msgspec.structs.replace(record, created_at=0.0, updated_at=0.0)


def item(document_id: str | None = "d1", path: str = "/nonexistent/upload.txt") -> JobItem:
    """A job item whose file does not exist (removing it is a no-op): for tests that are not about uploads."""
    return JobItem(filename="upload.txt", path=path, document_id=document_id)


# ---- the protocol, structurally ------------------------------------------------------------------------


def _protocol_methods() -> list[str]:
    return sorted(name for name, value in vars(Registry).items() if callable(value) and not name.startswith("_"))


def test_the_protocol_names_what_api_and_worker_use() -> None:
    # A guard on the next test: an empty or shrunken protocol would make it vacuous.
    assert {"create_job", "claim_job", "renew_lease", "finish_job", "mark_deleted",
            "upsert_documents_unless_deleted", "close"} <= set(_protocol_methods())


def _shape(sig: inspect.Signature) -> list[tuple[str, Any, bool]]:
    """Names, kinds (positional or keyword-only) and whether each parameter has a default."""
    return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("method", _protocol_methods())
def test_implementation_has_every_protocol_method_with_its_signature(name: str, method: str) -> None:
    cls = IMPLEMENTATIONS[name].cls
    assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
    want = inspect.signature(getattr(Registry, method))
    have = inspect.signature(getattr(cls, method))
    assert _shape(have) == _shape(want), method
    for p in want.parameters.values():  # the same defaults: a caller typed against the protocol relies on them
        if p.default is not inspect.Parameter.empty:
            assert have.parameters[p.name].default == p.default, (method, p.name)
    assert str(have.return_annotation) == str(want.return_annotation), method


# ---- jobs: lifecycle -----------------------------------------------------------------------------------


class TestJobLifecycle:
    def test_a_created_job_is_queued_and_reads_back_equal(self, registry: Registry) -> None:
        items = [JobItem(filename="a.txt", path="/x/a.txt", document_id="a", title="A", metadata={"k": [1, "ü"]}),
                 JobItem(filename="b.jsonl", path="/x/b.jsonl")]
        before = time.time()
        job = registry.create_job("t1", items)
        assert job.status == "queued" and job.tenant == "t1" and job.attempts == 0
        assert job.kind == JobKind.INGEST and job.params == {} and job.outcome == {} and job.stage == ""
        assert job.items == items
        assert before <= job.created_at <= time.time()
        assert job.started_at is None and job.finished_at is None
        assert registry.get_job(job.id) == job

    def test_job_ids_are_unique(self, registry: Registry) -> None:
        ids = {registry.create_job("t1", [item()]).id for _ in range(20)}
        assert len(ids) == 20

    def test_an_unknown_job_is_none(self, registry: Registry) -> None:
        assert registry.get_job("no-such-job") is None

    def test_a_second_handle_sees_the_same_jobs(self, open_registry: Opener) -> None:
        a, b = open_registry(), open_registry()
        job = a.create_job("t1", [item()])
        assert b.get_job(job.id) == job
        assert b.claim_job(LONG_LEASE_S) is not None
        assert a.get_job(job.id).status == "running"

    def test_claim_marks_running_and_finish_records_the_outcome(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        claimed = registry.claim_job(LONG_LEASE_S)
        assert claimed is not None and claimed.id == job.id
        assert claimed.status == "running" and claimed.attempts == 1 and claimed.started_at is not None
        assert registry.get_job(job.id).status == "running"
        registry.finish_job(job.id, "failed", "2 of 3 documents failed")
        done = registry.get_job(job.id)
        assert done.status == "failed" and done.error == "2 of 3 documents failed"
        assert done.finished_at is not None and done.finished_at >= claimed.started_at

    def test_a_finished_job_is_not_claimed_again(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(EXPIRED_LEASE_S)
        registry.finish_job(job.id, "succeeded")
        time.sleep(EXPIRE_SLEEP_S)  # its lease would have run out: a finished job holds none
        assert registry.claim_job(LONG_LEASE_S) is None
        assert registry.get_job(job.id).status == "succeeded"

    def test_requeue_puts_a_job_back_with_its_error(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        first = registry.claim_job(LONG_LEASE_S)
        registry.requeue_job(job.id, "attempt 1 failed: store unavailable")
        queued = registry.get_job(job.id)
        assert queued.status == "queued" and queued.error == "attempt 1 failed: store unavailable"
        again = registry.claim_job(LONG_LEASE_S)
        assert again is not None and again.id == job.id and again.attempts == 2
        assert again.started_at == first.started_at  # when the job first started, not this attempt

    def test_requeue_running_counts_and_requeues(self, registry: Registry) -> None:
        jobs = [registry.create_job("t1", [item()]) for _ in range(3)]
        held = [registry.claim_job(LONG_LEASE_S).id for _ in range(2)]
        assert registry.requeue_running() == 2
        assert {j.id: registry.get_job(j.id).status for j in jobs} == {j.id: "queued" for j in jobs}
        assert registry.requeue_running() == 0
        retaken = registry.claim_job(LONG_LEASE_S)
        assert retaken.id == held[0] and retaken.attempts == 2

    def test_jobs_are_claimed_oldest_first(self, registry: Registry) -> None:
        jobs = [registry.create_job("t1", [item(f"d{n}")]) for n in range(4)]
        assert [registry.claim_job(LONG_LEASE_S).id for _ in jobs] == [j.id for j in jobs]
        assert registry.claim_job(LONG_LEASE_S) is None

    def test_finishing_removes_the_uploaded_files_and_their_folder(self, registry: Registry, uploads) -> None:
        a, b = uploads("a"), uploads("b")
        job = registry.create_job("t1", [a, b])
        registry.claim_job(LONG_LEASE_S)
        registry.finish_job(job.id, "succeeded")
        for it in (a, b):
            assert not Path(it.path).exists()
            assert not Path(it.path).parent.exists()

    def test_finishing_keeps_a_folder_another_job_still_uses(self, registry: Registry, uploads, tmp_path) -> None:
        shared = tmp_path / "uploads" / uuid.uuid4().hex
        a, b = uploads("a", folder=shared, name="a.txt"), uploads("b", folder=shared, name="b.txt")
        first = registry.create_job("t1", [a])
        registry.create_job("t1", [b])
        registry.claim_job(LONG_LEASE_S)
        registry.finish_job(first.id, "succeeded")
        assert not Path(a.path).exists() and Path(b.path).exists()

    def test_requeueing_keeps_the_uploaded_files(self, registry: Registry, uploads) -> None:
        up = uploads("a")
        job = registry.create_job("t1", [up])
        registry.claim_job(LONG_LEASE_S)
        registry.requeue_job(job.id, "transient")
        assert Path(up.path).exists()
        assert registry.requeue_running() == 0 and Path(up.path).exists()


# ---- claiming and leases -------------------------------------------------------------------------------


class TestClaimingAndLeases:
    def test_an_empty_queue_claims_nothing(self, registry: Registry) -> None:
        assert registry.claim_job(LONG_LEASE_S) is None

    def test_a_held_lease_keeps_the_job_from_other_workers(self, open_registry: Opener) -> None:
        a, b = open_registry(), open_registry()
        job = a.create_job("t1", [item()])
        assert a.claim_job(LONG_LEASE_S).id == job.id
        assert b.claim_job(LONG_LEASE_S) is None

    def test_an_expired_lease_is_taken_over(self, open_registry: Opener) -> None:
        a, b = open_registry(), open_registry()
        job = a.create_job("t1", [item()])
        a.claim_job(EXPIRED_LEASE_S)
        time.sleep(EXPIRE_SLEEP_S)
        taken = b.claim_job(LONG_LEASE_S)
        assert taken is not None and taken.id == job.id
        assert taken.status == "running" and taken.attempts == 2

    def test_renewing_extends_the_lease(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(EXPIRED_LEASE_S)
        assert registry.renew_lease(job.id, LONG_LEASE_S) is False  # no cancel requested
        time.sleep(EXPIRE_SLEEP_S)
        assert registry.claim_job(LONG_LEASE_S) is None
        assert registry.get_job(job.id).attempts == 1

    def test_renewing_with_a_short_lease_lets_it_expire(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(LONG_LEASE_S)
        registry.renew_lease(job.id, EXPIRED_LEASE_S)  # the lease is set from now, not added to the old one
        time.sleep(EXPIRE_SLEEP_S)
        assert registry.claim_job(LONG_LEASE_S).id == job.id

    def test_renewing_reports_a_cancel_request(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(LONG_LEASE_S)
        registry.request_cancel(job.id)
        assert registry.renew_lease(job.id, LONG_LEASE_S) is True

    def test_a_retry_starts_its_report_afresh(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(EXPIRED_LEASE_S)
        registry.record_results(job.id, [DocumentResult(document_id="a", status="indexed", chunks=4)], total=5)
        time.sleep(EXPIRE_SLEEP_S)
        retry = registry.claim_job(LONG_LEASE_S)
        assert retry.id == job.id
        assert (retry.total, retry.done, retry.failed, retry.chunks, retry.results) == (0, 0, 0, 0, [])
        assert registry.get_job(job.id).results == []

    def test_an_expired_lease_is_taken_before_a_younger_queued_job(self, registry: Registry) -> None:
        old = registry.create_job("t1", [item("a")])
        registry.claim_job(EXPIRED_LEASE_S)
        young = registry.create_job("t1", [item("b")])
        time.sleep(EXPIRE_SLEEP_S)
        assert registry.claim_job(LONG_LEASE_S).id == old.id
        assert registry.claim_job(LONG_LEASE_S).id == young.id


# ---- the attempts limit, applied at claim --------------------------------------------------------------


class TestAttemptsLimit:
    def test_a_job_claimed_max_attempts_times_is_failed_and_the_next_one_taken(self, registry: Registry,
                                                                              uploads) -> None:
        up = uploads("a")
        poison = registry.create_job("t1", [up])
        registry.claim_job(EXPIRED_LEASE_S, max_attempts=2)
        registry.requeue_job(poison.id, "attempt 1 failed: boom")
        registry.claim_job(EXPIRED_LEASE_S, max_attempts=2)  # attempt 2; then its worker dies
        nxt = registry.create_job("t1", [item("b")])
        time.sleep(EXPIRE_SLEEP_S)
        claimed = registry.claim_job(LONG_LEASE_S, max_attempts=2)
        assert claimed is not None and claimed.id == nxt.id
        failed = registry.get_job(poison.id)
        assert failed.status == "failed" and failed.attempts == 2 and failed.finished_at is not None
        assert failed.error == GAVE_UP.format(n=2) + " (last error: attempt 1 failed: boom)"
        assert not Path(up.path).exists()  # a final job's files go

    def test_the_limit_applies_to_a_requeued_job(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(LONG_LEASE_S, max_attempts=1)
        registry.requeue_running()  # a restarted worker process puts it back
        assert registry.claim_job(LONG_LEASE_S, max_attempts=1) is None
        failed = registry.get_job(job.id)
        assert failed.status == "failed" and failed.error == GAVE_UP.format(n=1)

    def test_below_the_limit_a_job_is_retried(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        for attempt in (1, 2, 3):
            claimed = registry.claim_job(LONG_LEASE_S, max_attempts=3)
            assert claimed.id == job.id and claimed.attempts == attempt
            registry.requeue_job(job.id, f"attempt {attempt} failed")
        assert registry.claim_job(LONG_LEASE_S, max_attempts=3) is None
        assert registry.get_job(job.id).status == "failed"

    def test_without_a_limit_a_job_is_retried_indefinitely(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        for attempt in range(1, 8):
            assert registry.claim_job(LONG_LEASE_S).attempts == attempt
            registry.requeue_job(job.id, "again")
        assert registry.get_job(job.id).status == "queued"


# ---- cancellation --------------------------------------------------------------------------------------


class TestCancellation:
    def test_a_queued_job_is_cancelled_at_once_and_its_files_go(self, registry: Registry, uploads) -> None:
        up = uploads("a")
        job = registry.create_job("t1", [up])
        cancelled = registry.request_cancel(job.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.error == "cancelled on request" and cancelled.finished_at is not None
        assert registry.get_job(job.id).status == "cancelled"
        assert not Path(up.path).exists()
        assert registry.claim_job(LONG_LEASE_S) is None

    def test_a_running_job_is_asked_to_stop(self, registry: Registry, uploads) -> None:
        up = uploads("a")
        job = registry.create_job("t1", [up])
        registry.claim_job(LONG_LEASE_S)
        assert registry.cancel_requested(job.id) is False
        view = registry.request_cancel(job.id)
        assert view.status == "running" and view.cancel_requested is True
        assert registry.cancel_requested(job.id) is True
        assert Path(up.path).exists()  # its worker still reads it; finishing removes it
        registry.finish_job(job.id, "cancelled", "cancelled on request")
        assert registry.get_job(job.id).status == "cancelled" and not Path(up.path).exists()

    def test_cancelling_an_unknown_job_is_none(self, registry: Registry) -> None:
        assert registry.request_cancel("no-such-job") is None
        assert registry.cancel_requested("no-such-job") is False

    def test_cancelling_a_finished_job_changes_nothing(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(LONG_LEASE_S)
        registry.finish_job(job.id, "succeeded")
        view = registry.request_cancel(job.id)
        assert view.status == "succeeded" and view.error is None
        assert registry.get_job(job.id).status == "succeeded"

    def test_the_cancel_wins_when_a_dead_workers_job_is_claimed(self, registry: Registry, uploads) -> None:
        up = uploads("a")
        job = registry.create_job("t1", [up])
        registry.claim_job(EXPIRED_LEASE_S)
        registry.request_cancel(job.id)
        time.sleep(EXPIRE_SLEEP_S)
        assert registry.claim_job(LONG_LEASE_S) is None
        cancelled = registry.get_job(job.id)
        assert cancelled.status == "cancelled" and cancelled.error == "cancelled on request"
        assert cancelled.attempts == 1 and not Path(up.path).exists()

    @pytest.mark.parametrize("back_to_queue", ["requeue_job", "requeue_running"])
    def test_a_cancel_request_survives_a_return_to_the_queue(self, registry: Registry, back_to_queue: str) -> None:
        job = registry.create_job("t1", [item()])
        registry.claim_job(LONG_LEASE_S)
        registry.request_cancel(job.id)
        if back_to_queue == "requeue_job":
            registry.requeue_job(job.id, "transient")
        else:
            registry.requeue_running()
        other = registry.create_job("t1", [item("b")])
        assert registry.claim_job(LONG_LEASE_S).id == other.id
        assert registry.get_job(job.id).status == "cancelled"


# ---- results and progress counters ---------------------------------------------------------------------


class TestResultsAndProgress:
    def test_results_accumulate_in_order_with_their_counters(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item(None)])
        registry.claim_job(LONG_LEASE_S)
        first = [DocumentResult(document_id="a", status="indexed", chunks=4, source="bulk.jsonl:1"),
                 DocumentResult(document_id=None, status="failed", error="bad line", source="bulk.jsonl:2")]
        second = [DocumentResult(document_id="c", status="unchanged", source="bulk.jsonl:3"),
                  DocumentResult(document_id="d", status="indexed", chunks=2, source="bulk.jsonl:4")]
        registry.record_results(job.id, first, total=2)
        mid = registry.get_job(job.id)
        assert (mid.total, mid.done, mid.failed, mid.chunks) == (2, 1, 1, 4)
        registry.record_results(job.id, second, total=10)
        end = registry.get_job(job.id)
        assert end.results == first + second
        # total is the latest figure (a bulk file reveals its count as it is parsed); "unchanged" counts as done
        assert (end.total, end.done, end.failed, end.chunks) == (10, 3, 1, 6)

    def test_results_belong_to_their_job(self, registry: Registry) -> None:
        a, b = registry.create_job("t1", [item("a")]), registry.create_job("t1", [item("b")])
        registry.record_results(a.id, [DocumentResult(document_id="a", status="indexed", chunks=1)], total=1)
        assert registry.get_job(b.id).results == [] and registry.get_job(b.id).done == 0
        assert len(registry.get_job(a.id).results) == 1

    def test_an_empty_batch_updates_only_the_total(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item(None)])
        registry.record_results(job.id, [], total=7)
        got = registry.get_job(job.id)
        assert (got.total, got.done, got.failed, got.chunks, got.results) == (7, 0, 0, 0, [])


# ---- documents: CRUD and paging ------------------------------------------------------------------------


class TestDocuments:
    def test_an_upserted_document_reads_back(self, registry: Registry) -> None:
        record = doc("a", metadata={"lang": "de", "tags": ["x", "ü"], "n": 3, "nested": {"ok": True}},
                     status="failed", error="no text")
        before = time.time()
        registry.upsert_documents([record])
        got = registry.get_document("t1", "a")
        assert got is not None and without_times(got) == record
        assert before <= got.created_at <= got.updated_at <= time.time()

    def test_usage_sums_documents_chunks_and_stored_bytes_per_tenant(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a", chunks=2, bytes=100), doc("b", chunks=3, bytes=50),
                                   doc("c", tenant="t2", chunks=7, bytes=999)])
        assert registry.get_document("t1", "a").bytes == 100
        usage = registry.tenant_usage("t1")
        assert (usage["documents"], usage["chunks"], usage["stored_bytes"]) == (2, 5, 150)
        registry.upsert_documents([doc("a", chunks=1, bytes=10)])  # a replaced document frees what it held
        assert registry.tenant_usage("t1")["stored_bytes"] == 60
        assert registry.tenant_usage("nobody")["stored_bytes"] == 0

    def test_a_given_creation_time_is_kept(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a", created_at=1000.0)])
        assert registry.get_document("t1", "a").created_at == 1000.0

    def test_an_update_replaces_fields_but_keeps_the_creation_time(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a")])
        first = registry.get_document("t1", "a")
        time.sleep(0.01)
        changed = doc("a", chunks=9, content_hash="h2", encoder_version="v2", metadata={"k": 1}, title="New")
        registry.upsert_documents([changed])
        second = registry.get_document("t1", "a")
        assert without_times(second) == changed
        assert second.created_at == first.created_at and second.updated_at > first.updated_at
        assert registry.list_documents("t1", limit=10, offset=0)[1] == 1

    def test_get_documents_returns_those_found(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a"), doc("b"), doc("c")])
        got = registry.get_documents("t1", ["c", "a", "missing"])
        assert set(got) == {"a", "c"} and got["a"].id == "a" and got["c"].content_hash == "h-c"
        assert registry.get_documents("t1", []) == {}
        assert registry.get_document("t1", "missing") is None

    def test_get_documents_takes_many_ids(self, registry: Registry) -> None:
        registry.upsert_documents([doc(f"d{n:04d}") for n in range(1200)])
        ids = [f"d{n:04d}" for n in range(0, 2400, 2)]  # half exist
        assert set(registry.get_documents("t1", ids)) == {f"d{n:04d}" for n in range(0, 1200, 2)}

    def test_tenants_do_not_see_each_others_documents(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a", tenant="t1"), doc("a", tenant="t2", chunks=7), doc("b", tenant="t2")])
        assert registry.get_document("t1", "a").chunk_count == 3
        assert registry.get_document("t2", "a").chunk_count == 7
        assert registry.get_document("t1", "b") is None
        assert set(registry.get_documents("t1", ["a", "b"])) == {"a"}
        assert registry.list_documents("t1", limit=10, offset=0)[1] == 1
        assert [d.id for d in registry.list_documents("t2", limit=10, offset=0)[0]] == ["a", "b"]

    def test_pages_cover_every_document_once_in_id_order(self, registry: Registry) -> None:
        ids = [f"doc-{n:02d}" for n in range(23)]
        registry.upsert_documents([doc(i) for i in reversed(ids)])
        seen: list[str] = []
        for offset in range(0, 30, 5):
            page, total = registry.list_documents("t1", limit=5, offset=offset)
            assert total == 23
            assert len(page) == max(0, min(5, 23 - offset))
            seen += [d.id for d in page]
        assert seen == ids
        assert registry.list_documents("t1", limit=5, offset=100) == ([], 23)
        assert registry.list_documents("nobody", limit=5, offset=0) == ([], 0)

    def test_delete_document_says_whether_it_existed(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a"), doc("a", tenant="t2")])
        assert registry.delete_document("t1", "a") is True
        assert registry.get_document("t1", "a") is None
        assert registry.get_document("t2", "a") is not None
        assert registry.delete_document("t1", "a") is False

    def test_a_second_handle_sees_the_same_documents(self, open_registry: Opener) -> None:
        a, b = open_registry(), open_registry()
        a.upsert_documents([doc("x")])
        assert without_times(b.get_document("t1", "x")) == doc("x")


# ---- deletion marks against pending uploads ------------------------------------------------------------


class TestDeletionMarks:
    def test_a_delete_after_the_job_was_created_is_seen(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item(None)])
        registry.mark_deleted("t1", "a")
        assert registry.deleted_since("t1", ["a", "b"], job.created_at) == {"a"}
        assert registry.deleted_since("t2", ["a"], job.created_at) == set()  # per tenant
        assert registry.deleted_since("t1", [], job.created_at) == set()

    def test_a_delete_before_the_job_was_created_does_not_count(self, registry: Registry) -> None:
        registry.mark_deleted("t1", "a")
        time.sleep(0.01)
        job = registry.create_job("t1", [item("a")])  # a re-upload after the delete
        assert registry.deleted_since("t1", ["a"], job.created_at) == set()
        assert registry.get_job(job.id).status == "queued"

    def test_upsert_unless_deleted_writes_only_what_was_not_deleted(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item(None)])
        registry.mark_deleted("t1", "gone")
        skipped = registry.upsert_documents_unless_deleted(
            [doc("kept"), doc("gone"), doc("gone", tenant="t2")], job.created_at
        )
        assert skipped == {"gone"}
        assert registry.get_document("t1", "kept") is not None
        assert registry.get_document("t1", "gone") is None
        assert registry.get_document("t2", "gone") is not None  # only t1 deleted it

    def test_upsert_unless_deleted_writes_everything_for_a_later_job(self, registry: Registry) -> None:
        registry.mark_deleted("t1", "a")
        time.sleep(0.01)
        job = registry.create_job("t1", [item("a")])
        assert registry.upsert_documents_unless_deleted([doc("a")], job.created_at) == set()
        assert registry.get_document("t1", "a") is not None

    def test_a_queued_single_document_job_is_cancelled(self, registry: Registry, uploads) -> None:
        up = uploads("a")
        job = registry.create_job("t1", [up])
        assert registry.mark_deleted("t1", "a") == 1
        cancelled = registry.get_job(job.id)
        assert cancelled.status == "cancelled" and cancelled.error == "cancelled: the document was deleted"
        assert cancelled.finished_at is not None and not Path(up.path).exists()
        assert registry.claim_job(LONG_LEASE_S) is None

    def test_a_running_single_document_job_is_asked_to_stop(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item("a"), item("a")])
        registry.claim_job(LONG_LEASE_S)
        assert registry.mark_deleted("t1", "a") == 1
        assert registry.get_job(job.id).status == "running"
        assert registry.cancel_requested(job.id) is True

    def test_jobs_that_write_more_than_the_document_are_left_alone(self, registry: Registry) -> None:
        mixed = registry.create_job("t1", [item("a"), item("b")])
        bulk = registry.create_job("t1", [item(None)])  # a JSONL file: ids unknown until parsed
        other_doc = registry.create_job("t1", [item("b")])
        other_tenant = registry.create_job("t2", [item("a")])
        encoder = registry.create_job("t1", [item("a")], kind=JobKind.ADAPT)  # only ingest jobs write documents
        assert registry.mark_deleted("t1", "a") == 0
        for job in (mixed, bulk, other_doc, other_tenant, encoder):
            got = registry.get_job(job.id)
            assert got.status == "queued" and got.cancel_requested is False

    def test_a_mark_is_kept_while_a_job_created_before_it_is_pending(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item("a"), item("b")])
        registry.mark_deleted("t1", "a")
        time.sleep(0.01)
        registry.mark_deleted("t1", "z")  # a later mark prunes only marks no pending job needs
        assert registry.deleted_since("t1", ["a", "z"], job.created_at) == {"a", "z"}
        registry.claim_job(LONG_LEASE_S)
        registry.mark_deleted("t2", "y")  # still pending (running)
        assert registry.deleted_since("t1", ["a"], job.created_at) == {"a"}

    def test_marks_older_than_every_pending_job_are_pruned(self, registry: Registry) -> None:
        registry.mark_deleted("t1", "old")
        time.sleep(0.01)
        later = registry.create_job("t1", [item("b"), item("c")])
        registry.mark_deleted("t1", "new")
        assert registry.deleted_since("t1", ["old", "new"], 0.0) == {"new"}
        assert registry.deleted_since("t1", ["new"], later.created_at) == {"new"}

    def test_a_repeated_delete_moves_the_mark_forward(self, registry: Registry) -> None:
        job = registry.create_job("t1", [item("b"), item("c")])  # pending: keeps marks
        registry.mark_deleted("t1", "a")
        time.sleep(0.01)
        between = time.time()
        time.sleep(0.01)
        registry.mark_deleted("t1", "a")
        assert registry.deleted_since("t1", ["a"], between) == {"a"}
        assert registry.deleted_since("t1", ["a"], job.created_at) == {"a"}


# ---- encoder jobs: kinds, stages, outcomes -------------------------------------------------------------


class TestEncoderJobs:
    @pytest.mark.parametrize("kind", list(JobKind))
    def test_every_kind_and_its_params_read_back(self, registry: Registry, kind: JobKind) -> None:
        params = {"version": "v3", "epochs": 2, "lr": 2e-5, "promote": True, "datasets": ["scifact"]}
        job = registry.create_job("t1", [], kind=kind, params=params)
        got = registry.get_job(job.id)
        assert got.kind is kind and got.params == params and got.items == []
        assert registry.claim_job(LONG_LEASE_S).kind is kind

    def test_params_are_copied_at_creation(self, registry: Registry) -> None:
        params: dict[str, Any] = {"version": "v3"}
        job = registry.create_job("t1", [], kind=JobKind.PROMOTE, params=params)
        params["version"] = "changed"
        assert registry.get_job(job.id).params == {"version": "v3"}

    def test_stage_and_outcome(self, registry: Registry) -> None:
        job = registry.create_job("t1", [], kind=JobKind.ADAPT)
        registry.claim_job(LONG_LEASE_S)
        registry.set_stage(job.id, "training 40%")
        assert registry.get_job(job.id).stage == "training 40%"
        assert registry.get_job(job.id).outcome == {}
        registry.set_stage(job.id, "gated", {"version": "v2", "ndcg@10": 0.71, "passed": True})
        registry.set_stage(job.id, "done")  # without an outcome: the last one stays
        got = registry.get_job(job.id)
        assert got.stage == "done" and got.outcome == {"version": "v2", "ndcg@10": 0.71, "passed": True}
        registry.set_stage(job.id, "replaced", {})
        assert registry.get_job(job.id).outcome == {}

    def test_list_jobs_newest_first_by_kind_and_limit(self, registry: Registry) -> None:
        made = []
        for kind in (JobKind.INGEST, JobKind.ADAPT, JobKind.INGEST, JobKind.PROMOTE, JobKind.ADAPT):
            made.append(registry.create_job("t1", [], kind=kind))
            time.sleep(0.002)
        assert [j.id for j in registry.list_jobs()] == [j.id for j in reversed(made)]
        assert [j.id for j in registry.list_jobs(kind="adapt")] == [made[4].id, made[1].id]
        assert [j.id for j in registry.list_jobs(kind=JobKind.PROMOTE)] == [made[3].id]
        assert [j.id for j in registry.list_jobs(limit=2)] == [made[4].id, made[3].id]
        assert registry.list_jobs(kind=JobKind.ROLLBACK) == []
        assert registry.list_jobs(kind="adapt")[0] == registry.get_job(made[4].id)

    def test_finishing_an_encoder_job_keeps_its_outcome(self, registry: Registry) -> None:
        job = registry.create_job("t1", [], kind=JobKind.ROLLBACK, params={"to": "v1"})
        registry.claim_job(LONG_LEASE_S)
        registry.set_stage(job.id, "switched", {"active": "v1"})
        registry.finish_job(job.id, "succeeded")
        got = registry.get_job(job.id)
        assert got.status == "succeeded" and got.outcome == {"active": "v1"} and got.params == {"to": "v1"}


# ---- queued_count --------------------------------------------------------------------------------------


class TestFeedbackPairs:
    def test_feedback_grows_one_dataset_per_tenant(self, registry: Registry) -> None:
        first = registry.add_feedback_pairs("t1", [("q1", "d1")])
        again = registry.add_feedback_pairs("t1", [("q2", "d2"), ("q1", "d3")])
        other = registry.add_feedback_pairs("t2", [("q9", "d9")])
        assert first.id == again.id != other.id and again.format == "feedback" and again.name == "feedback"
        assert (again.pairs, again.queries) == (3, 2)
        assert registry.dataset_pairs("t1", first.id) == [("q1", "d1"), ("q2", "d2"), ("q1", "d3")]
        assert registry.dataset_pairs("t2", first.id) is None  # another tenant's
        assert [d.id for d in registry.list_datasets("t1")] == [first.id]


class TestScrapeReads:
    def test_queue_stats_count_waiting_jobs_by_kind_and_the_oldest(self, registry: Registry) -> None:
        assert registry.queue_stats() == {"queued_by_kind": {}, "oldest_queued_at": None, "running": 0}
        first = registry.create_job("t1", [item("a")])
        registry.create_job("t2", [], kind=JobKind.ADAPT)
        registry.create_job("t1", [item("b")])
        claimed = registry.claim_job(LONG_LEASE_S)
        stats = registry.queue_stats()
        assert stats["running"] == 1 and sum(stats["queued_by_kind"].values()) == 2
        waiting = [j for j in (registry.get_job(first.id),) if j.status == "queued"]
        assert stats["oldest_queued_at"] is not None and stats["oldest_queued_at"] >= first.created_at
        assert claimed is not None and (waiting or stats["oldest_queued_at"] > first.created_at)

    def test_tenants_usage_keeps_the_largest_and_sums_the_rest(self, registry: Registry) -> None:
        registry.upsert_documents([doc("a", tenant="big", chunks=50), doc("b", tenant="big", chunks=50),
                                   doc("c", tenant="mid", chunks=30), doc("d", tenant="s1", chunks=2),
                                   doc("e", tenant="s2", chunks=1)])
        assert registry.tenants_usage(2) == {"big": (2, 100), "mid": (1, 30), "_other": (2, 3)}
        assert registry.tenants_usage(10) == {"big": (2, 100), "mid": (1, 30), "s1": (1, 2), "s2": (1, 1)}


class TestTenantEncoders:
    def test_a_tenant_follows_the_default_until_pointed(self, registry: Registry) -> None:
        assert registry.get_tenant_encoder("t1") is None
        assert registry.tenant_encoders() == {}

    def test_pointers_are_per_tenant_and_move(self, registry: Registry) -> None:
        registry.set_tenant_encoder("t1", "v1")
        registry.set_tenant_encoder("t2", "v2")
        registry.set_tenant_encoder("t1", "v3")
        assert registry.get_tenant_encoder("t1") == "v3"
        assert registry.get_tenant_encoder("t2") == "v2"
        assert registry.tenant_encoders() == {"t1": "v3", "t2": "v2"}

    def test_clearing_returns_a_tenant_to_the_default(self, registry: Registry) -> None:
        registry.set_tenant_encoder("t1", "v1")
        registry.set_tenant_encoder("t1", None)
        registry.set_tenant_encoder("t9", None)  # clearing what was never set is harmless
        assert registry.get_tenant_encoder("t1") is None
        assert registry.tenant_encoders() == {}

    def test_a_second_handle_sees_the_pointer(self, open_registry: Opener) -> None:
        first, second = open_registry(), open_registry()
        first.set_tenant_encoder("t1", "v1")
        assert second.get_tenant_encoder("t1") == "v1"


class TestQueuedCount:
    def test_counts_jobs_not_yet_final(self, registry: Registry) -> None:
        assert registry.queued_count() == 0
        jobs = [registry.create_job("t1", [item(f"d{n}")]) for n in range(4)]
        assert registry.queued_count() == 4
        registry.claim_job(LONG_LEASE_S)
        assert registry.queued_count() == 4  # a running job is still pending work
        registry.finish_job(jobs[0].id, "succeeded")
        assert registry.queued_count() == 3
        registry.request_cancel(jobs[1].id)
        assert registry.queued_count() == 2
        registry.mark_deleted("t1", "d2")
        assert registry.queued_count() == 1


# ---- concurrency ---------------------------------------------------------------------------------------


class TestConcurrency:
    @pytest.mark.parametrize("handles", ["one handle", "a handle each"])
    def test_two_workers_never_claim_one_job_twice(self, open_registry: Opener, handles: str) -> None:
        shared = open_registry()
        jobs = {shared.create_job("t1", [item(f"d{n}")]).id for n in range(50)}
        workers = [shared, shared] if handles == "one handle" else [shared, open_registry()]
        claimed: list[list[str]] = [[], []]
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def work(n: int) -> None:
            reg = workers[n]
            try:
                start.wait()
                while (job := reg.claim_job(LONG_LEASE_S)) is not None:
                    claimed[n].append(job.id)
                    reg.finish_job(job.id, "succeeded")
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
                errors.append(exc)
            finally:
                reg.close()  # this thread's connection (or pool checkout)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and errors == []
        every = claimed[0] + claimed[1]
        assert len(every) == len(set(every)) == 50
        assert set(every) == jobs
        assert all(shared.get_job(j).attempts == 1 and shared.get_job(j).status == "succeeded" for j in jobs)
        assert shared.queued_count() == 0


# ---- the idle worker's wait -----------------------------------------------------------------------------


class TestWaitForJob:
    def test_an_idle_wait_returns_after_its_timeout(self, registry: Registry) -> None:
        started = time.monotonic()
        assert registry.wait_for_job(0.2) is False
        assert 0.15 <= time.monotonic() - started < 10

    @pytest.mark.parametrize("event", ["create", "requeue", "yield"])
    def test_a_claimable_job_ends_a_wait_early(self, registry: Registry, event: str) -> None:
        running = None
        if event != "create":
            registry.create_job("t1", [item()])
            running = registry.claim_job(LONG_LEASE_S)
        registry.wait_for_job(0.01)  # the waiter is set up (and earlier wake-ups are spent) before it matters
        woke: list[tuple[bool, float]] = []
        waiter = threading.Thread(target=lambda: woke.append((registry.wait_for_job(60.0), time.monotonic())))
        waiter.start()
        time.sleep(0.3)
        sent = time.monotonic()
        if event == "create":
            registry.create_job("t1", [item()])
        elif event == "requeue":
            registry.requeue_job(running.id, "the worker stopped")
        else:
            registry.yield_job(running.id)
        waiter.join(30)
        assert woke and woke[0][0] is True and woke[0][1] - sent < 10  # not the 60 s timeout
        assert registry.claim_job(LONG_LEASE_S) is not None


# ---- datasets: labelled pairs owned by a tenant ------------------------------------------------------


def make_dataset(registry: Registry, tenant: str = "t1", name: str = "feedback",
                 pairs: list[tuple[str, str]] | None = None, **kw: Any) -> DatasetRecord:
    pairs = [("what is x?", "d1"), ("what is y?", "d2"), ("what is x?", "d3")] if pairs is None else pairs
    base: dict[str, Any] = dict(split="train", format="jsonl", size=123, sha256="ab" * 32)
    return registry.create_dataset(tenant, name, pairs, **(base | kw))


class TestDatasets:
    def test_a_created_dataset_reads_back_with_its_counts(self, registry: Registry) -> None:
        before = time.time()
        record = make_dataset(registry, split="dev", format="beir-zip", size=4567, sha256="cd" * 32)
        assert record.id.startswith("ds_") and len(record.id) > 16
        assert (record.tenant, record.name, record.split, record.format) == ("t1", "feedback", "dev", "beir-zip")
        assert (record.pairs, record.queries, record.bytes, record.sha256) == (3, 2, 4567, "cd" * 32)
        assert before <= record.created_at <= time.time()
        assert registry.get_dataset("t1", record.id) == record
        assert registry.list_datasets("t1") == [record]

    def test_pairs_read_back_in_their_order_duplicates_and_all(self, registry: Registry) -> None:
        pairs = [("q ü €", "d/1"), ("q2", "d2"), ("q ü €", "d/1"), ("\u2028 odd", "7")]
        record = make_dataset(registry, pairs=pairs)
        assert registry.dataset_pairs("t1", record.id) == pairs
        assert (record.pairs, record.queries) == (4, 3)

    def test_many_pairs_round_trip(self, registry: Registry) -> None:
        pairs = [(f"query {n}", f"doc-{n % 97}") for n in range(5000)]
        record = make_dataset(registry, pairs=pairs)
        assert registry.dataset_pairs("t1", record.id) == pairs

    def test_ids_are_unique_even_for_the_same_content(self, registry: Registry) -> None:
        ids = {make_dataset(registry).id for _ in range(5)}
        assert len(ids) == 5
        assert len(registry.list_datasets("t1")) == 5

    def test_an_unknown_id_is_none_everywhere(self, registry: Registry) -> None:
        assert registry.get_dataset("t1", "ds_missing") is None
        assert registry.dataset_pairs("t1", "ds_missing") is None
        assert registry.delete_dataset("t1", "ds_missing") is False
        assert registry.list_datasets("t1") == []

    def test_another_tenants_id_behaves_exactly_like_a_missing_one(self, registry: Registry) -> None:
        mine = make_dataset(registry, tenant="t1")
        assert registry.get_dataset("t2", mine.id) is None
        assert registry.dataset_pairs("t2", mine.id) is None
        assert registry.delete_dataset("t2", mine.id) is False
        assert registry.list_datasets("t2") == []
        # Nothing of t1's changed.
        assert registry.get_dataset("t1", mine.id) == mine
        assert registry.dataset_pairs("t1", mine.id) == [("what is x?", "d1"), ("what is y?", "d2"),
                                                        ("what is x?", "d3")]

    def test_lists_hold_only_the_tenants_own_oldest_first(self, registry: Registry) -> None:
        first = make_dataset(registry, name="first")
        theirs = make_dataset(registry, tenant="t2", name="theirs")
        time.sleep(0.01)
        second = make_dataset(registry, name="second")
        assert [d.id for d in registry.list_datasets("t1")] == [first.id, second.id]
        assert registry.list_datasets("t2") == [theirs]

    def test_delete_removes_the_dataset_and_its_pairs_only(self, registry: Registry) -> None:
        gone, kept = make_dataset(registry), make_dataset(registry, pairs=[("q", "d")])
        assert registry.delete_dataset("t1", gone.id) is True
        assert registry.get_dataset("t1", gone.id) is None
        assert registry.dataset_pairs("t1", gone.id) is None
        assert registry.delete_dataset("t1", gone.id) is False
        assert registry.list_datasets("t1") == [kept]
        assert registry.dataset_pairs("t1", kept.id) == [("q", "d")]

    def test_a_second_handle_sees_the_same_datasets(self, open_registry: Opener) -> None:
        a, b = open_registry(), open_registry()
        record = make_dataset(a)
        assert b.get_dataset("t1", record.id) == record
        assert b.delete_dataset("t1", record.id) is True
        assert a.get_dataset("t1", record.id) is None
