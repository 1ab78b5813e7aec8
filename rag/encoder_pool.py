"""Which encoder each tenant writes and searches with, and a bounded set of loaded encoders.

A tenant searches with its own encoder version once it adapted and promoted one (the registry's
``tenant_encoders`` pointer), else with the default: the version of the store's active collection.
Either way its vectors live in that version's collection (``chunks-<version>``) under its tenant
filter, so a query is always embedded by the encoder whose vectors it searches.

Loaded encoders are kept in a least-recently-used cache of ``RAG_ENCODER_CACHE_SIZE`` entries; the
encoders handed in at start (the default one) are pinned and never evicted. A tenant's pointer and
the default are re-read at most every ``RAG_ENCODER_POLL_S`` seconds on the query side (``fresh``
reads, which the worker uses, skip that cache), so a promotion by a worker in another process is
followed within that delay.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from rag.embedding import Embedder, load_embedder
from rag.encoders import EncoderRegistry, encoder_source, version_of_collection
from rag.errors import RagError
from rag.index import collection_name
from rag.search import Retriever
from rag.sparse import SparseEncoder
from rag.store import VectorStore

if TYPE_CHECKING:
    from rag.registry import Registry
    from rag.settings import Settings

__all__ = ["EncoderPool"]

log = structlog.get_logger("rag.encoder_pool")


class EncoderPool:
    """Tenant → encoder version → loaded encoder (bounded LRU) and its retriever."""

    def __init__(self, settings: Settings, store: VectorStore, registry: Registry, default: Embedder,
                 sparse: SparseEncoder | None = None) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.sparse = sparse if sparse is not None else SparseEncoder()
        self.size = max(1, settings.encoder_cache_size)
        self._pinned: dict[str, Embedder] = {default.version: default}
        self._loaded: OrderedDict[str, Embedder] = OrderedDict()
        self._retrievers: dict[str, Retriever] = {}
        self._pointers: dict[str, tuple[str | None, float]] = {}  # tenant → (own version, read at)
        self._default: tuple[str, float] = (default.version, float("-inf"))
        self._lock = threading.RLock()
        self._loading = threading.Lock()  # one model load at a time: loads are rare and memory-heavy
        self.observe: Callable[[str, float], None] | None = None  # stage timings of the retrievers made here

    # ---- which version --------------------------------------------------------------------------
    def default_version(self, *, fresh: bool = False) -> str:
        """The default encoder's version: the active collection's (or the pinned default before any exists)."""
        version, read_at = self._default
        if fresh or time.monotonic() - read_at >= self.settings.encoder_poll_s:
            version = version_of_collection(self.store.get_active()) or version
            self._default = (version, time.monotonic())
        return version

    def own_version(self, tenant: str, *, fresh: bool = False) -> str | None:
        """The tenant's own version, None when it follows the default."""
        cached = self._pointers.get(tenant)
        if cached is not None and not fresh and time.monotonic() - cached[1] < self.settings.encoder_poll_s:
            return cached[0]
        version = self.registry.get_tenant_encoder(tenant)
        with self._lock:
            if len(self._pointers) > 10_000:  # bounded: tenants seen long ago are read again
                self._pointers.clear()
            self._pointers[tenant] = (version, time.monotonic())
        return version

    def version_for(self, tenant: str, *, fresh: bool = False) -> str:
        return self.own_version(tenant, fresh=fresh) or self.default_version(fresh=fresh)

    def forget(self, tenant: str | None = None) -> None:
        """Drop cached pointers (a tenant's, or all and the default) so the next read goes to the registry."""
        with self._lock:
            if tenant is None:
                self._pointers.clear()
                self._default = (self._default[0], float("-inf"))
            else:
                self._pointers.pop(tenant, None)

    # ---- loaded encoders ------------------------------------------------------------------------
    def embedder(self, version: str) -> Embedder:
        """The loaded encoder of ``version`` (loading it, and evicting the least recently used, if needed)."""
        with self._lock:
            if version in self._pinned:
                return self._pinned[version]
            if version in self._loaded:
                self._loaded.move_to_end(version)
                return self._loaded[version]
        with self._loading:
            with self._lock:  # loaded by another thread while this one waited
                if version in self._loaded:
                    return self._loaded[version]
            source = encoder_source(self.settings, version)
            if source is None:
                EncoderRegistry(self.settings.encoders_dir).require(version)  # raises NotFound, naming the known ones
                raise RagError(f"encoder version {version} has no model here")  # pragma: no cover
            model, runtime = source
            t0 = time.perf_counter()
            embedder = load_embedder(self.settings, model, runtime=runtime)
            if embedder.version != version:
                raise RagError(f"the encoder folder of version {version} holds {embedder.version}")
            with self._lock:
                self._loaded[version] = embedder
                while len(self._loaded) > self.size:
                    evicted, _ = self._loaded.popitem(last=False)
                    self._retrievers.pop(evicted, None)
                    log.info("encoder_evicted", encoder_version=evicted, cache_size=self.size)
            log.info("encoder_loaded", encoder_version=version, seconds=round(time.perf_counter() - t0, 2),
                     loaded=len(self._loaded))
            return embedder

    def set_default(self, embedder: Embedder, retriever: Retriever | None = None) -> None:
        """Pin ``embedder`` (the default the service serves with, and its retriever); the previous default
        joins the cache, where tenants still on it find it until it is evicted."""
        with self._lock:
            for version, previous in list(self._pinned.items()):
                if version != embedder.version:
                    del self._pinned[version]
                    self._loaded[version] = previous
            self._pinned[embedder.version] = embedder
            self._loaded.pop(embedder.version, None)
            if retriever is not None:
                self._retrievers[embedder.version] = retriever
            while len(self._loaded) > self.size:
                evicted, _ = self._loaded.popitem(last=False)
                self._retrievers.pop(evicted, None)

    def loaded(self) -> list[str]:
        """Versions in memory now: the pinned ones, then the cache from least to most recently used."""
        with self._lock:
            return [*self._pinned, *self._loaded]

    def for_tenant(self, tenant: str, *, fresh: bool = False) -> Embedder:
        return self.embedder(self.version_for(tenant, fresh=fresh))

    def retriever(self, version: str) -> Retriever:
        """The retriever over ``version``'s collection with ``version``'s encoder (one per loaded version)."""
        embedder = self.embedder(version)
        with self._lock:
            retriever = self._retrievers.get(version)
            if retriever is None or retriever.embedder is not embedder:
                retriever = Retriever(self.store, collection_name(version), embedder, self.sparse, self.settings)
                retriever.observe = self.observe
                self._retrievers[version] = retriever
            return retriever

    def retrievers(self) -> list[Retriever]:
        """The retrievers of the encoders loaded now (each with its own query sample, when sampling is on)."""
        with self._lock:
            return list(self._retrievers.values())

    def retriever_for(self, tenant: str) -> Retriever:
        return self.retriever(self.version_for(tenant))
