"""The durable document registry and job queue.

The embedded default is SQLite (WAL mode) under the data directory, so nothing needs a server;
``PostgresRegistry`` (rag/registry_pg.py) is the shared engine for several hosts, chosen by
``RAG_DATABASE_URL`` (rag/registry_factory.py opens one or the other). The worker and the API only
use the methods of ``Registry``.

Both engines version their schema: an ordered list of migrations per engine, applied in one
transaction when a handle opens; a database whose schema is newer than the code knows is refused
(:func:`refuse_newer_schema`) instead of being misread.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import structlog

from rag.auth import ApiKey
from rag.datasets import DatasetFormat, DatasetRecord, new_dataset_id
from rag.errors import RegistrySchemaError

log = structlog.get_logger("rag.registry")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobKind(StrEnum):
    """What a job does; the worker dispatches on it. A ``str`` so that it is stored and compared as text."""

    INGEST = "ingest"  # parse → chunk → embed → publish the job's uploaded files
    ADAPT = "adapt"  # pairs → fine-tune → gate (→ promote)
    PROMOTE = "promote"  # re-embed into a version's collection, then switch to it
    ROLLBACK = "rollback"  # switch back to the parent (or a named) version
    PRUNE = "prune"  # drop the collections of versions other than the active one and its parent
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


class DocumentRecord(msgspec.Struct, kw_only=True):
    tenant: str
    id: str
    title: str
    source: str
    content_hash: str
    chunk_count: int
    encoder_version: str
    status: str  # indexed | failed
    error: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    bytes: int = 0  # UTF-8 bytes of its chunks' text: what it occupies in the store (the stored-bytes quota)


class JobItem(msgspec.Struct, kw_only=True):
    """One uploaded file (or JSON text) of a job, stored on disk until the job is done."""

    filename: str
    path: str
    document_id: str | None = None
    title: str | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class DocumentResult(msgspec.Struct, kw_only=True):
    document_id: str | None
    status: str  # indexed | unchanged | failed
    chunks: int = 0
    error: str | None = None
    source: str = ""


class Job(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    status: JobStatus
    items: list[JobItem]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    error: str | None = None
    total: int = 0  # documents seen so far (a bulk JSONL file reveals its count as it is parsed)
    done: int = 0
    failed: int = 0
    chunks: int = 0
    cancel_requested: bool = False
    results: list[DocumentResult] = msgspec.field(default_factory=list)
    kind: JobKind = JobKind.INGEST
    params: dict[str, Any] = msgspec.field(default_factory=dict)  # what a non-ingest job does
    outcome: dict[str, Any] = msgspec.field(default_factory=dict)  # what it produced (e.g. the encoder record)
    stage: str = ""  # where a long job is (e.g. "training 40%")
    # Claimed again after yielding its turn to other tenants: its results so far stand, and the worker
    # skips the documents it already reported (done + failed) instead of starting over.
    resumed: bool = False


class Registry(Protocol):
    """Documents, jobs and deletion marks: what the API and the worker need of durable state.

    ``SqliteRegistry`` is the embedded implementation, ``PostgresRegistry`` (rag/registry_pg.py) the shared
    one; every implementation passes the same contract suite (tests/test_registry_contract.py).

    ``wait_for_job(timeout_s)`` is the idle worker's pause between polls: it returns after at most
    ``timeout_s``, and earlier (True) once a job may be waiting (PostgreSQL: LISTEN/NOTIFY from any
    process; SQLite: a job created, requeued or yielded through the same handle). Returning early or late
    is never wrong: the worker claims after it either way.
    """

    def create_job(self, tenant: str, items: Sequence[JobItem], *, kind: JobKind = JobKind.INGEST,
                   params: dict[str, Any] | None = None) -> Job: ...
    def get_job(self, job_id: str) -> Job | None: ...
    def list_jobs(self, *, kind: str | None = None, limit: int = 20) -> list[Job]: ...
    def set_stage(self, job_id: str, stage: str, outcome: dict[str, Any] | None = None) -> None: ...
    def queued_count(self) -> int: ...
    def claim_job(self, lease_s: float, max_attempts: int | None = None) -> Job | None: ...
    def renew_lease(self, job_id: str, lease_s: float) -> bool: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def yield_job(self, job_id: str) -> None: ...
    def others_waiting(self, tenant: str) -> bool: ...
    def record_results(self, job_id: str, results: Sequence[DocumentResult], *, total: int) -> None: ...
    def finish_job(self, job_id: str, status: JobStatus, error: str | None = None) -> None: ...
    def requeue_job(self, job_id: str, error: str) -> None: ...
    def request_cancel(self, job_id: str) -> Job | None: ...
    def requeue_running(self) -> int: ...
    def get_documents(self, tenant: str, ids: Sequence[str]) -> dict[str, DocumentRecord]: ...
    def get_document(self, tenant: str, document_id: str) -> DocumentRecord | None: ...
    def list_documents(self, tenant: str, *, limit: int, offset: int) -> tuple[list[DocumentRecord], int]: ...
    def upsert_documents(self, records: Sequence[DocumentRecord]) -> None: ...
    def delete_document(self, tenant: str, document_id: str) -> bool: ...
    def mark_deleted(self, tenant: str, document_id: str) -> int: ...
    def deleted_since(self, tenant: str, ids: Sequence[str], since: float) -> set[str]: ...
    def upsert_documents_unless_deleted(self, records: Sequence[DocumentRecord], since: float) -> set[str]: ...
    def take_token(self, bucket: str, rate: float, burst: int) -> float: ...
    def get_quotas(self, tenant: str) -> dict[str, int]: ...
    def set_quotas(self, tenant: str, limits: dict[str, int]) -> None: ...
    def tenant_usage(self, tenant: str) -> dict[str, int]: ...
    def add_llm_tokens(self, tenant: str, tokens: int) -> None: ...
    def queue_stats(self) -> dict[str, Any]: ...
    def tenants_usage(self, limit: int) -> dict[str, tuple[int, int]]: ...
    def get_tenant_encoder(self, tenant: str) -> str | None: ...
    def set_tenant_encoder(self, tenant: str, version: str | None) -> None: ...
    def tenant_encoders(self) -> dict[str, str]: ...
    def create_key(self, key: ApiKey) -> None: ...
    def get_key(self, key_id: str) -> ApiKey | None: ...
    def list_keys(self, tenant: str | None = None) -> list[ApiKey]: ...
    def revoke_key(self, key_id: str) -> bool: ...
    # ---- datasets: every method takes the tenant; another tenant's id is the same as a missing one ----
    def create_dataset(self, tenant: str, name: str, pairs: Sequence[tuple[str, str]], *, split: str,
                       format: DatasetFormat, size: int, sha256: str) -> DatasetRecord: ...
    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None: ...
    def list_datasets(self, tenant: str) -> list[DatasetRecord]: ...
    def delete_dataset(self, tenant: str, dataset_id: str) -> bool: ...
    def dataset_pairs(self, tenant: str, dataset_id: str) -> list[tuple[str, str]] | None: ...
    def add_feedback_pairs(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> DatasetRecord: ...
    # ---- end datasets ----
    def wait_for_job(self, timeout_s: float) -> bool: ...
    def close(self) -> None: ...


# SQLite's migrations, in order; PRAGMA user_version is the number applied (0 in files made before
# versions). Version 1 creates every table with the first release's columns (IF NOT EXISTS: an older file
# keeps what it has), version 2 adds the columns that came later, each only where missing (a file from
# between releases has some of them). A new change is a new function appended to SQLITE_MIGRATIONS.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    tenant TEXT NOT NULL, id TEXT NOT NULL, title TEXT NOT NULL, source TEXT NOT NULL,
    content_hash TEXT NOT NULL, chunk_count INTEGER NOT NULL, encoder_version TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, metadata TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, items TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL, error TEXT, total INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created_at);
CREATE TABLE IF NOT EXISTS job_results (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, document_id TEXT, status TEXT NOT NULL,
    chunks INTEGER NOT NULL, error TEXT, source TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
-- API keys: only the SHA-256 of a key is kept; revocation is a timestamp every API process sees at once.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, scopes TEXT NOT NULL, secret_hash TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, expires_at REAL, revoked_at REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
-- Token buckets of the rate limit (one per key): every API process takes from the same bucket.
CREATE TABLE IF NOT EXISTS rate_buckets (bucket TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL);
-- Per-tenant quota overrides (JSON object of quota name -> limit) and LLM token use per minute and per day.
CREATE TABLE IF NOT EXISTS quotas (tenant TEXT PRIMARY KEY, limits TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS llm_usage (
    tenant TEXT NOT NULL, period TEXT NOT NULL, start REAL NOT NULL, tokens INTEGER NOT NULL,
    PRIMARY KEY (tenant, period)
);
-- Each tenant's own encoder version (absent: the tenant searches with the default, the store's active pointer).
CREATE TABLE IF NOT EXISTS tenant_encoders (tenant TEXT PRIMARY KEY, version TEXT NOT NULL, updated_at REAL NOT NULL);
-- When a document was last deleted: an upload created before that must not bring it back
-- ("the delete wins"); marks older than every pending job are pruned.
CREATE TABLE IF NOT EXISTS deletions (
    tenant TEXT NOT NULL, document_id TEXT NOT NULL, deleted_at REAL NOT NULL,
    PRIMARY KEY (tenant, document_id)
);
-- ---- datasets: labelled (query, document id) pairs a tenant uploaded (rag/datasets.py) ----
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, split TEXT NOT NULL, format TEXT NOT NULL,
    pairs INTEGER NOT NULL, queries INTEGER NOT NULL, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_tenant ON datasets (tenant, created_at);
CREATE TABLE IF NOT EXISTS dataset_pairs (
    dataset_id TEXT NOT NULL, seq INTEGER NOT NULL, query TEXT NOT NULL, document_id TEXT NOT NULL,
    PRIMARY KEY (dataset_id, seq)
);
-- ---- end datasets ----
"""

