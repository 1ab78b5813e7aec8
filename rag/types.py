"""Plain data passed between the pipeline's stages."""

from __future__ import annotations

from typing import Any

import msgspec


class Document(msgspec.Struct, kw_only=True):
    """A parsed source document, before chunking."""

    id: str
    text: str
    title: str = ""
    source: str = ""
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class Chunk(msgspec.Struct, kw_only=True):
    """A token-bounded span of a document; ``start``/``end`` are character offsets into its text."""

    document_id: str
    index: int
    text: str
    start: int
    end: int
    heading_path: list[str] = msgspec.field(default_factory=list)
    token_count: int = 0


class SparseVector(msgspec.Struct, frozen=True):
    """A sparse vector: parallel lists of distinct term ids and their weights."""

    indices: list[int]
    values: list[float]


class PointRecord(msgspec.Struct, kw_only=True):
    """One point ready for the store: a dense vector, an optional sparse (BM25) one, and a payload.

    ``sparse=None`` (or an empty vector) stores no sparse vector: the point is then found by dense
    search only, and does not count towards the collection's IDF statistics.
    """

    id: str
    vector: list[float]
    payload: dict[str, Any]
    sparse: SparseVector | None = None


class ScoredPoint(msgspec.Struct, kw_only=True):
    """A search hit. ``score`` is cosine (dense), BM25 (sparse) or the fused RRF score (hybrid)."""

    id: str
    score: float
    payload: dict[str, Any]
