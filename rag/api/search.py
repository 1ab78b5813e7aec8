"""``POST /v1/search``: dense, sparse (BM25) or hybrid retrieval over the tenant's chunks."""

from __future__ import annotations

import time

import anyio.to_thread
from litestar import post

from rag.api.deps import Caller, access, check_query
from rag.api.schemas import SearchHitOut, SearchIn, SearchOut
from rag.services import Services
from rag.types import ChunkPayload


@post("/v1/search", status_code=200, summary="Dense, sparse (BM25) or hybrid retrieval over the tenant's chunks", **access("read", 413, 415))
async def search(data: SearchIn, svc: Services, caller: Caller) -> SearchOut:
    """``mode``: ``dense``, ``sparse`` or ``hybrid`` (RRF of both in one store query); default RAG_SEARCH_MODE."""
    # Checked before paying for the query encode.
    query = check_query(svc.settings, data.query, data.top_k, data.filter)
    # One retriever for the whole request, the tenant's: its encoder and collection belong together.
    retriever = await anyio.to_thread.run_sync(svc.retriever_for, caller.tenant)
    mode = retriever.mode_of(data.mode)
    started = time.perf_counter()
    hits = await retriever.asearch(query, tenant=caller.tenant, top_k=data.top_k, mode=mode, filter=data.filter)
    results = []
    for h in hits:
        p = ChunkPayload.from_payload(h.payload)
        results.append(SearchHitOut(
            chunk_id=h.id, document_id=p.document_id, chunk_index=p.chunk_index, score=h.score, text=p.text,
            title=p.title, source=p.source, offsets=(p.start, p.end), heading_path=p.heading_path,
            metadata=p.metadata,
        ))
    return SearchOut(results=results, encoder_version=retriever.embedder.version,
                     took_ms=round((time.perf_counter() - started) * 1000, 2), mode=mode)


ROUTES = [search]
