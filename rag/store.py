"""The vector store seam: one protocol, the embedded Qdrant engine (default) and a Qdrant server.

Every point carries ``tenant``, ``document_id``, ``content_hash`` and ``live`` in its payload. A
document's new generation is upserted with ``live=False`` (invisible), then :meth:`VectorStore.publish`
flips it live and removes the older generations, so a search never sees half of a re-indexed document.

Each point holds a dense vector (``"dense"``, cosine) and, when the caller computed one, a sparse BM25
vector (``"bm25"``, with Qdrant's IDF modifier; see :mod:`rag.sparse`). :meth:`VectorStore.search`
runs dense, sparse or hybrid retrieval; hybrid is one Qdrant query whose two prefetches (dense and
sparse, each under the full tenant/live/user filter) are fused by reciprocal rank fusion in the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

from rag.errors import BadRequest, NotFound, RagError, StoreError, StoreLockedError
from rag.types import PointRecord, ScoredPoint, SparseVector

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

    from rag.settings import Settings

__all__ = [
    "ACTIVE_ALIAS",
    "SPARSE_VECTOR_NAME",
    "VECTOR_NAME",
    "EdgeVectorStore",
    "FieldMatch",
    "FieldMatchAny",
    "FieldRange",
    "FilterCondition",
    "FusionMethod",
    "QdrantServerStore",
    "SearchMode",
    "VectorStore",
    "open_store",
    "parse_filter",
    "point_id",
]

VECTOR_NAME = "dense"
SPARSE_VECTOR_NAME = "bm25"
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

# Bounds for user filters: they come from HTTP requests, so every size is capped.
MAX_FILTER_FIELDS = 16
MAX_FILTER_VALUES = 256
FILTER_FIELDS = {"document_id": str, "title": str, "source": str, "chunk_index": int}
METADATA_PREFIX = "metadata."
# A metadata key becomes part of a Qdrant JSON path: dots, brackets or quotes would change its meaning.
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_RANGE_KEYS = frozenset({"gt", "gte", "lt", "lte"})
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


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class VectorStore(Protocol):
    """Where chunk vectors live: collections of points with a named dense vector and a payload."""

    def ensure_collection(self, name: str, dimension: int) -> None:
        """Create the collection (dense ``"dense"``, cosine; sparse ``"bm25"`` with IDF; payload indexes) unless it exists."""
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
        self, collection: str, *, batch_size: int = 256
    ) -> Iterator[list[PointRecord]]:
        """Every point (any tenant, live or not) with payload, dense and sparse vectors, a batch at a time.

        Re-embedding into a new encoder's collection copies payloads and sparse vectors from here.
        """
        ...

    def optimize(self, collection: str) -> bool:
        """Build vector indexes after a bulk load; True if anything was rebuilt."""
        ...

    def close(self) -> None:
        """Release the store; further calls raise :class:`StoreError`."""
        ...


# ---------------------------------------------------------------------------------------------
# User filters: validated once into a neutral form, translated by each backend
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldMatch:
    """``key`` equals ``value`` exactly."""

    key: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class FieldMatchAny:
    """``key`` equals one of ``values`` (each a str, int or bool)."""

    key: str
    values: tuple[str | int | bool, ...]


@dataclass(frozen=True, slots=True)
class FieldRange:
    """``key`` is a number within the given bounds (None: unbounded)."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


FilterCondition = FieldMatch | FieldMatchAny | FieldRange


def parse_filter(user_filter: Mapping[str, Any] | None) -> tuple[FilterCondition, ...]:
    """Validate a user filter into conditions every backend understands; :class:`BadRequest` if invalid.

    Fields: ``document_id``, ``title``, ``source``, ``chunk_index`` and ``metadata.<key>``. A value is
    a scalar (exact match; a float matches numerically), a non-empty list of scalars (match any), or a
    dict of ``gt``/``gte``/``lt``/``lte`` bounds. Conditions on different fields all must hold.
    """
    if user_filter is None:
        return ()
    if not isinstance(user_filter, Mapping):
        raise BadRequest(f"filter must be an object mapping fields to values, not {type(user_filter).__name__}")
    if len(user_filter) > MAX_FILTER_FIELDS:
        raise BadRequest(f"filter has {len(user_filter)} fields; at most {MAX_FILTER_FIELDS} are allowed")
    return tuple(_parse_condition(field, value) for field, value in user_filter.items())


