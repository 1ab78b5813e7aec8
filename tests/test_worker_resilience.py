"""The ingest worker never dies or wedges, whatever an upload contains (issue 10, items 1 and 4).

The real app (worker inside, embedded Qdrant, SQLite registry) runs every case. Faults are injected
only at the worker's edges: the loader it calls (``ingest.worker.load``), the registry's disk and
the store's write calls, each wrapped so that it raises or waits where a test says.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import ingest.worker as worker_module
from ingest.pairs import read_labelled, read_regular_text
from rag.errors import BadRequest
from rag.settings import Settings
from tests import hostile_files
from tests.conftest import wait_for

FINAL = ("succeeded", "failed", "cancelled")
FRESH = "The Aletsch Glacier is the largest glacier in the Alps, flowing twenty kilometres through Switzerland."


@pytest.fixture
def settings(tmp_path: Path, request) -> Settings:
    """conftest's settings; a test may change some with ``@pytest.mark.parametrize("settings", [{...}], indirect=True)``."""
    overrides = getattr(request, "param", {})
    return Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no", **overrides)


# ---- helpers --------------------------------------------------------------------------------------


def upload(client, name: str, data: bytes | str, tenant: str = "default") -> dict:
    if isinstance(data, str):
        data = data.encode()
    resp = client.post("/v1/documents", files={"file": (name, io.BytesIO(data))}, headers={"X-Tenant": tenant})
    assert resp.status_code == 202, resp.text
    return resp.json()


def get_job(client, job_id: str, tenant: str = "default") -> dict:
    resp = client.get(f"/v1/jobs/{job_id}", headers={"X-Tenant": tenant})
    assert resp.status_code == 200, resp.text
    return resp.json()


def finish(client, job_id: str, tenant: str = "default", timeout: float = 120) -> dict:
    def done():
        job = get_job(client, job_id, tenant)
        return job if job["status"] in FINAL else None

    return wait_for(done, timeout=timeout)


def search_ids(client, query: str, top_k: int = 10) -> list[str]:
    resp = client.post("/v1/search", json={"query": query, "top_k": top_k})
    assert resp.status_code == 200, resp.text
    return [h["document_id"] for h in resp.json()["results"]]


def assert_fresh_upload_indexed(client, name: str = "fresh.txt") -> None:
    """The worker survived: a new small upload is indexed and found."""
    job = finish(client, upload(client, name, FRESH)["job_ids"][0])
    assert job["status"] == "succeeded", job
    assert name in search_ids(client, "largest glacier in the Alps")


def uploads_left(settings: Settings) -> list[Path]:
    root = settings.uploads_dir
    return sorted(root.rglob("*")) if root.exists() else []


def supervisor_of(client):
    return client.services.worker_alive.__self__


class LoaderHooks:
    """Wraps the worker's loader: a hook per file name may raise or wait before a document is handed over."""

    def __init__(self, monkeypatch) -> None:
        self.real = worker_module.load
        self.hooks: dict[str, Callable[[int], None]] = {}
        self.handed: dict[str, int] = {}
        monkeypatch.setattr(worker_module, "load", self._load)

    def _load(self, filename: str, data: bytes, **kwargs) -> Iterator:
        hook = self.hooks.get(filename)
        for n, parsed in enumerate(self.real(filename, data, **kwargs)):
            if hook is not None:
                hook(n)
            self.handed[filename] = self.handed.get(filename, 0) + 1
            yield parsed


def jsonl(docs: list[tuple[str, str]]) -> bytes:
    return "".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs).encode()


def gate() -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """(reached, release, wait): the worker calls ``wait`` and blocks there until the test releases it."""
    reached, release = threading.Event(), threading.Event()

    def wait() -> None:
        reached.set()
        assert release.wait(60), "the test never released the worker"

    return reached, release, wait


# ---- hostile files ----------------------------------------------------------------------------------

HOSTILE = {
    "deep.jsonl": hostile_files.jsonl_deep_line,
    "corrupt-deflate.docx": hostile_files.docx_corrupt_deflate,
    "method-99.docx": hostile_files.docx_compression_99,
    "bomb.docx": hostile_files.docx_bomb,
    "foo-filter.pdf": hostile_files.pdf_unknown_filter,
    "many-pages.pdf": hostile_files.pdf_many_pages,
    "invalid-utf8.jsonl": hostile_files.invalid_utf8_jsonl,
}


