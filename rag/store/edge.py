"""The embedded backend: qdrant-edge, one shard per collection, owned by exactly one process.

What differs from the server lives here: the engine's condition, vector and request types, its
calls, its error translation, the file lock that keeps a second process out, the store-wide write
lock, and the active pointer as a file. The algorithms are :class:`rag.store.base.QdrantLikeStore`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from rag.errors import NotFound, RagError, StoreError, StoreLockedError
from rag.store import edge_copy
from rag.store.base import Branch, QdrantLikeStore, SearchPlan
from rag.store.edge_copy import Resync, data_extents, resync_changed
from rag.store.edge_index import EF_CONSTRUCT
from rag.store.filters import FieldRange
from rag.store.protocol import (
    BOOL_INDEXES,
    KEYWORD_INDEXES,
    SENTENCE_VECTOR_NAME,
    SPARSE_VECTOR_NAME,
    VECTOR_NAME,
    check_collection_name,
)
from rag.types import PointRecord, SparseVector

log = structlog.get_logger("rag.store.edge")

__all__ = ["EdgeVectorStore"]


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


class EdgeVectorStore(QdrantLikeStore):
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

    def __init__(self, root: Path | str, *, exact_search_max_points: int | None = None, hnsw_ef: int = 128,
                 auto_index_points: int = 20_000, hnsw_m: int = 0, hnsw_payload_m: int | None = 16,
                 hnsw_ef_construct: int = EF_CONSTRUCT) -> None:
        """Take the exclusive lock on ``root/.lock``, or raise :class:`StoreLockedError` at once.

        ``hnsw_ef``: the HNSW search beam (recall against cost; ``python -m eval bench scale``).
        ``auto_index_points``: once a collection holds this many points outside its HNSW index, a write
        starts :meth:`build_index` in a background thread (0: never; call :meth:`optimize` yourself).
        ``hnsw_m``, ``hnsw_payload_m``: the graph :meth:`build_index` builds: links per point over all points
        (0: no such graph) and within each tenant (None: ``hnsw_m``); see :mod:`rag.store.edge_index`. The
        default, per-tenant graphs only, suits this store, whose every vector search is filtered to one
        tenant (half the build time at 200k, recall@10 within 0.01; README "The embedded store at scale");
        an unfiltered vector search through such an index finds only part of the neighbours (exact=True
        does, at the cost of a scan). ``hnsw_ef_construct``: candidates per point inserted while building (the
        engine's default, 100); applies to the next build.
        """
        self.root = Path(root)
        self.lock_path = self.root / ".lock"
        self._exact_max = self.EXACT_SEARCH_MAX_POINTS if exact_search_max_points is None else exact_search_max_points
        self._hnsw_ef = hnsw_ef
        self._auto_index_points = auto_index_points
        self._hnsw_m = hnsw_m
        self._hnsw_payload_m = hnsw_payload_m
        self._hnsw_ef_construct = hnsw_ef_construct
        self._index_threads: dict[str, threading.Thread] = {}
        self._children: set[subprocess.Popen[str]] = set()  # running index builds, stopped by close()
        self._unindexed: dict[int, int] = {}  # id(shard handle) -> points upserted since its last index build
        self._lock_fd = self._acquire_lock()
        # Lock order: _write_lock before _shards_lock. Searches take only _shards_lock, briefly.
        self._write_lock = threading.RLock()
        self._shards_lock = threading.RLock()
        self._shards: dict[str, Any] = {}
        # id(shard handle) -> the writes applied to it since an index build copied it (see build_index).
        self._journals: dict[int, list[Any]] = {}
        self._building: set[str] = set()
        self._retired: list[tuple[Any, Path]] = []  # swapped-out shards, closed on the next build or close()
        self._closed = False
        try:
            self._collections_dir.mkdir(parents=True, exist_ok=True)
            self._recover_builds()
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
        """Stop index builds, flush and close every shard, then release the lock. Safe to call twice."""
        for child in list(self._children):
            with contextlib.suppress(OSError):
                child.kill()
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
            self._close_retired()
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
        """The collection's shard directory: ``collections/<name>``, or the index build that replaced it
        (named by ``collections/.current-<name>``, see :meth:`build_index`)."""
        try:
            target = self._redirect_path(name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return self._collections_dir / name
        except OSError as exc:
            raise StoreError(f"cannot read {self._redirect_path(name)}: {exc}") from exc
        return self._collections_dir / target

    def _redirect_path(self, name: str) -> Path:
        return self._collections_dir / f".current-{name}"

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
        check_collection_name(name)
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
                # Never indexed by build_index (no .current- file): count every point as unindexed.
                built = self._redirect_path(name).exists()
                self._unindexed[id(shard)] = 0 if built else shard.info().points_count
                self._shards[name] = shard
            return shard

    def ensure_collection(self, name: str, dimension: int) -> None:
        """Create the shard (cosine ``"dense"``, IDF-weighted sparse ``"bm25"``, payload indexes) unless it exists.

        A shard made before sparse vectors existed cannot gain one (the engine fixes a shard's vector
        layout at creation): it raises :class:`StoreError`; re-index into a new collection.
        """
        from qdrant_edge import (
            Distance,
            EdgeConfig,
            EdgeShard,
            EdgeSparseVectorParams,
            EdgeVectorParams,
            Modifier,
            UpdateOperation,
        )

        from rag.store.edge_index import field_index_params, hnsw_config, sentence_vector_params

        self._check_new_collection(name, dimension)
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
                    vectors={VECTOR_NAME: EdgeVectorParams(size=dimension, distance=Distance.Cosine),
                             SENTENCE_VECTOR_NAME: sentence_vector_params(dimension)},
                    sparse_vectors={SPARSE_VECTOR_NAME: EdgeSparseVectorParams(modifier=Modifier.Idf)},
                    hnsw_config=hnsw_config(self._hnsw_m, self._hnsw_payload_m, self._hnsw_ef_construct),
                )
                with _edge_errors(f"creating collection {name!r}"):
                    shard = EdgeShard.create(str(path), config)
                self._shards[name] = shard
            # Only missing indexes are created (this repairs a shard made before an index existed): creating
            # one with other parameters rebuilds it here, holding the GIL; an index build adjusts them instead.
            with _edge_errors(f"indexing collection {name!r}"):
                existing_indexes = set(shard.info().payload_schema)
                for field in KEYWORD_INDEXES + BOOL_INDEXES:
                    if field not in existing_indexes:
                        shard.update(UpdateOperation.create_field_index(field, field_index_params(field)))
                shard.flush()

    def list_collections(self) -> list[str]:
        """Names of every collection (shard directories), sorted."""
        self._check_open()
        try:
            # Names starting with "." are index builds (never a valid collection name); a built index that
            # replaced a shard is named by its .current-<name> file.
            names = {p.name for p in self._collections_dir.iterdir() if not p.name.startswith(".") and self._is_shard(p)}
            names |= {p.name[len(".current-"):] for p in self._collections_dir.glob(".current-*")}
            return sorted(names)
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
        check_collection_name(name)
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
        check_collection_name(name)
        with self._write_lock, self._shards_lock:
            self._check_open()
            shard = self._shards.pop(name, None)
            if shard is not None:
                self._unindexed.pop(id(shard), None)
                with _edge_errors(f"closing collection {name!r}"):
                    shard.close()
            path = self._shard_path(name)
            if self.get_active() == name:
                self._write_pointer(None)
            try:
                self._redirect_path(name).unlink(missing_ok=True)
                for doomed in {path, self._collections_dir / name}:
                    with contextlib.suppress(FileNotFoundError):
                        shutil.rmtree(doomed)
            except OSError as exc:
                raise StoreError(f"cannot delete {path}: {exc}") from exc

    # -- primitives for QdrantLikeStore (upsert, publish, search, count, scroll live there) ---------

    def _writing(self) -> contextlib.AbstractContextManager[Any]:
        # Multi-step writes take the store-wide write lock; searches never do (see the class docstring).
        return self._write_lock

    def _errors(self, action: str, collection: str | None = None) -> contextlib.AbstractContextManager[None]:
        # A missing collection is already NotFound from _shard; the engine's own errors become StoreError.
        return _edge_errors(action)

    def _collection(self, name: str) -> Any:
        return self._shard(name)

    def _eq(self, key: str, value: str | int | bool) -> Any:
        from qdrant_edge import FieldCondition, MatchValue

        return FieldCondition(key, match=MatchValue(_edge_value(value)))

    def _match_any(self, key: str, values: list[str] | list[int]) -> Any:
        from qdrant_edge import FieldCondition, MatchAny

        return FieldCondition(key, match=MatchAny(values))

    def _range(self, cond: FieldRange) -> Any:
        from qdrant_edge import FieldCondition, RangeFloat

        return FieldCondition(cond.key, range=RangeFloat(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))

    def _filter(self, **clauses: list[Any]) -> Any:
        from qdrant_edge import Filter

        return Filter(**clauses)

    def _sparse(self, vector: SparseVector) -> Any:
        from qdrant_edge import SparseVector as EdgeSparse

        return EdgeSparse(vector.indices, vector.values)

    def _point(self, point: PointRecord, vectors: dict[str, Any]) -> Any:
        from qdrant_edge import Point

        return Point(point.id, vectors, point.payload)

    def _upsert_raw(self, handle: Any, points: list[Any]) -> None:
        from qdrant_edge import UpdateOperation

        self._apply(handle, UpdateOperation.upsert_points(points))
        self._unindexed[id(handle)] = self._unindexed.get(id(handle), 0) + len(points)

    def _set_payload_raw(self, handle: Any, flt: Any, payload: dict[str, Any]) -> None:
        from qdrant_edge import UpdateOperation

        self._apply(handle, UpdateOperation.set_payload_by_filter(flt, payload))

    def _delete_raw(self, handle: Any, flt: Any) -> None:
        from qdrant_edge import UpdateOperation

        self._apply(handle, UpdateOperation.delete_points_by_filter(flt))

    def _flush(self, handle: Any) -> None:
        handle.flush()
        # Every multi-step write ends with a flush: the moment to see whether the index has fallen behind.
        if self._auto_index_points > 0:
            self._maybe_index(handle)

    def _maybe_index(self, handle: Any) -> None:
        # Points written since the shard was last indexed; the engine's own counts mix in sparse vectors.
        if self._unindexed.get(id(handle), 0) < self._auto_index_points:
            return
        name = next((n for n, h in list(self._shards.items()) if h is handle), None)
        running = self._index_threads.get(name) if name else None
        if name is None or name in self._building or (running is not None and running.is_alive()):
            return

        def build() -> None:
            try:
                self.build_index(name)
            except Exception as exc:  # logged, never raised into a writer; the next flush tries again
                log.warning("index_build_failed", collection=name, error=str(exc))

        thread = threading.Thread(target=build, name=f"index-{name}", daemon=True)
        self._index_threads[name] = thread
        thread.start()

    def _apply(self, handle: Any, op: Any) -> None:
        # Callers hold the write lock. While an index build works on a copy of this shard, the write is
        # journaled too and replayed into the built copy before it replaces the shard.
        handle.update(op)
        journal = self._journals.get(id(handle))
        if journal is not None:
            journal.append(op)

    def _retrieve_raw(self, handle: Any, ids: list[str], with_payload: Any, with_vector: Any) -> list[Any]:
        return handle.retrieve(ids, with_payload=with_payload, with_vector=with_vector)

    def has_sentence_vectors(self, collection: str) -> bool:
        check_collection_name(collection)
        with self._shards_lock:
            path = self._shard_path(collection)
        return SENTENCE_VECTOR_NAME in (_edge_saved_config(path).get("vectors") or {})

    def _count_raw(self, handle: Any, flt: Any) -> int:
        from qdrant_edge import CountRequest

        return handle.count(CountRequest(exact=True, filter=flt))

    def _scroll_raw(self, handle: Any, flt: Any, offset: Any, limit: int, with_payload: Any,
                    with_vector: Any) -> tuple[list[Any], Any]:
        from qdrant_edge import ScrollRequest

        return handle.scroll(ScrollRequest(offset=offset, limit=limit, filter=flt, with_payload=with_payload,
                                           with_vector=with_vector))

    def _dense_branch(self, handle: Any, vector: list[float]) -> Branch:
        from qdrant_edge import Query, SearchParams

        exact = handle.info().points_count <= self._exact_max  # see EXACT_SEARCH_MAX_POINTS
        # Segments not yet indexed are scanned exactly by the engine whatever this says.
        return Branch(Query.Nearest(vector, using=VECTOR_NAME), VECTOR_NAME,
                      SearchParams(exact=exact, hnsw_ef=None if exact else self._hnsw_ef))

    def _sparse_branch(self, vector: SparseVector, scope: list[Any]) -> Branch:
        from qdrant_edge import Filter, IdfParams, Query, SearchParams

        return Branch(Query.Nearest(self._sparse(vector), using=SPARSE_VECTOR_NAME), SPARSE_VECTOR_NAME,
                      SearchParams(idf=IdfParams(corpus=Filter(must=scope))))

    def _query_raw(self, handle: Any, branch: Branch, flt: Any, limit: int) -> list[Any]:
        from qdrant_edge import QueryRequest

        return handle.query(QueryRequest(limit=limit, query=branch.query, filter=flt, with_payload=True,
                                         params=branch.params))

    def _fused_query_raw(self, handle: Any, branches: list[Branch], flt: Any, plan: SearchPlan) -> list[Any]:
        from qdrant_edge import Fusion, Prefetch, QueryRequest

        return handle.query(QueryRequest(
            limit=plan.limit,
            prefetches=[Prefetch(limit=plan.prefetch, query=b.query, filter=flt, params=b.params) for b in branches],
            query=Fusion.Rrf(k=plan.rrf_k, weights=plan.weights),
            filter=flt,
            with_payload=True,
        ))

    def snapshot(self, dest: Path, during: Callable[[], None] | None = None) -> dict[str, int]:
        """Copy every collection and the active pointer to ``dest`` as one consistent state.

        Writes wait meanwhile (searches go on): every shard is flushed and copied under the write lock.
        ``during`` runs under the same lock once the copy is done (a backup copies the registry there, so
        that both describe one moment). Returns the points per collection.
        """
        dest = Path(dest)
        with self._write_lock:
            self._check_open()
            counts: dict[str, int] = {}
            for name in self.list_collections():
                shard = self._shard(name)
                with _edge_errors(f"flushing {name!r}"):
                    shard.flush()
                shutil.copytree(self._shard_path(name), dest / "collections" / name)
                counts[name] = self.count(name)
            if self._active_path.exists():
                shutil.copy2(self._active_path, dest / "active")
            if during is not None:
                during()
        return counts

    def optimize(self, collection: str) -> bool:
        """Build the collection's vector index now, in a child process (:meth:`build_index`); True when done.

        Collections at or below the engine's indexing threshold (roughly 10k 384-d vectors) stay brute
        force, which is exact and fast at that size.
        """
        self.build_index(collection)
        return True

    # Files whose mtime is up to this much before the mark are copied again under the lock too: the kernel
    # stamps mtime from a coarse clock (one tick, 1-10 ms, behind the fine one).
    _MTIME_SLACK_NS = 50_000_000

    def build_index(self, collection: str, *, timeout_s: float = 6 * 3600, nice: int = 10,
                    on_copied: Callable[[], None] | None = None) -> dict[str, float]:
        """Build the collection's HNSW index without stalling this process's searches or writes for long.

        The engine's optimizer holds the GIL for the whole build (8 s at 40k x 384-d here), so it runs
        in another process, on a copy:

        1. Flush the shard and copy its directory (sparse-aware ``cp``) while writes go on; flush again and
           bring the files modified meanwhile up to date block by block, still outside the lock
           (:meth:`_presync`); start the helper process that will do the pass under the lock (it first
           writes the copy out to disk); ``on_copied`` (a test hook) runs then. Then, under the write lock
           (writes wait), flush again and have the helper compare the files modified since the second pass
           began with their copies and write only the blocks that differ
           (:func:`rag.store.edge_copy.resync_changed`), so the copy is the flushed shard as it is now.
           From then on every write to the shard is also journaled.
        2. A child process (``python -m rag.store.edge_index``, at ``nice``) loads the copy and builds the
           index. Searches and writes go on here, on the live shard (brute force).
        3. The built copy is read into the page cache (without the GIL), loaded here (``EdgeShard.load``
           holds the GIL) and the journal replayed into it, outside the write lock, until
           only a few writes are left; then, under the write lock, the rest is replayed and flushed,
           ``collections/.current-<name>`` is switched atomically to the copy, and the copy becomes the
           shard searches use. The old shard is closed and deleted on the next build or close, so a
           search that already holds it finishes.

        A crash at any point leaves either the old shard (holding every write) or the new one (flushed
        with every write) named as current; the leftovers are deleted when the store is next opened.
        Returns the seconds of each step (``copy_s``, ``build_s``, ``catch_up_s``, ``swap_s``) and the
        writes replayed. Raises :class:`StoreError` if a build of the collection is already running, the
        child fails or times out, or the collection was dropped meanwhile; the live shard is untouched then.
        """
        check_collection_name(collection)
        build_name = f".build-{collection}-{uuid.uuid4().hex[:8]}"
        build_dir = self._collections_dir / build_name
        t0 = time.perf_counter()
        with self._write_lock:
            self._check_open()
            if collection in self._building:
                raise StoreError(f"an index build of {collection!r} is already running")
            self._building.add(collection)
            self._close_retired()
            try:
                handle = self._shard(collection)
                old_dir = self._shard_path(collection)
            except BaseException:
                self._building.discard(collection)
                raise
        helper: subprocess.Popen[str] | None = None
        try:
            # The bulk copy, writes going on: what changes meanwhile is copied again below, under the lock.
            # The first flush writes out everything pending (many files); the mark is taken after it, so those
            # files are not copied twice; the second, short flush makes every page clean again after the mark
            # (see rag.store.edge_copy.resync_changed).
            since_ns = self._flush_and_mark(handle, collection)
            copy_error = _copy_tree(old_dir, build_dir)
            t_bulk = time.perf_counter()
            if copy_error is None:
                since_ns = self._presync(handle, collection, old_dir, build_dir, since_ns)
                helper = _start_resync_helper(old_dir, build_dir, since_ns)
            t_presynced = time.perf_counter()
            if on_copied is not None:
                on_copied()
            with self._write_lock:
                t_locked = time.perf_counter()
                self._check_open()
                if self._shards.get(collection) is not handle:
                    raise StoreError(f"collection {collection!r} was dropped during its index build")
                with _edge_errors(f"flushing {collection!r}"):
                    handle.flush()
                t_flushed = time.perf_counter()
                if copy_error is None:
                    recopied, resync = _resync_locked(helper, old_dir, build_dir, since_ns)
                else:  # e.g. a file vanished mid-copy: copy it all again, here
                    shutil.rmtree(build_dir, ignore_errors=True)
                    copy_error = _copy_tree(old_dir, build_dir)
                    if copy_error is not None:
                        raise StoreError(f"cannot copy {collection!r} for an index build: {copy_error}")
                    recopied, resync = -1, Resync()
                journal: list[Any] = []
                self._journals[id(handle)] = journal
                unindexed_before = self._unindexed.get(id(handle), 0)
                self._unindexed[id(handle)] = 0  # what is written from now on is outside the index being built
                t1 = time.perf_counter()
        except BaseException:
            if helper is not None and helper.poll() is None:
                helper.kill()
                helper.communicate()
            with self._write_lock:
                self._building.discard(collection)
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        new: Any = None
        swapped = False
        try:
            spawn_s = self._run_index_child(build_dir, timeout_s=timeout_s, nice=nice)
            t2 = time.perf_counter()
            from qdrant_edge import EdgeShard

            # EdgeShard.load holds the GIL (every search and write of this process waits) for as long as it
            # takes, disk reads included: read the built files into the page cache first, without the GIL.
            _read_tree(build_dir)
            t_read = time.perf_counter()
            with _edge_errors(f"loading the indexed copy of {collection!r}"):
                new = EdgeShard.load(str(build_dir))
            t_loaded = time.perf_counter()
            done = 0
            while True:
                with self._write_lock:
                    self._check_open()
                    if self._shards.get(collection) is not handle:
                        raise StoreError(f"collection {collection!r} was dropped during its index build")
                    if len(journal) - done <= self.SWAP_MAX_REPLAY:
                        t3 = time.perf_counter()
                        with _edge_errors(f"replaying writes into the indexed {collection!r}"):
                            for op in journal[done:]:
                                new.update(op)
                            new.flush()
                        self._write_redirect(collection, build_name)
                        with self._shards_lock:
                            self._shards[collection] = new
                        self._unindexed[id(new)] = self._unindexed.pop(id(handle), 0)
                        swapped = True
                        self._retired.append((handle, old_dir))
                        replayed = len(journal)
                        t4 = time.perf_counter()
                        break
                upto = len(journal)  # the journal only grows (under the write lock); replay what is there
                with _edge_errors(f"replaying writes into the indexed {collection!r}"):
                    for op in journal[done:upto]:
                        new.update(op)
                    new.flush()  # so that the flush under the write lock has little left to write
                done = upto
        finally:
            with self._write_lock:
                self._journals.pop(id(handle), None)
                self._building.discard(collection)
            if not swapped:
                self._unindexed[id(handle)] = self._unindexed.get(id(handle), 0) + unindexed_before
                if new is not None:
                    with contextlib.suppress(Exception):
                        new.close()
                shutil.rmtree(build_dir, ignore_errors=True)
        report = {"copy_s": t1 - t0, "build_s": t2 - t1, "catch_up_s": t3 - t2, "swap_s": t4 - t3,
                  "replayed_writes": float(replayed), "copy_locked_s": t1 - t_locked,
                  "recopied_files": float(recopied), "copy_bulk_s": t_bulk - t0, "copy_presync_s": t_presynced - t_bulk,
                  "copy_locked_flush_s": t_flushed - t_locked, "resync_compared_mib": resync.compared / 2**20,
                  "resync_written_mib": resync.written / 2**20, "resync_in_process": float(resync.in_process),
                  "resync_helper_s": resync.seconds, "prefetch_s": t_read - t2, "load_s": t_loaded - t_read,
                  "spawn_s": spawn_s}
        log.info("index_built", collection=collection, **{k: round(v, 3) for k, v in report.items()})
        return report

    def _flush_and_mark(self, handle: Any, collection: str) -> int:
        """Flush, take a time mark, flush again; returns the mark (ns). Every file modified after the second
        flush has an mtime at or after the mark (see :func:`rag.store.edge_copy.resync_changed`)."""
        with _edge_errors(f"flushing {collection!r}"):
            handle.flush()
        time.sleep(2 * self._MTIME_SLACK_NS / 1e9)
        since_ns = time.time_ns() - self._MTIME_SLACK_NS
        with _edge_errors(f"flushing {collection!r}"):
            handle.flush()
        return since_ns

    def _presync(self, handle: Any, collection: str, old_dir: Path, build_dir: Path, since_ns: int) -> int:
        """Outside the write lock: bring the files changed during the bulk copy up to date, block by block; returns
        the mark the pass under the lock starts from.

        The pass under the lock then compares only the files written since this one began, and finds few blocks
        to write. If this pass fails (a file vanished meanwhile, say), the locked pass starts from the first
        mark, as if it had not run.
        """
        mark = self._flush_and_mark(handle, collection)
        try:
            resync_changed(old_dir, build_dir, since_ns, Resync())
        except OSError as exc:
            log.info("index_build_presync_skipped", collection=collection, error=str(exc))
            return since_ns
        return mark

    # Writes left to replay under the write lock when an index build swaps in (the rest is replayed before).
    SWAP_MAX_REPLAY = 16

    def _run_index_child(self, build_dir: Path, *, timeout_s: float, nice: int) -> float:
        """Run the child to its end; returns the seconds that starting it took (this thread holds the GIL meanwhile)."""
        cmd = [sys.executable, "-m", "rag.store.edge_index", str(build_dir), "--m", str(self._hnsw_m),
               "--ef-construct", str(self._hnsw_ef_construct)]
        if self._hnsw_payload_m is not None:
            cmd += ["--payload-m", str(self._hnsw_payload_m)]
        started = time.perf_counter()
        try:
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)
        except OSError as exc:
            raise StoreError(f"cannot start the index build process: {exc}") from exc
        spawn_s = time.perf_counter() - started
        self._children.add(child)
        try:
            out, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            child.kill()
            child.communicate()
            raise StoreError(f"the index build of {build_dir.name} took over {timeout_s:.0f} s; it was stopped") from exc
        finally:
            self._children.discard(child)
        if child.returncode != 0:
            tail = (err or out or "").strip().splitlines()[-3:]
            raise StoreError(f"the index build process failed (exit {child.returncode}): {' | '.join(tail)}")
        return spawn_s

    def _write_redirect(self, collection: str, target: str) -> None:
        redirect = self._redirect_path(collection)
        tmp = redirect.with_name(redirect.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(target + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, redirect)
        _fsync_dir(self._collections_dir)

    def _close_retired(self) -> None:
        for shard, path in self._retired:
            with contextlib.suppress(Exception):
                shard.close()
            shutil.rmtree(path, ignore_errors=True)
        self._retired.clear()

    def _recover_builds(self) -> None:
        """Delete what an interrupted or finished index build left: copies no ``.current-*`` file names,
        and shards that a ``.current-*`` file replaced."""
        current = set()
        for redirect in self._collections_dir.glob(".current-*"):
            if redirect.name.endswith(".tmp"):
                redirect.unlink()
                continue
            target = redirect.read_text(encoding="utf-8").strip()
            if not self._is_shard(self._collections_dir / target):
                redirect.unlink()  # cannot happen (the copy is complete before the switch); be safe
                continue
            current.add(target)
            replaced = self._collections_dir / redirect.name[len(".current-"):]
            if replaced.is_dir():
                shutil.rmtree(replaced)
        for leftover in self._collections_dir.glob(".build-*"):
            if leftover.name not in current:
                shutil.rmtree(leftover, ignore_errors=True)


def _start_resync_helper(src: Path, dst: Path, since_ns: int) -> subprocess.Popen[str] | None:
    """Start :mod:`rag.store.edge_copy` as a script and wait (up to a minute) until it has written the copy out to
    disk; it then waits for its "go"."""
    try:
        helper = subprocess.Popen([sys.executable, "-I", edge_copy.__file__, str(src), str(dst), str(since_ns)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        log.warning("index_build_resync_helper_failed", error=str(exc))
        return None
    assert helper.stdout is not None
    if select.select([helper.stdout], [], [], _HELPER_READY_S)[0]:
        helper.stdout.readline()  # "ready", or "" if it died: _resync_locked then finds out
    return helper


_HELPER_READY_S = 60.0


# The locked pass takes well under a second; past this the helper is taken for stuck and the pass done here.
_RESYNC_TIMEOUT_S = 120.0


def _resync_locked(helper: subprocess.Popen[str] | None, src: Path, dst: Path, since_ns: int) -> tuple[int, Resync]:
    """The pass under the write lock: by the helper process (one wait here), or here if it fails (correct, slower:
    every system call of the pass gives a search thread the GIL for a whole engine call). Returns the files
    compared and what was read and written."""
    if helper is not None:
        try:
            out, err = helper.communicate("go\n", timeout=_RESYNC_TIMEOUT_S)
            if helper.returncode == 0:
                done = json.loads(out)
                stats = Resync()
                stats.compared, stats.written = int(done["compared"]), int(done["written"])
                stats.seconds = float(done["seconds"])
                return int(done["files"]), stats
            log.warning("index_build_resync_helper_failed", exit=helper.returncode, error=(err or "").strip()[-300:])
        except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("index_build_resync_helper_failed", error=str(exc))
        finally:
            if helper.poll() is None:  # never let it write into the copy while the pass below does
                helper.kill()
                helper.communicate()
    stats = Resync()
    stats.in_process = True
    return resync_changed(src, dst, since_ns, stats), stats


def _copy_tree(src: Path, dst: Path) -> str | None:
    """Copy a shard directory, keeping its files' holes (``cp --sparse=always``); None, or the error."""
    copied = subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], capture_output=True, text=True)
    return None if copied.returncode == 0 else (copied.stderr.strip() or f"cp exited {copied.returncode}")


