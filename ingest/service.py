"""Compose the API with the ingest worker, for the embedded mode where one process owns the store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from litestar import Litestar

from ingest.worker import IngestWorker
from rag.api.app import Services, create_app
from rag.settings import Settings

log = structlog.get_logger("ingest.service")


@contextmanager
def worker_beside_api(services: Services) -> Iterator[IngestWorker]:
    """Run the worker thread for the app's lifetime; jobs a killed process left running are requeued first."""
    worker = IngestWorker(services.settings, services.registry, services.store, services.embedder)
    requeued = services.registry.requeue_running()
    if requeued:
        log.warning("jobs_requeued_after_restart", jobs=requeued)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def build_service(settings: Settings, services: Services | None = None) -> Litestar:
    """The app, with the worker inside it when settings say so (embedded store, or RAG_RUN_WORKER=yes)."""
    background = (worker_beside_api,) if settings.worker_in_process else ()
    return create_app(settings, services=services, background=background)
