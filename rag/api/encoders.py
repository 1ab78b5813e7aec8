"""Encoder endpoints: list versions, and queue adaptation, promotion and rollback jobs for the worker."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
import msgspec
import structlog
from litestar import get, post

from rag.api.deps import access
from rag.encoders import AdaptOptions, EncoderRegistry, check_options, describe, version_of_collection
from rag.errors import BadRequest
from rag.registry import JobKind
from rag.auth import Caller
from rag.services import Services

JOB_TENANT = "_encoders"
audit = structlog.get_logger("rag.audit")


# An encoder version names a folder and a collection: bounded, and only characters safe in both.
Version = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class PruneIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # versions whose collections stay besides active and parent
    keep: Annotated[list[Version], msgspec.Meta(max_length=100)] = msgspec.field(default_factory=list)


class SwitchIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: Version | None = None
    force: bool = False


def _registry(svc: Services) -> EncoderRegistry:
    return EncoderRegistry(svc.settings.encoders_dir)


@get("/v1/encoders", summary="Encoder versions: the active one, candidates, their gate scores and drift", **access("read"))
async def list_encoders(svc: Services) -> dict[str, Any]:
    active = version_of_collection(await anyio.to_thread.run_sync(svc.store.get_active))
    records = await anyio.to_thread.run_sync(_registry(svc).list)
    jobs = await anyio.to_thread.run_sync(lambda: [j for j in svc.registry.list_jobs(limit=20) if j.kind != JobKind.INGEST])
    return {"active": active, "serving": svc.embedder.version,
            "encoders": [describe(r, active) for r in records],
            "jobs": [{"id": j.id, "kind": str(j.kind), "status": j.status, "stage": j.stage, "error": j.error,
                      "created_at": j.created_at} for j in jobs]}


async def _queue(svc: Services, caller: Caller, kind: JobKind, params: dict[str, Any]) -> dict[str, Any]:
    job = await anyio.to_thread.run_sync(lambda: svc.registry.create_job(JOB_TENANT, [], kind=kind, params=params))
    audit.info("audit", action=f"encoder_{kind}", key_id=caller.key_id, tenant=caller.tenant, job_id=job.id,
               outcome="queued")
    return {"job_id": job.id, "kind": str(kind), "status": job.status, "status_url": f"/v1/jobs/{job.id}"}


@post("/v1/encoders/adapt", status_code=202, summary="Queue an adaptation: pairs → fine-tune → gate (→ promote)", **access("operator", 404, 415))
async def adapt_encoder(data: AdaptOptions, svc: Services, caller: Caller) -> dict[str, Any]:
    check_options(data)
    return await _queue(svc, caller, JobKind.ADAPT, msgspec.to_builtins(data))


@post("/v1/encoders/promote", status_code=202, summary="Queue a promotion: re-embed into the version's collection, then switch", **access("operator", 404, 415))
async def promote_encoder(data: SwitchIn, svc: Services, caller: Caller) -> dict[str, Any]:
    if not data.version:
        raise BadRequest("version is required")
    await anyio.to_thread.run_sync(lambda: _registry(svc).require(data.version))
    return await _queue(svc, caller, JobKind.PROMOTE, {"version": data.version, "force": data.force})


@post("/v1/encoders/rollback", status_code=202, summary="Queue a rollback to the active version's parent (or a named one)", **access("operator", 404, 415))
async def rollback_encoder(data: SwitchIn, svc: Services, caller: Caller) -> dict[str, Any]:
    if data.version:
        await anyio.to_thread.run_sync(lambda: _registry(svc).require(data.version))
    return await _queue(svc, caller, JobKind.ROLLBACK, {"version": data.version})


@post("/v1/encoders/prune", status_code=202,
      summary="Queue a prune: drop the collections of versions other than the active one and its parent", **access("operator", 404, 415))
async def prune_encoders(data: PruneIn, svc: Services, caller: Caller) -> dict[str, Any]:
    registry = _registry(svc)
    for version in data.keep:
        await anyio.to_thread.run_sync(lambda v=version: registry.require(v))
    return await _queue(svc, caller, JobKind.PRUNE, {"keep": data.keep})


ROUTES = [list_encoders, adapt_encoder, promote_encoder, rollback_encoder, prune_encoders]