def _read_tree(path: Path) -> None:
    """Read every file under ``path`` (its data, not its holes) into the page cache; the GIL is released while the
    kernel reads. Best effort: a file that cannot be read is left to the engine."""
    buf = bytearray(edge_copy.SYNC_BLOCK)
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                for start, end in data_extents(fd, os.fstat(fd).st_size):
                    while start < end and (got := os.preadv(fd, [buf], start)) > 0:
                        start += got
            except OSError:
                pass
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _edge_saved_config(path: Path) -> dict[str, Any]:
    """The shard's ``edge_config.json`` ({} if unreadable): the bindings expose no config getter, and this file is
    the shard's own record of its layout."""
    try:
        config = json.loads((path / "edge_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _edge_dimension(path: Path) -> int | None:
    # Unreadable means unknown: the engine then rejects wrong-sized vectors itself.
    try:
        return int(_edge_saved_config(path)["vectors"][VECTOR_NAME]["size"])
    except (KeyError, TypeError, ValueError):
        return None


def _edge_sparse_modifier(path: Path) -> str | None:
    """The sparse vector's modifier ("idf"), "" if the shard has no such vector, None if unreadable."""
    config = _edge_saved_config(path)
    if not config:
        return None
    sparse = config.get("sparse_vectors") or {}
    if not isinstance(sparse, dict) or SPARSE_VECTOR_NAME not in sparse:
        return ""
    params = sparse[SPARSE_VECTOR_NAME]
    return str(params.get("modifier") or "").lower() if isinstance(params, dict) else ""


@contextlib.contextmanager
def _edge_errors(action: str) -> Iterator[None]:
    try:
        yield
    except RagError:
        raise
    except Exception as exc:  # the bindings raise plain Exception for every engine error
        raise StoreError(f"embedded Qdrant failed {action}: {exc}") from exc
