"""The ingest worker run beside the API in one process (the embedded mode, where one process owns the store),
under a supervisor that restarts a worker thread that died."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from ingest.worker import IngestWorker
from rag.services import Services

log = structlog.get_logger("ingest.supervisor")

# How often the supervisor looks at the worker thread.
CHECK_EVERY_S = 0.25
# A dead worker is restarted after this long, doubled for each death that follows soon after a
# restart (up to the maximum), so that a crash loop does not spin.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0


class WorkerSupervisor:
    """Keeps one ingest worker thread running beside the API: a thread that died is replaced.

    A worker that is alive but silent (no heartbeat for ``worker_stale_s``) cannot be stopped from
    outside; ``alive()`` reports it so that ``/readyz`` turns 503 and an orchestrator can act.
    """

    def __init__(self, services: Services, *, background: bool | None = None) -> None:
        self.services = services
        self.settings = services.settings
        # The worker's heavy compute in a low-priority child process (ingest/background.py); None:
        # RAG_BACKGROUND_PROCESS as for a worker of its own process (the entry point decides for one beside the API).
        self.background = background
        self.worker = self._new_worker(services.embedder)
        self.restarts = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = RESTART_BACKOFF_S

    def _new_worker(self, embedder) -> IngestWorker:
        s = self.services
        return IngestWorker(s.settings, s.registry, s.store, embedder, encoders=s.pool(), metrics=s.metrics,
                            tracing=s.tracing, background=self.background)

    def alive(self) -> bool:
        """The worker thread runs and has beaten its heartbeat within ``worker_stale_s``."""
        return self.worker.alive(self.settings.worker_stale_s)

    def start(self) -> None:
        self.worker.start()
        self._thread = threading.Thread(target=self._watch, name="ingest-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self.worker.stop()

    def _watch(self) -> None:
        dead_since: float | None = None
        stale_logged = False
        started_at = time.monotonic()
        while not self._stop.wait(CHECK_EVERY_S):
            worker = self.worker
            thread = worker.thread
            try:
                if thread is not None and thread.is_alive():
                    dead_since = None
                    stale = not worker.alive(self.settings.worker_stale_s)
                    if stale and not stale_logged:
                        log.error("worker_stale", job_id=worker.current_job,
                                  silent_s=round(time.monotonic() - worker.heartbeat, 1))
                    stale_logged = stale
                    if time.monotonic() - started_at > RESTART_BACKOFF_MAX_S:
                        self._backoff = RESTART_BACKOFF_S  # it stayed up: the next death is not a loop
                    continue
                if worker.stopping:
                    continue
                now = time.monotonic()
                if dead_since is None:
                    dead_since = now
                    log.error("worker_dead", job_id=worker.current_job, restart_in_s=self._backoff)
                if now - dead_since < self._backoff:
                    continue
                dead_since = now  # a failed restart waits its backoff again
                self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX_S)
                self._restart(worker)
                dead_since, stale_logged, started_at = None, False, time.monotonic()
            except Exception:  # noqa: BLE001 - the supervisor outlives whatever it watches
                log.exception("worker_supervisor_error")

    def _restart(self, old: IngestWorker) -> None:
        # The job the dead thread held goes back to the queue; claim_job's attempts limit stops a
        # job that kills its worker every time.
        held = old.current_job
        if held is not None:
            self.services.registry.requeue_job(held, "the worker stopped during the job")
            old.current_job = None
        old.compute.close()  # its background process, if any, may be mid-request: the new worker starts its own
        worker = self._new_worker(old.embedder)  # the encoder it last wrote with (after a promotion)
        worker.start()
        self.worker = worker
        self.restarts += 1
        log.error("worker_restarted", restarts=self.restarts, requeued_job=held)


@contextmanager
def worker_beside_api(services: Services, *, background: bool | None = None) -> Iterator[WorkerSupervisor]:
    """Run the worker thread (supervised) for the app's lifetime; jobs a killed process left running are requeued first.
    ``background``: its heavy compute in a low-priority child process (``python -m rag serve`` passes
    ``RAG_BACKGROUND_PROCESS``'s answer for a worker beside the API; None: ``yes`` only)."""
    supervisor = WorkerSupervisor(services, background=background)
    # With an embedded store this is the only worker, so a job left running was a killed process's. A shared
    # registry (PostgreSQL) beside a Qdrant server may have other workers' jobs running: their leases say when
    # one died, and claim_job takes it over then.
    if services.settings.embedded or not services.settings.database_url:
        requeued = services.registry.requeue_running()
        if requeued:
            log.warning("jobs_requeued_after_restart", jobs=requeued)
    supervisor.start()
    services.worker_alive = supervisor.alive
    try:
        yield supervisor
    finally:
        services.worker_alive = None
        supervisor.stop()
