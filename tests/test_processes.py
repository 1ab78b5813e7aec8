"""The real processes: `python -m rag serve` and `python -m ingest` as a user runs them.

Models load only in the subprocesses started here. Every wait is bounded and every process started
here is killed in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TENANT = "default"
FINAL = ("succeeded", "failed", "cancelled")


# ---- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    """The test runner's environment without any RAG_* of its own (but the session's ONNX cache), plus this test's
    settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_") or k == "RAG_ONNX_CACHE_DIR"}
    env.update(RAG_DATA_DIR=str(data_dir), RAG_PORT=str(port), RAG_LOG_FORMAT="json", RAG_LLM_LOCAL="no", OPENBLAS_NUM_THREADS="1")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short-lived command to the end (killed on timeout, which fails the test)."""
    try:
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} did not finish within {timeout}s; stderr: {exc.stderr!r}")


def poll(predicate: Callable[[], Any], timeout: float, interval: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout}s")


class Service:
    """One `python -m rag serve` process on a data directory; output goes to a log file."""

    def __init__(self, data_dir: Path, port: int, log_path: Path, **extra_env: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.env = process_env(data_dir, port, **extra_env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rag", "serve"], cwd=ROOT, env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"service not ready within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a machine loses the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM and wait for a clean exit (the store is flushed and its lock released)."""
        assert self.proc is not None and self.proc.poll() is None, "the service is not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"service ignored SIGTERM for {timeout}s:\n{self.log_tail()}")
        # uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit.
        assert code in (0, -signal.SIGTERM), f"service exited with {code}:\n{self.log_tail()}"
        assert '"level": "error"' not in self.log_tail(20000), self.log_tail()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0, headers={"X-Tenant": TENANT})


def upload(client: httpx.Client, files: list[tuple[str, bytes]]) -> list[str]:
    resp = client.post("/v1/documents", files=[("file", (name, data)) for name, data in files])
    assert resp.status_code == 202, resp.text
    return resp.json()["job_ids"]


def get_job(client: httpx.Client, job_id: str) -> dict:
    resp = client.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def finish(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    return poll(lambda: (j := get_job(client, job_id))["status"] in FINAL and j, timeout, 0.1, f"job {job_id} ends")


def search(client: httpx.Client, query: str, top_k: int = 5) -> list[dict]:
    resp = client.post("/v1/search", json={"query": query, "top_k": top_k})
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def all_documents(client: httpx.Client) -> tuple[list[dict], int]:
    docs: list[dict] = []
    offset: int | None = 0
    total = 0
    while offset is not None:
        page = client.get("/v1/documents", params={"limit": 500, "offset": offset})
        assert page.status_code == 200, page.text
        body = page.json()
        docs += body["documents"]
        total, offset = body["total"], body["next_offset"]
    return docs, total


def open_store(data_dir: Path):
    from rag.store import EdgeVectorStore

    return EdgeVectorStore(data_dir / "qdrant")


def the_collection(store) -> tuple[str, int]:
    """The (only) collection the service wrote, and its vector size (from the shard's own config)."""
    collections = store.list_collections()
    assert len(collections) == 1, collections
    name = collections[0]
    config = json.loads((store.root / "collections" / name / "edge_config.json").read_text())
    return name, int(config["vectors"]["dense"]["size"])


def live_points(store, collection: str, dimension: int, document_id: str, expected: int) -> list:
    """Every live point of a document (the store's search sees only live ones)."""
    hits = store.search(collection, [1.0] * dimension, tenant=TENANT, top_k=expected + 50,
                        filter={"document_id": document_id})
    assert all(h.payload["document_id"] == document_id and h.payload["live"] is True for h in hits)
    return hits


def assert_one_whole_generation(hits: list, document_id: str, live_count: int) -> str:
    """A document is visible as exactly one complete generation: one content hash, chunks 0..n-1."""
    assert len(hits) == live_count, f"{document_id}: search sees {len(hits)} live points, count says {live_count}"
    hashes = {h.payload["content_hash"] for h in hits}
    assert len(hashes) == 1, f"{document_id}: live points of several generations {hashes}"
    indexes = sorted(h.payload["chunk_index"] for h in hits)
    assert indexes == list(range(live_count)), f"{document_id}: live chunk indexes {indexes}"
    return hashes.pop()


# ---- settings errors at start (fast: nothing is loaded before settings are valid) --------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RAG_CHUNK_TOKENS", "abc"), ("RAG_NOPE", "1"), ("RAG_PORT", "99999"), ("RAG_TOKENIZER_ENCODING", "foo")],
)
def test_serve_refuses_bad_settings_at_start(tmp_path, variable, value):
    env = process_env(tmp_path / "data", free_port(), **{variable: value})
    started = time.monotonic()
    result = run([sys.executable, "-m", "rag", "serve"], env, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert variable in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "data").exists(), "a refused start must not create the data directory"


