"""Several worker processes on one PostgreSQL registry (issue 14): exactly-once claiming, lease takeover after a
SIGKILL, and LISTEN/NOTIFY waking an idle worker.

The workers are real processes (tests/registry_worker.py) that use only the registry: two ``IngestWorker``s in
separate processes would need a store both can reach, and qdrant-client's ``:memory:`` is per process.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from rag.registry import JobItem
from rag.registry_pg import CHANNEL, PostgresRegistry

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4
JOBS = 200


class Worker:
    """A tests/registry_worker.py process whose output lines are collected by a thread."""

    def __init__(self, log: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.registry_worker", *args], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: list[tuple[float, list[str]]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.split()))

    def events(self, kind: str) -> list[list[str]]:
        return [words[1:] for _, words in self.lines if words and words[0] == kind]

    def wait_for(self, kind: str, n: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(kind)) < n:
            if self.proc.poll() is not None:
                pytest.fail(f"worker exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {n} × {kind!r} within {timeout}s: {self.lines[-5:]}")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("a worker did not stop")
        self._reader.join(5)


@pytest.fixture
def registry(postgres_url: str):
    handle = PostgresRegistry(postgres_url)
    yield handle
    handle.close()


def _wake(url: str) -> None:
    """NOTIFY the idle workers (to see their stop file) without giving them a job."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"NOTIFY {CHANNEL}")


def _drained(registry: PostgresRegistry, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while registry.queued_count():
        if time.monotonic() > deadline:
            pytest.fail(f"{registry.queued_count()} jobs still pending after {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_every_job_is_claimed_and_finished_exactly_once_by_concurrent_processes(registry, postgres_url, tmp_path):
    stop = tmp_path / "stop"
    workers = [Worker(tmp_path / f"w{n}.log", "loop", postgres_url, str(stop), "--poll", "5") for n in range(WORKERS)]
    try:
        for w in workers:
            w.wait_for("ready")
        started = time.monotonic()
        # Created while the workers idle in wait_for_job (poll 5 s): only NOTIFY wakes them this early.
        jobs = {registry.create_job(f"t{n % 5}", [JobItem(filename="f.txt", path=f"/nonexistent/{n}",
                                                          document_id=f"d{n}")]).id for n in range(JOBS)}
        _drained(registry, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        stop.touch()
        _wake(postgres_url)
        for w in workers:
            w.stop()
    claimed = collections.Counter(job_id for w in workers for job_id, _ in w.events("claimed"))
    finished = collections.Counter(job_id for w in workers for (job_id,) in w.events("finished"))
    assert set(claimed) == set(finished) == jobs
    assert max(claimed.values()) == max(finished.values()) == 1  # exactly once
    assert all(n > 0 for n in (len(w.events("claimed")) for w in workers)), "a worker never claimed a job"
    done = [registry.get_job(j) for j in jobs]
    assert all(j.status == "succeeded" and j.attempts == 1 and j.done == 1 for j in done)
    print(f"{WORKERS} processes x {JOBS} jobs: {elapsed:.2f}s; per worker "
          f"{[len(w.events('claimed')) for w in workers]}")


@pytest.mark.slow
def test_a_killed_workers_job_is_taken_over_after_its_lease_and_finished(registry, postgres_url, tmp_path):
    lease_s = 1.0
    holder = Worker(tmp_path / "holder.log", "hold", postgres_url, "--lease", str(lease_s))
    holder.wait_for("ready")
    job = registry.create_job("t1", [JobItem(filename="f.txt", path="/nonexistent/f", document_id="d1")])
    holder.wait_for("claimed")
    stop = tmp_path / "stop"
    taker = Worker(tmp_path / "taker.log", "loop", postgres_url, str(stop), "--poll", "0.1", "--lease", "30")
    try:
        taker.wait_for("ready")
        time.sleep(3 * lease_s)  # the holder renews: its lease never runs out while it lives
        assert taker.events("claimed") == [] and registry.get_job(job.id).attempts == 1
        holder.proc.send_signal(signal.SIGKILL)
        holder.proc.wait(10)
        killed = time.monotonic()
        taker.wait_for("finished", timeout=30)
        took_over = next(t for t, words in taker.lines if words[:1] == ["claimed"])
    finally:
        stop.touch()
        if holder.proc.poll() is None:
            holder.proc.kill()
        taker.stop()
        holder.stop()
    print(f"lease {lease_s}s: taken over {took_over - killed:.2f}s after the SIGKILL")
    assert taker.events("claimed") == [[job.id, "2"]]
    assert took_over - killed <= lease_s + 2.0  # the lease ran out, and the next poll took the job
    final = registry.get_job(job.id)
    assert (final.status, final.attempts, final.done) == ("succeeded", 2, 1)


def test_notify_wakes_an_idle_worker_in_another_process_before_its_poll(registry, postgres_url, tmp_path):
    stop = tmp_path / "stop"
    worker = Worker(tmp_path / "worker.log", "loop", postgres_url, str(stop), "--poll", "60")
    try:
        worker.wait_for("ready")
        time.sleep(0.3)  # idle in wait_for_job now
        created = time.monotonic()
        job = registry.create_job("t1", [JobItem(filename="f.txt", path="/nonexistent/f", document_id="d1")])
        worker.wait_for("claimed", timeout=30)
        woke = next(t for t, words in worker.lines if words[:1] == ["claimed"])
    finally:
        stop.touch()
        _wake(postgres_url)
        worker.stop()
    print(f"claimed {woke - created:.3f}s after create_job (poll 60 s)")
    assert worker.events("claimed")[0] == [job.id, "1"]
    assert woke - created < 5.0  # well before its 60 s poll
