"""Queries before bulk work on one encoder: a priority lock, and long encodes cut into slices.

One encoder serves a request's query (tens of milliseconds) and bulk work (an answer's context
sentences, a document group when the worker embeds in the API process). Its lock is held for one
``encode`` at a time, because torch already spreads one batch over every core. With a plain lock a
query waits for the whole bulk call; here a bulk call takes the lock once per slice of
:data:`SLICE_TEXTS` texts, and a query that is waiting goes before the next slice, so it waits at
most one slice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np

__all__ = ["SLICE_TEXTS", "URGENT_TEXTS", "PriorityLock", "encode_in_slices"]

# Texts per slice of a bulk encode: a quarter of the default batch, so a query waits for 16 texts at most. It costs
# no throughput: 192 SciFact chunks (1 thread, medians of 3, a busy 2-core machine) took 39.8 s in slices of 16
# and 41.8 s in batches of 64 (sorted by length first, a small slice pads no more than a big one).
SLICE_TEXTS = 16
# A query call of at most this many texts is a request's (the query encoder batches at most 32); longer
# calls (a gate's validation queries) are bulk work and wait like it.
URGENT_TEXTS = 32


class PriorityLock:
    """A mutex whose urgent acquirers go before every waiting ordinary one (never preempting the holder)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._urgent_waiting = 0

    @contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
                try:
                    while self._held:
                        self._cond.wait()
                finally:
                    self._urgent_waiting -= 1
            else:
                while self._held or self._urgent_waiting:
                    self._cond.wait()
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()


def encode_in_slices(encode: Callable[[list[str]], np.ndarray], texts: Sequence[str], dimension: int,
                     size: int = SLICE_TEXTS) -> np.ndarray:
    """``encode`` over ``texts`` in slices of ``size``, longest first (as sentence-transformers orders its
    batches, so slicing adds no padding), rows returned in the input order."""
    if len(texts) <= size:
        return encode(list(texts))
    order = np.argsort([-len(t) for t in texts])
    out = np.empty((len(texts), dimension), dtype=np.float32)
    for start in range(0, len(texts), size):
        rows = order[start:start + size]
        out[rows] = encode([texts[i] for i in rows])
    return out
