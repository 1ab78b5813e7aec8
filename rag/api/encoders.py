"""Encoder endpoints: each tenant's encoder, and adaptation, promotion, rollback and prune jobs for the worker.

Encoders belong to their tenant: a tenant admin adapts, promotes, rolls back and prunes for its own
tenant only; an operator does the same for the default encoder (every tenant without its own) with
``all_tenants``. A version trained on one tenant's documents is invisible to every other tenant.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
import msgspec
import structlog
from litestar import get, post

from rag.api.deps import access
from rag.encoders import AdaptOptions, EncoderRecord, EncoderRegistry, check_options, describe, version_of_collection
from rag.errors import BadRequest, Forbidden, NotFound
from rag.registry import JobKind
from rag.auth import Caller
from rag.services import Services

JOB_TENANT = "_encoders"  # the tenant of jobs that switch the default encoder (operator only)
audit = structlog.get_logger("rag.audit")


# An encoder version names a folder and a collection: bounded, and only characters safe in both.
Version = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
DatasetId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class AdaptIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An adaptation for the caller's tenant (``all_tenants``: the default encoder, operator only).

    Labelled pairs and validation sets are the tenant's uploaded datasets (``POST /v1/datasets``), by id;
    no field names a path on the server. With ``pairs_dataset`` and no ``epochs``, cross-validation on
    the labelled pairs chooses the epochs (RAG_ADAPT_CV_FOLDS folds over ``epoch_grid``).
    """

    pairs_dataset: DatasetId | None = None
    validation_dataset: DatasetId | None = None
    unsupervised: bool = True
    synthetic_questions: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    epochs: int | None = None
    cv_folds: int | None = None
    epoch_grid: Annotated[list[int], msgspec.Meta(min_length=1, max_length=10)] = msgspec.field(
        default_factory=lambda: [1, 2, 3, 4])
    max_pairs: Annotated[int, msgspec.Meta(ge=10, le=1_000_000)] | None = None
    max_seq_length: Annotated[int, msgspec.Meta(ge=16, le=512)] | None = None
    promote: bool | None = None
    force: bool = False
    all_tenants: bool = False


class PruneIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # versions whose collections stay besides the serving one and its parent
    keep: Annotated[list[Version], msgspec.Meta(max_length=100)] = msgspec.field(default_factory=list)
    all_tenants: bool = False


class SwitchIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: Version | None = None
    force: bool = False
    all_tenants: bool = False


def _registry(svc: Services) -> EncoderRegistry:
    return EncoderRegistry(svc.settings.encoders_dir)


def _visible(record: EncoderRecord, tenant: str) -> bool:
    """Shared versions (base encoders, operator adaptations) and the tenant's own; another tenant's do not exist."""
    return record.tenant is None or record.tenant == tenant


def _require_visible(svc: Services, version: str, tenant: str) -> EncoderRecord:
    rec = _registry(svc).get(version)
    if rec is None or not _visible(rec, tenant):
        raise NotFound(f"encoder version {version!r} is not in the registry")
    return rec


def _for(caller: Caller, all_tenants: bool) -> str | None:
    """The tenant a switch acts for: the caller's, or None (the default) for an operator asking for all tenants."""
    if not all_tenants:
        return caller.tenant
    if not caller.is_operator:
        raise Forbidden("all_tenants switches the default encoder of every tenant: it needs the operator scope",
                        code="insufficient_scope")
    return None


@get("/v1/encoders", summary="The tenant's encoder, the default, the versions it may use, and its encoder jobs", **access("read"))
async def list_encoders(svc: Services, caller: Caller) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        own = svc.registry.get_tenant_encoder(caller.tenant)
        default = version_of_collection(svc.store.get_active())
        serving = own or default
        records = [r for r in _registry(svc).list() if _visible(r, caller.tenant)]
        tenants = {caller.tenant, JOB_TENANT} if caller.is_operator else {caller.tenant}
        jobs = [j for j in svc.registry.list_jobs(limit=200) if j.kind != JobKind.INGEST and j.tenant in tenants][:20]
        drift = svc.drift.get(serving) if serving else None
        out: dict[str, Any] = {
            "tenant": caller.tenant, "active": serving, "own": own, "default": default,
            "drift": drift.to_dict() if drift is not None else None,
            "proposal": svc.proposals.get(caller.tenant),
            "encoders": [describe(r, serving) for r in records],
            "jobs": [{"id": j.id, "kind": str(j.kind), "status": j.status, "stage": j.stage, "error": j.error,
                      "created_at": j.created_at} for j in jobs],
        }
        if caller.is_operator:
            out["loaded"] = svc.pool().loaded()
            out["tenant_encoders"] = svc.registry.tenant_encoders()
        return out

    return await anyio.to_thread.run_sync(read)


