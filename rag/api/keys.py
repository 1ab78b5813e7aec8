"""API key routes: a tenant admin manages its own tenant's keys; an operator manages every tenant's."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
import structlog
from litestar import delete, get, post
from litestar.params import Parameter

from rag.api.deps import access
from rag.auth import TENANT_PATTERN, Caller, Scope, new_key
from rag.errors import Forbidden, NotFound
from rag.services import Services

log = structlog.get_logger("rag.audit")

TenantName = Annotated[str, msgspec.Meta(pattern=TENANT_PATTERN)]


class KeyIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    scopes: Annotated[list[str], msgspec.Meta(min_length=1, max_length=4)]
    tenant: TenantName | None = None  # default: the caller's tenant; another one needs an operator key
    name: Annotated[str, msgspec.Meta(max_length=200)] = ""
    expires_in_s: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86400)] | None = None


def _may_manage(caller: Caller, tenant: str) -> bool:
    return caller.is_operator or tenant == caller.tenant


@post("/v1/keys", sync_to_thread=True, status_code=201, summary="Create an API key (its secret is shown once)",
      **access("admin", 415))
def create_key(data: KeyIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = data.tenant or caller.tenant
    if not _may_manage(caller, tenant):
        raise Forbidden("only an operator key may create keys for another tenant")
    if Scope.OPERATOR in data.scopes and not caller.is_operator:
        raise Forbidden("only an operator key may create an operator key")
    expires_at = time.time() + data.expires_in_s if data.expires_in_s else None
    record, secret = new_key(tenant, data.scopes, name=data.name, expires_at=expires_at)
    svc.registry.create_key(record)
    log.info("audit", action="key_created", key_id=record.key_id, tenant=tenant, scopes=record.scopes,
             by_key_id=caller.key_id, outcome="ok")
    return {**record.public(), "secret": secret}


@get("/v1/keys", sync_to_thread=True, summary="The tenant's API keys (never their secrets)", **access("admin"))
def list_keys(
    svc: Services,
    caller: Caller,
    tenant: str | None = Parameter(query="tenant", default=None, required=False, max_length=64,
                                   description="operator only: one tenant's keys (default: every tenant's)"),
) -> dict[str, Any]:
    if tenant is not None and not _may_manage(caller, tenant):
        raise Forbidden("only an operator key may list another tenant's keys")
    scope_tenant = tenant if caller.is_operator else caller.tenant
    return {"keys": [k.public() for k in svc.registry.list_keys(scope_tenant)]}


@delete("/v1/keys/{key_id:str}", sync_to_thread=True, status_code=200,
        summary="Revoke an API key (effective at once, on every API process)", **access("admin", 404))
def revoke_key(svc: Services, caller: Caller, key_id: str) -> dict[str, Any]:
    key = svc.registry.get_key(key_id)
    # Another tenant's key is reported as missing: its existence is not the caller's to learn.
    if key is None or not _may_manage(caller, key.tenant):
        raise NotFound(f"no key {key_id}")
    revoked = svc.registry.revoke_key(key_id)
    log.info("audit", action="key_revoked", key_id=key_id, tenant=key.tenant, by_key_id=caller.key_id,
             outcome="ok" if revoked else "already_revoked")
    return {"revoked": key_id}


ROUTES = [create_key, list_keys, revoke_key]
