"""Quota routes: a tenant admin reads its quotas and usage; an operator sets one tenant's quotas."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import structlog
from litestar import get, put
from litestar.params import Parameter

from rag.api.deps import access
from rag.auth import TENANT_PATTERN, Caller
from rag.errors import Forbidden
from rag.quotas import quota_report
from rag.services import Services

log = structlog.get_logger("rag.audit")

Limit = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
ByteLimit = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class QuotasIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Quotas to set for the tenant (0: none); quotas not named keep their current value."""

    documents: Limit | None = None
    chunks: Limit | None = None
    stored_bytes: ByteLimit | None = None  # UTF-8 bytes of the tenant's chunks' text
    concurrent_jobs: Limit | None = None
    llm_tokens_per_minute: Limit | None = None
    llm_tokens_per_day: Limit | None = None
    datasets: Limit | None = None


@get("/v1/quotas", sync_to_thread=True, summary="The tenant's quotas and what it uses now", **access("admin"))
def get_quotas(
    svc: Services,
    caller: Caller,
    tenant: str | None = Parameter(query="tenant", default=None, required=False, max_length=64,
                                   pattern=TENANT_PATTERN, description="operator only: another tenant"),
) -> dict[str, Any]:
    if tenant is not None and tenant != caller.tenant and not caller.is_operator:
        raise Forbidden("only an operator key may read another tenant's quotas")
    return quota_report(svc.registry, svc.settings, tenant or caller.tenant)


@put("/v1/quotas/{tenant:str}", sync_to_thread=True, summary="Set a tenant's quotas (operator)",
     **access("operator", 415))
def set_quotas(data: QuotasIn, svc: Services, caller: Caller, tenant: str) -> dict[str, Any]:
    limits = {**svc.registry.get_quotas(tenant), **{k: v for k, v in msgspec.structs.asdict(data).items() if v is not None}}
    svc.registry.set_quotas(tenant, limits)
    log.info("audit", action="quotas_set", tenant=tenant, quotas=limits, by_key_id=caller.key_id, outcome="ok")
    return quota_report(svc.registry, svc.settings, tenant)


ROUTES = [get_quotas, set_quotas]
