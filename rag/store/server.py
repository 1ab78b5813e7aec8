"""The server backend: a Qdrant server through qdrant-client (or its ``":memory:"`` stand-in in tests).

What differs from the embedded engine lives here: qdrant-client's models and calls, its error
translation (a 404 is :class:`NotFound`), and the active pointer as the alias ``rag_active``. The
algorithms are :class:`rag.store.base.QdrantLikeStore`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rag.errors import NotFound, RagError, StoreError
from rag.store.base import Branch, QdrantLikeStore, SearchPlan
from rag.store.filters import FieldRange
from rag.store.protocol import (
    ACTIVE_ALIAS,
    BOOL_INDEXES,
    KEYWORD_INDEXES,
    SENTENCE_VECTOR_NAME,
    SPARSE_VECTOR_NAME,
    VECTOR_NAME,
    check_collection_name,
)
from rag.types import PointRecord, SparseVector

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

__all__ = ["ClusterOptions", "QdrantServerStore", "collection_config"]


@dataclass(frozen=True)
class ClusterOptions:
    """How a collection is laid out on a Qdrant server or cluster (settings ``RAG_QDRANT_*``), fixed at creation.

    ``shards`` split a collection over the nodes (one per node is the usual start; more lets a cluster
    grow); ``replication_factor`` copies each shard (2 survives a node); ``write_consistency_factor`` is
    how many replicas acknowledge a write before it returns. ``on_disk`` keeps the original vectors
    memory-mapped on disk, with ``quantization`` ``int8`` keeping a 4x smaller copy in RAM for search
    (rescored with the originals). ``write_ordering`` ``strong`` routes writes through the shard leader,
    so a job's upsert is seen by every replica's next read (the job → search handoff).
    """

    shards: int = 1
    replication_factor: int = 1
    write_consistency_factor: int = 1
    on_disk: bool = False
    on_disk_payload: bool = False
    quantization: str = "none"  # none | int8
    write_ordering: str = "weak"  # weak | medium | strong

    @classmethod
    def from_settings(cls, settings: Any) -> ClusterOptions:
        return cls(shards=settings.qdrant_shards, replication_factor=settings.qdrant_replication_factor,
                   write_consistency_factor=settings.qdrant_write_consistency_factor,
                   on_disk=settings.qdrant_on_disk, on_disk_payload=settings.qdrant_on_disk_payload,
                   quantization=settings.qdrant_quantization, write_ordering=settings.qdrant_write_ordering)


def collection_config(options: ClusterOptions, dimension: int) -> dict[str, Any]:
    """The keyword arguments of ``create_collection`` for our collections under ``options``."""
    from qdrant_client import models

    # The int8 copy (in RAM) is the dense vector's alone: sentence vectors are read by id, never searched.
    quantization = None if options.quantization != "int8" else models.ScalarQuantization(
        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    dense = models.VectorParams(size=dimension, distance=models.Distance.COSINE, on_disk=options.on_disk,
                                quantization_config=quantization)
    # Read by point id only (rag/sentence_vectors.py): never in an HNSW graph, float16, on disk.
    sentences = models.VectorParams(
        size=dimension, distance=models.Distance.COSINE, on_disk=True, datatype=models.Datatype.FLOAT16,
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
        hnsw_config=models.HnswConfigDiff(m=0, payload_m=0))
    sparse = models.SparseVectorParams(modifier=models.Modifier.IDF,
                                       index=models.SparseIndexParams(on_disk=options.on_disk))
    config: dict[str, Any] = {
        "vectors_config": {VECTOR_NAME: dense, SENTENCE_VECTOR_NAME: sentences},
        "sparse_vectors_config": {SPARSE_VECTOR_NAME: sparse},
        "shard_number": options.shards, "replication_factor": options.replication_factor,
        "write_consistency_factor": options.write_consistency_factor, "on_disk_payload": options.on_disk_payload,
    }
    return config


def _server_errors_types() -> tuple[type[BaseException], ...]:
    import httpx
    from qdrant_client.http.exceptions import ApiException

    types: list[type[BaseException]] = [ApiException, httpx.HTTPError, OSError, ValueError, RuntimeError]
    with contextlib.suppress(ImportError):
        import grpc

        types.append(grpc.RpcError)
    return tuple(types)


class QdrantServerStore(QdrantLikeStore):
    """A Qdrant server through qdrant-client; the active pointer is the alias ``rag_active``."""

    def __init__(self, client: QdrantClient, options: ClusterOptions | None = None) -> None:
        """Wrap an existing client (the store closes it in :meth:`close`)."""
        self.client = client
        self.options = options or ClusterOptions()
        self._closed = False
        self._error_types = _server_errors_types()
        # Collection -> whether it has sentence vectors: a collection's vector layout is fixed at creation.
        self._sentence_slots: dict[str, bool] = {}

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, timeout: float = 10,
                 options: ClusterOptions | None = None) -> QdrantServerStore:
        """Connect to the server at ``url`` (``":memory:"`` gives qdrant-client's in-process stand-in)."""
        from qdrant_client import QdrantClient

        if url == ":memory:":
            return cls(QdrantClient(":memory:"), options)
        # qdrant-client takes whole seconds; round up so a sub-second setting never becomes 0 (no limit).
        client = QdrantClient(url=url, api_key=api_key or None, timeout=max(1, math.ceil(timeout)))
        return cls(client, options)

    @contextlib.contextmanager
    def _errors(self, action: str, collection: str | None = None) -> Iterator[None]:
        if self._closed:
            raise StoreError("the Qdrant server store is closed")
        try:
            yield
        except RagError:
            raise
        except self._error_types as exc:
            if collection is not None and _is_not_found(exc):
                raise NotFound(f"collection {collection!r} does not exist") from exc
            raise StoreError(f"Qdrant server failed {action}: {exc}") from exc

    def ensure_collection(self, name: str, dimension: int) -> None:
        """Create the collection (dense + IDF sparse vectors) and its payload indexes unless it exists.

        An existing collection must have the same dimension and the ``"bm25"`` IDF sparse vector;
        otherwise :class:`StoreError` (re-index into a new collection).
        """
        from qdrant_client import models

        self._check_new_collection(name, dimension)
        with self._errors(f"creating collection {name!r}"):
            if self.client.collection_exists(name):
                config = self.client.get_collection(name).config.params
                vectors = config.vectors
                params = vectors.get(VECTOR_NAME) if isinstance(vectors, Mapping) else None
                if params is None or params.size != dimension:
                    have = "no 'dense' vector" if params is None else f"{params.size}-d vectors"
                    raise StoreError(f"collection {name!r} has {have}, not {dimension}-d 'dense' vectors")
                sparse_params = (config.sparse_vectors or {}).get(SPARSE_VECTOR_NAME)
                if sparse_params is None or sparse_params.modifier != models.Modifier.IDF:
                    raise StoreError(
                        f"collection {name!r} has no IDF-weighted sparse vector {SPARSE_VECTOR_NAME!r} "
                        f"(it predates hybrid search); re-index its documents into a new collection"
                    )
            else:
                try:
                    self.client.create_collection(name, **collection_config(self.options, dimension))
                except self._error_types:
                    # Another process may have created it between the check and the create.
                    if not self.client.collection_exists(name):
                        raise
            # Re-creating an index is a no-op on the server; local mode ignores indexes entirely.
            for field in KEYWORD_INDEXES:
                schema = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=field == "tenant")
                self.client.create_payload_index(name, field, field_schema=schema, wait=True)
            for field in BOOL_INDEXES:
                self.client.create_payload_index(name, field, field_schema=models.PayloadSchemaType.BOOL, wait=True)

    def list_collections(self) -> list[str]:
        """Names of every collection (aliases excluded), sorted."""
        with self._errors("listing collections"):
            return sorted(c.name for c in self.client.get_collections().collections)

    def get_active(self) -> str | None:
        """The collection the ``rag_active`` alias points at, or None."""
        with self._errors("reading aliases"):
            for alias in self.client.get_aliases().aliases:
                if alias.alias_name == ACTIVE_ALIAS:
                    return alias.collection_name
        return None

    def set_active(self, name: str) -> None:
        """Move the alias in one ``update_collection_aliases`` call (delete + create), atomic on the server."""
        from qdrant_client import models

        check_collection_name(name)
        with self._errors(f"switching the active collection to {name!r}"):
            if not self.client.collection_exists(name):
                raise NotFound(f"collection {name!r} does not exist")
            ops: list[Any] = []
            # Deleting an alias that does not exist is an error on some server versions.
            if self.get_active() is not None:
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=ACTIVE_ALIAS)))
            ops.append(models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=name, alias_name=ACTIVE_ALIAS)
            ))
            self.client.update_collection_aliases(change_aliases_operations=ops)

    def drop_collection(self, name: str) -> None:
        """Delete the collection (the server removes aliases pointing at it)."""
        check_collection_name(name)
        self._sentence_slots.pop(name, None)
        with self._errors(f"deleting collection {name!r}"):
            self.client.delete_collection(name)

    def optimize(self, collection: str) -> bool:
        """A no-op: the server's optimizers build indexes in the background. Returns False."""
        check_collection_name(collection)
        return False

    def close(self) -> None:
        """Close the client. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
        except self._error_types as exc:
            raise StoreError(f"closing the Qdrant client failed: {exc}") from exc

    # -- primitives for QdrantLikeStore (upsert, publish, search, count, scroll live there) ---------

    def _collection(self, name: str) -> str:
        # qdrant-client addresses a collection by name; a missing one is a 404 inside _errors.
        return name

    def _eq(self, key: str, value: str | int | bool) -> Any:
        from qdrant_client import models

        return models.FieldCondition(key=key, match=models.MatchValue(value=value))

    def _match_any(self, key: str, values: list[str] | list[int]) -> Any:
        from qdrant_client import models

        return models.FieldCondition(key=key, match=models.MatchAny(any=values))

    def _range(self, cond: FieldRange) -> Any:
        from qdrant_client import models

        return models.FieldCondition(key=cond.key, range=models.Range(gt=cond.gt, gte=cond.gte, lt=cond.lt,
                                                                      lte=cond.lte))

    def _filter(self, **clauses: list[Any]) -> Any:
        from qdrant_client import models

        return models.Filter(**clauses)

    def _sparse(self, vector: SparseVector) -> Any:
        from qdrant_client import models

        return models.SparseVector(indices=list(vector.indices), values=list(vector.values))

    def _point(self, point: PointRecord, vectors: dict[str, Any]) -> Any:
        from qdrant_client import models

        return models.PointStruct(id=point.id, vector=vectors, payload=point.payload)

    def _ordering(self) -> Any:
        from qdrant_client import models

        return models.WriteOrdering(self.options.write_ordering)

    # Every write waits until applied, in the configured ordering: a job that finished has its points searchable.
    def _upsert_raw(self, handle: str, points: list[Any]) -> None:
        self.client.upsert(handle, points=points, wait=True, ordering=self._ordering())

    def _set_payload_raw(self, handle: str, flt: Any, payload: dict[str, Any]) -> None:
        self.client.set_payload(handle, payload=payload, points=flt, wait=True, ordering=self._ordering())

    def _delete_raw(self, handle: str, flt: Any) -> None:
        from qdrant_client import models

        self.client.delete(handle, points_selector=models.FilterSelector(filter=flt), wait=True,
                           ordering=self._ordering())

    def _count_raw(self, handle: str, flt: Any) -> int:
        return self.client.count(handle, count_filter=flt, exact=True).count

    def _retrieve_raw(self, handle: str, ids: list[str], with_payload: Any, with_vector: Any) -> list[Any]:
        return self.client.retrieve(handle, ids=ids, with_payload=with_payload, with_vectors=with_vector)

    def has_sentence_vectors(self, collection: str) -> bool:
        check_collection_name(collection)
        known = self._sentence_slots.get(collection)
        if known is None:
            with self._errors(f"reading the configuration of {collection!r}", collection):
                vectors = self.client.get_collection(collection).config.params.vectors
            known = self._sentence_slots[collection] = isinstance(vectors, Mapping) and SENTENCE_VECTOR_NAME in vectors
        return known

    def _scroll_raw(self, handle: str, flt: Any, offset: Any, limit: int, with_payload: Any,
                    with_vector: Any) -> tuple[list[Any], Any]:
        return self.client.scroll(handle, scroll_filter=flt, limit=limit, offset=offset, with_payload=with_payload,
                                  with_vectors=with_vector)

    def _dense_branch(self, handle: str, vector: list[float]) -> Branch:
        return Branch(vector, VECTOR_NAME)

    def _sparse_branch(self, vector: SparseVector, scope: list[Any]) -> Branch:
        from qdrant_client import models

        # On a server the scoped IDF also keeps deleted points, which its global IDF counts until
        # segments are vacuumed, out of the statistics.
        return Branch(self._sparse(vector), SPARSE_VECTOR_NAME,
                      models.SearchParams(idf=models.IdfCorpusParams(corpus=models.Filter(must=scope))))

    def _query_raw(self, handle: str, branch: Branch, flt: Any, limit: int) -> list[Any]:
        response = self.client.query_points(handle, query=branch.query, using=branch.using,
                                            search_params=branch.params, query_filter=flt, limit=limit,
                                            with_payload=True)
        return response.points

    def _fused_query_raw(self, handle: str, branches: list[Branch], flt: Any, plan: SearchPlan) -> list[Any]:
        from qdrant_client import models

        prefetch = [models.Prefetch(query=b.query, using=b.using, filter=flt, limit=plan.prefetch, params=b.params)
                    for b in branches]
        response = self.client.query_points(handle, prefetch=prefetch, query_filter=flt, limit=plan.limit,
                                            query=models.RrfQuery(rrf=models.Rrf(k=plan.rrf_k, weights=plan.weights)),
                                            with_payload=True)
        return response.points


def _is_not_found(exc: BaseException) -> bool:
    status = getattr(exc, "status_code", None)
    if status == 404:
        return True
    # Local mode (":memory:") raises ValueError("Collection x not found").
    return isinstance(exc, ValueError) and "not found" in str(exc).lower()
