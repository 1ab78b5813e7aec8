"""Operator endpoints: the opt-in sample of query embeddings that ``python -m eval drift --queries`` reads.

The sample pools every tenant's queries and embeddings can be partly inverted back to text, so these
routes are for operators only: keep ``/v1/admin/`` off the public network (README, "Embedding drift").
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Response, get, post
from litestar.params import Parameter

from rag.api.deps import access
from rag.auth import TENANT_PATTERN, Caller
from rag.backup import backup
from rag.errors import NotFound
from rag.metrics import CONTENT_TYPE_LATEST
from rag.query_sample import QuerySample, QuerySampleOut
from rag.services import Services

QUERY_SAMPLE_FILE = "query-sample.npy"
audit = structlog.get_logger("rag.audit")


def _sample(svc: Services, tenant: str | None) -> QuerySample:
    # Each encoder version samples the queries it embeds; a tenant's encoder is its own once it adapted one.
    retriever = svc.retriever if tenant is None else svc.retriever_for(tenant)
    sample = getattr(retriever, "query_sample", None)
    if sample is None:
        raise NotFound("query sampling is off; set RAG_QUERY_SAMPLE_SIZE to a positive size to turn it on",
                       code="query_sample_disabled")
    return sample


@get("/v1/admin/query-sample", sync_to_thread=True, summary="The sample of query embeddings (vectors only)", **access("operator", 404))
def query_sample(svc: Services, tenant: Annotated[str | None, Parameter(query="tenant", pattern=TENANT_PATTERN)] = None) -> QuerySampleOut:
    """Rows in arrival order with their arrival number and time (of the default encoder, or of the encoder
    ``tenant`` searches with); 404 ``query_sample_disabled`` when off."""
    return _sample(svc, tenant).snapshot()


@post("/v1/admin/query-sample/export", sync_to_thread=True, status_code=200,
      summary="Write the query sample to <data_dir>/query-sample.npy (+ .json)", **access("operator", 404))
def export_query_sample(svc: Services) -> dict[str, Any]:
    sample = _sample(svc, None)
    path = sample.save(svc.settings.data_dir / QUERY_SAMPLE_FILE)
    return {"path": str(path), "metadata": str(path.with_suffix(".json")), "count": len(sample), "seen": sample.seen,
            "encoder_version": sample.encoder_version}


class ReconcileIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    repair: bool = False
    tenants: Annotated[list[Annotated[str, msgspec.Meta(pattern=TENANT_PATTERN)]], msgspec.Meta(max_length=1000)] | None = None


@post("/v1/admin/reconcile", status_code=200, summary="Compare the registry with the store per tenant, and repair",
      **access("operator"))
async def reconcile(data: ReconcileIn, svc: Services, caller: Caller) -> dict[str, Any]:
    """What differs (missing, incomplete or orphan points, wrong sizes or hashes, several generations, another
    encoder's vectors) per tenant; with ``repair``, fixed so that both agree (README, "Operating it")."""
    report = await anyio.to_thread.run_sync(lambda: svc.reconcile(repair=data.repair, tenants=data.tenants))
    audit.info("audit", action="reconcile", key_id=caller.key_id, tenant=caller.tenant, repair=data.repair,
               outcome="ok", **report.counts())
    return report.to_dict()


@post("/v1/admin/backup", status_code=201, summary="Back up store, registry, uploads and encoders into the data dir",
      **access("operator"))
async def make_backup(svc: Services, caller: Caller) -> dict[str, Any]:
    """Written to ``<data_dir>/backups/<UTC time>/`` (a folder the server chooses; ``python -m rag backup DIR``
    copies it out). Writes wait while the store and the registry are copied; searches go on."""
    dest = svc.settings.data_dir / "backups" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = await anyio.to_thread.run_sync(lambda: backup(svc.settings, svc.store, svc.registry, dest))
    audit.info("audit", action="backup", key_id=caller.key_id, tenant=caller.tenant, outcome="ok", path=str(dest))
    return result


@get("/metrics", sync_to_thread=True, summary="This process's metrics in Prometheus text format", include_in_schema=False,
     **access("operator"))
def metrics(svc: Services) -> Response[bytes]:
    """Request and stage latency, ingest and job counts, queue depth and age, LLM tokens, tenants and encoders."""
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [query_sample, export_query_sample, reconcile, make_backup, metrics]
