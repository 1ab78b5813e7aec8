"""A bounded, opt-in sample of the query embeddings the service computed, for drift monitoring.

Off unless ``RAG_QUERY_SAMPLE_SIZE`` > 0; then it keeps a uniform random sample of at most that
many query vectors out of every query seen since start (reservoir sampling, Algorithm R), each with
its arrival number and time (to the second), and besides it the first ``first`` vectors exactly (the
drift monitor freezes them as the encoder version's reference when it has none: :mod:`rag.drift_reference`).
It stores vectors only: never the query text, the tenant or the request. The sample lives in
memory and is lost on restart; ``save`` writes it to ``.npy`` + ``.json`` for ``python -m eval drift``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np

__all__ = ["QuerySample", "QuerySampleOut"]

FORMAT = "rag-query-sample/1"


class QuerySampleOut(msgspec.Struct, kw_only=True):
    """The sample as served by ``GET /v1/admin/query-sample`` (rows in arrival order)."""

    format: str = FORMAT
    encoder_version: str
    dimension: int
    capacity: int
    seen: int  # query embeddings offered since start
    count: int  # rows held (min(seen, capacity))
    seq: list[int]  # arrival number of each row (0-based)
    timestamps: list[int]  # arrival time of each row, unix seconds
    vectors: list[list[float]]


class QuerySample:
    """Thread-safe reservoir of query vectors; ``add_many`` costs a lock and a few random draws."""

    def __init__(self, capacity: int, *, encoder_version: str = "", seed: int = 0, first: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 (leave sampling off instead)")
        self.capacity = capacity
        self.encoder_version = encoder_version
        self.id = uuid.uuid4().hex  # arrival numbers count from 0 in each sample: this tells samples apart
        self.first_capacity = max(0, first)
        self._first: np.ndarray | None = None  # the first ``first`` vectors offered, never replaced
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._vectors: np.ndarray | None = None  # allocated on the first vector (its dimension)
        self._seq = np.zeros(capacity, dtype=np.int64)
        self._time = np.zeros(capacity, dtype=np.int64)
        self._count = 0
        self._seen = 0

    @property
    def seen(self) -> int:
        return self._seen

    def __len__(self) -> int:
        return self._count

    def add_many(self, vectors: np.ndarray) -> None:
        """Offer each row of ``vectors`` (one query embedding each) to the reservoir."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        now = int(time.time())
        with self._lock:
            if self._vectors is None:
                self._vectors = np.zeros((self.capacity, vectors.shape[1]), dtype=np.float32)
                self._first = np.zeros((self.first_capacity, vectors.shape[1]), dtype=np.float32)
            elif vectors.shape[1] != self._vectors.shape[1]:
                raise ValueError(f"vector dimension {vectors.shape[1]} != the sample's {self._vectors.shape[1]}")
            if self._seen < self.first_capacity:
                take = vectors[:self.first_capacity - self._seen]
                self._first[self._seen:self._seen + len(take)] = take
            for row in vectors:
                if self._count < self.capacity:
                    slot = self._count
                    self._count += 1
                else:
                    slot = self._rng.randrange(self._seen + 1)
                    if slot >= self.capacity:
                        self._seen += 1
                        continue
                self._vectors[slot] = row
                self._seq[slot] = self._seen
                self._time[slot] = now
                self._seen += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors, seq, timestamps) copies, in arrival order."""
        with self._lock:
            n = self._count
            dim = 0 if self._vectors is None else self._vectors.shape[1]
            vectors = np.zeros((0, dim), np.float32) if self._vectors is None else self._vectors[:n].copy()
            seq, ts = self._seq[:n].copy(), self._time[:n].copy()
        order = np.argsort(seq, kind="stable")
        return vectors[order], seq[order], ts[order]

    def first(self) -> np.ndarray:
        """A copy of the first ``first`` vectors offered (fewer while fewer were seen)."""
        with self._lock:
            if self._first is None:
                return np.zeros((0, 0), np.float32)
            return self._first[:min(self._seen, self.first_capacity)].copy()

    def snapshot(self) -> QuerySampleOut:
        vectors, seq, ts = self.arrays()
        return QuerySampleOut(
            encoder_version=self.encoder_version, dimension=int(vectors.shape[1]), capacity=self.capacity,
            seen=self._seen, count=len(vectors), seq=seq.tolist(), timestamps=ts.tolist(),
            # Six decimals are plenty for unit vectors and halve the response size.
            vectors=np.round(vectors.astype(np.float64), 6).tolist(),
        )

    def save(self, path: Path) -> Path:
        """Write ``path`` (.npy, the vectors) and ``path.with_suffix('.json')`` (seq, times, encoder); atomic."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vectors, seq, ts = self.arrays()
        meta = {"format": FORMAT, "encoder_version": self.encoder_version, "dimension": int(vectors.shape[1]),
                "capacity": self.capacity, "seen": self._seen, "count": len(vectors), "seq": seq.tolist(),
                "timestamps": ts.tolist(), "saved_at": int(time.time())}
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, vectors)
        os.replace(tmp, path)
        side = path.with_suffix(".json")
        tmp_side = side.with_name(side.name + ".tmp")
        tmp_side.write_text(json.dumps(meta))
        os.replace(tmp_side, side)
        return path

