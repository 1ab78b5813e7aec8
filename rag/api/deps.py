"""What handlers receive by dependency injection (``svc``, ``tenant``), and the request checks that
several routes share (query and top_k bounds, filters) so that each has one home."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.di import Provide
from litestar.params import Parameter

from rag.errors import BadRequest
from rag.services import Services
from rag.settings import Settings
from rag.store import parse_filter

__all__ = ["DEPENDENCIES", "Caller", "check_query", "provide_caller", "provide_services", "shown"]

TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def provide_services(request: Request) -> Services:
    return request.app.state.services


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: today the tenant named by ``X-Tenant``.

    Handlers receive it as ``caller`` (not ``tenant``): Litestar reports a body field that shares a
    dependency's name as a server error, and request bodies do have ``tenant`` fields.
    """

    tenant: str


def provide_caller(
    request: Request,
    x_tenant: str | None = Parameter(header="X-Tenant", default=None, required=False,
                                     description="The tenant (1-64 of [A-Za-z0-9_-]); default `default`"),
) -> Caller:
    """The request's tenant, from ``X-Tenant``; sent twice (or joined by a proxy) is refused, not guessed."""
    values = [v.decode("latin-1") for k, v in request.scope["headers"] if k.lower() == b"x-tenant"]
    if len(values) > 1 or any("," in v for v in values):
        raise BadRequest("X-Tenant was sent more than once", code="duplicate_tenant_header")
    tenant = values[0] if values else "default"
    if not TENANT_RE.match(tenant):
        raise BadRequest("X-Tenant must be 1-64 characters of [A-Za-z0-9_-]", code="invalid_tenant")
    return Caller(tenant=tenant)


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
