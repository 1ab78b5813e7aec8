"""``python -m ingest add``: batch ingestion through the running service's API, or in-process when none is up."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from rag.errors import RagError
from rag.loaders import SUPPORTED_SUFFIXES
from rag.settings import Settings

from ingest.worker import iter_paths

FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Summary:
    files: int = 0
    documents: int = 0
    chunks: int = 0
    failures: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    errors: list[str] | None = None

    def lines(self) -> list[str]:
        out = [
            f"files: {self.files}  documents: {self.documents}  chunks: {self.chunks}  unchanged: {self.unchanged}  "
            f"failures: {self.failures}  time: {self.seconds:.1f}s"
        ]
        out += [f"  failed: {e}" for e in (self.errors or [])[:50]]
        return out


def service_url(settings: Settings, url: str | None) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return (url or f"http://{host}:{settings.port}").rstrip("/")


def api_headers(settings: Settings, tenant: str | None = None) -> dict[str, str]:
    """What a command-line tool sends to the service: RAG_API_KEY as a Bearer token; ``X-Tenant`` (honoured in
    open mode, or for an operator key acting for a tenant) when a tenant is named."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    if tenant:
        headers["X-Tenant"] = tenant
    return headers


def service_is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _summarise(jobs: Sequence[dict], started: float, files: int) -> Summary:
    s = Summary(files=files, errors=[])
    for job in jobs:
        for d in job["documents"]:
            s.documents += 1
            s.chunks += d["chunks"] if d["status"] == "indexed" else 0
            s.unchanged += d["status"] == "unchanged"
            if d["status"] == "failed":
                s.failures += 1
                s.errors.append(f"{d['source']} {d['document_id'] or ''}: {d['error']}")
        if job["status"] in ("failed", "cancelled") and not job["documents"]:
            s.failures += 1
            s.errors.append(f"job {job['id']}: {job['error']}")
    s.seconds = time.perf_counter() - started
    return s


def _wait(job_ids: list[str], fetch: Callable[[str], dict], bar: tqdm, poll_s: float = 0.5) -> list[dict]:
    jobs: dict[str, dict] = {}
    while True:
        for jid in job_ids:
            if jid not in jobs or jobs[jid]["status"] not in FINAL:
                jobs[jid] = fetch(jid)
        done = sum(j["progress"]["documents_done"] + j["progress"]["documents_failed"] for j in jobs.values())
        total = sum(j["progress"]["documents_total"] for j in jobs.values())
        bar.total = max(total, done, bar.total or 0)
        bar.n = done
        bar.refresh()
        if all(j["status"] in FINAL for j in jobs.values()):
            return list(jobs.values())
        time.sleep(poll_s)


def add_via_api(url: str, paths: list[Path], *, tenant: str, files_per_request: int = 20,
                headers: dict[str, str] | None = None) -> Summary:
    """Upload files to the running service and follow their jobs to the end."""
    started = time.perf_counter()
    files = list(iter_paths(paths, SUPPORTED_SUFFIXES))
    job_ids: list[str] = []
    headers = {"X-Tenant": tenant, **(headers or {})}
    with httpx.Client(base_url=url, timeout=120.0, headers=headers) as client:
        with tqdm(total=len(files), desc="upload", unit="file") as bar:
            for start in range(0, len(files), files_per_request):
                part = files[start : start + files_per_request]
                multipart = [("file", (p.name, p.read_bytes())) for p in part]
                resp = client.post("/v1/documents", files=multipart)
                if resp.status_code != 202:
                    raise RagError(f"upload failed ({resp.status_code}): {resp.text}")
                job_ids += resp.json()["job_ids"]
                bar.update(len(part))

        def fetch(jid: str) -> dict:
            r = client.get(f"/v1/jobs/{jid}")
            r.raise_for_status()
            return r.json()

        with tqdm(desc="index", unit="doc") as bar:
            jobs = _wait(job_ids, fetch, bar)
    return _summarise(jobs, started, len(files))


def add_in_process(settings: Settings, paths: list[Path], *, tenant: str) -> Summary:
    """No service is up: take the embedded store's lock ourselves and run the worker here."""
    import shutil
    import uuid

    from rag.registry import job_view
    from rag.services import Services
    from rag.loaders import default_document_id
    from rag.registry import JobItem

    from ingest.worker import IngestWorker

    started = time.perf_counter()
    files = list(iter_paths(paths, SUPPORTED_SUFFIXES))
    services = Services.build(settings)
    try:
        worker = IngestWorker(settings, services.registry, services.store, services.embedder, encoders=services.pool())
        services.registry.requeue_running()
        batch = settings.uploads_dir / uuid.uuid4().hex
        batch.mkdir(parents=True, exist_ok=True)
        job_ids = []
        for i, p in enumerate(files):
            dest = batch / f"{i:04d}-{default_document_id(p.name)}"
            shutil.copyfile(p, dest)
            bulk = p.suffix.lower() == ".jsonl"
            item = JobItem(filename=p.name, path=str(dest), document_id=None if bulk else default_document_id(p.name))
            job_ids.append(services.registry.create_job(tenant, [item]).id)
        worker.start()
        try:
            with tqdm(desc="index", unit="doc") as bar:
                jobs = _wait(job_ids, lambda jid: job_view(services.registry.get_job(jid)), bar)
        finally:
            worker.stop()
    finally:
        services.close()
    return _summarise(jobs, started, len(files))
