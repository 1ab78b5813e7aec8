"""What both Qdrant backends do alike, written once: the search plan, publishing, counting, scrolling.

:class:`QdrantLikeStore` holds every algorithm that does not depend on the engine's bindings; a
backend subclass supplies only primitives: how to build a condition, a filter, a vector and a point
in its own types, the raw engine calls, error translation, and (embedded) the write lock. The
pattern is httpx's ``BaseClient``: the logic lives once, the twins differ only in I/O.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rag.errors import BadRequest
from rag.store.filters import FieldMatch, FieldMatchAny, FieldRange, FilterCondition, parse_filter
from rag.store.protocol import (
    FUSION_METHODS,
    PUBLISH_BATCH,
    SEARCH_MODES,
    SENTENCE_VECTOR_NAME,
    SPARSE_VECTOR_NAME,
    TIE_SLACK,
    UPSERT_BATCH,
    VECTOR_NAME,
    FusionMethod,
    SearchMode,
    check_collection_name,
)
from rag.types import PointRecord, ScoredPoint, SparseVector

__all__ = ["Branch", "QdrantLikeStore", "SearchPlan", "plan_search"]


# ---------------------------------------------------------------------------------------------
# Search requests: validated once, run by each backend in one engine query
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchPlan:
    """A validated search request, in plain values each backend turns into one engine query."""

    mode: str
    dense: list[float] | None
    sparse: SparseVector | None
    limit: int  # top_k plus TIE_SLACK
    top_k: int
    prefetch: int
    rrf_k: int
    weights: list[float] | None  # None: plain RRF


@dataclass(frozen=True, slots=True)
class Branch:
    """One retrieval branch of a query in a backend's own types: the query, its vector name, its params."""

    query: Any
    using: str
    params: Any = None


def plan_search(
    mode: str,
    vector: Sequence[float] | None,
    sparse_vector: SparseVector | None,
    *,
    top_k: int,
    fusion: str,
    rrf_k: int,
    weights: Sequence[float],
    prefetch_k: int,
) -> SearchPlan:
    """Check a search request's arguments (:class:`BadRequest` if invalid) and size its branches."""
    _check_top_k(top_k)
    if mode not in SEARCH_MODES:
        raise BadRequest(f"search mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
    dense: list[float] | None = None
    if mode != "sparse":
        if vector is None:
            raise BadRequest(f"a {mode} search needs a dense query vector")
        dense = vector if isinstance(vector, list) else list(vector)
    sparse: SparseVector | None = None
    if mode != "dense":
        if sparse_vector is None:
            raise BadRequest(f"a {mode} search needs a sparse query vector")
        if len(sparse_vector.indices) != len(sparse_vector.values):
            raise BadRequest("sparse query vector: indices and values differ in length")
        sparse = sparse_vector
    plan_weights = _fusion_weights(fusion, rrf_k, weights, prefetch_k) if mode == "hybrid" else None
    limit = top_k + TIE_SLACK
    # A fused list can only hold what the branches fetched; a branch shorter than the answer would cut it.
    return SearchPlan(mode=mode, dense=dense, sparse=sparse, limit=limit, top_k=top_k,
                      prefetch=max(prefetch_k, limit), rrf_k=rrf_k, weights=plan_weights)


def _fusion_weights(fusion: str, rrf_k: int, weights: Sequence[float], prefetch_k: int) -> list[float] | None:
    """The checked fusion options of a hybrid search; the branch weights, or None for plain RRF."""
    if fusion not in FUSION_METHODS:
        raise BadRequest(f"fusion must be one of {', '.join(FUSION_METHODS)}, not {fusion!r}")
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 1:
        raise BadRequest(f"rrf_k must be an integer >= 1, not {rrf_k!r}")
    if isinstance(prefetch_k, bool) or not isinstance(prefetch_k, int) or prefetch_k < 1:
        raise BadRequest(f"prefetch_k must be a positive integer, not {prefetch_k!r}")
    if fusion != "weighted":
        return None
    if len(weights) != 2 or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
    ) or not any(weights):
        raise BadRequest(f"weights must be two finite numbers >= 0, not both 0; got {tuple(weights)!r}")
    return [float(w) for w in weights]


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadRequest(f"top_k must be a positive integer, not {top_k!r}")


def _ranked(hits: Sequence[Any], top_k: int) -> list[ScoredPoint]:
    """Engine hits as ScoredPoints, best first, equal scores by id, cut to ``top_k``."""
    points = [ScoredPoint(id=str(h.id), score=float(h.score), payload=dict(h.payload or {})) for h in hits]
    points.sort(key=lambda p: (-p.score, p.id))
    return points[:top_k]


