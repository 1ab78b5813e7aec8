"""Shared fixtures: the real encoder is loaded once per test session."""

from __future__ import annotations

import os

from rag.runtime import pin_process_environment

pin_process_environment()  # before numpy and torch load, as every entry point does

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rag.embedding import SentenceTransformerEmbedder
from rag.settings import Settings

# One ONNX export cache for the whole session: every test's data dir, and the processes tests start, find the
# exports there (MiniLM is exported once per session, not per test), and the exports of the models tests train
# go with it at the end instead of piling up in the user's cache.
if not os.environ.get("RAG_ONNX_CACHE_DIR"):
    os.environ["RAG_ONNX_CACHE_DIR"] = _SESSION_ONNX_CACHE = tempfile.mkdtemp(prefix="rag-test-onnx-")
else:
    _SESSION_ONNX_CACHE = ""


def pytest_sessionfinish(session, exitstatus) -> None:
    if _SESSION_ONNX_CACHE:
        shutil.rmtree(_SESSION_ONNX_CACHE, ignore_errors=True)


# The benchmark data lies in ../shared/data beside the checkout (CI clones beside it too).
DATA = Path(os.environ.get("SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        pytest.skip(f"benchmark data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this session (tests/pg.py), started on first use and stopped at the end;
    the tests that need it are skipped, saying why, where the server is not installed."""
    from tests.pg import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb or initdb on PATH); "
                    "`make test` installs Debian's postgresql package")
    server = PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """A URL of a fresh, empty schema of its own (the only one on its search_path) for one test."""
    url = postgres_server.create_schema()
    yield url
    postgres_server.drop_schema(url)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # A data dir per test; the ONNX exports in the session's cache (RAG_ONNX_CACHE_DIR, above).
    return Settings(data_dir=tmp_path / "data", worker_poll_s=0.05, log_format="json", llm_local="no")


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s")


def build_app(settings: Settings, services=None):
    """The app as ``python -m rag serve`` composes it: the API, with the ingest worker inside when settings say so."""
    from ingest.supervisor import worker_beside_api
    from rag.api.app import create_app

    background = (worker_beside_api,) if settings.worker_in_process else ()
    return create_app(settings, services=services, background=background)


@pytest.fixture
def app_client(settings: Settings, embedder) -> Iterator:
    """The real app (worker inside, embedded Qdrant, SQLite registry) over Litestar's test client."""
    from litestar.testing import TestClient

    from rag.services import Services
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    app = build_app(settings, services=services)
    try:
        with TestClient(app, timeout=60) as client:
            client.services = services
            yield client
    finally:
        registry.close()
        store.close()


@contextmanager
def serving(settings: Settings, embedder, prepare=None) -> Iterator[tuple[str, object]]:
    """The real service over real HTTP (uvicorn on a free loopback port, worker inside): yields (url, services).

    ``prepare(services)`` runs before the server starts (e.g. to create API keys).
    """
    import socket
    import threading

    import httpx
    import uvicorn

    from rag.registry import SqliteRegistry
    from rag.services import Services
    from rag.store import open_store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    services = Services(settings=settings, registry=registry, store=store, embedder=embedder)
    if prepare is not None:
        prepare(services)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(settings, services=services), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=120, interval=0.2)
        yield url, services
    finally:
        server.should_exit = True
        thread.join(60)
        registry.close()
        store.close()
