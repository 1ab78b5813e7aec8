"""``POST /v1/feedback``: a chat frontend's judgement of an answer's source, closing the loop from production.

A source judged helpful (or the document named as the right one instead) becomes a labelled
(query, document id) pair in the tenant's feedback dataset, which adaptation takes as
``"pairs_dataset": "feedback"``; every judgement counts in ``rag_feedback_total`` (a live precision signal).
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
import msgspec
from litestar import post

from rag.api.deps import Caller, access
from rag.errors import NotFound
from rag.services import Services

DocId = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class FeedbackIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]
    document_id: DocId  # the cited document the judgement is about
    helpful: bool
    chunk_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    corrected_document_id: DocId | None = None  # the document that answers the query instead


@post("/v1/feedback", status_code=201, summary="Judge an answer's source: helpful or not, or name the right document",
      **access("read", 404, 415))
async def feedback(data: FeedbackIn, svc: Services, caller: Caller) -> dict[str, Any]:
    tenant = caller.tenant
    query = data.query.strip()

    def store() -> dict[str, Any]:
        for doc in (data.document_id, data.corrected_document_id):
            if doc is not None and svc.registry.get_document(tenant, doc) is None:
                raise NotFound(f"document {doc!r} not found")
        pairs = [(query, d) for d, ok in ((data.document_id, data.helpful), (data.corrected_document_id, True))
                 if d is not None and ok]
        record = svc.registry.add_feedback_pairs(tenant, pairs) if pairs else None
        return {"pairs_added": len(pairs), "dataset_id": record.id if record else None,
                "dataset_pairs": record.pairs if record else None}

    out = await anyio.to_thread.run_sync(store)
    verdict = "corrected" if data.corrected_document_id else ("helpful" if data.helpful else "not_helpful")
    svc.metrics.feedback.labels(verdict=verdict).inc()
    return out


ROUTES = [feedback]
