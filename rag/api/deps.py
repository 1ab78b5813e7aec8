"""Who may call what, and what handlers receive by dependency injection (``svc``, ``caller``), and the
request checks that several routes share (query and top_k bounds, filters) so that each has one home.

Every route declares the scope it needs in ``opt={"scope": ...}`` (``None``: public); ``authorize`` (an
app-wide guard) authenticates the request and checks that scope before the handler runs, and
``create_app`` refuses a route that declares nothing.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import structlog
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Parameter

from rag.api.errors import error_responses
from rag.auth import Caller, authenticate, key_id_of
from rag.errors import BadRequest, Forbidden, RagError, TooManyRequests
from rag.services import Services
from rag.settings import Settings
from rag.store import parse_filter

__all__ = ["DEPENDENCIES", "Caller", "authorize", "check_query", "provide_caller", "provide_services", "access",
           "shown"]

log = structlog.get_logger("rag.audit")
SCOPE = "scope"
_UNDECLARED = object()


def access(needs: str | None, *statuses: int) -> dict[str, Any]:
    """A route decorator's ``opt`` and ``responses``: the scope it needs (``None``: public, no credentials)
    and the error statuses it can return (401/403 added for every protected route)."""
    extra = (401, 403, 429) if needs is not None else ()
    return {"opt": {SCOPE: needs}, "responses": error_responses(*statuses, *extra)}


def declared_scope(handler: BaseRouteHandler) -> object:
    return handler.opt.get(SCOPE, _UNDECLARED)


def undeclared(handlers: list[BaseRouteHandler]) -> list[str]:
    """Handlers that say nothing about who may call them (a route like that must not exist)."""
    return [getattr(h, "handler_name", repr(h)) for h in handlers if declared_scope(h) is _UNDECLARED]


def _x_tenant(connection: ASGIConnection) -> str | None:
    # Repeated headers arrive either as several raw headers or joined with "," by a proxy or client: refuse both.
    values = [v.decode("latin-1") for k, v in connection.scope["headers"] if k.lower() == b"x-tenant"]
    if len(values) > 1 or any("," in v for v in values):
        raise BadRequest("X-Tenant was sent more than once", code="duplicate_tenant_header")
    return values[0] if values else None


async def authorize(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """The app-wide guard: authenticate, check the route's scope, and keep the caller for the handler."""
    needed = declared_scope(handler)
    # Our own routes all declare a scope (create_app refuses one that does not); what remains undeclared is
    # Litestar's OpenAPI document and viewer, which are public.
    if needed is None or needed is _UNDECLARED:
        return
    svc: Services = connection.app.state.services
    x_tenant = _x_tenant(connection)
    authorization = connection.headers.get("authorization")
    try:
        if svc.settings.auth_mode == "open":
            caller = authenticate(svc.registry, authorization, x_tenant, svc.settings)
        else:
            caller = await anyio.to_thread.run_sync(authenticate, svc.registry, authorization, x_tenant, svc.settings)
        if not caller.allows(str(needed)):
            raise Forbidden(f"this route needs the {needed} scope; the key has {', '.join(sorted(caller.scopes))}")
        await _rate_limit(svc, caller)
    except RagError as exc:
        if exc.status_code in (401, 403):
            log.warning("audit", action="request_denied", outcome=exc.code, route=connection.scope["path"],
                        method=connection.scope.get("method"), key_id=key_id_of(authorization), tenant=x_tenant,
                        reason=exc.message)
        raise
    connection.state.caller = caller


async def _rate_limit(svc: Services, caller: Caller) -> None:
    """Per key, a token bucket kept in the registry (so every API process draws from the same one)."""
    settings = svc.settings
    if caller.key_id is None or not settings.rate_limit_per_s:
        return  # open mode is a single user on loopback; keys are what a limit applies to
    wait = await anyio.to_thread.run_sync(svc.registry.take_token, f"key:{caller.key_id}",
                                          settings.rate_limit_per_s, settings.rate_limit_burst)
    if wait:
        raise TooManyRequests(f"API key {caller.key_id} is over its rate limit of {settings.rate_limit_per_s:g} "
                              f"requests/s with a burst of {settings.rate_limit_burst} (RAG_RATE_LIMIT_PER_S, "
                              "RAG_RATE_LIMIT_BURST)", retry_after_s=wait, code="rate_limited")


def provide_services(request: Request) -> Services:
    return request.app.state.services


def provide_caller(
    request: Request,
    x_tenant: str | None = Parameter(header="X-Tenant", default=None, required=False,
                                     description="An operator acting for a tenant names it here (1-64 of "
                                                 "[A-Za-z0-9_-]); other keys act for their own tenant"),
) -> Caller:
    """The caller the guard authenticated (``X-Tenant`` is declared here so the OpenAPI document shows it)."""
    return request.state.caller


DEPENDENCIES = {
    "svc": Provide(provide_services, sync_to_thread=False),
    "caller": Provide(provide_caller, sync_to_thread=False),
}


def check_query(settings: Settings, text: str, top_k: int, filter: dict[str, Any] | None, *,
                what: str = "query") -> str:
    """The bounds every retrieval request shares; returns the stripped text.

    Runs before any work, and before a stream starts: once a 200 and the first event have gone out, a
    bad filter could only end the stream, not become a 400.
    """
    stripped = text.strip()
    if not stripped:
        raise BadRequest(f"{what} must not be empty", code=f"empty_{what}")
    if len(text) > settings.max_query_chars:
        raise BadRequest(f"{what} is {len(text)} characters; the limit is {settings.max_query_chars} "
                         "(RAG_MAX_QUERY_CHARS)", code="query_too_long")
    if not 1 <= top_k <= settings.max_top_k:
        raise BadRequest(f"top_k must be between 1 and {settings.max_top_k}", code="invalid_top_k")
    parse_filter(filter)
    return stripped


def shown(value: str, limit: int = 64) -> str:
    """A caller's string, quoted and cut short, for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")
