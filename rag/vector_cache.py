"""A bounded cache of text embeddings, so the answer path does not embed the same text twice.

Keys are (namespace, encoder version, text): the namespace is the tenant, so one tenant's cache hits
never tell anything (not even by timing) about another tenant's questions or documents, and vectors
of two encoder versions never mix. Least recently used entries go first once ``max_items`` is reached;
``max_items`` 0 turns the cache off. Thread-safe: the answer path calls it from worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from rag.embedding import Embedder

__all__ = ["VectorCache"]


class VectorCache:
    """(namespace, version, text) → unit vector, least recently used out first."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max(0, int(max_items))
        self._items: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, version: str, text: str, *, namespace: str, kind: str = "q") -> np.ndarray | None:
        """A cached vector (counted as a hit or a miss), or None; for callers that embed by other means."""
        if not self.max_items:
            return None
        key = (f"{kind}:{namespace}", version, text)
        with self._lock:
            vec = self._items.get(key)
            if vec is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        return vec

    def store(self, version: str, text: str, vector: np.ndarray, *, namespace: str, kind: str = "q") -> None:
        if not self.max_items:
            return
        vec = np.array(vector, dtype=np.float32)
        vec.setflags(write=False)
        with self._lock:
            self._items[(f"{kind}:{namespace}", version, text)] = vec
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def documents(self, embedder: Embedder, texts: Sequence[str], *, namespace: str) -> np.ndarray:
        """``embedder.embed_documents(texts)``, embedding only the texts not cached yet."""
        return self._get(embedder, texts, namespace, embedder.embed_documents, "d")

    def queries(self, embedder: Embedder, texts: Sequence[str], *, namespace: str) -> np.ndarray:
        """``embedder.embed_queries(texts)``, embedding only the texts not cached yet."""
        return self._get(embedder, texts, namespace, embedder.embed_queries, "q")

    def _get(self, embedder: Embedder, texts: Sequence[str], namespace: str,
             embed: Callable[[Sequence[str]], np.ndarray], kind: str) -> np.ndarray:
        texts = list(texts)
        if not self.max_items:
            return embed(texts)
        space = f"{kind}:{namespace}"
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for t in texts:
                key = (space, embedder.version, t)
                vec = self._items.get(key)
                if vec is not None:
                    self._items.move_to_end(key)
                    found[t] = vec
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        self.hits += len(texts) - sum(1 for t in texts if t not in found)
        self.misses += len(missing)
        if missing:
            fresh = np.asarray(embed(missing), dtype=np.float32)
            with self._lock:
                for t, vec in zip(missing, fresh, strict=True):
                    vec.setflags(write=False)
                    self._items[(space, embedder.version, t)] = vec
                    found[t] = vec
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        if not texts:
            return np.zeros((0, embedder.dimension), dtype=np.float32)
        return np.stack([found[t] for t in texts])
