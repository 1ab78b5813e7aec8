"""Data and helpers every capability group of the store contract shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from rag.sparse import SparseEncoder
from rag.store import VectorStore, point_id
from rag.types import PointRecord

DIM = 16
COLL = "chunks-test"
SPARSE = SparseEncoder()


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_points(
    tenant: str,
    document_id: str,
    content_hash: str,
    vectors: np.ndarray,
    *,
    title: str = "A title",
    source: str = "a.txt",
    metadata: dict[str, Any] | None = None,
    texts: list[str] | None = None,
) -> list[PointRecord]:
    """Points of one document generation; with ``texts`` each also gets its BM25 sparse vector."""
    return [
        PointRecord(
            id=point_id(tenant, document_id, content_hash, i),
            vector=vec.tolist(),
            sparse=SPARSE.encode_document(texts[i]) if texts is not None else None,
            payload={
                "tenant": tenant, "document_id": document_id, "content_hash": content_hash, "live": False,
                "chunk_index": i, "text": texts[i] if texts is not None else f"chunk {i} of {document_id}",
                "title": title, "source": source,
                "start": i * 100, "end": i * 100 + 99, "heading_path": ["Intro", f"Part {i}"],
                "metadata": dict(metadata or {}), "encoder_version": "test-v1",
            },
        )
        for i, vec in enumerate(vectors)
    ]


def index(store: VectorStore, tenant: str, document_id: str, content_hash: str, vectors: np.ndarray,
          **kw: Any) -> list[PointRecord]:
    points = make_points(tenant, document_id, content_hash, vectors, **kw)
    store.upsert(COLL, points)
    store.publish(COLL, tenant, document_id, content_hash)
    return points


# -- texts for sparse and hybrid search ---------------------------------------------------------

GEO = [
    "Glaciers flow slowly down mountain valleys, carrying rock and ice.",
    "The Aletsch glacier is the largest glacier in the Alps.",
    "Volcanoes erupt molten lava and ash over the surrounding farmland.",
    "Mount Etna is an active volcano on the island of Sicily.",
    "Ice cores drilled from a glacier record the climate of past millennia.",
]
BIO = [
    "Photosynthesis converts light energy into chemical energy inside chloroplasts.",
    "Plants store the glucose made by photosynthesis in roots and seeds.",
    "Lava from an old volcano weathers into fertile soil for plants.",
    "Mitochondria release the energy stored in glucose.",
]


def padded(texts: list[str], start: int) -> list[str]:
    """Texts made distinct by a different number of "note" words each (``start + i``).

    Equal BM25 scores inside a hybrid query's branch are ranked in the engine's own order, which the
    two backends need not share; a query that includes "note" sees a different count in every chunk.
    """
    return [t + " note" * (start + i) for i, t in enumerate(texts)]


def index_texts(store: VectorStore, tenant: str, document_id: str, content_hash: str, texts: list[str], seed: int,
                **kw: Any) -> list[PointRecord]:
    return index(store, tenant, document_id, content_hash, unit_vectors(len(texts), seed), texts=texts, **kw)


def manual_bm25(query: str, points: list[PointRecord]) -> dict[str, float]:
    """BM25 of each point for ``query``: stored weights times IDF over ``points`` (the tenant's live ones)."""
    q = SPARSE.encode_query(query)
    corpus = [p for p in points if p.sparse is not None and p.sparse.indices]
    n = len(corpus)
    df = {t: sum(t in p.sparse.indices for p in corpus) for t in q.indices}
    idf = {t: np.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in q.indices}
    scores = {}
    for p in corpus:
        weights = dict(zip(p.sparse.indices, p.sparse.values, strict=True))
        hit = [t for t in q.indices if t in weights]
        if hit:
            scores[p.id] = float(sum(idf[t] * weights[t] for t in hit))
    return scores


def manual_rrf(branches: list[list[str]], k: int, weights: tuple[float, float] | None) -> list[tuple[str, float]]:
    """Qdrant's (weighted) RRF: rank r (from 1) in branch i adds 1 / (r / w_i + k - 1); ties by id."""
    scores: dict[str, float] = {}
    for i, ids in enumerate(branches):
        w = 1.0 if weights is None else weights[i]
        for rank, pid in enumerate(ids, start=1):
            scores[pid] = scores.get(pid, 0.0) + (1 / (rank / w + k - 1) if w > 0 else 0.0)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


MODES = ("dense", "sparse", "hybrid")


def search_mode(store: VectorStore, mode: str, query: str, qvec: np.ndarray, tenant: str = "t", top_k: int = 10,
                **kw: Any) -> list:
    return store.search(COLL, qvec.tolist(), tenant=tenant, top_k=top_k, mode=mode,
                        sparse_vector=SPARSE.encode_query(query), **kw)
