"""What runs around every request: a request id on every log line, and the JSON depth guard."""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from litestar import Request
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from rag.errors import BadRequest
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.tracing import trace_id_of
from rag.settings import Settings

log = structlog.get_logger("rag.api")


class RequestContextMiddleware(ASGIMiddleware):
    """Binds a request id to every log line of the request and returns it as ``X-Request-ID``."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["type"] != "http":
            await next_app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        svc = getattr(getattr(scope.get("app"), "state", None), "services", None)
        tracing = getattr(svc, "tracing", None)
        if tracing is None or not tracing.enabled:
            await self._handle(scope, receive, send, next_app, headers, None)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items() if k in (b"traceparent", b"tracestate")}
        route = scope.get("path_template") or "unmatched"
        with tracing.root(f"{scope['method']} {route}", carrier, **{"http.method": scope["method"], "http.route": route}) as s:
            await self._handle(scope, receive, send, next_app, headers, s)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp, headers: dict, s: Any) -> None:
        # With tracing on, the request id is the trace id: a log line leads to its trace and back.
        request_id = trace_id_of(s) or headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await next_app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            log.info("request", method=scope["method"], path=scope["path"], status=status, ms=round(seconds * 1000, 2))
            structlog.contextvars.unbind_contextvars("request_id")
            _count(scope, status, seconds)
            if s is not None:
                s.set_attribute("http.status_code", status)


def _count(scope: Scope, status: int, seconds: float) -> None:
    """The request in the process's metrics, by route template (bounded), never by raw path."""
    app = scope.get("app")
    svc = getattr(getattr(app, "state", None), "services", None)
    metrics = getattr(svc, "metrics", None)
    if metrics is None:
        return
    route = scope.get("path_template") or "unmatched"
    metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()
    metrics.request_seconds.labels(route=route, method=scope["method"]).observe(seconds)


async def reject_deep_json(request: Request) -> None:
    """Before any handler decodes a JSON body: refuse nesting deep enough to exhaust the parser's recursion."""
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return
    if "json" not in request.headers.get("content-type", "").lower():
        return
    svc = getattr(request.app.state, "services", None)
    limit = svc.settings.max_json_depth if svc is not None else Settings().max_json_depth
    try:
        check_json_depth(await request.body(), limit)
    except JsonTooDeep as exc:
        raise BadRequest(f"body: {exc} (RAG_MAX_JSON_DEPTH)", code="json_too_deep") from exc
