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


class PointRecord(msgspec.Struct, kw_only=True):
    """One vector with its payload, ready for the store."""

    id: str
    vector: list[float]
    payload: dict[str, Any]


class ScoredPoint(msgspec.Struct, kw_only=True):
    id: str
    score: float
    payload: dict[str, Any]
