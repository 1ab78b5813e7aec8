"""HTTP request and response bodies (msgspec): requests forbid unknown fields and bound sizes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

DocumentId = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f/]+$")]


class TextDocumentIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: str
    id: DocumentId | None = None
    title: str | None = None  # bounded by RAG_MAX_TITLE_CHARS (a 413, as on the multipart path)
    metadata: dict[str, Any] | None = None


class SearchIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    query: str
    top_k: int = 10
    filter: dict[str, Any] | None = None
    # dense: MiniLM cosine; sparse: BM25; hybrid: both fused by RRF. None: the service's RAG_SEARCH_MODE.
    mode: Literal["dense", "sparse", "hybrid"] | None = None


class JobRef(msgspec.Struct):
    job_id: str
    filename: str
    document_id: str | None


class UploadOut(msgspec.Struct):
    jobs: list[JobRef]
    job_ids: list[str]
    document_ids: list[str | None]


class SearchHitOut(msgspec.Struct):
    chunk_id: str
    document_id: str
    chunk_index: int
    score: float
    text: str
    title: str
    source: str
    offsets: tuple[int, int]
    heading_path: list[str]
    metadata: dict[str, Any]


class SearchOut(msgspec.Struct):
    results: list[SearchHitOut]
    encoder_version: str
    took_ms: float
    mode: str  # the mode that ran (the request's, or the service default)