# The next job, fairly across tenants: first the tenant with the fewest jobs running now (a per-tenant
# concurrency limit of one while others wait), then the tenant served longest ago (round-robin), then the
# oldest job of that tenant. One tenant's bulk import cannot hold the queue: it also yields between its
# slices when others wait (the worker's ``others_waiting`` check).
_FAIR_NEXT_JOB = """
SELECT j.* FROM jobs j
WHERE j.status = 'queued' OR (j.status = 'running' AND j.lease_until < ?)
ORDER BY
    (SELECT COUNT(*) FROM jobs r WHERE r.tenant = j.tenant AND r.status = 'running' AND r.lease_until >= ?),
    COALESCE((SELECT MAX(c.claimed_at) FROM jobs c WHERE c.tenant = j.tenant), 0),
    j.created_at
LIMIT 1
"""

_LATER_COLUMNS = {
    "jobs": (("kind", "TEXT NOT NULL DEFAULT 'ingest'"), ("params", "TEXT NOT NULL DEFAULT '{}'"),
             ("outcome", "TEXT NOT NULL DEFAULT '{}'"), ("stage", "TEXT NOT NULL DEFAULT ''"),
             ("claimed_at", "REAL"), ("yielded", "INTEGER NOT NULL DEFAULT 0")),
    "documents": (("bytes", "INTEGER NOT NULL DEFAULT 0"),),
}


