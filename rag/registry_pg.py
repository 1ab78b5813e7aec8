"""The registry on PostgreSQL: one database that the API and worker processes of several hosts share.

The same contract as ``SqliteRegistry`` (tests/test_registry_contract.py runs on both); what differs is
how the guarantees are kept without SQLite's one write lock:

- a job is claimed with ``SELECT … FOR UPDATE SKIP LOCKED`` in the fair order (fewest running jobs per
  tenant, then the tenant served longest ago, then the oldest job), so concurrent workers never wait on
  each other and never take one job twice; a worker that died leaves a lease that runs out, and the
  next claim takes the job over;
- "the delete wins": ``mark_deleted`` holds an exclusive transaction-level advisory lock that
  ``create_job`` and ``upsert_documents_unless_deleted`` take shared, so a mark and a job's creation
  time (or a publish) are ordered as they are under SQLite's lock;
- time is the database server's clock (``clock_timestamp()``), one clock for every host's leases,
  deletion marks and rate buckets;
- ``create_job``, ``requeue_job``, ``yield_job`` and ``requeue_running`` NOTIFY ``rag_jobs`` on commit;
  an idle worker LISTENs in ``wait_for_job`` and wakes at once instead of at its next poll.

Connections come from a bounded ``psycopg_pool.ConnectionPool`` (autocommit; a transaction where one is
needed). Text columns sort with ``COLLATE "C"`` (code points, as SQLite sorts), whatever the database's
collation. PostgreSQL text cannot hold NUL: descriptive text (titles, sources, errors, stages) has it
replaced by U+FFFD.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from rag.auth import ApiKey
from rag.datasets import DatasetFormat, DatasetRecord, new_dataset_id
from rag.errors import RegistryUnavailable
from rag.registry import (
    DATASET_COLUMNS,
    DOC_COLUMNS,
    FINAL_JOB_STATES,
    GAVE_UP,
    DocumentRecord,
    DocumentResult,
    Job,
    JobItem,
    JobKind,
    JobStatus,
    dataset_from_row,
    discard_uploads,
    doc_from_row,
    job_from_row,
    key_from_row,
    refuse_newer_schema,
    result_from_row,
    sql_statements,
)

log = structlog.get_logger("rag.registry_pg")

CHANNEL = "rag_jobs"  # NOTIFYed when a job becomes claimable
# Transaction-level advisory lock keys, fixed numbers of this application ("rag" and a counter).
_LOCK_MIGRATE = 0x726167_0001
_LOCK_DELETE = 0x726167_0002
_NOW = "extract(epoch from clock_timestamp())::float8"

# PostgreSQL's migrations, in order; schema_version holds the number applied. Version 1 is the schema of
# SqliteRegistry's version 2 (the first release on PostgreSQL), plus ``seq``: the insertion order that breaks
# ties between jobs created in the same microsecond (SQLite's rowid).
_V1 = """
CREATE TABLE documents (
    tenant text NOT NULL, id text NOT NULL, title text NOT NULL, source text NOT NULL,
    content_hash text NOT NULL, chunk_count bigint NOT NULL, encoder_version text NOT NULL,
    status text NOT NULL, error text, metadata text NOT NULL,
    created_at double precision NOT NULL, updated_at double precision NOT NULL,
    bytes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE jobs (
    id text PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY, tenant text NOT NULL, status text NOT NULL,
    items text NOT NULL, created_at double precision NOT NULL, started_at double precision,
    finished_at double precision, attempts integer NOT NULL DEFAULT 0, lease_until double precision, error text,
    total bigint NOT NULL DEFAULT 0, done bigint NOT NULL DEFAULT 0, failed bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0, cancel_requested boolean NOT NULL DEFAULT false,
    kind text NOT NULL DEFAULT 'ingest', params text NOT NULL DEFAULT '{}', outcome text NOT NULL DEFAULT '{}',
    stage text NOT NULL DEFAULT '', claimed_at double precision, yielded boolean NOT NULL DEFAULT false
);
CREATE INDEX jobs_queue ON jobs (status, created_at);
CREATE INDEX jobs_tenant ON jobs (tenant, status);
-- the fair order's "served longest ago" reads the newest claim of a tenant
CREATE INDEX jobs_tenant_claimed ON jobs (tenant, claimed_at);
CREATE TABLE job_results (
    job_id text NOT NULL, seq integer NOT NULL, document_id text, status text NOT NULL,
    chunks bigint NOT NULL, error text, source text NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE api_keys (
    key_id text PRIMARY KEY, tenant text NOT NULL, scopes text NOT NULL, secret_hash text NOT NULL,
    name text NOT NULL DEFAULT '', created_at double precision NOT NULL, expires_at double precision,
    revoked_at double precision
);
CREATE INDEX api_keys_tenant ON api_keys (tenant);
CREATE TABLE rate_buckets (bucket text PRIMARY KEY, tokens double precision NOT NULL,
                           updated_at double precision NOT NULL);
CREATE TABLE quotas (tenant text PRIMARY KEY, limits text NOT NULL);
CREATE TABLE llm_usage (
    tenant text NOT NULL, period text NOT NULL, start double precision NOT NULL, tokens bigint NOT NULL,
    PRIMARY KEY (tenant, period)
);
CREATE TABLE tenant_encoders (tenant text PRIMARY KEY, version text NOT NULL, updated_at double precision NOT NULL);
CREATE TABLE deletions (
    tenant text NOT NULL, document_id text NOT NULL, deleted_at double precision NOT NULL,
    PRIMARY KEY (tenant, document_id)
);
CREATE TABLE datasets (
    id text PRIMARY KEY, tenant text NOT NULL, name text NOT NULL, split text NOT NULL, format text NOT NULL,
    pairs bigint NOT NULL, queries bigint NOT NULL, bytes bigint NOT NULL, sha256 text NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX datasets_tenant ON datasets (tenant, created_at);
CREATE TABLE dataset_pairs (
    dataset_id text NOT NULL, seq integer NOT NULL, query text NOT NULL, document_id text NOT NULL,
    PRIMARY KEY (dataset_id, seq)
)
"""

POSTGRES_MIGRATIONS: tuple[str, ...] = (_V1,)  # migration n brings a database from version n-1 to n

# SqliteRegistry's fair order (rag/registry.py), locking the chosen row and skipping rows other claims hold.
_FAIR_NEXT_JOB = """
SELECT j.* FROM jobs j
WHERE j.status = 'queued' OR (j.status = 'running' AND j.lease_until < %(now)s)
ORDER BY
    (SELECT COUNT(*) FROM jobs r WHERE r.tenant = j.tenant AND r.status = 'running' AND r.lease_until >= %(now)s),
    COALESCE((SELECT MAX(c.claimed_at) FROM jobs c WHERE c.tenant = j.tenant), 0),
    j.created_at, j.seq
LIMIT 1
FOR UPDATE OF j SKIP LOCKED
"""


def _text(value: str | None) -> str | None:
    """Descriptive text as PostgreSQL can store it (no NUL)."""
    return value.replace("\x00", "\ufffd") if value else value


def describe_url(url: str) -> str:
    """Where a database URL points (host, port, database), without its credentials: for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unparsable RAG_DATABASE_URL)"
    return f"{parts.get('dbname') or '(default database)'} on {parts.get('host') or 'the local socket'}:" \
           f"{parts.get('port') or 5432}"


class PostgresRegistry:
    """Registry and job queue in a PostgreSQL database; safe across threads, processes and hosts."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 30.0) -> None:
        self.url = url
        self.where = describe_url(url)
        self._sizes = (min_size, max_size)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._listen_lock = threading.Lock()
        self._listener: psycopg.Connection | None = None
        self._migrate()

    # ---- connections and schema ---------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                   connect_timeout=max(1, round(self._timeout_s)))
        except psycopg.OperationalError as exc:
            raise RegistryUnavailable(f"cannot connect to the registry database {self.where}: {exc}") from exc

    def _migrate(self) -> None:
        """Apply the migrations the database lacks, in one transaction under an advisory lock (concurrent
        openers wait, then find them applied); refuse a database newer than the code."""
        known = len(POSTGRES_MIGRATIONS)
        with self._connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_MIGRATE,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = row["version"] if row else 0
            refuse_newer_schema(version, known, self.where)
            for script in POSTGRES_MIGRATIONS[version:]:
                for statement in sql_statements(script):
                    conn.execute(statement)
            if version < known:
                conn.execute("UPDATE schema_version SET version = %s", (known,))
                log.info("registry_migrated", engine="postgres", database=self.where, from_version=version,
                         to_version=known)

    @property
    def schema_version(self) -> int:
        with self._connection() as db:
            return db.execute("SELECT version FROM schema_version").fetchone()["version"]

    def _get_pool(self, closed: ConnectionPool | None = None) -> ConnectionPool:
        with self._lock:
            if self._pool is None or self._pool is closed:
                # Opened lazily, and again after close(): close() releases the connections, as SqliteRegistry's
                # releases its thread's, and a handle used afterwards (another thread's) reconnects.
                self._pool = ConnectionPool(
                    self.url, min_size=self._sizes[0], max_size=self._sizes[1], timeout=self._timeout_s,
                    kwargs={"autocommit": True, "row_factory": dict_row}, check=ConnectionPool.check_connection,
                    open=True, name="rag-registry",
                )
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        pool = self._get_pool()
        try:
            try:
                conn = pool.getconn()
            except PoolClosed:  # another thread closed it just now
                pool = self._get_pool(closed=pool)
                conn = pool.getconn()
        except PoolTimeout as exc:
            raise RegistryUnavailable(
                f"no connection to the registry database {self.where} within {self._timeout_s:g}s "
                "(RAG_DATABASE_POOL_TIMEOUT_S; RAG_DATABASE_POOL_MAX_SIZE bounds the pool)") from exc
        try:
            yield conn
        except psycopg.OperationalError as exc:  # connection lost, server shutting down, deadlock
            raise RegistryUnavailable(f"the registry database {self.where} failed: {exc}") from exc
        finally:
            pool.putconn(conn)

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection]:
        with self._connection() as conn, conn.transaction():
            yield conn

    @staticmethod
    def _now(db: psycopg.Connection) -> float:
        return db.execute(f"SELECT {_NOW} AS now").fetchone()["now"]

    @staticmethod
    def _notify(db: psycopg.Connection) -> None:
        db.execute("SELECT pg_notify(%s, '')", (CHANNEL,))  # delivered when the transaction commits

    # ---- jobs -------------------------------------------------------------------------------
    def create_job(self, tenant: str, items: Sequence[JobItem], *, kind: JobKind = JobKind.INGEST,
                   params: dict[str, Any] | None = None) -> Job:
        with self._tx() as db:
            # Shared with other creators, exclusive with mark_deleted: the clock is read after any delete
            # that started first has committed its mark, as under SQLite's write lock.
            db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_LOCK_DELETE,))
            job = Job(id=uuid.uuid4().hex, tenant=tenant, status="queued", items=list(items),
                      created_at=self._now(db), kind=kind, params=dict(params or {}))
            db.execute(
                "INSERT INTO jobs (id, tenant, status, items, created_at, kind, params) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (job.id, tenant, job.status, msgspec.json.encode(job.items).decode(), job.created_at, str(kind),
                 msgspec.json.encode(job.params).decode()),
            )
            self._notify(db)
        return job

    def set_stage(self, job_id: str, stage: str, outcome: dict[str, Any] | None = None) -> None:
        """Record where a long (non-ingest) job is, and what it produced so far."""
        with self._connection() as db:
            if outcome is None:
                db.execute("UPDATE jobs SET stage = %s WHERE id = %s", (_text(stage), job_id))
            else:
                db.execute("UPDATE jobs SET stage = %s, outcome = %s WHERE id = %s",
                           (_text(stage), msgspec.json.encode(outcome).decode(), job_id))

    def list_jobs(self, *, kind: str | None = None, limit: int = 20) -> list[Job]:
        with self._connection() as db:
            where, args = ("WHERE kind = %s", [str(kind)]) if kind is not None else ("", [])
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, seq DESC LIMIT %s",
                              (*args, limit)).fetchall()
            return self._jobs(db, rows)

    @staticmethod
    def _jobs(db: psycopg.Connection, rows: list[dict[str, Any]]) -> list[Job]:
        results: dict[str, list[DocumentResult]] = {r["id"]: [] for r in rows}
        if rows:
            for r in db.execute("SELECT * FROM job_results WHERE job_id = ANY(%s) ORDER BY job_id, seq",
                                (list(results),)):
                results[r["job_id"]].append(result_from_row(r))
        return [job_from_row(row, results[row["id"]]) for row in rows]

    def get_job(self, job_id: str) -> Job | None:
        with self._connection() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
            return self._jobs(db, [row])[0] if row else None

    def claim_job(self, lease_s: float, max_attempts: int | None = None) -> Job | None:
        """Take the next job in the fair order, or a running one whose worker's lease ran out (it died).

        A job already claimed ``max_attempts`` times is failed here instead, and the next one is taken
        (as ``SqliteRegistry.claim_job``). Rows another worker is claiming right now are skipped, not waited on.
        """
        gave_up: list[list[JobItem]] = []
        with self._tx() as db:
            job = self._claim(db, self._now(db), lease_s, max_attempts, gave_up)
        for items in gave_up:  # after the commit: a job's files go only once it is final
            discard_uploads(items)
        return job

    def _claim(self, db: psycopg.Connection, now: float, lease_s: float, max_attempts: int | None,
               gave_up: list[list[JobItem]]) -> Job | None:
        while True:
            row = db.execute(_FAIR_NEXT_JOB, {"now": now}).fetchone()
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
            db.execute("UPDATE jobs SET status = %s, error = %s, finished_at = %s, lease_until = NULL WHERE id = %s",
                       (status, _text(error), now, row["id"]))
            gave_up.append(msgspec.json.decode(row["items"], type=list[JobItem]))
        resumed = bool(row["yielded"])
        # A retried job starts its report afresh (what it already indexed is found unchanged); a resumed one
        # (it yielded its turn) keeps its results and counters.
        reset = "" if resumed else ", total = 0, done = 0, failed = 0, chunks = 0"
        row = db.execute(
            "UPDATE jobs SET status = 'running', lease_until = %s, attempts = attempts + 1, "
            f"started_at = COALESCE(started_at, %s), claimed_at = %s, yielded = false{reset} WHERE id = %s RETURNING *",
            (now + lease_s, now, now, row["id"]),
        ).fetchone()
        if resumed:
            job = self._jobs(db, [row])[0]
        else:
            db.execute("DELETE FROM job_results WHERE job_id = %s", (row["id"],))
            job = job_from_row(row, [])
        job.resumed = resumed
        return job

    def yield_job(self, job_id: str) -> None:
        """A running job gives its turn to other tenants' jobs: back to the queue, its results kept, and the
        turn not counted as an attempt (it did not fail)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', lease_until = NULL, yielded = true, "
                       "attempts = GREATEST(attempts - 1, 0) WHERE id = %s AND status = 'running'", (job_id,))
            self._notify(db)

    def others_waiting(self, tenant: str) -> bool:
        """Whether another tenant has a job waiting for a worker (the cue for a long job to yield)."""
        with self._connection() as db:
            return db.execute("SELECT 1 FROM jobs WHERE status = 'queued' AND tenant <> %s LIMIT 1",
                              (tenant,)).fetchone() is not None

    def cancel_requested(self, job_id: str) -> bool:
        """Whether cancelling a running job was requested (a read, cheap enough to ask between documents)."""
        with self._connection() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def renew_lease(self, job_id: str, lease_s: float) -> bool:
        """Extend a running job's lease (the worker's heartbeat); returns whether cancellation was requested."""
        with self._connection() as db:
            row = db.execute(
                f"WITH renewed AS (UPDATE jobs SET lease_until = {_NOW} + %s WHERE id = %s AND status = 'running') "
                "SELECT cancel_requested FROM jobs WHERE id = %s", (lease_s, job_id, job_id)).fetchone()
        return bool(row and row["cancel_requested"])

    def record_results(self, job_id: str, results: Sequence[DocumentResult], *, total: int) -> None:
        results = list(results)
        with self._tx() as db:
            # One writer of a job's report at a time (a worker whose lease was taken over may still write).
            db.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            seq = db.execute("SELECT COUNT(*) AS n FROM job_results WHERE job_id = %s", (job_id,)).fetchone()["n"]
            if results:
                with db.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO job_results (job_id, seq, document_id, status, chunks, error, source) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                        [(job_id, seq + i, r.document_id, r.status, r.chunks, _text(r.error), _text(r.source))
                         for i, r in enumerate(results)],
                    )
            db.execute(
                "UPDATE jobs SET total = %s, done = done + %s, failed = failed + %s, chunks = chunks + %s "
                "WHERE id = %s",
                (total, sum(r.status != "failed" for r in results), sum(r.status == "failed" for r in results),
                 sum(r.chunks for r in results), job_id),
            )

    def finish_job(self, job_id: str, status: JobStatus, error: str | None = None) -> None:
        with self._connection() as db:
            row = db.execute(
                f"UPDATE jobs SET status = %s, error = %s, finished_at = {_NOW}, lease_until = NULL WHERE id = %s "
                "RETURNING items", (status, _text(error), job_id)).fetchone()
        if status in FINAL_JOB_STATES and row is not None:
            discard_uploads(msgspec.json.decode(row["items"], type=list[JobItem]))

    def requeue_job(self, job_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', error = %s, lease_until = NULL WHERE id = %s",
                       (_text(error), job_id))
            self._notify(db)

    def request_cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once; a running one stops at its next document."""
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = 'cancelled', error = 'cancelled on request', finished_at = {_NOW} "
                "WHERE id = %s AND status = 'queued'", (job_id,))
            cancelled = cur.rowcount
            db.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s AND status = 'running'", (job_id,))
        job = self.get_job(job_id)
        if cancelled and job is not None:
            discard_uploads(job.items)
        return job

    def requeue_running(self) -> int:
        """Every running job back to the queue: for a process that knows it is the only worker (the embedded
        service at start). Where several workers share the database, expired leases do this job instead.

        A job that stops its worker every time does not loop: ``claim_job(max_attempts=...)`` fails it.
        """
        with self._tx() as db:
            # Rows locked in id order, as mark_deleted locks them: two such statements never deadlock.
            cur = db.execute("UPDATE jobs SET status = 'queued', lease_until = NULL WHERE id IN "
                             "(SELECT id FROM jobs WHERE status = 'running' ORDER BY id FOR UPDATE) "
                             "AND status = 'running'")
            if cur.rowcount:
                self._notify(db)
            return cur.rowcount

    def queued_count(self) -> int:
        with self._connection() as db:
            return db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running')").fetchone()["n"]

    # ---- documents --------------------------------------------------------------------------
    def get_documents(self, tenant: str, ids: Sequence[str]) -> dict[str, DocumentRecord]:
        with self._connection() as db:
            rows = db.execute(f"SELECT {DOC_COLUMNS} FROM documents WHERE tenant = %s AND id = ANY(%s)",
                              (tenant, list(ids))).fetchall()
        return {r["id"]: doc_from_row(r) for r in rows}

    def get_document(self, tenant: str, document_id: str) -> DocumentRecord | None:
        return self.get_documents(tenant, [document_id]).get(document_id)

    def list_documents(self, tenant: str, *, limit: int, offset: int) -> tuple[list[DocumentRecord], int]:
        with self._connection() as db:
            total = db.execute("SELECT COUNT(*) AS n FROM documents WHERE tenant = %s", (tenant,)).fetchone()["n"]
            rows = db.execute(
                f'SELECT {DOC_COLUMNS} FROM documents WHERE tenant = %s ORDER BY id COLLATE "C" LIMIT %s OFFSET %s',
                (tenant, limit, offset)).fetchall()
        return [doc_from_row(r) for r in rows], total

    def upsert_documents(self, records: Iterable[DocumentRecord]) -> None:
        with self._tx() as db:
            self._upsert(db, list(records))

    def upsert_documents_unless_deleted(self, records: Sequence[DocumentRecord], since: float) -> set[str]:
        """``upsert_documents``, in one transaction with the deletion check: ids deleted after ``since`` (the
        job's creation) are not written, and are returned so that the caller removes their chunks again."""
        records = list(records)
        with self._tx() as db:
            # Shared with other writers, exclusive with mark_deleted: a delete either committed its mark before
            # the check below, or starts after this write commits (and then removes the row itself).
            db.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_LOCK_DELETE,))
            skipped: set[tuple[str, str]] = set()
            for tenant in {r.tenant for r in records}:
                ids = [r.id for r in records if r.tenant == tenant]
                skipped.update((tenant, d) for d in self._deleted_since(db, tenant, ids, since))
            self._upsert(db, [r for r in records if (r.tenant, r.id) not in skipped])
        return {d for _, d in skipped}

    def _upsert(self, db: psycopg.Connection, records: Sequence[DocumentRecord]) -> None:
        if not records:
            return
        now = self._now(db)
        with db.cursor() as cur:
            cur.executemany(
                f"INSERT INTO documents ({DOC_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant, id) DO UPDATE SET title = excluded.title, source = excluded.source, "
                "content_hash = excluded.content_hash, chunk_count = excluded.chunk_count, "
                "encoder_version = excluded.encoder_version, status = excluded.status, error = excluded.error, "
                "metadata = excluded.metadata, updated_at = excluded.updated_at, bytes = excluded.bytes",
                [(r.tenant, r.id, _text(r.title), _text(r.source), r.content_hash, r.chunk_count, r.encoder_version,
                  r.status, _text(r.error), json.dumps(r.metadata), r.created_at or now, now, r.bytes)
                 for r in records],
            )

    def delete_document(self, tenant: str, document_id: str) -> bool:
        with self._connection() as db:
            cur = db.execute("DELETE FROM documents WHERE tenant = %s AND id = %s", (tenant, document_id))
            return cur.rowcount > 0

    def mark_deleted(self, tenant: str, document_id: str) -> int:
        """Record that a document is being deleted (before its chunks and row go); returns the jobs it cancelled.

        The delete wins over every upload of the id created before it (see ``SqliteRegistry.mark_deleted``).
        """
        cancelled: list[list[JobItem]] = []
        asked = 0
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_DELETE,))
            now = self._now(db)  # under the lock, as in create_job
            db.execute(
                "INSERT INTO deletions (tenant, document_id, deleted_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant, document_id) DO UPDATE SET deleted_at = excluded.deleted_at",
                (tenant, document_id, now),
            )
            rows = db.execute(
                "SELECT id, status, items FROM jobs WHERE tenant = %s AND kind = 'ingest' "
                "AND status IN ('queued', 'running') ORDER BY id FOR UPDATE", (tenant,)).fetchall()
            for row in rows:
                items = msgspec.json.decode(row["items"], type=list[JobItem])
                if not items or any(i.document_id != document_id for i in items):
                    continue  # it writes other documents too (or a JSONL's): the mark fails just this one
                if row["status"] == "queued":
                    db.execute("UPDATE jobs SET status = 'cancelled', error = %s, finished_at = %s WHERE id = %s",
                               ("cancelled: the document was deleted", now, row["id"]))
                    cancelled.append(items)
                else:
                    db.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s", (row["id"],))
                    asked += 1
            # A mark only matters to jobs created before it; once none of them is pending it can go.
            oldest = db.execute("SELECT MIN(created_at) AS t FROM jobs WHERE status IN ('queued', 'running')"
                                ).fetchone()["t"]
            db.execute("DELETE FROM deletions WHERE deleted_at < %s", (now if oldest is None else oldest,))
        for items in cancelled:
            discard_uploads(items)
        return len(cancelled) + asked

    def deleted_since(self, tenant: str, ids: Sequence[str], since: float) -> set[str]:
        """Those of ``ids`` deleted after ``since`` (a job's creation): that job must not publish them."""
        with self._connection() as db:
            return self._deleted_since(db, tenant, ids, since)

    @staticmethod
    def _deleted_since(db: psycopg.Connection, tenant: str, ids: Sequence[str], since: float) -> set[str]:
        rows = db.execute("SELECT document_id FROM deletions WHERE tenant = %s AND deleted_at > %s "
                          "AND document_id = ANY(%s)", (tenant, since, list(ids))).fetchall()
        return {r["document_id"] for r in rows}

    # ---- limits and quotas -------------------------------------------------------------------
    def take_token(self, bucket: str, rate: float, burst: int) -> float:
        """Take one token from ``bucket`` (refilled at ``rate``/s up to ``burst``): 0 when taken, else the
        seconds until one is there. The bucket's row is locked, so concurrent API processes never both take the last."""
        with self._tx() as db:
            db.execute(f"INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (%s, %s, {_NOW}) "
                       "ON CONFLICT (bucket) DO NOTHING", (bucket, float(burst)))
            row = db.execute("SELECT tokens, updated_at FROM rate_buckets WHERE bucket = %s FOR UPDATE",
                             (bucket,)).fetchone()
            now = self._now(db)  # after the lock: never before the time the last taker wrote
            tokens = min(float(burst), row["tokens"] + max(0.0, now - row["updated_at"]) * rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
            if not wait:
                tokens -= 1
            db.execute("UPDATE rate_buckets SET tokens = %s, updated_at = %s WHERE bucket = %s", (tokens, now, bucket))
        return wait

    def get_quotas(self, tenant: str) -> dict[str, int]:
        with self._connection() as db:
            row = db.execute("SELECT limits FROM quotas WHERE tenant = %s", (tenant,)).fetchone()
        return json.loads(row["limits"]) if row else {}

    def set_quotas(self, tenant: str, limits: dict[str, int]) -> None:
        with self._connection() as db:
            db.execute("INSERT INTO quotas (tenant, limits) VALUES (%s, %s) ON CONFLICT (tenant) DO UPDATE SET "
                       "limits = excluded.limits", (tenant, json.dumps(limits, sort_keys=True)))

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """What a tenant uses now: documents, chunks, stored bytes, ingest jobs queued or running, LLM tokens
        this minute/day."""
        with self._connection() as db:
            docs = db.execute(
                "SELECT COUNT(*) AS n, COALESCE(SUM(chunk_count), 0)::bigint AS chunks, "
                "COALESCE(SUM(bytes), 0)::bigint AS stored FROM documents WHERE tenant = %s", (tenant,)).fetchone()
            jobs = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE tenant = %s AND kind = 'ingest' AND status IN "
                              "('queued', 'running')", (tenant,)).fetchone()["n"]
            now = self._now(db)
            periods = {r["period"]: r for r in db.execute(
                "SELECT period, start, tokens FROM llm_usage WHERE tenant = %s", (tenant,))}
        usage = {"documents": docs["n"], "chunks": docs["chunks"], "stored_bytes": docs["stored"],
                 "concurrent_jobs": jobs}
        for period, length in (("minute", 60.0), ("day", 86400.0)):
            row = periods.get(period)
            usage[f"llm_tokens_per_{period}"] = row["tokens"] if row and now - row["start"] < length else 0
        return usage

    def add_llm_tokens(self, tenant: str, tokens: int) -> None:
        """Count LLM tokens against the tenant's current minute and day (fixed windows that restart when over)."""
        with self._tx() as db:
            now = self._now(db)
            for period, length in (("minute", 60.0), ("day", 86400.0)):
                db.execute(
                    "INSERT INTO llm_usage (tenant, period, start, tokens) VALUES (%(t)s, %(p)s, %(now)s, %(n)s) "
                    "ON CONFLICT (tenant, period) DO UPDATE SET "
                    "tokens = CASE WHEN %(now)s - llm_usage.start < %(len)s THEN llm_usage.tokens + excluded.tokens "
                    "ELSE excluded.tokens END, "
                    "start = CASE WHEN %(now)s - llm_usage.start < %(len)s THEN llm_usage.start "
                    "ELSE excluded.start END",
                    {"t": tenant, "p": period, "now": now, "n": tokens, "len": length})

    # ---- per-tenant encoders -----------------------------------------------------------------
    # ---- what /metrics reads at scrape time --------------------------------------------------
    def queue_stats(self) -> dict[str, Any]:
        """Jobs waiting by kind, when the oldest of them was created, and how many are running."""
        with self._connection() as db:
            by_kind = {r["kind"]: r["n"] for r in db.execute(
                "SELECT kind, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY kind")}
            oldest = db.execute("SELECT MIN(created_at) AS t FROM jobs WHERE status = 'queued'").fetchone()["t"]
            running = db.execute("SELECT COUNT(*) AS n FROM jobs WHERE status = 'running'").fetchone()["n"]
        return {"queued_by_kind": by_kind, "oldest_queued_at": oldest, "running": running}

    def tenants_usage(self, limit: int) -> dict[str, tuple[int, int]]:
        """(documents, chunks) of the ``limit`` tenants with the most chunks; the rest summed as ``_other``."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT tenant, COUNT(*) AS docs, COALESCE(SUM(chunk_count), 0)::bigint AS chunks FROM documents "
                'GROUP BY tenant ORDER BY chunks DESC, tenant COLLATE "C"').fetchall()
        out = {r["tenant"]: (r["docs"], r["chunks"]) for r in rows[:limit]}
        rest = rows[limit:]
        if rest:
            out["_other"] = (sum(r["docs"] for r in rest), sum(r["chunks"] for r in rest))
        return out

    def get_tenant_encoder(self, tenant: str) -> str | None:
        """The tenant's own encoder version, None when it follows the default."""
        with self._connection() as db:
            row = db.execute("SELECT version FROM tenant_encoders WHERE tenant = %s", (tenant,)).fetchone()
        return row["version"] if row else None

    def set_tenant_encoder(self, tenant: str, version: str | None) -> None:
        """Point the tenant at ``version`` (None: back to following the default)."""
        with self._connection() as db:
            if version is None:
                db.execute("DELETE FROM tenant_encoders WHERE tenant = %s", (tenant,))
            else:
                db.execute(f"INSERT INTO tenant_encoders (tenant, version, updated_at) VALUES (%s, %s, {_NOW}) "
                           "ON CONFLICT (tenant) DO UPDATE SET version = excluded.version, "
                           "updated_at = excluded.updated_at", (tenant, version))

    def tenant_encoders(self) -> dict[str, str]:
        """Every tenant with an encoder of its own → that version."""
        with self._connection() as db:
            rows = db.execute('SELECT tenant, version FROM tenant_encoders ORDER BY tenant COLLATE "C"').fetchall()
        return {r["tenant"]: r["version"] for r in rows}

    # ---- API keys ----------------------------------------------------------------------------
    def create_key(self, key: ApiKey) -> None:
        """Store a key (a re-registered bootstrap key replaces its hash and is un-revoked)."""
        with self._connection() as db:
            db.execute(
                "INSERT INTO api_keys (key_id, tenant, scopes, secret_hash, name, created_at, expires_at, revoked_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (key_id) DO UPDATE SET tenant = excluded.tenant, "
                "scopes = excluded.scopes, secret_hash = excluded.secret_hash, name = excluded.name, "
                "expires_at = excluded.expires_at, revoked_at = excluded.revoked_at",
                (key.key_id, key.tenant, json.dumps(key.scopes), key.secret_hash, _text(key.name), key.created_at,
                 key.expires_at, key.revoked_at),
            )

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._connection() as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
        return key_from_row(row) if row else None

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        where, args = ("WHERE tenant = %s", (tenant,)) if tenant is not None else ("", ())
        with self._connection() as db:
            rows = db.execute(f'SELECT * FROM api_keys {where} ORDER BY created_at, key_id COLLATE "C"',
                              args).fetchall()
        return [key_from_row(r) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._connection() as db:
            cur = db.execute(f"UPDATE api_keys SET revoked_at = {_NOW} WHERE key_id = %s AND revoked_at IS NULL",
                             (key_id,))
            return cur.rowcount > 0

    # ---- datasets (labelled pairs a tenant uploaded; every query carries the tenant) ----------------
    def create_dataset(self, tenant: str, name: str, pairs: Sequence[tuple[str, str]], *, split: str,
                       format: DatasetFormat, size: int, sha256: str) -> DatasetRecord:
        """Store a dataset and its pairs (in their order) in one transaction; its id is new and random."""
        pairs = list(pairs)
        with self._tx() as db:
            record = DatasetRecord(id=new_dataset_id(), tenant=tenant, name=name, split=split, format=format,
                                   pairs=len(pairs), queries=len({q for q, _ in pairs}), bytes=size, sha256=sha256,
                                   created_at=self._now(db))
            db.execute(f"INSERT INTO datasets ({DATASET_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                       (record.id, tenant, name, split, format, record.pairs, record.queries, size, sha256,
                        record.created_at))
            copy_in = "COPY dataset_pairs (dataset_id, seq, query, document_id) FROM STDIN"
            with db.cursor() as cur, cur.copy(copy_in) as copy:
                for i, (q, d) in enumerate(pairs):
                    copy.write_row((record.id, i, q, d))
        return record

    def add_feedback_pairs(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> DatasetRecord:
        """Append confirmed (query, document id) pairs to the tenant's feedback dataset (made on first use)."""
        pairs = list(pairs)
        with self._tx() as db:
            # One feedback dataset per tenant: concurrent first feedbacks of a tenant wait for each other.
            db.execute("SELECT pg_advisory_xact_lock(hashtext('rag-feedback:' || %s))", (tenant,))
            row = db.execute("SELECT id FROM datasets WHERE tenant = %s AND format = 'feedback'", (tenant,)).fetchone()
            if row is None:
                dataset_id = new_dataset_id()
                db.execute(f"INSERT INTO datasets ({DATASET_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                           (dataset_id, tenant, "feedback", "train", "feedback", 0, 0, 0, "", self._now(db)))
            else:
                dataset_id = row["id"]
            seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) AS s FROM dataset_pairs WHERE dataset_id = %s",
                             (dataset_id,)).fetchone()["s"]
            for i, (q, d) in enumerate(pairs):
                db.execute("INSERT INTO dataset_pairs (dataset_id, seq, query, document_id) VALUES (%s, %s, %s, %s)",
                           (dataset_id, seq + i, q, d))
            counts = db.execute("SELECT COUNT(*) AS n, COUNT(DISTINCT query) AS q FROM dataset_pairs "
                                "WHERE dataset_id = %s", (dataset_id,)).fetchone()
            size = sum(len(q.encode()) + len(d.encode()) for q, d in pairs)
            db.execute("UPDATE datasets SET pairs = %s, queries = %s, bytes = bytes + %s WHERE id = %s",
                       (counts["n"], counts["q"], size, dataset_id))
            row = db.execute(f"SELECT {DATASET_COLUMNS} FROM datasets WHERE id = %s", (dataset_id,)).fetchone()
        return dataset_from_row(row)

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        with self._connection() as db:
            row = db.execute(f"SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = %s AND id = %s",
                             (tenant, dataset_id)).fetchone()
        return dataset_from_row(row) if row else None

    def list_datasets(self, tenant: str) -> list[DatasetRecord]:
        """The tenant's datasets, oldest first."""
        with self._connection() as db:
            rows = db.execute(f'SELECT {DATASET_COLUMNS} FROM datasets WHERE tenant = %s '
                              'ORDER BY created_at, id COLLATE "C"', (tenant,)).fetchall()
        return [dataset_from_row(r) for r in rows]

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        """Delete a dataset and its pairs; False when the tenant has no such dataset."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM datasets WHERE tenant = %s AND id = %s", (tenant, dataset_id))
            if not cur.rowcount:
                return False
            db.execute("DELETE FROM dataset_pairs WHERE dataset_id = %s", (dataset_id,))
        return True

    def dataset_pairs(self, tenant: str, dataset_id: str) -> list[tuple[str, str]] | None:
        """A dataset's (query, document id) pairs in upload order; None when the tenant has no such dataset."""
        with self._tx() as db:
            # One snapshot: a delete between the two reads cannot show a dataset without pairs.
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            found = db.execute("SELECT 1 FROM datasets WHERE tenant = %s AND id = %s", (tenant, dataset_id)).fetchone()
            if found is None:
                return None
            rows = db.execute("SELECT query, document_id FROM dataset_pairs WHERE dataset_id = %s ORDER BY seq",
                              (dataset_id,)).fetchall()
        return [(r["query"], r["document_id"]) for r in rows]

    # ---- end datasets ----------------------------------------------------------------------------------

    def wait_for_job(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a NOTIFY that a job became claimable (from any process or host): True
        when one came.

        The LISTEN connection is this handle's own (a pooled one would carry the LISTEN to other users) and
        is opened on the first wait; a notification that came while the worker was busy wakes the next wait
        at once. Never raises: on a database error it sleeps ``timeout_s`` and reconnects next time.
        """
        with self._listen_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = self._connect()
                    self._listener.execute(f"LISTEN {CHANNEL}")
                woken = False
                for _ in self._listener.notifies(timeout=timeout_s, stop_after=1):
                    woken = True
                if woken:  # a burst of jobs (one NOTIFY each) is one wake-up, not one per job
                    for _ in self._listener.notifies(timeout=0):
                        pass
                return woken
            except (psycopg.Error, RegistryUnavailable) as exc:
                log.warning("registry_listen_failed", database=self.where, error=str(exc))
                if self._listener is not None:
                    self._listener.close()
                self._listener = None
        time.sleep(timeout_s)
        return False

    def close(self) -> None:
        """Release the pool's connections and the LISTEN connection (a later call reconnects)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        with self._listen_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
