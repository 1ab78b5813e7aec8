"""Sentence vectors computed once, at ingest, and stored with their chunk.

An extractive answer ranks every sentence of its context by cosine to the question
(:mod:`rag.extractive`). Embedding those 25-40 sentences at question time cost ~280 ms of a ~290 ms
answer on two cores; embedding them at ingest moves that cost to where it is paid once per chunk.

Each point carries the vectors of its chunk text's sentences, in :func:`rag.sentences.split_sentences`
order, as the multivector ``"sentences"`` (float16, on disk, no HNSW graph: it is only read by point
id). At answer time :func:`stored_sentence_vectors` reads them for the context's chunks in one store
call and maps each sentence's text to its vector; a source that merges adjacent chunks shares most
of its sentences with them, and only the sentences cut at a chunk boundary are embedded then.

Versioning: the vectors are the chunk encoder's. They are written only for tenants on the default
encoder (the one the answer path ranks sentences with) and used only when the point's
``encoder_version`` is the answer embedder's version; anything else falls back to embedding (and the
bounded sentence cache). Collections made before this existed hold none and work as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rag.embedding import Embedder
from rag.sentences import split_sentences
from rag.store import VectorStore

__all__ = ["chunk_sentences", "embed_chunk_sentences", "stored_sentence_vectors"]


def chunk_sentences(text: str) -> list[str]:
    """The sentences of a chunk text, as the answer path splits a source (``rag.extractive._candidates``)."""
    return [text[s:e] for s, e in split_sentences(text)]


def embed_chunk_sentences(embedder: Embedder, texts: Sequence[str]) -> list[list[list[float]]]:
    """Each chunk text's sentence vectors (as lists, for the store), one embedding call for all of them.

    A sentence that occurs in several chunks (the chunk overlap repeats one or two) is embedded once.
    """
    per_chunk = [chunk_sentences(t) for t in texts]
    unique = list(dict.fromkeys(s for sentences in per_chunk for s in sentences))
    if not unique:
        return [[] for _ in texts]
    vectors = np.asarray(embedder.embed_documents(unique), dtype=np.float32)
    row = {s: i for i, s in enumerate(unique)}
    return [vectors[[row[s] for s in sentences]].tolist() if sentences else [] for sentences in per_chunk]


def stored_sentence_vectors(store: VectorStore, collection: str, tenant: str, chunks: Iterable[tuple[str, str]],
                            encoder_version: str) -> dict[str, np.ndarray]:
    """Sentence text -> stored vector for the chunks ``(point id, chunk text)`` of ``tenant``, where the
    point's vectors are ``encoder_version``'s and match the text's sentences one to one."""
    texts: dict[str, str] = dict(chunks)
    if not texts:
        return {}
    found: Mapping[str, tuple[str, Any]] = store.sentence_vectors(collection, list(texts), tenant=tenant)
    out: dict[str, np.ndarray] = {}
    for point, (version, vectors) in found.items():
        sentences = chunk_sentences(texts[point])
        if version == encoder_version and len(sentences) == len(vectors):
            out.update(zip(sentences, vectors, strict=True))
    return out
