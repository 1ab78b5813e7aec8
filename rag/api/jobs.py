"""Job routes: a job's status, progress and per-document errors; cancelling it."""

from __future__ import annotations

from typing import Any

from litestar import get, post

from rag.api.deps import Caller, access
from rag.errors import NotFound
from rag.api.encoders import JOB_TENANT
from rag.registry import Job, job_view
from rag.services import Services


def _visible_job(svc: Services, caller: Caller, job_id: str) -> Job:
    job = svc.registry.get_job(job_id)
    # A tenant's jobs (uploads and its encoder's adapt/promote/rollback/prune) are its own; the jobs that switch
    # the default encoder for every tenant are the operator's.
    visible = job is not None and (job.tenant == caller.tenant or (job.tenant == JOB_TENANT and caller.is_operator))
    if not visible:
        raise NotFound(f"no job {job_id}")
    return job


@get("/v1/jobs/{job_id:str}", sync_to_thread=True, summary="Job status, progress and per-document errors", **access("read", 404))
def get_job(svc: Services, caller: Caller, job_id: str) -> dict[str, Any]:
    return job_view(_visible_job(svc, caller, job_id))


@post("/v1/jobs/{job_id:str}/cancel", sync_to_thread=True, status_code=200, summary="Cancel a queued or running job", **access("write", 404))
def cancel_job(svc: Services, caller: Caller, job_id: str) -> dict[str, Any]:
    _visible_job(svc, caller, job_id)
    return job_view(svc.registry.request_cancel(job_id))


ROUTES = [get_job, cancel_job]