def _dedupe_documents(documents: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    # The last generation named for a document wins: publishing two for one document would keep both.
    latest: dict[str, str] = {}
    for document_id, content_hash in documents:
        latest.pop(document_id, None)
        latest[document_id] = content_hash
    return list(latest.items())


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _record_from(point_id_: Any, payload: Mapping[str, Any] | None, vectors: Any) -> PointRecord:
    """A scrolled point (either backend) back as a :class:`PointRecord`."""
    vectors = vectors or {}
    dense = vectors.get(VECTOR_NAME) if isinstance(vectors, Mapping) else vectors
    sparse = vectors.get(SPARSE_VECTOR_NAME) if isinstance(vectors, Mapping) else None
    sv = None
    if sparse is not None:
        indices = getattr(sparse, "indices", None)
        values = getattr(sparse, "values", None)
        if indices is None and isinstance(sparse, Mapping):
            indices, values = sparse.get("indices"), sparse.get("values")
        if indices is not None:
            sv = SparseVector(indices=[int(i) for i in indices], values=[float(v) for v in values])
    return PointRecord(id=str(point_id_), vector=[float(x) for x in (dense or [])], payload=dict(payload or {}),
                       sparse=sv)


# ---------------------------------------------------------------------------------------------
# The shared store: algorithms over primitives each backend supplies
# ---------------------------------------------------------------------------------------------


class QdrantLikeStore(ABC):
    """The algorithms of a Qdrant-backed :class:`~rag.store.VectorStore`, over backend primitives.

    A handle (:meth:`_collection`) is what the raw calls address: an open shard (embedded) or the
    collection's name (server). Conditions and filters are the backend's own objects; this class
    only combines them.
    """

    # -- primitives: conditions, filters, vectors, points ------------------------------------

    @abstractmethod
    def _eq(self, key: str, value: str | int | bool) -> Any:
        """A condition: payload field ``key`` equals ``value``."""

    @abstractmethod
    def _match_any(self, key: str, values: list[str] | list[int]) -> Any:
        """A condition: ``key`` equals one of ``values`` (all strings, or all integers)."""

    @abstractmethod
    def _range(self, cond: FieldRange) -> Any:
        """A condition: ``cond.key`` is a number within ``cond``'s bounds."""

    @abstractmethod
    def _filter(self, **clauses: list[Any]) -> Any:
        """A filter of the given ``must``/``should``/``must_not`` clauses."""

    @abstractmethod
    def _sparse(self, vector: SparseVector) -> Any:
        """A sparse vector in the backend's type (for points and queries alike)."""

    @abstractmethod
    def _point(self, point: PointRecord, vectors: dict[str, Any]) -> Any:
        """A point to upsert, with its vectors already in the backend's types."""

    # -- primitives: raw calls -----------------------------------------------------------------

    @abstractmethod
    def _errors(self, action: str, collection: str | None = None) -> contextlib.AbstractContextManager[None]:
        """Translate the backend's errors raised inside into :class:`StoreError` (or NotFound)."""

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        """Held around a multi-step write so writes do not interleave; nothing by default."""
        return contextlib.nullcontext()

    @abstractmethod
    def _collection(self, name: str) -> Any:
        """The handle the raw calls address for collection ``name``."""

    @abstractmethod
    def _upsert_raw(self, handle: Any, points: list[Any]) -> None:
        """Upsert one batch of backend points."""

    @abstractmethod
    def _set_payload_raw(self, handle: Any, flt: Any, payload: dict[str, Any]) -> None:
        """Set ``payload`` on every point matching ``flt``."""

    @abstractmethod
    def _delete_raw(self, handle: Any, flt: Any) -> None:
        """Delete every point matching ``flt``."""

    @abstractmethod
    def _retrieve_raw(self, handle: Any, ids: list[str], with_payload: Any, with_vector: Any) -> list[Any]:
        """The records of the points ``ids`` (missing ones left out)."""

    @abstractmethod
    def has_sentence_vectors(self, collection: str) -> bool:
        """Whether the collection has the ``"sentences"`` multivector (see the protocol)."""

    @abstractmethod
    def _count_raw(self, handle: Any, flt: Any) -> int:
        """The exact number of points matching ``flt`` (None: all)."""

    @abstractmethod
    def _scroll_raw(self, handle: Any, flt: Any, offset: Any, limit: int, with_payload: Any,
                    with_vector: Any) -> tuple[list[Any], Any]:
        """One page of records from ``offset``, and the next offset (None at the end)."""

    @abstractmethod
    def _dense_branch(self, handle: Any, vector: list[float]) -> Branch:
        """The dense branch of a query."""

    @abstractmethod
    def _sparse_branch(self, vector: SparseVector, scope: list[Any]) -> Branch:
        """The sparse branch of a query, its IDF counted over the points matching ``scope``."""

    @abstractmethod
    def _query_raw(self, handle: Any, branch: Branch, flt: Any, limit: int) -> list[Any]:
        """The hits of one branch under ``flt``, at most ``limit``."""

    @abstractmethod
    def _fused_query_raw(self, handle: Any, branches: list[Branch], flt: Any, plan: SearchPlan) -> list[Any]:
        """The hits of the branches (each under ``flt``) fused by (weighted) RRF, at most ``plan.limit``."""

    def _flush(self, handle: Any) -> None:
        """Make the writes so far durable; nothing where each call already waits for it."""

    # -- shared: conditions and vectors ----------------------------------------------------------

    def _any(self, key: str, values: Sequence[str | int | bool]) -> Any:
        # A match-any takes only all-strings or all-integers; bools and mixed lists become an OR of groups.
        strings = [v for v in values if isinstance(v, str)]
        ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        bools = [v for v in values if isinstance(v, bool)]
        parts = [self._match_any(key, group) for group in (strings, ints) if group]
        parts += [self._eq(key, b) for b in bools]
        return parts[0] if len(parts) == 1 else self._filter(should=parts)

    def _condition(self, cond: FilterCondition) -> Any:
        if isinstance(cond, FieldMatch):
            return self._eq(cond.key, cond.value)
        if isinstance(cond, FieldMatchAny):
            return self._any(cond.key, cond.values)
        return self._range(cond)

    def _fields(self, **fields: str | bool | None) -> Any:
        """A filter: every field given (not None) equals its value; None when none is given."""
        must = [self._eq(key, value) for key, value in fields.items() if value is not None]
        return self._filter(must=must) if must else None

    def _generation(self, document_id: str, content_hash: str) -> Any:
        return self._filter(must=[self._eq("document_id", document_id), self._eq("content_hash", content_hash)])

    def _vectors(self, p: PointRecord, sentences: bool = False) -> dict[str, Any]:
        vectors: dict[str, Any] = {VECTOR_NAME: p.vector if isinstance(p.vector, list) else list(p.vector)}
        # An empty sparse vector is left out on both backends: the point then is not part of the IDF
        # statistics anywhere.
        if p.sparse is not None and p.sparse.indices:
            vectors[SPARSE_VECTOR_NAME] = self._sparse(p.sparse)
        if sentences and p.sentences:
            vectors[SENTENCE_VECTOR_NAME] = p.sentences
        return vectors

    @staticmethod
    def _check_new_collection(name: str, dimension: int) -> None:
        check_collection_name(name)
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise BadRequest(f"dimension must be a positive integer, not {dimension!r}")

    # -- shared: points ----------------------------------------------------------------------------

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points, a few hundred per engine call (see ``UPSERT_BATCH``)."""
        with self._writing():
            handle = self._collection(collection)
            # A collection made before sentence vectors existed stores the points without them.
            sentences = any(p.sentences for p in points) and self.has_sentence_vectors(collection)
            with self._errors(f"upserting into {collection!r}", collection):
                for batch in _chunks(points, UPSERT_BATCH):
                    self._upsert_raw(handle, [self._point(p, self._vectors(p, sentences)) for p in batch])

    def publish(self, collection: str, tenant: str, document_id: str, content_hash: str) -> None:
        """Set ``live=True`` on the generation, then delete the document's other generations."""
        self.publish_many(collection, tenant, [(document_id, content_hash)])

    def publish_many(self, collection: str, tenant: str, documents: Sequence[tuple[str, str]]) -> None:
        """Publish many documents of one tenant; durable (flushed, or applied on the server) on return."""
        pairs = _dedupe_documents(documents)
        if not pairs:
            return
        with self._writing():
            handle = self._collection(collection)
            with self._errors(f"publishing into {collection!r}", collection):
                for batch in _chunks(pairs, PUBLISH_BATCH):
                    generations = [self._generation(d, h) for d, h in batch]
                    # Live first, then delete: a reader sees the old generation, then both for an
                    # instant, then only the new one; never no generation at all.
                    self._set_payload_raw(handle, self._filter(must=[self._eq("tenant", tenant)], should=generations),
                                          {"live": True})
                    self._delete_raw(handle, self._filter(
                        must=[self._eq("tenant", tenant), self._any("document_id", [d for d, _ in batch])],
                        must_not=generations,
                    ))
                self._flush(handle)

    def delete_document(self, collection: str, tenant: str, document_id: str) -> int:
        """Delete every point of the document; returns how many there were, counted just before."""
        flt = self._filter(must=[self._eq("tenant", tenant), self._eq("document_id", document_id)])
        with self._writing():
            handle = self._collection(collection)
            with self._errors(f"deleting from {collection!r}", collection):
                # Exact under the write lock (embedded): no other write can land between count and delete.
                removed = self._count_raw(handle, flt)
                if removed:
                    self._delete_raw(handle, flt)
                    self._flush(handle)
        return removed

    def delete_tenant(self, collection: str, tenant: str) -> int:
        """Delete every point of the tenant in ``collection``; returns how many there were, counted just before."""
        flt = self._filter(must=[self._eq("tenant", tenant)])
        with self._writing():
            handle = self._collection(collection)
            with self._errors(f"deleting from {collection!r}", collection):
                removed = self._count_raw(handle, flt)
                if removed:
                    self._delete_raw(handle, flt)
                    self._flush(handle)
        return removed

    # -- shared: reads -----------------------------------------------------------------------------

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
        """Dense, sparse or hybrid search in one engine query; see :meth:`rag.store.VectorStore.search`."""
        plan = plan_search(mode, vector, sparse_vector, top_k=top_k, fusion=fusion, rrf_k=rrf_k, weights=weights,
                           prefetch_k=prefetch_k)
        scope = [self._eq("tenant", tenant), self._eq("live", True)]
        conditions = scope + [self._condition(c) for c in parse_filter(filter)]
        handle = self._collection(collection)
        with self._errors(f"searching {collection!r}", collection):
            flt = self._filter(must=conditions)
            branches = [self._dense_branch(handle, plan.dense)] if plan.dense is not None else []
            if plan.sparse is not None:
                # IDF over the tenant's live points only: another tenant's documents or a staged
                # generation must not move this tenant's scores (nor leak their term statistics).
                branches.append(self._sparse_branch(plan.sparse, scope))
            if plan.mode == "hybrid":
                hits = self._fused_query_raw(handle, branches, flt, plan)
            else:
                hits = self._query_raw(handle, branches[0], flt, plan.limit)
        return _ranked(hits, plan.top_k)

    def count(
        self,
        collection: str,
        *,
        tenant: str | None = None,
        document_id: str | None = None,
        live: bool | None = None,
    ) -> int:
        """Exact number of points matching every field given."""
        flt = self._fields(tenant=tenant, document_id=document_id, live=live)
        handle = self._collection(collection)
        with self._errors(f"counting {collection!r}", collection):
            return self._count_raw(handle, flt)

    def _scroll(self, collection: str, *, batch_size: int, flt: Any = None, with_payload: Any = True,
                with_vector: Any = True) -> Iterator[list[Any]]:
        """The engine's records in batches, each batch its own short engine call."""
        handle = self._collection(collection)
        offset = None
        while True:
            with self._errors(f"scrolling {collection!r}", collection):
                records, offset = self._scroll_raw(handle, flt, offset, batch_size, with_payload, with_vector)
            if records:
                yield records
            if offset is None or not records:
                return

    def iter_dense(
        self, collection: str, *, tenant: str | None = None, live: bool | None = True, batch_size: int = 512
    ) -> Iterator[tuple[list[str], list[list[float]]]]:
        """Every matching point's dense vector, scrolled in batches (each its own short engine call)."""
        for records in self._scroll(collection, batch_size=batch_size, flt=self._fields(tenant=tenant, live=live),
                                    with_payload=["document_id"], with_vector=[VECTOR_NAME]):
            yield ([str((r.payload or {}).get("document_id", "")) for r in records],
                   [list(r.vector[VECTOR_NAME]) for r in records])

    def iter_points(self, collection: str, *, tenant: str | None = None,
                    batch_size: int = 256) -> Iterator[list[PointRecord]]:
        """Every point (of ``tenant`` when given) with payload, dense and sparse vectors (not sentence vectors),
        scrolled in batches (each its own short engine call)."""
        flt = self._fields(tenant=tenant, live=None) if tenant is not None else None
        for records in self._scroll(collection, batch_size=batch_size, flt=flt,
                                    with_vector=[VECTOR_NAME, SPARSE_VECTOR_NAME]):
            yield [_record_from(r.id, r.payload, r.vector) for r in records]

    def sentence_vectors(self, collection: str, ids: Sequence[str], *, tenant: str) -> dict[str, tuple[str, np.ndarray]]:
        """See :meth:`rag.store.VectorStore.sentence_vectors`: one engine call for all ``ids``."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        if not ids or not self.has_sentence_vectors(collection):
            return {}
        handle = self._collection(collection)
        with self._errors(f"reading sentence vectors of {collection!r}", collection):
            records = self._retrieve_raw(handle, ids, ["tenant", "encoder_version"], [SENTENCE_VECTOR_NAME])
        out: dict[str, tuple[str, np.ndarray]] = {}
        for r in records:
            payload = r.payload or {}
            vectors = (r.vector or {}).get(SENTENCE_VECTOR_NAME) if isinstance(r.vector, Mapping) else None
            if payload.get("tenant") == tenant and vectors:
                out[str(r.id)] = (str(payload.get("encoder_version", "")), np.asarray(vectors, dtype=np.float32))
        return out