@pytest.mark.slow
def test_hostile_files_fail_their_document_and_the_worker_goes_on(app_client):
    for n, (name, build) in enumerate(HOSTILE.items()):
        job = finish(app_client, upload(app_client, name, build())["job_ids"][0])
        assert job["status"] in ("succeeded", "failed"), (name, job)
        failed = [d for d in job["documents"] if d["status"] == "failed"]
        assert failed, (name, job["documents"])
        assert all(d["error"] for d in failed), (name, failed)
        assert_fresh_upload_indexed(app_client, f"fresh-{n}.txt")
    assert uploads_left(app_client.services.settings) == []


# ---- the worker's own defence: a registry that breaks under it -----------------------------------------


def test_an_exception_escaping_a_job_fails_the_job_and_the_worker_goes_on(app_client):
    """The registry breaks under the worker (a table gone, as on a damaged disk): the job fails with the
    reason, the poll loop lives through failed claims, and the same thread indexes once it is repaired."""
    path = app_client.services.settings.registry_path
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE deletions RENAME TO deletions_away")
    job = finish(app_client, upload(app_client, "doomed.txt", "A text whose job meets a broken disk.")["job_ids"][0])
    assert job["status"] == "failed", job
    assert job["error"] == "internal error: OperationalError: no such table: deletions", job
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE deletions_away RENAME TO deletions")
        db.execute("ALTER TABLE jobs RENAME TO jobs_away")  # now every claim of the poll loop fails
    time.sleep(0.5)
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE jobs_away RENAME TO jobs")
    assert_fresh_upload_indexed(app_client)
    assert supervisor_of(app_client).restarts == 0  # the same thread lived through both


def test_a_job_over_its_attempts_is_failed_at_claim(app_client, monkeypatch):
    """A job whose workers died during it (attempts used up) is not tried again: it fails at claim."""
    svc = app_client.services
    hooks = LoaderHooks(monkeypatch)
    reached, release, wait = gate()
    hooks.hooks["hold.txt"] = lambda n: wait()
    held = upload(app_client, "hold.txt", "The worker waits on this one.")["job_ids"][0]
    assert reached.wait(30)
    # Earlier crashes, as the registry shows them after restarts: the job ran its attempts.
    poison = upload(app_client, "poison.txt", "A text that killed its worker each time.")["job_ids"][0]
    with sqlite3.connect(svc.settings.registry_path) as db:
        db.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (svc.settings.job_max_attempts, poison))
    release.set()
    job = finish(app_client, poison)
    assert job["status"] == "failed", job
    assert job["error"].startswith(f"gave up after {svc.settings.job_max_attempts} attempts"), job
    assert job["attempts"] == svc.settings.job_max_attempts and job["documents"] == []
    assert finish(app_client, held)["status"] == "succeeded"
    assert svc.registry.get_document("default", "poison.txt") is None
    assert_fresh_upload_indexed(app_client)
    # A restart's requeue (every running job back to the queue) cannot loop on it either.
    assert svc.registry.requeue_running() == 0
    assert uploads_left(svc.settings) == []


def test_cancel_ends_a_running_job_at_its_next_document(app_client, monkeypatch):
    monkeypatch.setattr(worker_module, "GROUP_CHUNKS", 2)  # a group of two documents: some publish early
    hooks = LoaderHooks(monkeypatch)
    reached, release, wait = gate()
    hooks.hooks["many.jsonl"] = lambda n: wait() if n == 5 else None
    docs = [(f"m{i}", f"Document {i} describes the lake number {i} in the valley.") for i in range(20)]
    job_id = upload(app_client, "many.jsonl", jsonl(docs))["job_ids"][0]
    assert reached.wait(60)
    resp = app_client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    release.set()
    job = finish(app_client, job_id)
    assert job["status"] == "cancelled", job
    # The loader was not asked for a document after the one it was handing over.
    assert hooks.handed["many.jsonl"] == 6
    listed = app_client.get("/v1/documents", params={"limit": 100}).json()["documents"]
    indexed = sorted(d["id"] for d in listed)
    # Whole groups published before the cancel stay (they are complete); nothing after it was written.
    assert indexed == ["m0", "m1", "m2", "m3"], indexed
    svc = app_client.services
    assert svc.store.count(svc.collection, tenant="default", live=False) == 0
    assert uploads_left(svc.settings) == []
    assert_fresh_upload_indexed(app_client)