def _parse_condition(field: object, value: object) -> FilterCondition:
    if not isinstance(field, str):
        raise BadRequest(f"filter field {field!r} must be a string")
    if field.startswith(METADATA_PREFIX):
        if not _METADATA_KEY.match(field[len(METADATA_PREFIX):]):
            raise BadRequest(
                f"filter field {field!r}: a metadata key must be 1-64 letters, digits, '_' or '-'"
            )
        expected: type | None = None  # metadata values may be of any scalar type
    elif field in FILTER_FIELDS:
        expected = FILTER_FIELDS[field]
    else:
        raise BadRequest(
            f"filter field {field!r} is not filterable; use one of "
            f"{', '.join(sorted(FILTER_FIELDS))} or metadata.<key>"
        )

    if isinstance(value, Mapping):
        return _parse_range(field, value, expected)
    if isinstance(value, (list, tuple)):
        if not value:
            raise BadRequest(f"filter field {field!r}: an empty list matches nothing")
        if len(value) > MAX_FILTER_VALUES:
            raise BadRequest(f"filter field {field!r}: at most {MAX_FILTER_VALUES} values are allowed")
        values = []
        for item in value:
            if isinstance(item, float) or not _is_scalar(item):
                raise BadRequest(
                    f"filter field {field!r}: list items must be strings, integers or booleans, not {item!r}"
                )
            _check_type(field, item, expected)
            if item not in values:
                values.append(item)
        return FieldMatch(field, values[0]) if len(values) == 1 else FieldMatchAny(field, tuple(values))
    if isinstance(value, float):
        # Qdrant matches floats only through ranges; a point range is the exact numeric match.
        if expected is str:
            raise BadRequest(f"filter field {field!r} expects a string, not {value!r}")
        if not math.isfinite(value):
            raise BadRequest(f"filter field {field!r}: {value!r} is not a finite number")
        return FieldRange(field, gte=value, lte=value)
    if _is_scalar(value):
        _check_type(field, value, expected)
        return FieldMatch(field, value)  # type: ignore[arg-type]
    raise BadRequest(
        f"filter field {field!r}: expected a string, number, boolean, list of those, "
        f"or an object of gt/gte/lt/lte; got {value!r}"
    )


def _parse_range(field: str, value: Mapping[Any, Any], expected: type | None) -> FieldRange:
    if expected is str:
        raise BadRequest(f"filter field {field!r} holds text; a range (gt/gte/lt/lte) does not apply")
    keys = set(value)
    if not keys or not keys <= _RANGE_KEYS:
        raise BadRequest(
            f"filter field {field!r}: a range takes one or more of gt, gte, lt, lte; got {sorted(map(str, keys))}"
        )
    bounds: dict[str, float] = {}
    for key, bound in value.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not _finite(bound):
            raise BadRequest(f"filter field {field!r}: range bound {key} must be a finite number, not {bound!r}",
                             code="invalid_filter")
        bounds[key] = float(bound) if isinstance(bound, int) and not _INT64[0] <= bound <= _INT64[1] else bound
    return FieldRange(field, **bounds)


def _finite(number: int | float) -> bool:
    """A bound a float64 comparison can use: ints of any size are fine up to float64's range."""
    if isinstance(number, int):
        return -_MAX_BOUND <= number <= _MAX_BOUND
    return math.isfinite(number)


def _is_scalar(value: object) -> bool:
    return isinstance(value, (str, int, bool))


# Qdrant stores integers as int64; a larger one fails deep inside the engine instead of as a 400.
_INT64 = (-(2**63), 2**63 - 1)
# Qdrant ranges are float64 comparisons; a bound beyond this has no meaning a stored value could meet.
_MAX_BOUND = 1.7976931348623157e308
MAX_FILTER_STRING = 1024


def _check_value(field: str, value: object) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise BadRequest(f"filter field {field!r}: {value} is outside the 64-bit integer range", code="invalid_filter")
    if isinstance(value, str) and len(value) > MAX_FILTER_STRING:
        raise BadRequest(f"filter field {field!r}: a value is longer than {MAX_FILTER_STRING} characters",
                         code="invalid_filter")


def _check_type(field: str, value: object, expected: type | None) -> None:
    _check_value(field, value)
    if expected is None:
        return
    # bool is an int in Python; chunk_index = true must not silently mean chunk 1.
    ok = isinstance(value, str) if expected is str else isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        kind = "a string" if expected is str else "an integer"
        raise BadRequest(f"filter field {field!r} expects {kind}, not {value!r}")


def _check_collection_name(name: str) -> None:
    if not isinstance(name, str) or not _COLLECTION_NAME.match(name) or name == ACTIVE_ALIAS:
        raise BadRequest(
            f"collection name {name!r} is invalid: use 1-128 letters, digits, '_', '.' or '-' "
            f"(starting with a letter or digit), and not {ACTIVE_ALIAS!r}"
        )


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadRequest(f"top_k must be a positive integer, not {top_k!r}")


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


# ---------------------------------------------------------------------------------------------
# Search requests: validated once, run by each backend in one engine query
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SearchPlan:
    mode: str
    dense: list[float] | None
    sparse: SparseVector | None
    limit: int  # top_k plus TIE_SLACK
    top_k: int
    prefetch: int
    rrf_k: int
    weights: list[float] | None  # None: plain RRF


def _plan_search(
    mode: str,
    vector: Sequence[float] | None,
    sparse_vector: SparseVector | None,
    *,
    top_k: int,
    fusion: str,
    rrf_k: int,
    weights: Sequence[float],
    prefetch_k: int,
) -> _SearchPlan:
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
    plan_weights: list[float] | None = None
    if mode == "hybrid":
        if fusion not in FUSION_METHODS:
            raise BadRequest(f"fusion must be one of {', '.join(FUSION_METHODS)}, not {fusion!r}")
        if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 1:
            raise BadRequest(f"rrf_k must be an integer >= 1, not {rrf_k!r}")
        if isinstance(prefetch_k, bool) or not isinstance(prefetch_k, int) or prefetch_k < 1:
            raise BadRequest(f"prefetch_k must be a positive integer, not {prefetch_k!r}")
        if fusion == "weighted":
            if len(weights) != 2 or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
            ) or not any(weights):
                raise BadRequest(f"weights must be two finite numbers >= 0, not both 0; got {tuple(weights)!r}")
            plan_weights = [float(w) for w in weights]
    limit = top_k + TIE_SLACK
    # A fused list can only hold what the branches fetched; a branch shorter than the answer would cut it.
    return _SearchPlan(mode=mode, dense=dense, sparse=sparse, limit=limit, top_k=top_k,
                       prefetch=max(prefetch_k, limit), rrf_k=rrf_k, weights=plan_weights)