async def _queue(svc: Services, caller: Caller, kind: JobKind, tenant: str | None,
                 params: dict[str, Any]) -> dict[str, Any]:
    job = await anyio.to_thread.run_sync(lambda: svc.registry.create_job(
        JOB_TENANT if tenant is None else tenant, [], kind=kind, params={**params, "tenant": tenant}))
    audit.info("audit", action=f"encoder_{kind}", key_id=caller.key_id, tenant=caller.tenant,
               for_tenant=tenant or "all", job_id=job.id, outcome="queued")
    return {"job_id": job.id, "kind": str(kind), "status": job.status, "status_url": f"/v1/jobs/{job.id}",
            "tenant": tenant or "all"}


@post("/v1/encoders/adapt", status_code=202, summary="Queue an adaptation for the tenant: pairs → fine-tune → gate (→ promote)", **access("admin", 403, 404, 415))
async def adapt_encoder(data: AdaptIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = _for(caller, data.all_tenants)
    fields = {f: getattr(data, f) for f in data.__struct_fields__ if f != "all_tenants"}
    options = AdaptOptions(**fields, tenant=tenant)
    check_options(options)
    for field in ("pairs_dataset", "validation_dataset"):
        dataset = getattr(options, field)
        if dataset is None:
            continue
        if dataset == "feedback":  # the tenant's feedback dataset (POST /v1/feedback), whatever its id
            found = await anyio.to_thread.run_sync(lambda: next(
                (d for d in svc.registry.list_datasets(caller.tenant) if d.format == "feedback"), None))
        else:
            found = await anyio.to_thread.run_sync(lambda d=dataset: svc.registry.get_dataset(caller.tenant, d))
        if found is None:
            raise NotFound(f"dataset {dataset!r} not found")
        options = msgspec.structs.replace(options, **{field: found.id})
    params = msgspec.to_builtins(options)
    params["dataset_tenant"] = caller.tenant  # whose datasets the ids name (the caller's, also for all tenants)
    return await _queue(svc, caller, JobKind.ADAPT, tenant, params)


@post("/v1/encoders/promote", status_code=202, summary="Queue a promotion for the tenant: re-embed its chunks into the version's collection, then switch", **access("admin", 403, 404, 415))
async def promote_encoder(data: SwitchIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = _for(caller, data.all_tenants)
    if not data.version:
        raise BadRequest("version is required")
    rec = await anyio.to_thread.run_sync(lambda: _require_visible(svc, data.version, caller.tenant))
    if tenant is None and rec.tenant is not None:
        raise BadRequest(f"encoder {rec.version} was trained on one tenant's documents; it cannot become the "
                         "default for every tenant")
    return await _queue(svc, caller, JobKind.PROMOTE, tenant, {"version": data.version, "force": data.force})


@post("/v1/encoders/rollback", status_code=202, summary="Queue a rollback of the tenant's encoder to its parent (or a named version)", **access("admin", 403, 404, 415))
async def rollback_encoder(data: SwitchIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = _for(caller, data.all_tenants)
    if data.version:
        await anyio.to_thread.run_sync(lambda: _require_visible(svc, data.version, caller.tenant))
    elif tenant is not None and await anyio.to_thread.run_sync(svc.registry.get_tenant_encoder, tenant) is None:
        raise BadRequest(f"tenant {tenant!r} searches with the default encoder: it has no encoder of its own to "
                         "roll back", code="nothing_to_roll_back")
    return await _queue(svc, caller, JobKind.ROLLBACK, tenant, {"version": data.version})


@post("/v1/encoders/prune", status_code=202,
      summary="Queue a prune: the tenant's copies under versions it no longer uses (all_tenants: unused collections)", **access("admin", 403, 404, 415))
async def prune_encoders(data: PruneIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = _for(caller, data.all_tenants)
    for version in data.keep:
        await anyio.to_thread.run_sync(lambda v=version: _require_visible(svc, v, caller.tenant))
    return await _queue(svc, caller, JobKind.PRUNE, tenant, {"keep": data.keep})


ROUTES = [list_encoders, adapt_encoder, promote_encoder, rollback_encoder, prune_encoders]
