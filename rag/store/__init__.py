"""The vector store seam: one protocol, the embedded Qdrant engine (default) and a Qdrant server.

Every point carries ``tenant``, ``document_id``, ``content_hash`` and ``live`` in its payload. A
document's new generation is upserted with ``live=False`` (invisible), then :meth:`VectorStore.publish`
flips it live and removes the older generations, so a search never sees half of a re-indexed document.

Each point holds a dense vector (``"dense"``, cosine) and, when the caller computed one, a sparse BM25
vector (``"bm25"``, with Qdrant's IDF modifier; see :mod:`rag.sparse`). :meth:`VectorStore.search`
runs dense, sparse or hybrid retrieval; hybrid is one Qdrant query whose two prefetches (dense and
sparse, each under the full tenant/live/user filter) are fused by reciprocal rank fusion in the engine.

Rooms: :mod:`~rag.store.protocol` (the protocol, shared names, point ids), :mod:`~rag.store.filters`
(user filters), :mod:`~rag.store.base` (the algorithms both backends share), :mod:`~rag.store.edge`
and :mod:`~rag.store.server` (only what differs per backend). Callers import from ``rag.store``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rag.store.edge import EdgeVectorStore
from rag.store.filters import FieldMatch, FieldMatchAny, FieldRange, FilterCondition, parse_filter
from rag.store.protocol import (
    ACTIVE_ALIAS,
    FUSION_METHODS,
    SEARCH_MODES,
    SPARSE_VECTOR_NAME,
    VECTOR_NAME,
    FusionMethod,
    SearchMode,
    VectorStore,
    point_id,
)
from rag.store.server import ClusterOptions, QdrantServerStore

if TYPE_CHECKING:
    from rag.settings import Settings

__all__ = [
    "ACTIVE_ALIAS",
    "FUSION_METHODS",
    "SEARCH_MODES",
    "SPARSE_VECTOR_NAME",
    "VECTOR_NAME",
    "EdgeVectorStore",
    "FieldMatch",
    "FieldMatchAny",
    "FieldRange",
    "FilterCondition",
    "FusionMethod",
    "ClusterOptions",
    "QdrantServerStore",
    "SearchMode",
    "VectorStore",
    "open_store",
    "parse_filter",
    "point_id",
]


# The factory lives here, not beside the protocol: the backends import the protocol module, so the
# protocol module importing them back would be an import loop.
def open_store(settings: Settings) -> VectorStore:
    """The store the settings name: embedded under ``settings.qdrant_dir``, or the server at ``qdrant_url``."""
    if settings.embedded:
        return EdgeVectorStore(settings.qdrant_dir, hnsw_ef=settings.hnsw_ef,
                               auto_index_points=settings.index_auto_build_points, hnsw_m=settings.hnsw_m,
                               hnsw_payload_m=settings.hnsw_payload_m, hnsw_ef_construct=settings.hnsw_ef_construct)
    return QdrantServerStore.from_url(settings.qdrant_url, settings.qdrant_api_key or None, settings.qdrant_timeout_s,
                                      ClusterOptions.from_settings(settings))