def _sqlite_v1(db: sqlite3.Connection) -> None:
    for statement in sql_statements(_SCHEMA):
        db.execute(statement)


def _sqlite_v2(db: sqlite3.Connection) -> None:
    for table, columns in _LATER_COLUMNS.items():
        have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
        for column, decl in columns:
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, status)")


SQLITE_MIGRATIONS = (_sqlite_v1, _sqlite_v2)  # migration n brings a file from version n-1 to n

GAVE_UP = "gave up after {n} attempts: the worker stopped during the job each time"
# An upload's saved files lie in a folder of their own, named by a random hex id (see the API).
_BATCH_DIR = re.compile(r"^[0-9a-f]{32}$")

DOC_COLUMNS = (
    "tenant, id, title, source, content_hash, chunk_count, encoder_version, status, error, metadata, "
    "created_at, updated_at, bytes"
)
DATASET_COLUMNS = "id, tenant, name, split, format, pairs, queries, bytes, sha256, created_at"


def sql_statements(script: str) -> list[str]:
    """A schema script's statements, to run one by one inside a transaction (sqlite3's ``executescript`` would
    commit first). Comments are whole lines (``--``) and may hold a ``;``; statements end at ``;``."""
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [part.strip() for part in code.split(";") if part.strip()]


def refuse_newer_schema(found: int, known: int, where: str) -> None:
    """Raise when a database's schema is newer than this code's migrations: an older release must not guess at
    tables a newer one changed (it would misread or damage them)."""
    if found > known:
        raise RegistrySchemaError(
            f"the registry database {where} has schema version {found}, newer than this code knows (version "
            f"{known}): run the release that migrated it (or a newer one), or point the service at another database"
        )


# Rows to records, for every engine: a row is anything indexed by column name (sqlite3.Row, a dict).
def doc_from_row(row: Any) -> DocumentRecord:
    return DocumentRecord(
        tenant=row["tenant"], id=row["id"], title=row["title"], source=row["source"],
        content_hash=row["content_hash"], chunk_count=row["chunk_count"],
        encoder_version=row["encoder_version"], status=row["status"], error=row["error"],
        metadata=json.loads(row["metadata"]), created_at=row["created_at"], updated_at=row["updated_at"],
        bytes=row["bytes"],
    )


def key_from_row(row: Any) -> ApiKey:
    return ApiKey(key_id=row["key_id"], tenant=row["tenant"], scopes=json.loads(row["scopes"]),
                  secret_hash=row["secret_hash"], name=row["name"], created_at=row["created_at"],
                  expires_at=row["expires_at"], revoked_at=row["revoked_at"])


def result_from_row(row: Any) -> DocumentResult:
    return DocumentResult(document_id=row["document_id"], status=row["status"], chunks=row["chunks"],
                          error=row["error"], source=row["source"])


