"""The Litestar application: ``create_app(settings, services=None, background=())``.

Routes live in one module per resource (documents, jobs, search, answers, encoders, keys, quotas, datasets,
admin, health);
handlers receive the services and the tenant by dependency injection (``rag.api.deps``); resources
are built and started by the core (``rag.services.running``), never here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from rag.api import admin, answers, datasets, documents, encoders, feedback, health, jobs, keys, quotas, search
from rag.api.deps import DEPENDENCIES, authorize, declared_scope, undeclared
from rag.api.errors import EXCEPTION_HANDLERS
from rag.api.middleware import RequestContextMiddleware, reject_deep_json
from rag.api.openapi import add_links, describe_dataset_upload, describe_upload, mark_public
from rag.services import Background, Services, running
from rag.settings import Settings

__all__ = ["create_app"]

ROUTES = [*documents.ROUTES, *jobs.ROUTES, *search.ROUTES, *answers.ROUTES, *encoders.ROUTES, *keys.ROUTES, *quotas.ROUTES,
          *datasets.ROUTES, *feedback.ROUTES, *admin.ROUTES, *health.ROUTES]


def create_app(settings: Settings, services: Services | None = None, background: tuple[Background, ...] = ()) -> Litestar:
    """Build the app. ``services`` lets tests share models; ``background`` runs beside the API (the worker)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with running(settings, services, background) as svc:
            app.state.services = svc
            yield

    missing = undeclared(ROUTES)
    if missing:  # a route that does not say who may call it does not exist (ARCHITECTURE.md, "Tenancy")
        raise RuntimeError(f"routes without a declared scope: {', '.join(missing)}")
    cors = CORSConfig(allow_origins=settings.cors_origins, allow_headers=["Authorization", "Content-Type",
                      "X-Tenant", "X-Request-ID"]) if settings.cors_origins else None
    app = Litestar(
        route_handlers=ROUTES,
        dependencies=DEPENDENCIES,
        guards=[authorize],
        cors_config=cors,
        lifespan=[lifespan],
        middleware=[RequestContextMiddleware()],
        before_request=reject_deep_json,
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(
            title="rag", version="0.1.0", path="/docs", render_plugins=[SwaggerRenderPlugin()],
            components=Components(security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer")}),
            security=[{"bearer": []}],
        ),
        request_max_body_size=settings.max_upload_bytes * 2 + 1_000_000,
        debug=False,
    )
    # Generated once and cached: the served document carries these additions.
    public = [(path, method.lower()) for h in ROUTES if declared_scope(h) is None
              for path in h.paths for method in h.http_methods]
    add_links(describe_dataset_upload(describe_upload(mark_public(app.openapi_schema, public))))
    return app
