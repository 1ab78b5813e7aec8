"""The store's seam: the :class:`VectorStore` protocol, the names every backend shares, point ids."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np

from rag.errors import BadRequest
from rag.types import PointRecord, ScoredPoint, SparseVector

__all__ = [
    "ACTIVE_ALIAS",
    "BOOL_INDEXES",
    "FUSION_METHODS",
    "KEYWORD_INDEXES",
    "PUBLISH_BATCH",
    "SEARCH_MODES",
    "SENTENCE_VECTOR_NAME",
    "SPARSE_VECTOR_NAME",
    "TIE_SLACK",
    "UPSERT_BATCH",
    "VECTOR_NAME",
    "FusionMethod",
    "SearchMode",
    "VectorStore",
    "check_collection_name",
    "point_id",
]

VECTOR_NAME = "dense"
SPARSE_VECTOR_NAME = "bm25"
# The vectors of a chunk's sentences (a multivector, float16, never indexed): computed at ingest so that an
# extractive answer ranks its context's sentences without embedding them (rag/sentence_vectors.py).
SENTENCE_VECTOR_NAME = "sentences"
SearchMode = Literal["dense", "sparse", "hybrid"]
FusionMethod = Literal["rrf", "weighted"]
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)
FUSION_METHODS: tuple[str, ...] = get_args(FusionMethod)
# Hits fetched beyond top_k and then dropped: equal scores (duplicate chunks, RRF ties) are ordered by
# point id, and the slack lets both backends see the same tied candidates at the cut.
TIE_SLACK = 8
ACTIVE_ALIAS = "rag_active"
# Payload fields the store itself filters on; they get payload indexes in every collection.
KEYWORD_INDEXES = ("tenant", "document_id", "content_hash")
BOOL_INDEXES = ("live",)

# Collection names become directory names (embedded) and URL segments (server).
_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# Bounded batches: the edge engine holds the GIL for a whole call, so one huge upsert would stall
# every API thread; a few hundred points per call keeps each pause in the millisecond range.
UPSERT_BATCH = 256
# publish_many builds one filter over many documents; keep each filter a sensible size.
PUBLISH_BATCH = 128

_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "rag-backend/point")


def point_id(tenant: str, document_id: str, content_hash: str, index: int) -> str:
    """The deterministic id (a UUIDv5 string) of chunk ``index`` of one generation of a document.

    A retried job writes the same ids and overwrites instead of duplicating; a new content hash
    gives new ids, so the next generation can sit beside the live one until it is published.
    """
    # JSON keeps the parts unambiguous whatever characters a tenant or document id contains.
    key = json.dumps([tenant, document_id, content_hash, int(index)], ensure_ascii=False)
    return str(uuid.uuid5(_POINT_NAMESPACE, key))


def check_collection_name(name: str) -> None:
    """:class:`BadRequest` unless ``name`` is safe as a directory name and a URL segment."""
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name) or name == ACTIVE_ALIAS:
        raise BadRequest(
            f"collection name {name!r} is invalid: use 1-128 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), and not {ACTIVE_ALIAS!r}"
        )


@runtime_checkable
class VectorStore(Protocol):
    """Where chunk vectors live: collections of points with a named dense vector and a payload."""

    def ensure_collection(self, name: str, dimension: int) -> None:
        """Create the collection (dense ``"dense"``, cosine; sparse ``"bm25"`` with IDF; the unindexed multivector
        ``"sentences"``; payload indexes) unless it exists."""
        ...

    def has_sentence_vectors(self, collection: str) -> bool:
        """Whether the collection can hold sentence vectors (collections made before they existed cannot)."""
        ...

    def sentence_vectors(self, collection: str, ids: Sequence[str], *, tenant: str) -> dict[str, tuple[str, np.ndarray]]:
        """The stored sentence vectors of the points ``ids`` of ``tenant``: id -> (the payload's ``encoder_version``,
        an ``(n sentences, dimension)`` float32 array). Points of other tenants, missing points and points
        stored without sentence vectors are left out."""
        ...

    def list_collections(self) -> list[str]:
        """Names of every collection, sorted."""
        ...

    def get_active(self) -> str | None:
        """The collection searches use by default, or None when none was set."""
        ...

    def set_active(self, name: str) -> None:
        """Point the active pointer at ``name`` in one atomic step."""
        ...

    def drop_collection(self, name: str) -> None:
        """Delete a collection and its points (no error if it does not exist)."""
        ...

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points; payloads are stored as given (callers write ``live=False``)."""
        ...

    def publish(self, collection: str, tenant: str, document_id: str, content_hash: str) -> None:
        """Make generation ``content_hash`` of the document live and remove its other generations."""
        ...

    def publish_many(self, collection: str, tenant: str, documents: Sequence[tuple[str, str]]) -> None:
        """:meth:`publish` for many ``(document_id, content_hash)`` pairs, durable once at the end."""
        ...

    def delete_document(self, collection: str, tenant: str, document_id: str) -> int:
        """Remove every point of the document (any generation); returns how many were removed."""
        ...

    def delete_tenant(self, collection: str, tenant: str) -> int:
        """Delete every point of ``tenant`` in ``collection`` (a tenant's copy under an encoder it left); the count removed."""
        ...

    def search(
        self,
        collection: str,
        vector: Sequence[float] | None = None,
        *,
        tenant: str,
        top_k: int,
        filter: Mapping[str, Any] | None = None,
        mode: SearchMode = "dense",
        sparse_vector: SparseVector | None = None,
        fusion: FusionMethod = "rrf",
        rrf_k: int = 60,
        weights: tuple[float, float] = (1.0, 1.0),
        prefetch_k: int = 100,
    ) -> list[ScoredPoint]:
        """The tenant's best live points for a query, best first, narrowed by a user filter.

        ``mode="dense"``: nearest to ``vector`` (cosine). ``"sparse"``: highest BM25 score of
        ``sparse_vector`` (a query from :meth:`rag.sparse.SparseEncoder.encode_query`; IDF counted over
        the tenant's live points). ``"hybrid"``: one query, the ``prefetch_k`` best of each branch fused
        by reciprocal rank fusion — ``fusion="rrf"`` scores a point ``sum 1 / (k + rank - 1)`` over the
        branches (ranks from 1), ``"weighted"`` gives branch ``i`` the score ``1 / (rank / w_i + k - 1)``
        with ``weights=(dense, sparse)`` (Qdrant's weighted RRF; weight 0 mutes a branch). Equal scores
        are ordered by point id, so both backends return the same list for the same data; the one
        exception is exact duplicates inside a hybrid branch, which the engine ranks in its own order
        before fusing.
        """
        ...

    def count(
        self,
        collection: str,
        *,
        tenant: str | None = None,
        document_id: str | None = None,
        live: bool | None = None,
    ) -> int:
        """Exact number of points matching the given payload fields."""
        ...

    def iter_dense(
        self, collection: str, *, tenant: str | None = None, live: bool | None = True, batch_size: int = 512
    ) -> Iterator[tuple[list[str], list[list[float]]]]:
        """Every matching point's dense vector, a batch of ``(document ids, vectors)`` at a time (drift snapshots)."""
        ...

    def iter_points(
        self, collection: str, *, tenant: str | None = None, batch_size: int = 256
    ) -> Iterator[list[PointRecord]]:
        """Every point (of ``tenant``, else any tenant; live or not) with payload, dense and sparse vectors, a batch at a time.

        Re-embedding into a new encoder's collection copies payloads and sparse vectors from here.
        """
        ...

    def optimize(self, collection: str) -> bool:
        """Build vector indexes after a bulk load; True if anything was rebuilt."""
        ...

    def close(self) -> None:
        """Release the store; further calls raise :class:`StoreError`."""
        ...
