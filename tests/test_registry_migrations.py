"""Versioned schema migrations of both registry engines (rag/registry.py, rag/registry_pg.py).

Opening a handle applies the migrations a database lacks, in order and in one transaction; a database whose
schema is newer than the code is refused with an error that names both versions, and is left as it was.
Unlike the contract suite, these tests look at the engines' own bookkeeping (PRAGMA user_version, the
schema_version table).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from rag.errors import RagError, RegistrySchemaError
from rag.registry import SQLITE_MIGRATIONS, JobItem, Registry, SqliteRegistry
from rag.registry_factory import open_registry
from rag.registry_pg import POSTGRES_MIGRATIONS, PostgresRegistry
from rag.settings import Settings

# The first release's jobs and documents tables, as a file made before schema versions existed has them.
FIRST_RELEASE = """
CREATE TABLE documents (
    tenant TEXT NOT NULL, id TEXT NOT NULL, title TEXT NOT NULL, source TEXT NOT NULL,
    content_hash TEXT NOT NULL, chunk_count INTEGER NOT NULL, encoder_version TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT, metadata TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, items TEXT NOT NULL,
    created_at REAL NOT NULL, started_at REAL, finished_at REAL, attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL, error TEXT, total INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
INSERT INTO jobs (id, tenant, status, items, created_at) VALUES ('old-job', 't1', 'queued', '[]', 1.0);
INSERT INTO documents VALUES ('t1', 'd1', 'T', 's.txt', 'h', 3, 'v1', 'indexed', NULL, '{}', 1.0, 1.0);
"""


class Engine:
    """Open a handle, and read or force the stored schema version, of one engine's fresh database."""

    def __init__(self, name: str, known: int, open_: Callable[[], Registry], get: Callable[[], int],
                 put: Callable[[int], None]) -> None:
        self.name, self.known, self.open, self.get, self.put = name, known, open_, get, put


def _sqlite_engine(tmp_path: Path) -> Engine:
    path = tmp_path / "registry.sqlite3"

    def put(version: int) -> None:
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {version}")

    def get() -> int:
        with sqlite3.connect(path) as db:
            return db.execute("PRAGMA user_version").fetchone()[0]

    return Engine("sqlite", len(SQLITE_MIGRATIONS), lambda: SqliteRegistry(path), get, put)


def _postgres_engine(url: str) -> Engine:
    def put(version: int) -> None:
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("UPDATE schema_version SET version = %s", (version,))

    def get() -> int:
        with psycopg.connect(url, autocommit=True) as db:
            return db.execute("SELECT version FROM schema_version").fetchone()[0]

    return Engine("postgres", len(POSTGRES_MIGRATIONS), lambda: PostgresRegistry(url), get, put)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return _sqlite_engine(tmp_path)
    return _postgres_engine(request.getfixturevalue("postgres_url"))


def test_a_new_database_gets_every_migration_once(engine: Engine) -> None:
    registry = engine.open()
    try:
        job = registry.create_job("t1", [JobItem(filename="a", path="/nonexistent/a")])
        assert engine.get() == engine.known >= 1
    finally:
        registry.close()
    again = engine.open()  # nothing left to apply: the data stands
    try:
        assert engine.get() == engine.known
        assert again.get_job(job.id) == job
    finally:
        again.close()


def test_a_database_newer_than_the_code_is_refused_naming_both_versions(engine: Engine) -> None:
    engine.open().close()
    engine.put(engine.known + 3)
    with pytest.raises(RegistrySchemaError) as caught:
        engine.open()
    message = str(caught.value)
    assert isinstance(caught.value, RagError) and caught.value.code == "registry_schema_too_new"
    assert f"schema version {engine.known + 3}" in message and f"(version {engine.known})" in message
    assert engine.get() == engine.known + 3  # left as it was


def test_concurrent_first_opens_apply_the_migrations_once(engine: Engine) -> None:
    opened: list[Registry] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait()
            opened.append(engine.open())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(opened) == 4
        assert engine.get() == engine.known
        job = opened[0].create_job("t1", [])
        assert all(r.get_job(job.id) == job for r in opened)
    finally:
        for r in opened:
            r.close()


def test_a_first_release_sqlite_file_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(FIRST_RELEASE)
    registry = SqliteRegistry(path)
    try:
        assert registry.schema_version == len(SQLITE_MIGRATIONS)
        old = registry.get_job("old-job")
        assert (old.kind, old.params, old.outcome, old.stage) == ("ingest", {}, {}, "")
        assert registry.get_document("t1", "d1").bytes == 0
        claimed = registry.claim_job(60.0)  # the later columns (claimed_at, yielded) work on the old rows
        assert claimed.id == "old-job" and claimed.attempts == 1
        assert registry.list_datasets("t1") == []  # tables of later releases were created
    finally:
        registry.close()


def test_an_unversioned_file_of_the_latest_shape_keeps_its_data(tmp_path: Path) -> None:
    # What the code before schema versions left: every column, and user_version 0.
    path = tmp_path / "registry.sqlite3"
    registry = SqliteRegistry(path)
    job = registry.create_job("t1", [])
    registry.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 0")
    registry = SqliteRegistry(path)
    try:
        assert registry.schema_version == len(SQLITE_MIGRATIONS)
        assert registry.get_job(job.id) == job
    finally:
        registry.close()


def test_the_factory_opens_sqlite_without_a_database_url(tmp_path: Path) -> None:
    registry = open_registry(Settings(data_dir=tmp_path / "data"))
    try:
        assert isinstance(registry, SqliteRegistry) and (tmp_path / "data" / "registry.sqlite3").exists()
    finally:
        registry.close()


def test_the_factory_opens_postgres_with_a_database_url(postgres_url: str) -> None:
    registry = open_registry(Settings(database_url=postgres_url, database_pool_max_size=3))
    try:
        assert isinstance(registry, PostgresRegistry)
        assert registry.schema_version == len(POSTGRES_MIGRATIONS)
    finally:
        registry.close()


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = f"postgresql://nobody@/nothing?host={tmp_path}&connect_timeout=2"  # no server listens there
    with pytest.raises(RagError, match=r"cannot connect to the registry database nothing on ") as caught:
        PostgresRegistry(url)
    assert caught.value.status_code == 503
