"""Liveness and readiness, for load balancers and orchestrators (no credentials needed)."""

from __future__ import annotations

from litestar import Request, Response, get

from rag.api.deps import access
from rag.api.errors import error_response


@get("/healthz", summary="Liveness", **access(None))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: models loaded, store open, worker alive", **access(None))
async def readyz(request: Request) -> Response[dict]:
    svc = getattr(request.app.state, "services", None)
    if svc is None or not svc.ready:
        return error_response(503, "not_ready", "service is starting")
    if svc.settings.worker_in_process and svc.worker_alive is not None and not svc.worker_alive():
        return error_response(503, "worker_not_alive",
                              f"the ingest worker is not running or has shown no sign of life for "
                              f"{svc.settings.worker_stale_s:g} s (RAG_WORKER_STALE_S)")
    return Response({"status": "ready", "encoder_version": svc.embedder.version, "collection": svc.collection,
                     "store": "embedded" if svc.settings.embedded else "server",
                     "worker": "in-process" if svc.settings.worker_in_process else "external"})


ROUTES = [healthz, readyz]
