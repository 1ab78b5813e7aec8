"""Query-side retrieval: encode the query (dense and/or sparse), search the encoder's collection.

:class:`Retriever` is the one entry point the API and the evaluation harness share, so an eval figure
measures exactly what the service serves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import numpy as np
import structlog

from rag.embedding import Embedder
from rag.errors import BadRequest
from rag.query_sample import QuerySample
from rag.sparse import SparseEncoder
from rag.store import SEARCH_MODES, FusionMethod, VectorStore
from rag.types import ScoredPoint, SparseVector
from rag.tracing import span
from rag.vector_cache import VectorCache

if TYPE_CHECKING:
    from rag.settings import Settings

log = structlog.get_logger("rag.search")


class QueryEncoder:
    """Encodes concurrent queries together: requests that arrive while a batch runs share the next one.

    On a small CPU one encode of 8 short queries costs little more than one, so batching keeps
    latency flat under concurrency instead of queueing requests behind each other.
    """

    def __init__(self, embedder: Embedder, max_batch: int = 32, sample: QuerySample | None = None) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self.sample = sample  # opt-in drift monitoring: every query vector is offered to it
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running = False

    async def embed(self, text: str) -> np.ndarray:
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((text, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    vectors = await anyio.to_thread.run_sync(self.embedder.embed_queries, [t for t, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiter, who re-raises it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), vec in zip(batch, vectors, strict=True):
                    if not fut.done():
                        fut.set_result(vec)
                if self.sample is not None:
                    try:
                        self.sample.add_many(vectors)
                    except ValueError as exc:  # monitoring must never fail or stall a query
                        log.warning("query_sample_failed", error=str(exc))
        finally:
            self._running = False


class Retriever:
    """Dense, sparse (BM25) or hybrid retrieval over one collection, configured by the settings.

    ``settings.search_mode`` is the default mode; hybrid fuses the ``settings.prefetch_k`` best of each
    branch in one store query by reciprocal rank fusion with ``settings.rrf_k``. With both
    ``dense_weight`` and ``sparse_weight`` at 1 that is plain RRF; any other pair selects Qdrant's
    weighted RRF with weights ``(dense_weight, sparse_weight)``.

    ``sparse`` must be configured as the ingest worker's encoder was (both default to
    ``SparseEncoder()``), or query terms will not match the stored ones.
    """

    def __init__(
        self, store: VectorStore, collection: str, embedder: Embedder, sparse: SparseEncoder, settings: Settings
    ) -> None:
        self.store = store
        self.collection = collection
        self.embedder = embedder
        self.sparse = sparse
        self.settings = settings
        # RAG_QUERY_SAMPLE_SIZE > 0: keep a bounded sample of query vectors (never text) for drift checks.
        self.query_sample = (QuerySample(settings.query_sample_size, encoder_version=embedder.version,
                                         first=settings.drift_reference_rows)
                             if settings.query_sample_size > 0 else None)
        self.query_encoder = QueryEncoder(embedder, sample=self.query_sample)
        # The tenant's recent queries (RAG_QUERY_CACHE_SIZE): a repeated question costs no encode.
        self.query_cache = VectorCache(settings.query_cache_size)
        self.observe: Callable[[str, float], None] | None = None  # (stage, seconds), e.g. the process's metrics
        weights = (float(settings.dense_weight), float(settings.sparse_weight))
        self.fusion: FusionMethod = "rrf" if weights == (1.0, 1.0) else "weighted"
        self.weights = weights

    def mode_of(self, mode: str | None) -> str:
        """The effective mode (None: the settings' default); :class:`BadRequest` if unknown."""
        mode = self.settings.search_mode if mode is None else mode
        if mode not in SEARCH_MODES:
            raise BadRequest(f"mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}", code="invalid_mode")
        return mode

    def _store_search(
        self,
        mode: str,
        dense: list[float] | None,
        query: str,
        *,
        tenant: str,
        top_k: int,
        filter: Mapping[str, Any] | None,
    ) -> list[ScoredPoint]:
        # Encoding a query's BM25 terms costs microseconds: it rides along in the store's thread.
        sparse: SparseVector | None = self.sparse.encode_query(query) if mode != "dense" else None
        return self.store.search(
            self.collection, dense, tenant=tenant, top_k=top_k, filter=filter, mode=mode,  # type: ignore[arg-type]
            sparse_vector=sparse, fusion=self.fusion, rrf_k=self.settings.rrf_k, weights=self.weights,
            prefetch_k=self.settings.prefetch_k,
        )

    def search(
        self,
        query: str,
        *,
        tenant: str,
        top_k: int,
        mode: str | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> list[ScoredPoint]:
        """The tenant's best chunks for ``query``, best first (blocking; for batch callers such as eval)."""
        mode = self.mode_of(mode)
        dense = self.embedder.embed_queries([query])[0].tolist() if mode != "sparse" else None
        return self._store_search(mode, dense, query, tenant=tenant, top_k=top_k, filter=filter)

    async def query_vector(self, query: str, tenant: str) -> np.ndarray:
        """The query's dense vector: from the tenant's query cache, else encoded (batched with concurrent ones)."""
        t0 = time.perf_counter()
        with span("query_encode", encoder_version=self.embedder.version) as s:
            vec = self.query_cache.lookup(self.embedder.version, query, namespace=tenant)
            if s is not None:
                s.set_attribute("cached", vec is not None)
            if vec is None:
                vec = await self.query_encoder.embed(query)
                self.query_cache.store(self.embedder.version, query, vec, namespace=tenant)
        if self.observe is not None:
            self.observe("query_encode", time.perf_counter() - t0)
        return vec

    async def asearch(
        self,
        query: str,
        *,
        tenant: str,
        top_k: int,
        mode: str | None = None,
        filter: Mapping[str, Any] | None = None,
    ) -> list[ScoredPoint]:
        """:meth:`search` for the event loop: concurrent query encodes share a batch, the store runs in a thread."""
        mode = self.mode_of(mode)
        dense = (await self.query_vector(query, tenant)).tolist() if mode != "sparse" else None
        t0 = time.perf_counter()
        with span("store_search", mode=mode, top_k=top_k, collection=self.collection):
            hits = await anyio.to_thread.run_sync(
                lambda: self._store_search(mode, dense, query, tenant=tenant, top_k=top_k, filter=filter)
            )
        if self.observe is not None:
            self.observe("store_search", time.perf_counter() - t0)
        return hits
