"""The service an answer evaluation talks to: ``python -m rag serve`` started and stopped as a
subprocess with a data dir of its own (or one already running at a URL), and the HTTP client that
uploads the corpus and asks the questions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from eval.datasets import QAExample

__all__ = ["Service", "ask_all", "running_service", "start_service", "upload_corpus", "wait_ready"]


@dataclass
class Service:
    url: str
    proc: subprocess.Popen | None = None  # None: a service this process did not start (and does not stop)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_service(data_dir: Path, port: int, env_overrides: dict[str, str], log_path: Path | None = None) -> Service:
    """``python -m rag serve`` on ``port`` with its own data dir; RAG_* of this process are passed on
    unless overridden."""
    env = dict(os.environ)
    env.update({"RAG_DATA_DIR": str(data_dir), "RAG_PORT": str(port), "RAG_LOG_LEVEL": "warning", **env_overrides})
    data_dir.mkdir(parents=True, exist_ok=True)
    out = (log_path or data_dir / f"serve-{port}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "rag", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    svc = Service(url=f"http://127.0.0.1:{port}", proc=proc)
    try:
        wait_ready(svc.url, proc)
    except BaseException:
        svc.stop()
        raise
    return svc


@contextmanager
def running_service(url: str | None, data_dir: Path, port: int, env_overrides: dict[str, str]) -> Iterator[Service]:
    """The service at ``url`` when one is given, else one started for the block (and stopped after it)."""
    svc = Service(url=url) if url else start_service(data_dir, port, env_overrides)
    try:
        yield svc
    finally:
        svc.stop()


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    """Until ``GET /readyz`` answers 200; exits when the process dies or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: the service did not become ready")


_API_KEY = {"key": ""}  # set once by the entry point (python -m eval) from RAG_API_KEY


def use_api_key(key: str) -> None:
    """Present ``key`` as a Bearer token on every request to a running service (RAG_API_KEY, read at the entry point)."""
    _API_KEY["key"] = key


def service_headers(tenant: str | None = None) -> dict[str, str]:
    """The headers of a request to the service: the key when one is set, the tenant when named (``X-Tenant``)."""
    headers = {"Authorization": f"Bearer {_API_KEY['key']}"} if _API_KEY["key"] else {}
    if tenant:
        headers["X-Tenant"] = tenant
    return headers


def upload_corpus(url: str, dataset: Path, tenant: str) -> str:
    """Upload ``dataset/corpus.jsonl`` through the API (a no-op for documents it already holds); the summary."""
    from ingest.cli import add_via_api

    summary = add_via_api(url, [dataset / "corpus.jsonl"], tenant=tenant, headers=service_headers())
    return "\n".join(summary.lines())


async def ask_all(url: str, examples: Sequence[QAExample], *, tenant: str, concurrency: int = 2, top_k: int = 8,
                  on_result: Callable[[QAExample, dict[str, Any]], None] | None = None,
                  timeout_s: float = 180) -> list[tuple[QAExample, dict[str, Any]]]:
    """POST /v1/answer for each question; ``on_result(example, response)`` as each one lands."""
    queue = list(enumerate(examples))
    results: dict[int, tuple[QAExample, dict[str, Any]]] = {}
    it = iter(queue)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=service_headers(tenant)) as client:
        async def worker() -> None:
            for i, ex in it:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/answer", json={"question": ex.question, "top_k": top_k})
                    body = r.json() if r.status_code == 200 else {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
                except httpx.HTTPError as exc:
                    body = {"error": f"{type(exc).__name__}: {exc}"}
                body["_client_ms"] = round((time.perf_counter() - t0) * 1000, 2)
                results[i] = (ex, body)
                if on_result is not None:
                    on_result(ex, body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [results[i] for i in sorted(results)]
