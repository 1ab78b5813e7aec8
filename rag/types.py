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
    search only, and does not count towards the collection's IDF statistics. ``sentences``: the vectors of
    the chunk text's sentences in :func:`rag.sentences.split_sentences` order (None or empty: none stored).
    """

    id: str
    vector: list[float]
    payload: dict[str, Any]
    sparse: SparseVector | None = None
    sentences: list[list[float]] | None = None


class ScoredPoint(msgspec.Struct, kw_only=True):
    """A search hit. ``score`` is cosine (dense), BM25 (sparse) or the fused RRF score (hybrid)."""

    id: str
    score: float
    payload: dict[str, Any]


class ChunkPayload(msgspec.Struct, kw_only=True):
    """What the store keeps beside a chunk's vectors: written by the worker, read by search, answers,
    adaptation and eval. The store filters on ``tenant``, ``document_id``, ``content_hash`` and ``live``."""

    tenant: str
    document_id: str
    content_hash: str
    chunk_index: int
    text: str
    start: int
    end: int
    live: bool = False  # written invisible, published in one step with the document's other chunks
    title: str = ""
    source: str = ""
    heading_path: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    encoder_version: str = ""
    token_count: int = 0

    def to_payload(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ChunkPayload:
        """Read a stored payload; fields added by a later version are ignored, missing optional ones defaulted."""
        return msgspec.convert(payload, cls, strict=False)


def embedding_text(title: str, heading_path: list[str], text: str) -> str:
    """What the encoders (dense and sparse) see for a chunk: the document title and heading path give it context.

    One home for this rule: the worker embeds chunks with it and adaptation builds its training passages
    with it, so a model is trained on the same text it will later embed.
    """
    head = " > ".join([p for p in [title, *heading_path] if p])
    return f"{head}\n{text}" if head else text