def test_ingest_refuses_bad_settings_at_start(tmp_path):
    env = process_env(tmp_path / "data", free_port(), RAG_CHUNK_OVERLAP="500")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    result = run([sys.executable, "-m", "ingest", "add", "--local", str(note)], env, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "RAG_CHUNK_OVERLAP" in result.stderr


# ---- a crash in the middle of a job ------------------------------------------------------------

# Small chunks make the worker's groups small (a group is ~512 estimated chunks: 44 of these
# documents at 32 tokens), so the first group is published a few seconds into the job while a
# second one is still to come. Few documents keep the test short on a 2-core machine.
CRASH_DOCUMENTS = 64
CRASH_ENV = {"RAG_CHUNK_TOKENS": "32", "RAG_CHUNK_OVERLAP": "0", "RAG_WORKER_POLL_S": "0.1"}


@pytest.fixture(params=["sqlite", "postgres"])
def registry_env(request) -> dict[str, str]:
    """The registry the service processes share: the data dir's SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return {}
    return {"RAG_DATABASE_URL": request.getfixturevalue("postgres_url")}


@pytest.mark.slow
def test_crash_mid_job_is_retried_to_a_correct_state(tmp_path, shared_data, registry_env):
    """A process SIGKILLed mid-job; a new process (on the same registry, SQLite or PostgreSQL) takes the job
    over and every document ends indexed exactly once, with nothing half-written in between."""
    from rag.registry_factory import open_registry
    from rag.settings import Settings

    lines = []
    with open(shared_data / "scifact" / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip("\n"))
            if len(lines) == CRASH_DOCUMENTS:
                break
    ids = [str(json.loads(line)["_id"]) for line in lines]
    assert len(set(ids)) == len(ids) == CRASH_DOCUMENTS
    corpus = ("\n".join(lines) + "\n").encode()
    data_dir = tmp_path / "data"
    service = Service(data_dir, free_port(), tmp_path / "service.log", **CRASH_ENV, **registry_env)
    try:
        # 1. Upload and kill the process once some documents are done but the job is not.
        service.start().wait_ready()
        with service.client() as client:
            (job_id,) = upload(client, [("corpus.jsonl", corpus)])

            def part_done():
                job = get_job(client, job_id)
                if job["status"] in FINAL:
                    pytest.fail(f"the job ended ({job['status']}) before it could be killed: use more documents")
                return job if job["progress"]["documents_done"] > 0 else None

            before = poll(part_done, timeout=180, interval=0.05, what="first documents indexed")
        service.kill()
        assert before["progress"]["documents_done"] < CRASH_DOCUMENTS

        # 2. While it is dead: no document is half visible, and what the registry calls indexed is whole.
        registry = open_registry(Settings(data_dir=data_dir, database_url=registry_env.get("RAG_DATABASE_URL", "")))
        try:
            records = registry.get_documents(TENANT, ids)
            job = registry.get_job(job_id)
        finally:
            registry.close()
        assert job is not None and job.status == "running" and job.attempts == 1
        store = open_store(data_dir)
        try:
            collection, dimension = the_collection(store)
            visible = 0
            for document_id in ids:
                live = store.count(collection, tenant=TENANT, document_id=document_id, live=True)
                record = records.get(document_id)
                if record is not None and record.status == "indexed":
                    assert live == record.chunk_count, f"{document_id}: registry says indexed, {live} live points"
                if live == 0:
                    continue
                visible += 1
                digest = assert_one_whole_generation(
                    live_points(store, collection, dimension, document_id, live), document_id, live
                )
                if record is not None:
                    assert digest == record.content_hash
            assert visible >= 1, "the killed job had published nothing"
            assert visible < CRASH_DOCUMENTS
        finally:
            store.close()

        # 3. Restart on the same data: the job is taken up again and finishes.
        service.start().wait_ready()
        with service.client() as client:
            job = finish(client, job_id, timeout=240)
            assert job["status"] == "succeeded", job
            assert job["attempts"] >= 2, job
            assert job["progress"]["documents_done"] == CRASH_DOCUMENTS, job["progress"]
            docs, total = all_documents(client)
        assert total == CRASH_DOCUMENTS
        assert sorted(d["id"] for d in docs) == sorted(ids)
        assert all(d["status"] == "indexed" and d["chunk_count"] >= 1 for d in docs)
        service.stop()

        # 4. Stopped again: every document is exactly its registered generation, nothing else is stored.
        store = open_store(data_dir)
        try:
            collection, dimension = the_collection(store)
            for doc in docs:
                live = store.count(collection, tenant=TENANT, document_id=doc["id"], live=True)
                assert live == doc["chunk_count"], (doc["id"], live, doc["chunk_count"])
                digest = assert_one_whole_generation(
                    live_points(store, collection, dimension, doc["id"], live), doc["id"], live
                )
                assert digest == doc["content_hash"]
            # No duplicates and no invisible leftovers of the killed attempt.
            assert store.count(collection) == sum(d["chunk_count"] for d in docs)
            assert store.count(collection, live=False) == 0
        finally:
            store.close()
        leftovers = [p for p in (data_dir / "uploads").rglob("*") if p.is_file()]
        assert not leftovers, f"uploads of a finished job are still on disk: {leftovers}"
        # The processes really shared the configured registry (no SQLite file beside a PostgreSQL one).
        assert (data_dir / "registry.sqlite3").exists() == ("RAG_DATABASE_URL" not in registry_env)
    finally:
        service.kill()


# ---- one running service for the lock and CLI tests ---------------------------------------------


@pytest.fixture(scope="module")
def running_service(tmp_path_factory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("service")
    service = Service(base / "data", free_port(), base / "service.log", RAG_WORKER_POLL_S="0.1")
    try:
        service.start().wait_ready()
        yield service
    finally:
        service.kill()


LOCK_MESSAGE = re.compile(r"in use by process|locked|held by", re.I)


@pytest.mark.slow
def test_lock_refusal_leaves_the_running_service_unharmed(running_service, tmp_path):
    service = running_service
    note = tmp_path / "refused.txt"
    note.write_text("This note must not be ingested while the service holds the store.")

    # The batch CLI in local mode must not touch the store another process holds.
    started = time.monotonic()
    result = run([sys.executable, "-m", "ingest", "add", "--local", str(note)], service.env, timeout=60)
    assert time.monotonic() - started < 30, "the refusal took too long"
    assert result.returncode != 0, result.stdout
    assert LOCK_MESSAGE.search(result.stderr), result.stderr[-2000:]
    assert f"process {service.proc.pid}" in result.stderr, result.stderr[-2000:]  # names the holder
    assert "Traceback" not in result.stderr

    # Opening the store directly in another process fails the same way, at once.
    probe = (
        "import sys\n"
        "from rag.errors import StoreLockedError\n"
        "from rag.store import EdgeVectorStore\n"
        "try:\n"
        "    EdgeVectorStore(sys.argv[1])\n"
        "except StoreLockedError as exc:\n"
        "    print('LOCKED', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    result = run([sys.executable, "-c", probe, str(service.data_dir / "qdrant")], service.env, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("LOCKED"), (result.returncode, result.stdout,
                                                                            result.stderr[-2000:])

    # The holder is unharmed: a write after the refusals is flushed and searchable.
    text = ("The okapi is a giraffid artiodactyl mammal native to the northeast of the Democratic Republic of "
            "the Congo; it has striped hindquarters like a zebra.")
    with service.client() as client:
        assert client.get("/readyz").status_code == 200
        (job_id,) = upload(client, [("okapi.txt", text.encode())])
        job = finish(client, job_id)
        assert job["status"] == "succeeded", job
        hits = search(client, "forest giraffe relative with zebra stripes", top_k=3)
        assert hits and hits[0]["document_id"] == "okapi.txt", hits
        assert client.get("/v1/documents/refused.txt").status_code == 404
    assert service.proc.poll() is None, service.log_tail()


@pytest.mark.slow
def test_cli_add_goes_through_the_api(running_service, tmp_path):
    service = running_service
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "comets.md").write_text(
        "# Comets\n\nA comet is an icy small Solar System body that, when passing close to the Sun, warms and "
        "begins to release gases, producing a visible atmosphere or coma and sometimes a tail.\n"
    )
    (folder / "sourdough.txt").write_text(
        "Sourdough bread is leavened by a starter culture of wild yeast and lactic acid bacteria, "
        "which gives the loaf its sour taste and chewy crumb.\n"
    )
    (folder / "empty.txt").write_text("")

    result = run([sys.executable, "-m", "ingest", "add", str(folder), "--url", service.url], service.env, timeout=180)
    out = result.stdout
    assert result.returncode == 1, (result.returncode, out, result.stderr[-2000:])
    assert re.search(r"\bdocuments: 3\b", out), out
    assert re.search(r"\bfailures: 1\b", out), out
    assert re.search(r"\bfiles: 3\b", out), out
    assert "empty.txt" in out  # the failure is listed with its file

    with service.client() as client:
        hits = search(client, "icy body that grows a tail near the Sun", top_k=3)
        assert hits and hits[0]["document_id"] == "comets.md", hits
        hits = search(client, "bread leavened with wild yeast starter", top_k=3)
        assert hits and hits[0]["document_id"] == "sourdough.txt", hits
        assert client.get("/v1/documents/comets.md").json()["status"] == "indexed"
        assert client.get("/v1/documents/empty.txt").status_code == 404

    # The API path leaves the lock with the service: it is still the only writer and still healthy.
    assert service.proc.poll() is None, service.log_tail()