def _ranked(hits: Sequence[Any], top_k: int) -> list[ScoredPoint]:
    """Engine hits as ScoredPoints, best first, equal scores by id, cut to ``top_k``."""
    points = [ScoredPoint(id=str(h.id), score=float(h.score), payload=dict(h.payload or {})) for h in hits]
    points.sort(key=lambda p: (-p.score, p.id))
    return points[:top_k]


# ---------------------------------------------------------------------------------------------
# Embedded: qdrant-edge, one shard per collection, owned by exactly one process
# ---------------------------------------------------------------------------------------------


def _edge_value(value: str | int | bool) -> Any:
    """A match value the edge bindings keep as the right JSON type.

    qdrant-edge 0.9.0 converts a Python value by trying str, then int, then bool; ``True`` is an
    int in Python, so ``MatchValue(True)`` silently becomes ``MatchValue(1)`` and never matches a
    stored ``true``. numpy's bool is not an int, so it reaches the bool branch intact.
    """
    if isinstance(value, bool):
        import numpy as np

        return np.bool_(value)
    return value


class EdgeVectorStore:
    """The embedded Qdrant engine (qdrant-edge): one shard directory per collection under ``root``.

    Layout: ``root/.lock`` (held for the object's lifetime), ``root/active`` (the active pointer),
    ``root/collections/<name>/`` (one shard each).

    Threads: searches run from API worker threads while the ingest worker writes from another one.
    The engine locks internally and concurrent query/update calls were verified to work, but the
    bindings hold the GIL for the whole of each call; multi-step writes (publish, delete, drop) take
    one store-wide write lock so they do not interleave, and searches never wait for that lock.

    Indexing: the engine never builds HNSW by itself; :meth:`optimize` does, and blocks every
    Python thread of the process while it runs (about 7 s for 20k x 384-d here). The store therefore
    never calls it on its own: call it after a bulk load when a pause is acceptable (batch CLI,
    re-embedding a new collection before switching to it). Without it, search is brute force, which
    is exact and ~1.4 ms for 20k x 384-d points on this machine.
    """

    # Below this many points (deleted ones included) searches are exact: brute force costs about
    # 1.4 ms at 20k x 384-d here, and HNSW recall on small or uniform data is poor at the default ef
    # (OFFLINE.md). Above it, an HNSW index built by optimize() is trusted; Qdrant's planner still
    # scores exactly when the filtered set is small.
    EXACT_SEARCH_MAX_POINTS = 20_000

    def __init__(self, root: Path | str, *, exact_search_max_points: int | None = None) -> None:
        """Take the exclusive lock on ``root/.lock``, or raise :class:`StoreLockedError` at once."""
        self.root = Path(root)
        self.lock_path = self.root / ".lock"
        self._exact_max = self.EXACT_SEARCH_MAX_POINTS if exact_search_max_points is None else exact_search_max_points
        self._lock_fd = self._acquire_lock()
        # Lock order: _write_lock before _shards_lock. Searches take only _shards_lock, briefly.
        self._write_lock = threading.RLock()
        self._shards_lock = threading.RLock()
        self._shards: dict[str, Any] = {}
        self._closed = False
        try:
            self._collections_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._release_lock()
            raise StoreError(f"cannot create {self._collections_dir}: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        # The lock comes before any engine call: a second EdgeShard.load on a shard another process
        # holds fails, and that failed attempt breaks the holder's next flush (OFFLINE.md).
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot open the store lock {self.lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            raise StoreLockedError(
                f"the embedded Qdrant store at {self.root} is in use by process {holder} "
                f"(lock file {self.lock_path}); use the running service's HTTP API, "
                f"or stop that process first"
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.lock_path}: {exc}") from exc
        # The pid is only informative (for the message above); the flock is what excludes.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_lock(self) -> None:
        # The file stays: unlinking it would let a newcomer lock a fresh inode while another
        # process still waits on the old one.
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Flush and close every shard, then release the lock. Safe to call twice."""
        with self._write_lock, self._shards_lock:
            if self._closed:
                return
            self._closed = True
            errors: list[str] = []
            for name, shard in self._shards.items():
                try:
                    shard.flush()
                    shard.close()
                except Exception as exc:  # the engine raises bare Exception; close the rest anyway
                    errors.append(f"{name}: {exc}")
            self._shards.clear()
            self._release_lock()
        if errors:
            raise StoreError(f"closing the embedded store at {self.root} failed: {'; '.join(errors)}")

    def __enter__(self) -> EdgeVectorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- shards ------------------------------------------------------------------------------

    @property
    def _collections_dir(self) -> Path:
        return self.root / "collections"

    @property
    def _active_path(self) -> Path:
        return self.root / "active"

    def _shard_path(self, name: str) -> Path:
        return self._collections_dir / name

    @staticmethod
    def _is_shard(path: Path) -> bool:
        # edge_config.json is written by EdgeShard.create; a directory without it is not a shard.
        return (path / "edge_config.json").is_file()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the embedded store at {self.root} is closed")

    def _shard(self, name: str) -> Any:
        """The open shard of collection ``name``, loaded on first use; NotFound if it does not exist."""
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        _check_collection_name(name)
        with self._shards_lock:
            self._check_open()
            shard = self._shards.get(name)
            if shard is None:
                path = self._shard_path(name)
                if not self._is_shard(path):
                    raise NotFound(f"collection {name!r} does not exist")
                from qdrant_edge import EdgeShard

                with _edge_errors(f"loading collection {name!r}"):
                    shard = EdgeShard.load(str(path))
                self._shards[name] = shard
            return shard

    def ensure_collection(self, name: str, dimension: int) -> None:
        """Create the shard (cosine ``"dense"``, IDF-weighted sparse ``"bm25"``, payload indexes) unless it exists.

        A shard made before sparse vectors existed cannot gain one (the engine fixes a shard's vector
        layout at creation): it raises :class:`StoreError`; re-index into a new collection.
        """
        from qdrant_edge import (
            BoolIndexParams,
            Distance,
            EdgeConfig,
            EdgeShard,
            EdgeSparseVectorParams,
            EdgeVectorParams,
            KeywordIndexParams,
            Modifier,
            UpdateOperation,
        )

        _check_collection_name(name)
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise BadRequest(f"dimension must be a positive integer, not {dimension!r}")
        with self._write_lock, self._shards_lock:
            self._check_open()
            path = self._shard_path(name)
            if self._is_shard(path):
                existing = _edge_dimension(path)
                if existing is not None and existing != dimension:
                    raise StoreError(
                        f"collection {name!r} holds {existing}-d vectors, not {dimension}-d; "
                        f"use a new collection for a different encoder"
                    )
                if _edge_sparse_modifier(path) not in (None, "idf"):
                    raise StoreError(
                        f"collection {name!r} has no IDF-weighted sparse vector {SPARSE_VECTOR_NAME!r} "
                        f"(it predates hybrid search); re-index its documents into a new collection"
                    )
                shard = self._shard(name)
            else:
                config = EdgeConfig(
                    vectors={VECTOR_NAME: EdgeVectorParams(size=dimension, distance=Distance.Cosine)},
                    sparse_vectors={SPARSE_VECTOR_NAME: EdgeSparseVectorParams(modifier=Modifier.Idf)},
                )
                with _edge_errors(f"creating collection {name!r}"):
                    shard = EdgeShard.create(str(path), config)
                self._shards[name] = shard
            # Creating an existing index is a no-op, so this also repairs a shard made before an index existed.
            with _edge_errors(f"indexing collection {name!r}"):
                for field in KEYWORD_INDEXES:
                    params = KeywordIndexParams(is_tenant=True) if field == "tenant" else KeywordIndexParams()
                    shard.update(UpdateOperation.create_field_index(field, params))
                for field in BOOL_INDEXES:
                    shard.update(UpdateOperation.create_field_index(field, BoolIndexParams()))
                shard.flush()

    def list_collections(self) -> list[str]:
        """Names of every collection (shard directories), sorted."""
        self._check_open()
        try:
            return sorted(p.name for p in self._collections_dir.iterdir() if self._is_shard(p))
        except OSError as exc:
            raise StoreError(f"cannot list {self._collections_dir}: {exc}") from exc

    def get_active(self) -> str | None:
        """The collection named by the pointer file, or None when none was set."""
        self._check_open()
        try:
            name = self._active_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self._active_path}: {exc}") from exc
        return name or None

    def set_active(self, name: str) -> None:
        """Point ``root/active`` at ``name``: written to a temp file, fsynced, then renamed over."""
        _check_collection_name(name)
        with self._write_lock:
            self._check_open()
            if not self._is_shard(self._shard_path(name)):
                raise NotFound(f"collection {name!r} does not exist")
            self._write_pointer(name)

    def _write_pointer(self, name: str | None) -> None:
        try:
            if name is None:
                self._active_path.unlink(missing_ok=True)
            else:
                # os.replace is atomic: a reader sees the old name or the new one, never a torn file.
                tmp = self.root / f".active.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "w", encoding="utf-8") as fh:
                    fh.write(name + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self._active_path)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself must survive a crash
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StoreError(f"cannot write the active pointer {self._active_path}: {exc}") from exc

    def drop_collection(self, name: str) -> None:
        """Close and delete the shard; the active pointer is cleared if it named it (as a server alias is)."""
        _check_collection_name(name)
        with self._write_lock, self._shards_lock:
            self._check_open()
            shard = self._shards.pop(name, None)
            if shard is not None:
                with _edge_errors(f"closing collection {name!r}"):
                    shard.close()
            path = self._shard_path(name)
            if self.get_active() == name:
                self._write_pointer(None)
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc}") from exc

    # -- points ------------------------------------------------------------------------------

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        """Insert or overwrite points, a few hundred per engine call (see ``UPSERT_BATCH``)."""
        from qdrant_edge import Point, UpdateOperation

        with self._write_lock:
            shard = self._shard(collection)
            with _edge_errors(f"upserting into {collection!r}"):
                for batch in _chunks(points, UPSERT_BATCH):
                    shard.update(UpdateOperation.upsert_points([Point(p.id, _edge_vectors(p), p.payload) for p in batch]))

    def publish(self, collection: str, tenant: str, document_id: str, content_hash: str) -> None:
        """Set ``live=True`` on the generation, delete the document's other generations, flush."""
        self.publish_many(collection, tenant, [(document_id, content_hash)])

    def publish_many(self, collection: str, tenant: str, documents: Sequence[tuple[str, str]]) -> None:
        """Publish many documents of one tenant; one flush at the end makes all of them durable."""
        from qdrant_edge import Filter, UpdateOperation

        pairs = _dedupe_documents(documents)
        if not pairs:
            return
        with self._write_lock:
            shard = self._shard(collection)
            with _edge_errors(f"publishing into {collection!r}"):
                for batch in _chunks(pairs, PUBLISH_BATCH):
                    generations = [_edge_generation(d, h) for d, h in batch]
                    # Live first, then delete: a reader sees the old generation, then both for an
                    # instant, then only the new one; never no generation at all.
                    shard.update(UpdateOperation.set_payload_by_filter(
                        Filter(must=[_edge_eq("tenant", tenant)], should=generations), {"live": True}
                    ))
                    shard.update(UpdateOperation.delete_points_by_filter(Filter(
                        must=[_edge_eq("tenant", tenant), _edge_any("document_id", [d for d, _ in batch])],
                        must_not=generations,
                    )))
                shard.flush()

    def delete_document(self, collection: str, tenant: str, document_id: str) -> int:
        """Delete every point of the document and flush; returns how many there were."""
        from qdrant_edge import CountRequest, Filter, UpdateOperation

        flt = Filter(must=[_edge_eq("tenant", tenant), _edge_eq("document_id", document_id)])
        with self._write_lock:
            shard = self._shard(collection)
            with _edge_errors(f"deleting from {collection!r}"):
                # Exact under the write lock: no other write can land between the count and the delete.
                removed = shard.count(CountRequest(exact=True, filter=flt))
                if removed:
                    shard.update(UpdateOperation.delete_points_by_filter(flt))
                    shard.flush()
        return removed

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
        """Dense, sparse or hybrid search in one engine query; see :meth:`VectorStore.search`."""
        from qdrant_edge import Filter, Fusion, IdfParams, Prefetch, Query, QueryRequest, SearchParams
        from qdrant_edge import SparseVector as EdgeSparse

        plan = _plan_search(mode, vector, sparse_vector, top_k=top_k, fusion=fusion, rrf_k=rrf_k, weights=weights,
                            prefetch_k=prefetch_k)
        scope = [_edge_eq("tenant", tenant), _edge_eq("live", True)]
        conditions = scope + [_edge_condition(c) for c in parse_filter(filter)]
        shard = self._shard(collection)
        with _edge_errors(f"searching {collection!r}"):
            flt = Filter(must=conditions)
            dense_params = SearchParams(exact=shard.info().points_count <= self._exact_max)
            # IDF over the tenant's live points only: another tenant's documents or a staged
            # generation must not move this tenant's scores (nor leak their term statistics).
            sparse_params = SearchParams(idf=IdfParams(corpus=Filter(must=scope)))
            dense_q = Query.Nearest(plan.dense, using=VECTOR_NAME) if plan.dense is not None else None
            sparse_q = (Query.Nearest(EdgeSparse(plan.sparse.indices, plan.sparse.values), using=SPARSE_VECTOR_NAME)
                        if plan.sparse is not None else None)
            if plan.mode == "dense":
                request = QueryRequest(limit=plan.limit, query=dense_q, filter=flt, with_payload=True,
                                       params=dense_params)
            elif plan.mode == "sparse":
                request = QueryRequest(limit=plan.limit, query=sparse_q, filter=flt, with_payload=True,
                                       params=sparse_params)
            else:
                request = QueryRequest(
                    limit=plan.limit,
                    prefetches=[
                        Prefetch(limit=plan.prefetch, query=dense_q, filter=flt, params=dense_params),
                        Prefetch(limit=plan.prefetch, query=sparse_q, filter=flt, params=sparse_params),
                    ],
                    query=Fusion.Rrf(k=plan.rrf_k, weights=plan.weights),
                    filter=flt,
                    with_payload=True,
                )
            hits = shard.query(request)
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
        from qdrant_edge import CountRequest, Filter

        must = [_edge_eq(k, v) for k, v in (("tenant", tenant), ("document_id", document_id), ("live", live))
                if v is not None]
        shard = self._shard(collection)
        with _edge_errors(f"counting {collection!r}"):
            return shard.count(CountRequest(exact=True, filter=Filter(must=must) if must else None))

    def _scroll(self, collection: str, *, batch_size: int, flt: Any = None, with_payload: Any = True,
                with_vector: Any = True) -> Iterator[list[Any]]:
        """The engine's records in batches, each batch its own short engine call."""
        from qdrant_edge import ScrollRequest

        shard = self._shard(collection)
        offset = None
        while True:
            with _edge_errors(f"scrolling {collection!r}"):
                records, offset = shard.scroll(ScrollRequest(offset=offset, limit=batch_size, filter=flt,
                                                             with_payload=with_payload, with_vector=with_vector))
            if records:
                yield records
            if offset is None or not records:
                return

    def iter_dense(
        self, collection: str, *, tenant: str | None = None, live: bool | None = True, batch_size: int = 512
    ) -> Iterator[tuple[list[str], list[list[float]]]]:
        """Every matching point's dense vector, scrolled in batches (each its own short engine call)."""
        from qdrant_edge import Filter

        must = [_edge_eq(k, v) for k, v in (("tenant", tenant), ("live", live)) if v is not None]
        for records in self._scroll(collection, batch_size=batch_size, flt=Filter(must=must) if must else None,
                                    with_payload=["document_id"], with_vector=[VECTOR_NAME]):
            yield ([str((r.payload or {}).get("document_id", "")) for r in records],
                   [list(r.vector[VECTOR_NAME]) for r in records])

    def iter_points(self, collection: str, *, batch_size: int = 256) -> Iterator[list[PointRecord]]:
        """Every point with payload and vectors, scrolled in batches (each its own short engine call)."""
        for records in self._scroll(collection, batch_size=batch_size):
            yield [_record_from(r.id, r.payload, r.vector) for r in records]

    def optimize(self, collection: str) -> bool:
        """Run the engine's optimizers (HNSW build, merges, vacuum) now; blocks the process meanwhile.

        Returns True if any segment changed. The engine only builds HNSW for segments above its
        indexing threshold (roughly 10k 384-d vectors), so small collections stay brute force.
        """
        with self._write_lock:
            shard = self._shard(collection)
            with _edge_errors(f"optimizing {collection!r}"):
                changed = bool(shard.optimize())
                shard.flush()
        return changed


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


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _edge_dimension(path: Path) -> int | None:
    # The bindings expose no config getter; edge_config.json is the shard's own record of it.
    # Unreadable means unknown: the engine then rejects wrong-sized vectors itself.
    try:
        config = json.loads((path / "edge_config.json").read_text(encoding="utf-8"))
        return int(config["vectors"][VECTOR_NAME]["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _edge_sparse_modifier(path: Path) -> str | None:
    """The sparse vector's modifier ("idf"), "" if the shard has no such vector, None if unreadable."""
    try:
        config = json.loads((path / "edge_config.json").read_text(encoding="utf-8"))
        sparse = config.get("sparse_vectors") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(sparse, dict) or SPARSE_VECTOR_NAME not in sparse:
        return ""
    params = sparse[SPARSE_VECTOR_NAME]
    return str(params.get("modifier") or "").lower() if isinstance(params, dict) else ""


def _edge_vectors(p: PointRecord) -> dict[str, Any]:
    from qdrant_edge import SparseVector as EdgeSparse

    vectors: dict[str, Any] = {VECTOR_NAME: p.vector if isinstance(p.vector, list) else list(p.vector)}
    # An empty sparse vector is left out, as on the server side: the point then is not part of the
    # IDF statistics on either backend.
    if p.sparse is not None and p.sparse.indices:
        vectors[SPARSE_VECTOR_NAME] = EdgeSparse(p.sparse.indices, p.sparse.values)
    return vectors


@contextlib.contextmanager
def _edge_errors(action: str) -> Iterator[None]:
    try:
        yield
    except RagError:
        raise
    except Exception as exc:  # the bindings raise plain Exception for every engine error
        raise StoreError(f"embedded Qdrant failed {action}: {exc}") from exc


def _edge_eq(key: str, value: str | int | bool) -> Any:
    from qdrant_edge import FieldCondition, MatchValue

    return FieldCondition(key, match=MatchValue(_edge_value(value)))


def _edge_any(key: str, values: Sequence[str | int | bool]) -> Any:
    from qdrant_edge import FieldCondition, Filter, MatchAny

    # MatchAny takes only all-strings or all-integers; bools and mixed lists become an OR of groups.
    strings = [v for v in values if isinstance(v, str)]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    bools = [v for v in values if isinstance(v, bool)]
    parts = [FieldCondition(key, match=MatchAny(group)) for group in (strings, ints) if group]
    parts += [_edge_eq(key, b) for b in bools]
    return parts[0] if len(parts) == 1 else Filter(should=parts)


def _edge_generation(document_id: str, content_hash: str) -> Any:
    from qdrant_edge import Filter

    return Filter(must=[_edge_eq("document_id", document_id), _edge_eq("content_hash", content_hash)])


def _edge_condition(cond: FilterCondition) -> Any:
    from qdrant_edge import FieldCondition, RangeFloat

    if isinstance(cond, FieldMatch):
        return _edge_eq(cond.key, cond.value)
    if isinstance(cond, FieldMatchAny):
        return _edge_any(cond.key, cond.values)
    return FieldCondition(cond.key, range=RangeFloat(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))


# ---------------------------------------------------------------------------------------------
# Server: qdrant-client (a Qdrant server, or ":memory:" in tests)
# ---------------------------------------------------------------------------------------------


def _server_errors_types() -> tuple[type[BaseException], ...]:
    import httpx
    from qdrant_client.http.exceptions import ApiException

    types: list[type[BaseException]] = [ApiException, httpx.HTTPError, OSError, ValueError, RuntimeError]
    with contextlib.suppress(ImportError):
        import grpc

        types.append(grpc.RpcError)
    return tuple(types)


class QdrantServerStore:
    """A Qdrant server through qdrant-client; the active pointer is the alias ``rag_active``."""

    def __init__(self, client: QdrantClient) -> None:
        """Wrap an existing client (the store closes it in :meth:`close`)."""
        self.client = client
        self._closed = False
        self._error_types = _server_errors_types()

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, timeout: float = 10) -> QdrantServerStore:
        """Connect to the server at ``url`` (``":memory:"`` gives qdrant-client's in-process stand-in)."""
        from qdrant_client import QdrantClient

        if url == ":memory:":
            return cls(QdrantClient(":memory:"))
        # qdrant-client takes whole seconds; round up so a sub-second setting never becomes 0 (no limit).
        client = QdrantClient(url=url, api_key=api_key or None, timeout=max(1, math.ceil(timeout)))
        return cls(client)

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

        _check_collection_name(name)
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise BadRequest(f"dimension must be a positive integer, not {dimension!r}")
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
                    dense = models.VectorParams(size=dimension, distance=models.Distance.COSINE)
                    sparse = models.SparseVectorParams(modifier=models.Modifier.IDF)
                    self.client.create_collection(name, vectors_config={VECTOR_NAME: dense},
                                                  sparse_vectors_config={SPARSE_VECTOR_NAME: sparse})
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

        _check_collection_name(name)
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
        _check_collection_name(name)
        with self._errors(f"deleting collection {name!r}"):
            self.client.delete_collection(name)

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        """Upsert in batches of ``UPSERT_BATCH``, waiting for each to be applied."""
        from qdrant_client import models

        with self._errors(f"upserting into {collection!r}", collection):
            for batch in _chunks(points, UPSERT_BATCH):
                structs = [models.PointStruct(id=p.id, vector=_server_vectors(p), payload=p.payload) for p in batch]
                self.client.upsert(collection, points=structs, wait=True)

    def publish(self, collection: str, tenant: str, document_id: str, content_hash: str) -> None:
        """Set ``live=True`` on the generation, then delete the document's other generations."""
        self.publish_many(collection, tenant, [(document_id, content_hash)])

    def publish_many(self, collection: str, tenant: str, documents: Sequence[tuple[str, str]]) -> None:
        """Publish many documents of one tenant; each step waits for the server to apply it."""
        from qdrant_client import models

        pairs = _dedupe_documents(documents)
        with self._errors(f"publishing into {collection!r}", collection):
            for batch in _chunks(pairs, PUBLISH_BATCH):
                generations: list[Any] = [
                    models.Filter(must=[_server_eq("document_id", d), _server_eq("content_hash", h)]) for d, h in batch
                ]
                self.client.set_payload(
                    collection,
                    payload={"live": True},
                    points=models.Filter(must=[_server_eq("tenant", tenant)], should=generations),
                    wait=True,
                )
                stale = models.Filter(
                    must=[_server_eq("tenant", tenant), _server_any("document_id", [d for d, _ in batch])],
                    must_not=generations,
                )
                self.client.delete(collection, points_selector=models.FilterSelector(filter=stale), wait=True)

    def delete_document(self, collection: str, tenant: str, document_id: str) -> int:
        """Delete every point of the document; returns the count taken just before."""
        from qdrant_client import models

        flt = models.Filter(must=[_server_eq("tenant", tenant), _server_eq("document_id", document_id)])
        with self._errors(f"deleting from {collection!r}", collection):
            removed = self.client.count(collection, count_filter=flt, exact=True).count
            if removed:
                self.client.delete(collection, points_selector=models.FilterSelector(filter=flt), wait=True)
        return removed

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
        """Dense, sparse or hybrid search in one ``query_points`` call; see :meth:`VectorStore.search`."""
        from qdrant_client import models

        plan = _plan_search(mode, vector, sparse_vector, top_k=top_k, fusion=fusion, rrf_k=rrf_k, weights=weights,
                            prefetch_k=prefetch_k)
        scope = [_server_eq("tenant", tenant), _server_eq("live", True)]
        flt = models.Filter(must=scope + [_server_condition(c) for c in parse_filter(filter)])
        # IDF over the tenant's live points only (as on the embedded side); on a server this also
        # keeps deleted points, which its global IDF counts until segments are vacuumed, out of it.
        sparse_params = models.SearchParams(idf=models.IdfCorpusParams(corpus=models.Filter(must=scope)))
        sparse_q = (models.SparseVector(indices=list(plan.sparse.indices), values=list(plan.sparse.values))
                    if plan.sparse is not None else None)
        args: dict[str, Any]
        if plan.mode == "dense":
            args = {"query": plan.dense, "using": VECTOR_NAME}
        elif plan.mode == "sparse":
            args = {"query": sparse_q, "using": SPARSE_VECTOR_NAME, "search_params": sparse_params}
        else:
            args = {
                "prefetch": [
                    models.Prefetch(query=plan.dense, using=VECTOR_NAME, filter=flt, limit=plan.prefetch),
                    models.Prefetch(query=sparse_q, using=SPARSE_VECTOR_NAME, filter=flt, limit=plan.prefetch,
                                    params=sparse_params),
                ],
                "query": models.RrfQuery(rrf=models.Rrf(k=plan.rrf_k, weights=plan.weights)),
            }
        with self._errors(f"searching {collection!r}", collection):
            response = self.client.query_points(collection, query_filter=flt, limit=plan.limit, with_payload=True,
                                                **args)
        return _ranked(response.points, plan.top_k)

    def count(
        self,
        collection: str,
        *,
        tenant: str | None = None,
        document_id: str | None = None,
        live: bool | None = None,
    ) -> int:
        """Exact number of points matching every field given."""
        from qdrant_client import models

        must: list[Any] = [_server_eq(k, v) for k, v in (("tenant", tenant), ("document_id", document_id),
                                                          ("live", live)) if v is not None]
        with self._errors(f"counting {collection!r}", collection):
            flt = models.Filter(must=must) if must else None
            return self.client.count(collection, count_filter=flt, exact=True).count

    def _scroll(self, collection: str, *, batch_size: int, flt: Any = None, with_payload: Any = True,
                with_vectors: Any = True) -> Iterator[list[Any]]:
        """The server's records in batches."""
        offset = None
        while True:
            with self._errors(f"scrolling {collection!r}", collection):
                records, offset = self.client.scroll(collection, scroll_filter=flt, limit=batch_size, offset=offset,
                                                     with_payload=with_payload, with_vectors=with_vectors)
            if records:
                yield records
            if offset is None or not records:
                return

    def iter_dense(
        self, collection: str, *, tenant: str | None = None, live: bool | None = True, batch_size: int = 512
    ) -> Iterator[tuple[list[str], list[list[float]]]]:
        """Every matching point's dense vector, scrolled in batches."""
        from qdrant_client import models

        must: list[Any] = [_server_eq(k, v) for k, v in (("tenant", tenant), ("live", live)) if v is not None]
        for records in self._scroll(collection, batch_size=batch_size, flt=models.Filter(must=must) if must else None,
                                    with_payload=["document_id"], with_vectors=[VECTOR_NAME]):
            yield ([str((r.payload or {}).get("document_id", "")) for r in records],
                   [list(r.vector[VECTOR_NAME]) for r in records])

    def iter_points(self, collection: str, *, batch_size: int = 256) -> Iterator[list[PointRecord]]:
        """Every point with payload and vectors, scrolled in batches."""
        for records in self._scroll(collection, batch_size=batch_size):
            yield [_record_from(r.id, r.payload, r.vector) for r in records]

    def optimize(self, collection: str) -> bool:
        """A no-op: the server's optimizers build indexes in the background. Returns False."""
        _check_collection_name(collection)
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


def _is_not_found(exc: BaseException) -> bool:
    status = getattr(exc, "status_code", None)
    if status == 404:
        return True
    # Local mode (":memory:") raises ValueError("Collection x not found").
    return isinstance(exc, ValueError) and "not found" in str(exc).lower()


def _server_vectors(p: PointRecord) -> dict[str, Any]:
    from qdrant_client import models

    vectors: dict[str, Any] = {VECTOR_NAME: p.vector if isinstance(p.vector, list) else list(p.vector)}
    if p.sparse is not None and p.sparse.indices:  # empty: left out, as on the embedded side
        vectors[SPARSE_VECTOR_NAME] = models.SparseVector(indices=list(p.sparse.indices), values=list(p.sparse.values))
    return vectors


def _server_eq(key: str, value: str | int | bool) -> Any:
    from qdrant_client import models

    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def _server_any(key: str, values: Sequence[str | int | bool]) -> Any:
    from qdrant_client import models

    # Same grouping as the edge side: MatchAny is all-strings or all-integers.
    strings = [v for v in values if isinstance(v, str)]
    ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    bools = [v for v in values if isinstance(v, bool)]
    parts: list[Any] = [models.FieldCondition(key=key, match=models.MatchAny(any=g)) for g in (strings, ints) if g]
    parts += [_server_eq(key, b) for b in bools]
    return parts[0] if len(parts) == 1 else models.Filter(should=parts)


def _server_condition(cond: FilterCondition) -> Any:
    from qdrant_client import models

    if isinstance(cond, FieldMatch):
        return _server_eq(cond.key, cond.value)
    if isinstance(cond, FieldMatchAny):
        return _server_any(cond.key, cond.values)
    return models.FieldCondition(key=cond.key, range=models.Range(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def open_store(settings: Settings) -> VectorStore:
    """The store the settings name: embedded under ``settings.qdrant_dir``, or the server at ``qdrant_url``."""
    if settings.embedded:
        return EdgeVectorStore(settings.qdrant_dir)
    return QdrantServerStore.from_url(settings.qdrant_url, settings.qdrant_api_key or None, settings.qdrant_timeout_s)