# ---- liveness: heartbeat, /readyz and the supervisor -------------------------------------------------


# The thread's death is the point of the test: pytest need not report it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("settings", [{"worker_stale_s": 1.0}], indirect=True)
def test_readyz_reports_a_wedged_or_dead_worker_and_the_supervisor_restarts_it(app_client, monkeypatch):
    assert app_client.get("/readyz").status_code == 200
    supervisor = supervisor_of(app_client)
    first = supervisor.worker
    hooks = LoaderHooks(monkeypatch)
    reached, release, wait = gate()
    deaths = [1]

    def wedge_then_die(n: int) -> None:
        wait()
        if deaths:
            deaths.pop()
            raise SystemExit("the worker thread ends")  # not an Exception: nothing in the worker catches it

    hooks.hooks["wedge.txt"] = wedge_then_die
    job_id = upload(app_client, "wedge.txt", "A text the worker stalls on, then dies on.")["job_ids"][0]
    assert reached.wait(30)

    # Wedged: the thread lives but beats no more.
    def not_alive():
        resp = app_client.get("/readyz")
        return resp if resp.status_code == 503 else None

    resp = wait_for(not_alive, timeout=10)
    assert resp.json()["error"]["code"] == "worker_not_alive"
    assert first.thread.is_alive()

    # Dead: the thread ends; /readyz says so until the supervisor's restart (after its backoff).
    release.set()
    first.thread.join(10)
    assert not first.thread.is_alive()
    resp = app_client.get("/readyz")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "worker_not_alive"
    wait_for(lambda: app_client.get("/readyz").status_code == 200, timeout=15)
    assert supervisor.restarts == 1 and supervisor.worker is not first
    # The job the dead thread held went back to the queue; the new worker finishes it.
    job = finish(app_client, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert_fresh_upload_indexed(app_client)


# ---- delete racing an upload: the delete wins -----------------------------------------------------------


def _assert_gone(client, document_id: str, query: str) -> None:
    svc = client.services
    assert client.get(f"/v1/documents/{document_id}").status_code == 404
    assert svc.store.count(svc.collection, tenant="default", document_id=document_id) == 0
    assert document_id not in search_ids(client, query, top_k=20)


def test_delete_wins_over_a_pending_upload_of_the_document(app_client, monkeypatch):
    svc = app_client.services
    hooks = LoaderHooks(monkeypatch)
    name = "race.txt"
    first = finish(app_client, upload(app_client, name, "Version zero is about copper mining in Chile.")["job_ids"][0])
    assert first["status"] == "succeeded"

    # Trial 1: a JSONL job is running (parsing) when the delete comes: not cancelled (it holds other
    # documents), its line of the deleted id is failed, not published.
    reached, release, wait = gate()
    hooks.hooks["bulk.jsonl"] = lambda n: wait() if n == 0 else None
    bulk = upload(app_client, "bulk.jsonl", jsonl([(name, "Version one is about silver mining in Peru."),
                                                    ("other", "An unrelated note about beekeeping.")]))["job_ids"][0]
    assert reached.wait(30)
    assert app_client.delete(f"/v1/documents/{name}").status_code == 200
    release.set()
    job = finish(app_client, bulk)
    by_id = {d["document_id"]: d for d in job["documents"]}
    assert by_id[name]["status"] == "failed" and by_id[name]["error"] == worker_module.DELETED_PENDING, by_id
    assert by_id["other"]["status"] == "indexed"
    _assert_gone(app_client, name, "silver mining in Peru")

    # Trial 2: the upload is queued (the worker is busy) when the delete comes: its job is cancelled.
    reached, release, wait = gate()
    hooks.hooks["busy.txt"] = lambda n: wait()
    busy = upload(app_client, "busy.txt", "A text that keeps the worker busy.")["job_ids"][0]
    assert reached.wait(30)
    queued = upload(app_client, name, "Version two is about tin mining in Bolivia.")["job_ids"][0]
    assert app_client.delete(f"/v1/documents/{name}").status_code == 200
    assert get_job(app_client, queued)["status"] == "cancelled"
    release.set()
    finish(app_client, busy)
    assert finish(app_client, queued)["status"] == "cancelled"
    _assert_gone(app_client, name, "tin mining in Bolivia")

    # Trial 3: the delete lands while the worker publishes: what it published goes again.
    reached, release, wait = gate()
    real_publish = svc.store.publish_many

    def publish_many(collection, tenant, documents):
        if any(d == name for d, _ in documents):
            wait()
        return real_publish(collection, tenant, documents)

    monkeypatch.setattr(svc.store, "publish_many", publish_many)
    racing = upload(app_client, name, "Version three is about gold mining in Ghana.")["job_ids"][0]
    assert reached.wait(60)
    assert app_client.delete(f"/v1/documents/{name}").status_code == 200
    release.set()
    job = finish(app_client, racing)
    assert job["status"] in ("failed", "cancelled"), job
    if job["documents"]:
        assert job["documents"][0]["error"] == worker_module.DELETED_PENDING, job
    _assert_gone(app_client, name, "gold mining in Ghana")
    monkeypatch.setattr(svc.store, "publish_many", real_publish)

    # An upload made after the delete indexes normally.
    job = finish(app_client, upload(app_client, name, "Version four is about salt mining in Poland.")["job_ids"][0])
    assert job["status"] == "succeeded", job
    assert app_client.get(f"/v1/documents/{name}").json()["status"] == "indexed"
    assert name in search_ids(app_client, "salt mining in Poland", top_k=3)
    assert uploads_left(svc.settings) == []


# ---- uploads on disk -----------------------------------------------------------------------------------


def test_finished_jobs_leave_no_upload_files_or_folders(app_client, monkeypatch):
    settings = app_client.services.settings
    files = [("file", (f"part-{i}.txt", io.BytesIO(f"Part {i} of a batch about rivers.".encode()))) for i in range(3)]
    resp = app_client.post("/v1/documents", files=files)
    assert resp.status_code == 202, resp.text
    assert all(finish(app_client, j)["status"] == "succeeded" for j in resp.json()["job_ids"])
    failed = finish(app_client, upload(app_client, "empty.txt", "   ")["job_ids"][0])
    assert failed["status"] == "failed"
    # A job cancelled while queued: its files go at once.
    hooks = LoaderHooks(monkeypatch)
    reached, release, wait = gate()
    hooks.hooks["busy.txt"] = lambda n: wait()
    busy = upload(app_client, "busy.txt", "A text that keeps the worker busy.")["job_ids"][0]
    assert reached.wait(30)
    queued = upload(app_client, "later.txt", "Never indexed.")["job_ids"][0]
    assert len(uploads_left(settings)) == 4  # two folders, a file in each
    assert app_client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
    release.set()
    finish(app_client, busy)
    assert uploads_left(settings) == []


# ---- pairs files: only regular files are read --------------------------------------------------------------


def _returns_quickly(fn: Callable[[], object]) -> object:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "reading blocked"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_pairs_files_must_be_regular_files(tmp_path):
    fifo = tmp_path / "pairs.fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(BadRequest, match="not a regular file"):
        _returns_quickly(lambda: read_labelled(fifo))
    with pytest.raises(BadRequest, match="not a regular file"):
        _returns_quickly(lambda: read_labelled(Path("/dev/zero")))
    with pytest.raises(BadRequest, match="no such file"):
        read_labelled(tmp_path / "missing.jsonl")
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 101)
    with pytest.raises(BadRequest, match="at most 100"):
        read_regular_text(big, limit=100)
    # A BEIR folder whose queries file is a FIFO is refused too; a regular one is read as before.
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    os.mkfifo(beir / "queries.jsonl")
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(BadRequest, match="not a regular file"):
        _returns_quickly(lambda: read_labelled(beir))
    (beir / "queries.jsonl").unlink()
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "which river?"}) + "\n")
    assert read_labelled(beir) == [("which river?", "d1")]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"query": "which lake?", "document_id": "d2"}) + "\n")
    assert read_labelled(pairs) == [("which lake?", "d2")]
