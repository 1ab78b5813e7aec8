"""Query-side retrieval: embed the query, search the encoder's collection, shape the hits."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio.to_thread
import numpy as np

from rag.embedding import Embedder
from rag.store import VectorStore
from rag.types import ScoredPoint


class QueryEncoder:
    """Encodes concurrent queries together: requests that arrive while a batch runs share the next one.

    On a small CPU one encode of 8 short queries costs little more than one, so batching keeps
    latency flat under concurrency instead of queueing requests behind each other.
    """

    def __init__(self, embedder: Embedder, max_batch: int = 32) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
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
        finally:
            self._running = False


async def retrieve(
    encoder: QueryEncoder,
    store: VectorStore,
    collection: str,
    query: str,
    *,
    tenant: str,
    top_k: int,
    filter: dict[str, Any] | None = None,
) -> list[ScoredPoint]:
    """Dense retrieval of the tenant's published chunks for one query, best first."""
    vector = await encoder.embed(query)
    return await anyio.to_thread.run_sync(
        lambda: store.search(collection, vector.tolist(), tenant=tenant, top_k=top_k, filter=filter)
    )