def job_from_row(row: Any, results: list[DocumentResult]) -> Job:
    return Job(
        id=row["id"], tenant=row["tenant"], status=row["status"],
        items=msgspec.json.decode(row["items"], type=list[JobItem]), created_at=row["created_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], attempts=row["attempts"],
        error=row["error"], total=row["total"], done=row["done"], failed=row["failed"],
        chunks=row["chunks"], cancel_requested=bool(row["cancel_requested"]), results=results,
        kind=JobKind(row["kind"]), params=msgspec.json.decode(row["params"]),
        outcome=msgspec.json.decode(row["outcome"]), stage=row["stage"],
    )


def dataset_from_row(row: Any) -> DatasetRecord:
    return DatasetRecord(id=row["id"], tenant=row["tenant"], name=row["name"], split=row["split"],
                         format=row["format"], pairs=row["pairs"], queries=row["queries"], bytes=row["bytes"],
                         sha256=row["sha256"], created_at=row["created_at"])


def _enable_wal(conn: sqlite3.Connection, deadline_s: float = 30.0) -> None:
    """Switch the file to WAL. The first switch needs the file to itself, and SQLite answers a concurrent
    opener's switch with SQLITE_BUSY at once, without its busy handler: retry until the deadline."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.02)


class SqliteRegistry:
    """Registry and job queue in one SQLite file; safe across threads and processes on one host."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._job_waiting = threading.Event()  # set by this handle's create/requeue/yield: wakes wait_for_job
        self._migrate()

    def _migrate(self) -> None:
        """Apply the migrations this file lacks (PRAGMA user_version counts those applied), all in one write
        transaction so that concurrent openers apply each once; refuse a file newer than the code."""
        db = self._conn()
        version = db.execute("PRAGMA user_version").fetchone()[0]
        refuse_newer_schema(version, len(SQLITE_MIGRATIONS), str(self.path))
        if version == len(SQLITE_MIGRATIONS):
            return
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]  # again, under the write lock
            refuse_newer_schema(version, len(SQLITE_MIGRATIONS), str(self.path))
            if version == len(SQLITE_MIGRATIONS):
                return  # another opener applied them while this one waited for the lock
            for migrate in SQLITE_MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA user_version = {len(SQLITE_MIGRATIONS)}")
        log.info("registry_migrated", engine="sqlite", path=str(self.path), from_version=version,
                 to_version=len(SQLITE_MIGRATIONS))

    @property
    def schema_version(self) -> int:
        return self._conn().execute("PRAGMA user_version").fetchone()[0]

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so two workers never claim one job.
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ---- jobs -------------------------------------------------------------------------------
    def create_job(self, tenant: str, items: Sequence[JobItem], *, kind: JobKind = JobKind.INGEST,
                   params: dict[str, Any] | None = None) -> Job:
        with self._tx() as db:
            # The clock is read under the write lock: a job's created_at must not precede a deletion mark
            # that a concurrent delete wrote while this call waited for the lock.
            job = Job(id=uuid.uuid4().hex, tenant=tenant, status="queued", items=list(items), created_at=time.time(),
                      kind=kind, params=dict(params or {}))
            db.execute(
                "INSERT INTO jobs (id, tenant, status, items, created_at, kind, params) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, tenant, job.status, msgspec.json.encode(job.items).decode(), job.created_at, kind,
                 msgspec.json.encode(job.params).decode()),
            )
        self._job_waiting.set()
        return job

    def set_stage(self, job_id: str, stage: str, outcome: dict[str, Any] | None = None) -> None:
        """Record where a long (non-ingest) job is, and what it produced so far."""
        with self._tx() as db:
            if outcome is None:
                db.execute("UPDATE jobs SET stage = ? WHERE id = ?", (stage, job_id))
            else:
                db.execute("UPDATE jobs SET stage = ?, outcome = ? WHERE id = ?",
                           (stage, msgspec.json.encode(outcome).decode(), job_id))

    def list_jobs(self, *, kind: str | None = None, limit: int = 20) -> list[Job]:
        db = self._conn()
        rows = db.execute("SELECT * FROM jobs WHERE (? IS NULL OR kind = ?) ORDER BY created_at DESC LIMIT ?",
                          (kind, kind, limit)).fetchall()
        return [self._job(db, r) for r in rows]

    def _job(self, db: sqlite3.Connection, row: sqlite3.Row) -> Job:
        results = [result_from_row(r)
                   for r in db.execute("SELECT * FROM job_results WHERE job_id = ? ORDER BY seq", (row["id"],))]
        return job_from_row(row, results)

    def get_job(self, job_id: str) -> Job | None:
        db = self._conn()
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(db, row) if row else None

    def claim_job(self, lease_s: float, max_attempts: int | None = None) -> Job | None:
        """Take the oldest queued job, or a running one whose worker's lease ran out (it died).

        A job already claimed ``max_attempts`` times is failed here instead, and the next one is
        taken: its earlier workers stopped during it (a poison upload, or a crash loop), so one more
        try would most likely stop this worker too.
        """
        now = time.time()
        gave_up: list[list[JobItem]] = []
        with self._tx() as db:
            job = self._claim(db, now, lease_s, max_attempts, gave_up)
        for items in gave_up:  # after the commit: a job's files go only once it is final
            discard_uploads(items)
        return job

    def _claim(self, db: sqlite3.Connection, now: float, lease_s: float, max_attempts: int | None,
               gave_up: list[list[JobItem]]) -> Job | None:
        while True:
            row = db.execute(_FAIR_NEXT_JOB, (now, now)).fetchone()
            if row is None:
                return None
            if row["cancel_requested"]:
                # Its worker stopped before it saw the cancel: the cancel still wins.
                status, error = "cancelled", "cancelled on request"
            elif max_attempts is not None and row["attempts"] >= max_attempts:
                status, error = "failed", GAVE_UP.format(n=row["attempts"])
                if row["error"]:
                    error += f" (last error: {row['error']})"
            else:
                break
            db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, lease_until = NULL WHERE id = ?",
                (status, error, now, row["id"]),
            )
            gave_up.append(msgspec.json.decode(row["items"], type=list[JobItem]))
        resumed = bool(row["yielded"])
        db.execute(
            "UPDATE jobs SET status = 'running', lease_until = ?, attempts = attempts + 1, "
            "started_at = COALESCE(started_at, ?), claimed_at = ?, yielded = 0 WHERE id = ?",
            (now + lease_s, now, now, row["id"]),
        )
        if not resumed:
            # A retried job starts its report afresh; what it already indexed is found unchanged.
            db.execute("DELETE FROM job_results WHERE job_id = ?", (row["id"],))
            db.execute("UPDATE jobs SET total = 0, done = 0, failed = 0, chunks = 0 WHERE id = ?", (row["id"],))
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        job = self._job(db, row)
        job.resumed = resumed
        return job

    def yield_job(self, job_id: str) -> None:
        """A running job gives its turn to other tenants' jobs: back to the queue, its results kept, and the
        turn not counted as an attempt (it did not fail)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', lease_until = NULL, yielded = 1, "
                       "attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = 'running'", (job_id,))
        self._job_waiting.set()

    def others_waiting(self, tenant: str) -> bool:
        """Whether another tenant has a job waiting for a worker (the cue for a long job to yield)."""
        row = self._conn().execute(
            "SELECT 1 FROM jobs WHERE status = 'queued' AND tenant != ? LIMIT 1", (tenant,)).fetchone()
        return row is not None

    def cancel_requested(self, job_id: str) -> bool:
        """Whether cancelling a running job was requested (a read, cheap enough to ask between documents)."""
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def renew_lease(self, job_id: str, lease_s: float) -> bool:
        """Extend a running job's lease; returns whether cancellation was requested."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running'", (time.time() + lease_s, job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def record_results(self, job_id: str, results: Sequence[DocumentResult], *, total: int) -> None:
        with self._tx() as db:
            seq = db.execute("SELECT COUNT(*) FROM job_results WHERE job_id = ?", (job_id,)).fetchone()[0]
            db.executemany(
                "INSERT INTO job_results (job_id, seq, document_id, status, chunks, error, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job_id, seq + i, r.document_id, r.status, r.chunks, r.error, r.source) for i, r in enumerate(results)],
            )
            db.execute(
                "UPDATE jobs SET total = ?, done = done + ?, failed = failed + ?, chunks = chunks + ? WHERE id = ?",
                (
                    total,
                    sum(r.status != "failed" for r in results),
                    sum(r.status == "failed" for r in results),
                    sum(r.chunks for r in results),
                    job_id,
                ),
            )

    def finish_job(self, job_id: str, status: JobStatus, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ?, lease_until = NULL WHERE id = ?",
                (status, error, time.time(), job_id),
            )
            row = db.execute("SELECT items FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if status in FINAL_JOB_STATES and row is not None:
            discard_uploads(msgspec.json.decode(row["items"], type=list[JobItem]))

    def requeue_job(self, job_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', error = ?, lease_until = NULL WHERE id = ?", (error, job_id))
        self._job_waiting.set()

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one stops at its next document."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled on request', finished_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (time.time(), job_id),
            )
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
        job = self.get_job(job_id)
        if cur.rowcount and job is not None:
            discard_uploads(job.items)
        return job

    def requeue_running(self) -> int:
        """At start of the only worker process: jobs a killed worker left running go back to the queue.

        A job that stops its worker every time does not loop: ``claim_job(max_attempts=...)`` fails it.
        """
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'queued', lease_until = NULL WHERE status = 'running'")
        if cur.rowcount:
            self._job_waiting.set()
        return cur.rowcount

    def queued_count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]

    # ---- documents --------------------------------------------------------------------------
    def get_documents(self, tenant: str, ids: Sequence[str]) -> dict[str, DocumentRecord]:
        out: dict[str, DocumentRecord] = {}
        db = self._conn()
        ids = list(ids)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in db.execute(
                f"SELECT {DOC_COLUMNS} FROM documents WHERE tenant = ? AND id IN ({marks})", (tenant, *part)
            ):
                out[row["id"]] = doc_from_row(row)
        return out

    def get_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        return self.get_documents(tenant, [document_id]).get(document_id)

    def list_documents(self, tenant: str, *, limit: int, offset: int) -> tuple[list[DocumentRecord], int]:
        db = self._conn()
        total = db.execute("SELECT COUNT(*) FROM documents WHERE tenant = ?", (tenant,)).fetchone()[0]
        rows = db.execute(
            f"SELECT {DOC_COLUMNS} FROM documents WHERE tenant = ? ORDER BY id LIMIT ? OFFSET ?",
            (tenant, limit, offset),
        ).fetchall()
        return [doc_from_row(r) for r in rows], total

    def upsert_documents(self, records: Iterable[DocumentRecord]) -> None:
        with self._tx() as db:
            self._upsert(db, list(records))

    def upsert_documents_unless_deleted(self, records: Sequence[DocumentRecord], since: float) -> set[str]:
        """``upsert_documents``, in one transaction with the deletion check: ids deleted after ``since`` (the
        job's creation) are not written, and are returned so that the caller removes their chunks again."""
        records = list(records)
        with self._tx() as db:
            skipped: set[tuple[str, str]] = set()
            for tenant in {r.tenant for r in records}:
                ids = [r.id for r in records if r.tenant == tenant]
                skipped.update((tenant, d) for d in self._deleted_since(db, tenant, ids, since))
            self._upsert(db, [r for r in records if (r.tenant, r.id) not in skipped])
        return {d for _, d in skipped}

    @staticmethod
    def _upsert(db: sqlite3.Connection, records: Sequence[DocumentRecord]) -> None:
        now = time.time()
        db.executemany(
            f"INSERT INTO documents ({DOC_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant, id) DO UPDATE SET title = excluded.title, source = excluded.source, "
            "content_hash = excluded.content_hash, chunk_count = excluded.chunk_count, "
            "encoder_version = excluded.encoder_version, status = excluded.status, error = excluded.error, "
            "metadata = excluded.metadata, updated_at = excluded.updated_at, bytes = excluded.bytes",
            [
                (
                    r.tenant, r.id, r.title, r.source, r.content_hash, r.chunk_count, r.encoder_version,
                    r.status, r.error, json.dumps(r.metadata), r.created_at or now, now, r.bytes,
                )
                for r in records
            ],
        )

    def delete_document(self, tenant: str, document_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM documents WHERE tenant = ? AND id = ?", (tenant, document_id))
            return cur.rowcount > 0

    def mark_deleted(self, tenant: str, document_id: str) -> int:
        """Record that a document is being deleted (before its chunks and row go); returns the jobs it cancelled.

        The delete wins over every upload of the id created before it: a queued job that writes only
        this document is cancelled, a running one is asked to stop, and a worker that still reaches
        the document (a JSONL line, or a publish racing this call) finds the mark and drops it.
        """
        cancelled: list[list[JobItem]] = []
        asked = 0
        with self._tx() as db:
            now = time.time()  # under the write lock, as in create_job
            db.execute(
                "INSERT INTO deletions (tenant, document_id, deleted_at) VALUES (?, ?, ?) "
                "ON CONFLICT (tenant, document_id) DO UPDATE SET deleted_at = excluded.deleted_at",
                (tenant, document_id, now),
            )
            rows = db.execute(
                "SELECT id, status, items FROM jobs WHERE tenant = ? AND kind = 'ingest' "
                "AND status IN ('queued', 'running')",
                (tenant,),
            ).fetchall()
            for row in rows:
                items = msgspec.json.decode(row["items"], type=list[JobItem])
                if not items or any(i.document_id != document_id for i in items):
                    continue  # it writes other documents too (or a JSONL's): the mark fails just this one
                if row["status"] == "queued":
                    db.execute(
                        "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ? WHERE id = ?",
                        ("cancelled: the document was deleted", now, row["id"]),
                    )
                    cancelled.append(items)
                else:
                    db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (row["id"],))
                    asked += 1
            # A mark only matters to jobs created before it; once none of them is pending it can go.
            oldest = db.execute("SELECT MIN(created_at) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]
            db.execute("DELETE FROM deletions WHERE deleted_at < ?", (now if oldest is None else oldest,))
        for items in cancelled:
            discard_uploads(items)
        return len(cancelled) + asked

    def deleted_since(self, tenant: str, ids: Sequence[str], since: float) -> set[str]:
        """Those of ``ids`` deleted after ``since`` (a job's creation): that job must not publish them."""
        return self._deleted_since(self._conn(), tenant, ids, since)

    @staticmethod
    def _deleted_since(db: sqlite3.Connection, tenant: str, ids: Sequence[str], since: float) -> set[str]:
        out: set[str] = set()
        ids = list(ids)
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            out.update(r[0] for r in db.execute(
                f"SELECT document_id FROM deletions WHERE tenant = ? AND deleted_at > ? AND document_id IN ({marks})",
                (tenant, since, *part),
            ))
        return out

    # ---- limits and quotas -------------------------------------------------------------------
    def take_token(self, bucket: str, rate: float, burst: int) -> float:
        """Take one token from ``bucket`` (refilled at ``rate``/s up to ``burst``): 0 when taken, else the
        seconds until one is there. In one transaction, so concurrent API processes never both take the last."""
        with self._tx() as db:
            now = time.time()
            row = db.execute("SELECT tokens, updated_at FROM rate_buckets WHERE bucket = ?", (bucket,)).fetchone()
            tokens = float(burst) if row is None else min(float(burst), row["tokens"] + (now - row["updated_at"]) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            if not wait:
                tokens -= 1
            db.execute("INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (?, ?, ?) ON CONFLICT (bucket) "
                       "DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at", (bucket, tokens, now))
        return wait

    def get_quotas(self, tenant: str) -> dict[str, int]:
        row = self._conn().execute("SELECT limits FROM quotas WHERE tenant = ?", (tenant,)).fetchone()
        return json.loads(row["limits"]) if row else {}

    def set_quotas(self, tenant: str, limits: dict[str, int]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO quotas (tenant, limits) VALUES (?, ?) ON CONFLICT (tenant) DO UPDATE SET "
                       "limits = excluded.limits", (tenant, json.dumps(limits, sort_keys=True)))

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """What a tenant uses now: documents, chunks, stored bytes, ingest jobs queued or running, LLM tokens
        this minute/day."""
        db = self._conn()
        docs, chunks, stored = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(chunk_count), 0), COALESCE(SUM(bytes), 0) FROM documents WHERE tenant = ?",
            (tenant,)).fetchone()
        jobs = db.execute("SELECT COUNT(*) FROM jobs WHERE tenant = ? AND kind = 'ingest' AND status IN "
                          "('queued', 'running')", (tenant,)).fetchone()[0]
        now = time.time()
        usage = {"documents": docs, "chunks": chunks, "stored_bytes": stored, "concurrent_jobs": jobs}
        for period, length in (("minute", 60.0), ("day", 86400.0)):
            row = db.execute("SELECT start, tokens FROM llm_usage WHERE tenant = ? AND period = ?",
                             (tenant, period)).fetchone()
            usage[f"llm_tokens_per_{period}"] = row["tokens"] if row and now - row["start"] < length else 0
        return usage

    def add_llm_tokens(self, tenant: str, tokens: int) -> None:
        """Count LLM tokens against the tenant's current minute and day (fixed windows that restart when over)."""
        with self._tx() as db:
            now = time.time()
            for period, length in (("minute", 60.0), ("day", 86400.0)):
                db.execute(
                    "INSERT INTO llm_usage (tenant, period, start, tokens) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (tenant, period) DO UPDATE SET "
                    "tokens = CASE WHEN ? - start < ? THEN tokens + excluded.tokens ELSE excluded.tokens END, "
                    "start = CASE WHEN ? - start < ? THEN start ELSE excluded.start END",
                    (tenant, period, now, tokens, now, length, now, length))

    # ---- what /metrics reads at scrape time --------------------------------------------------
    def queue_stats(self) -> dict[str, Any]:
        """Jobs waiting by kind, when the oldest of them was created, and how many are running."""
        db = self._conn()
        by_kind = {r["kind"]: r["n"] for r in db.execute(
            "SELECT kind, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY kind")}
        oldest = db.execute("SELECT MIN(created_at) FROM jobs WHERE status = 'queued'").fetchone()[0]
        running = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0]
        return {"queued_by_kind": by_kind, "oldest_queued_at": oldest, "running": running}

    def tenants_usage(self, limit: int) -> dict[str, tuple[int, int]]:
        """(documents, chunks) of the ``limit`` tenants with the most chunks; the rest summed as ``_other``."""
        rows = self._conn().execute(
            "SELECT tenant, COUNT(*) AS docs, COALESCE(SUM(chunk_count), 0) AS chunks FROM documents "
            "GROUP BY tenant ORDER BY chunks DESC, tenant").fetchall()
        out = {r["tenant"]: (r["docs"], r["chunks"]) for r in rows[:limit]}
        rest = rows[limit:]
        if rest:
            out["_other"] = (sum(r["docs"] for r in rest), sum(r["chunks"] for r in rest))
        return out

    # ---- per-tenant encoders -----------------------------------------------------------------
    def get_tenant_encoder(self, tenant: str) -> str | None:
        """The tenant's own encoder version, None when it follows the default."""
        row = self._conn().execute("SELECT version FROM tenant_encoders WHERE tenant = ?", (tenant,)).fetchone()
        return row["version"] if row else None

    def set_tenant_encoder(self, tenant: str, version: str | None) -> None:
        """Point the tenant at ``version`` (None: back to following the default)."""
        with self._tx() as db:
            if version is None:
                db.execute("DELETE FROM tenant_encoders WHERE tenant = ?", (tenant,))
            else:
                db.execute("INSERT INTO tenant_encoders (tenant, version, updated_at) VALUES (?, ?, ?) "
                           "ON CONFLICT (tenant) DO UPDATE SET version = excluded.version, "
                           "updated_at = excluded.updated_at", (tenant, version, time.time()))

    def tenant_encoders(self) -> dict[str, str]:
        """Every tenant with an encoder of its own → that version."""
        rows = self._conn().execute("SELECT tenant, version FROM tenant_encoders ORDER BY tenant").fetchall()
        return {r["tenant"]: r["version"] for r in rows}

    # ---- API keys ----------------------------------------------------------------------------
    def create_key(self, key: ApiKey) -> None:
        """Store a key (a re-registered bootstrap key replaces its hash and is un-revoked)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys (key_id, tenant, scopes, secret_hash, name, created_at, expires_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO UPDATE SET tenant = excluded.tenant, "
                "scopes = excluded.scopes, secret_hash = excluded.secret_hash, name = excluded.name, "
                "expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
                (key.key_id, key.tenant, json.dumps(key.scopes), key.secret_hash, key.name, key.created_at,
                 key.expires_at, key.revoked_at),
            )

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self._conn().execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return key_from_row(row) if row else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        rows = self._conn().execute(
            "SELECT * FROM api_keys WHERE (? IS NULL OR tenant = ?) ORDER BY created_at, key_id", (tenant, tenant)
        ).fetchall()
        return [key_from_row(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                             (time.time(), key_id))
            return cur.rowcount > 0

    # ---- datasets (labelled pairs a tenant uploaded; every query carries the tenant) ----------------
    def create_dataset(self, tenant: str, name: str, pairs: Sequence[tuple[str, str]], *, split: str,
                       format: DatasetFormat, size: int, sha256: str) -> DatasetRecord:
        """Store a dataset and its pairs (in their order) in one transaction; its id is new and random."""
        pairs = list(pairs)
        record = DatasetRecord(id=new_dataset_id(), tenant=tenant, name=name, split=split, format=format,
                               pairs=len(pairs), queries=len({q for q, _ in pairs}), bytes=size, sha256=sha256,
                               created_at=time.time())
        with self._tx() as db:
            db.execute(f"INSERT INTO datasets ({DATASET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.id, tenant, name, split, format, record.pairs, record.queries, size, sha256,
                        record.created_at))
            db.executemany("INSERT INTO dataset_pairs (dataset_id, seq, query, document_id) VALUES (?, ?, ?, ?)",
                           ((record.id, i, q, d) for i, (q, d) in enumerate(pairs)))
        return record

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        row = self._conn().execute(f"SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = ? AND id = ?",
                                   (tenant, dataset_id)).fetchone()
        return dataset_from_row(row) if row else None

    def list_datasets(self, tenant: str) -> list[DatasetRecord]:
        """The tenant's datasets, oldest first."""
        rows = self._conn().execute(
            f"SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = ? ORDER BY created_at, id", (tenant,)
        ).fetchall()
        return [dataset_from_row(r) for r in rows]

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        """Delete a dataset and its pairs; False when the tenant has no such dataset."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM datasets WHERE tenant = ? AND id = ?", (tenant, dataset_id))
            if not cur.rowcount:
                return False
            db.execute("DELETE FROM dataset_pairs WHERE dataset_id = ?", (dataset_id,))
        return True

    def dataset_pairs(self, tenant: str, dataset_id: str) -> list[tuple[str, str]] | None:
        """A dataset's (query, document id) pairs in upload order; None when the tenant has no such dataset."""
        db = self._conn()
        db.execute("BEGIN")  # one snapshot: a delete between the two reads cannot show a dataset without pairs
        try:
            if self.get_dataset(tenant, dataset_id) is None:
                return None
            rows = db.execute("SELECT query, document_id FROM dataset_pairs WHERE dataset_id = ? ORDER BY seq",
                              (dataset_id,)).fetchall()
        finally:
            db.execute("COMMIT")
        return [(r["query"], r["document_id"]) for r in rows]

    def add_feedback_pairs(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> DatasetRecord:
        """Append confirmed (query, document id) pairs to the tenant's feedback dataset (made on first use)."""
        pairs = list(pairs)
        with self._tx() as db:
            row = db.execute("SELECT id FROM datasets WHERE tenant = ? AND format = 'feedback'", (tenant,)).fetchone()
            if row is None:
                dataset_id = new_dataset_id()
                db.execute(f"INSERT INTO datasets ({DATASET_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (dataset_id, tenant, "feedback", "train", "feedback", 0, 0, 0, "", time.time()))
            else:
                dataset_id = row["id"]
            seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM dataset_pairs WHERE dataset_id = ?",
                             (dataset_id,)).fetchone()[0]
            db.executemany("INSERT INTO dataset_pairs (dataset_id, seq, query, document_id) VALUES (?, ?, ?, ?)",
                           ((dataset_id, seq + i, q, d) for i, (q, d) in enumerate(pairs)))
            n, queries = db.execute("SELECT COUNT(*), COUNT(DISTINCT query) FROM dataset_pairs WHERE dataset_id = ?",
                                    (dataset_id,)).fetchone()
            size = sum(len(q.encode()) + len(d.encode()) for q, d in pairs)
            db.execute("UPDATE datasets SET pairs = ?, queries = ?, bytes = bytes + ? WHERE id = ?",
                       (n, queries, size, dataset_id))
            row = db.execute(f"SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
        return dataset_from_row(row)

    # ---- end datasets ----------------------------------------------------------------------------------

    def backup_to(self, dest: Path) -> None:
        """A consistent copy of the whole registry in the SQLite file ``dest`` (SQLite's online backup)."""
        target = sqlite3.connect(dest)
        try:
            self._conn().backup(target)
        finally:
            target.close()

    def wait_for_job(self, timeout_s: float) -> bool:
        """Sleep the poll interval, or less (True) when a job is created through this handle (the embedded
        service's API and worker share one); another process's job is found at the next poll."""
        woken = self._job_waiting.wait(timeout_s)
        self._job_waiting.clear()
        return woken

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def remove_upload(item: JobItem) -> None:
    """Delete a finished job's uploaded file (ignore it if already gone)."""
    try:
        os.unlink(item.path)
    except FileNotFoundError:
        pass


def discard_uploads(items: Iterable[JobItem]) -> None:
    """A finished job's uploaded files, and then their upload folder if that is empty (other jobs of the
    same upload may still hold files in it). Never raises: a leftover file must not fail a finished job."""
    folders: set[Path] = set()
    for item in items:
        try:
            remove_upload(item)
        except OSError as exc:
            log.warning("upload_not_removed", path=item.path, error=str(exc))
            continue
        folders.add(Path(item.path).parent)
    for folder in folders:
        # Only an upload's own folder (a random hex name), never a folder that a path merely lies in.
        if not _BATCH_DIR.match(folder.name):
            continue
        try:
            folder.rmdir()
        except OSError:  # not empty yet (another job's file), or already gone
            pass


def job_view(job: Job) -> dict[str, Any]:
    """A job as clients see it (the API's job body, the CLI's progress): status, progress and per-document errors."""
    return {
        "id": job.id, "status": job.status, "tenant": job.tenant,
        "files": [i.filename for i in job.items],
        "progress": {"documents_total": job.total, "documents_done": job.done, "documents_failed": job.failed,
                     "chunks": job.chunks},
        "attempts": job.attempts, "error": job.error,
        "documents": [msgspec.to_builtins(r) for r in job.results],
        "errors": [{"document_id": r.document_id, "source": r.source, "error": r.error}
                   for r in job.results if r.status == "failed"],
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "kind": str(job.kind), "stage": job.stage, "params": job.params, "outcome": job.outcome,
    }
