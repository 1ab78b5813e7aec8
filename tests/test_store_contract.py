"""One contract for every VectorStore: the embedded engine (qdrant-edge) and qdrant-client (:memory:)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.errors import BadRequest, NotFound, StoreError, StoreLockedError
from rag.sparse import SparseEncoder
from rag.store import (
    EdgeVectorStore,
    FieldMatch,
    FieldMatchAny,
    FieldRange,
    QdrantServerStore,
    VectorStore,
    open_store,
    parse_filter,
    point_id,
)
from rag.types import PointRecord, SparseVector

DIM = 16
COLL = "chunks-test"
SPARSE = SparseEncoder()
REPO = Path(__file__).resolve().parents[1]

# qdrant-client's :memory: mode warns that it ignores payload indexes and search params (other than
# the IDF scope); the server uses them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]


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


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "edge":
        s: VectorStore = EdgeVectorStore(tmp_path / "qdrant")
    else:
        from qdrant_client import QdrantClient

        s = QdrantServerStore(QdrantClient(":memory:"))
    s.ensure_collection(COLL, DIM)
    try:
        yield s
    finally:
        s.close()


class TestVectorStoreContract:
    def test_is_a_vector_store(self, store: VectorStore) -> None:
        assert isinstance(store, VectorStore)

    def test_ensure_collection_is_idempotent(self, store: VectorStore) -> None:
        index(store, "t1", "doc", "h1", unit_vectors(3, 1))
        store.ensure_collection(COLL, DIM)
        store.ensure_collection(COLL, DIM)
        assert store.list_collections() == [COLL]
        assert store.count(COLL) == 3

    def test_ensure_collection_rejects_other_dimension(self, store: VectorStore) -> None:
        with pytest.raises(StoreError, match="16"):
            store.ensure_collection(COLL, DIM * 2)

    def test_unpublished_points_are_invisible_until_published(self, store: VectorStore) -> None:
        vecs = unit_vectors(4, 2)
        points = make_points("t1", "doc", "h1", vecs)
        store.upsert(COLL, points)
        assert store.count(COLL, tenant="t1", live=False) == 4
        assert store.search(COLL, vecs[0].tolist(), tenant="t1", top_k=10) == []

        store.publish(COLL, "t1", "doc", "h1")
        assert store.count(COLL, tenant="t1", live=True) == 4
        assert store.count(COLL, live=False) == 0
        hits = store.search(COLL, vecs[0].tolist(), tenant="t1", top_k=10)
        assert len(hits) == 4
        assert hits[0].id == points[0].id
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].payload == {**points[0].payload, "live": True}

    def test_publish_replaces_the_old_generation(self, store: VectorStore) -> None:
        old = index(store, "t1", "doc", "h1", unit_vectors(5, 3))
        index(store, "t1", "other", "h9", unit_vectors(2, 4))
        new_vecs = unit_vectors(3, 5)
        new = make_points("t1", "doc", "h2", new_vecs)
        store.upsert(COLL, new)
        # Before publish: the old generation still answers, the new one is staged.
        assert store.count(COLL, document_id="doc") == 8
        assert {h.payload["content_hash"] for h in store.search(COLL, new_vecs[0].tolist(), tenant="t1", top_k=20)
                if h.payload["document_id"] == "doc"} == {"h1"}

        store.publish(COLL, "t1", "doc", "h2")
        assert store.count(COLL, document_id="doc") == 3
        assert store.count(COLL, document_id="doc", live=True) == 3
        assert store.count(COLL, document_id="other") == 2  # other documents are untouched
        hits = store.search(COLL, old[0].vector, tenant="t1", top_k=20)
        assert {h.payload["content_hash"] for h in hits if h.payload["document_id"] == "doc"} == {"h2"}
        other = make_points("t1", "other", "h9", unit_vectors(2, 4))
        assert {h.id for h in hits} == {p.id for p in new} | {p.id for p in other}

    def test_publish_many(self, store: VectorStore) -> None:
        index(store, "t1", "a", "a1", unit_vectors(2, 6))
        store.upsert(COLL, make_points("t1", "a", "a2", unit_vectors(3, 7)))
        store.upsert(COLL, make_points("t1", "b", "b1", unit_vectors(2, 8)))
        store.publish_many(COLL, "t1", [("a", "a2"), ("b", "b1")])
        assert store.count(COLL, document_id="a", live=True) == 3
        assert store.count(COLL, document_id="a") == 3
        assert store.count(COLL, document_id="b", live=True) == 2
        store.publish_many(COLL, "t1", [])  # nothing to do is fine

    def test_reupserting_same_ids_does_not_duplicate(self, store: VectorStore) -> None:
        vecs = unit_vectors(4, 9)
        index(store, "t1", "doc", "h1", vecs)
        index(store, "t1", "doc", "h1", vecs)  # a retried job writes the same ids
        assert store.count(COLL) == 4
        assert store.count(COLL, document_id="doc", live=True) == 4
        assert len(store.search(COLL, vecs[0].tolist(), tenant="t1", top_k=10)) == 4

    def test_delete_document_removes_every_generation(self, store: VectorStore) -> None:
        vecs = unit_vectors(3, 10)
        index(store, "t1", "doc", "h1", vecs)
        store.upsert(COLL, make_points("t1", "doc", "h2", unit_vectors(2, 11)))  # staged, not live
        index(store, "t1", "keep", "k1", unit_vectors(1, 12))
        assert store.delete_document(COLL, "t1", "doc") == 5
        assert store.count(COLL, document_id="doc") == 0
        assert store.count(COLL) == 1
        hits = store.search(COLL, vecs[0].tolist(), tenant="t1", top_k=10)
        assert [h.payload["document_id"] for h in hits] == ["keep"]
        assert store.delete_document(COLL, "t1", "doc") == 0

    def test_delete_document_is_per_tenant(self, store: VectorStore) -> None:
        index(store, "a", "doc", "h1", unit_vectors(2, 13))
        index(store, "b", "doc", "h1", unit_vectors(2, 14))
        assert store.delete_document(COLL, "a", "doc") == 2
        assert store.count(COLL, tenant="b", document_id="doc") == 2

    def test_tenant_isolation(self, store: VectorStore) -> None:
        vecs = unit_vectors(3, 15)
        index(store, "alice", "secret", "h1", vecs)
        index(store, "bob", "mine", "h1", unit_vectors(2, 16))
        for flt in (None, {"document_id": "secret"}, {"document_id": ["secret", "mine"]}, {"chunk_index": {"gte": 0}}):
            hits = store.search(COLL, vecs[0].tolist(), tenant="bob", top_k=10, filter=flt)
            assert all(h.payload["tenant"] == "bob" for h in hits), flt
            assert "secret" not in {h.payload["document_id"] for h in hits}
        assert store.search(COLL, vecs[0].tolist(), tenant="bob", top_k=10, filter={"document_id": "secret"}) == []
        assert store.search(COLL, vecs[0].tolist(), tenant="nobody", top_k=10) == []
        assert store.count(COLL, tenant="alice") == 3

    def test_user_filters_restrict_results(self, store: VectorStore) -> None:
        index(store, "t", "d1", "h", unit_vectors(4, 17), title="Alpha", source="a.pdf",
              metadata={"lang": "en", "year": 2020, "reviewed": True})
        index(store, "t", "d2", "h", unit_vectors(4, 18), title="Beta", source="b.md",
              metadata={"lang": "de", "year": 2023, "reviewed": False})
        q = unit_vectors(1, 19)[0].tolist()

        def found(flt: dict[str, Any]) -> set[tuple[str, int]]:
            return {(h.payload["document_id"], h.payload["chunk_index"])
                    for h in store.search(COLL, q, tenant="t", top_k=50, filter=flt)}

        everything = {(d, i) for d in ("d1", "d2") for i in range(4)}
        assert found({}) == everything
        assert found({"document_id": "d1"}) == {("d1", i) for i in range(4)}
        assert found({"title": "Beta"}) == {("d2", i) for i in range(4)}
        assert found({"source": ["a.pdf", "b.md"]}) == everything
        assert found({"source": ["b.md", "zzz"]}) == {("d2", i) for i in range(4)}
        assert found({"chunk_index": 2}) == {("d1", 2), ("d2", 2)}
        assert found({"chunk_index": [0, 3]}) == {(d, i) for d in ("d1", "d2") for i in (0, 3)}
        assert found({"chunk_index": {"gte": 1, "lt": 3}}) == {(d, i) for d in ("d1", "d2") for i in (1, 2)}
        assert found({"chunk_index": {"gt": 2.5}}) == {("d1", 3), ("d2", 3)}
        assert found({"metadata.lang": "de"}) == {("d2", i) for i in range(4)}
        assert found({"metadata.year": {"lte": 2021}}) == {("d1", i) for i in range(4)}
        assert found({"metadata.year": 2023.0}) == {("d2", i) for i in range(4)}
        assert found({"metadata.reviewed": True}) == {("d1", i) for i in range(4)}
        assert found({"metadata.reviewed": False}) == {("d2", i) for i in range(4)}
        assert found({"metadata.reviewed": [False, "x"]}) == {("d2", i) for i in range(4)}
        assert found({"metadata.lang": "en", "chunk_index": 1}) == {("d1", 1)}
        assert found({"metadata.lang": "fr"}) == set()
        assert found({"metadata.missing": "x"}) == set()

    @pytest.mark.parametrize(
        "flt, field",
        [
            ({"tenant": "other"}, "tenant"),
            ({"live": False}, "live"),
            ({"text": "x"}, "text"),
            ({"document_id": []}, "document_id"),
            ({"document_id": None}, "document_id"),
            ({"document_id": 3}, "document_id"),
            ({"title": {"gte": 1}}, "title"),
            ({"chunk_index": {"between": [1, 2]}}, "chunk_index"),
            ({"chunk_index": {}}, "chunk_index"),
            ({"chunk_index": {"gte": "1"}}, "chunk_index"),
            ({"chunk_index": {"gte": True}}, "chunk_index"),
            ({"chunk_index": True}, "chunk_index"),
            ({"chunk_index": [1, [2]]}, "chunk_index"),
            ({"metadata.a": {"gt": {"x": 1}}}, "metadata.a"),
            ({"metadata.a": [1.5]}, "metadata.a"),
            ({"metadata.a": {"x": 1}}, "metadata.a"),
            ({"metadata.": "x"}, "metadata."),
            ({"metadata.a.b": "x"}, "metadata.a.b"),
            ({"metadata.a": float("nan")}, "metadata.a"),
            ({"metadata": {"a": 1}}, "metadata"),
        ],
    )
    def test_bad_filters_raise_bad_request(self, store: VectorStore, flt: dict[str, Any], field: str) -> None:
        index(store, "t", "d", "h", unit_vectors(1, 20))
        with pytest.raises(BadRequest) as info:
            store.search(COLL, unit_vectors(1, 21)[0].tolist(), tenant="t", top_k=3, filter=flt)
        assert repr(field) in info.value.message

    def test_top_k_and_order(self, store: VectorStore) -> None:
        vecs = unit_vectors(12, 22)
        index(store, "t", "d", "h", vecs)
        q = vecs[5]
        expected = np.argsort(-(vecs @ q))[:4]
        hits = store.search(COLL, q.tolist(), tenant="t", top_k=4)
        assert [h.payload["chunk_index"] for h in hits] == expected.tolist()
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert [h.score for h in hits] == pytest.approx((vecs[expected] @ q).tolist(), abs=1e-4)
        assert len(store.search(COLL, q.tolist(), tenant="t", top_k=1)) == 1
        assert len(store.search(COLL, q.tolist(), tenant="t", top_k=100)) == 12
        with pytest.raises(BadRequest):
            store.search(COLL, q.tolist(), tenant="t", top_k=0)

    def test_active_pointer_and_collections(self, store: VectorStore) -> None:
        assert store.get_active() is None
        store.set_active(COLL)
        assert store.get_active() == COLL
        store.ensure_collection("chunks-v2", DIM)
        assert store.list_collections() == ["chunks-test", "chunks-v2"]
        store.set_active("chunks-v2")
        assert store.get_active() == "chunks-v2"
        with pytest.raises(NotFound):
            store.set_active("chunks-missing")
        assert store.get_active() == "chunks-v2"  # a failed switch leaves the pointer alone
        store.set_active(COLL)
        store.drop_collection("chunks-v2")
        assert store.list_collections() == [COLL]
        assert store.get_active() == COLL
        store.drop_collection(COLL)  # dropping the active one clears the pointer, as a server drops the alias
        assert store.list_collections() == []
        assert store.get_active() is None
        store.drop_collection("chunks-never-existed")

    def test_missing_collection_is_not_found(self, store: VectorStore) -> None:
        with pytest.raises(NotFound):
            store.search("chunks-missing", [0.0] * DIM, tenant="t", top_k=3)
        with pytest.raises(NotFound):
            store.count("chunks-missing")

    def test_invalid_collection_name(self, store: VectorStore) -> None:
        for name in ("../escape", "", "rag_active", "a/b"):
            with pytest.raises(BadRequest):
                store.ensure_collection(name, DIM)

    def test_optimize_keeps_results(self, store: VectorStore) -> None:
        vecs = unit_vectors(5, 23)
        index(store, "t", "d", "h", vecs)
        assert isinstance(store.optimize(COLL), bool)
        assert store.search(COLL, vecs[2].tolist(), tenant="t", top_k=1)[0].payload["chunk_index"] == 2

    def test_closed_store_raises_store_error(self, store: VectorStore) -> None:
        store.close()
        with pytest.raises(StoreError):
            store.count(COLL)
        store.close()  # twice is fine


# -- sparse and hybrid search -------------------------------------------------------------------

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


class TestHybridSearchContract:
    def test_sparse_scores_are_bm25_over_the_tenants_live_points(self, store: VectorStore) -> None:
        live = index_texts(store, "t", "geo", "h1", GEO, 40) + index_texts(store, "t", "bio", "h1", BIO, 41)
        query = "glacier ice in the Alps"
        before = store.search(COLL, None, tenant="t", top_k=20, mode="sparse", sparse_vector=SPARSE.encode_query(query))
        expected = manual_bm25(query, live)
        assert [h.id for h in before] == [pid for pid, _ in sorted(expected.items(), key=lambda x: (-x[1], x[0]))]
        assert [h.score for h in before] == pytest.approx([expected[h.id] for h in before], rel=1e-4)
        assert before[0].payload["text"] == GEO[1]

        # Another tenant's documents and a staged generation change neither the IDF nor the ranking.
        index_texts(store, "u", "ice", "h1", ["glacier glacier ice Alps"] * 6, 42)
        store.upsert(COLL, make_points("t", "geo", "h2", unit_vectors(3, 43), texts=["glacier ice"] * 3))
        after = store.search(COLL, None, tenant="t", top_k=20, mode="sparse", sparse_vector=SPARSE.encode_query(query))
        assert [(h.id, pytest.approx(h.score, rel=1e-4)) for h in after] == [(h.id, h.score) for h in before]

    def test_points_without_sparse_vectors_are_found_by_dense_search_only(self, store: VectorStore) -> None:
        vecs = unit_vectors(2, 44)
        index(store, "t", "legacy", "h1", vecs)  # a caller that passes no sparse vectors
        index_texts(store, "t", "geo", "h1", GEO, 45)
        assert {h.payload["document_id"] for h in search_mode(store, "dense", "glacier", vecs[0], top_k=20)} == {
            "legacy", "geo"}
        assert {h.payload["document_id"] for h in search_mode(store, "sparse", "glacier", vecs[0], top_k=20)} == {"geo"}
        hybrid = search_mode(store, "hybrid", "glacier", vecs[0], top_k=20)
        assert {h.payload["document_id"] for h in hybrid} == {"legacy", "geo"}  # the dense branch still finds it

    @pytest.mark.parametrize(
        ("fusion", "weights", "rrf_k"),
        [("rrf", (1.0, 1.0), 60), ("rrf", (3.0, 0.1), 2), ("weighted", (2.0, 0.5), 60), ("weighted", (0.5, 3.0), 10)],
    )
    def test_hybrid_is_rrf_of_both_branches(self, store: VectorStore, fusion: str, weights: tuple[float, float],
                                            rrf_k: int) -> None:
        for n in range(4):  # enough points that each branch's prefetch cut matters
            index_texts(store, "t", f"geo{n}", "h1", padded(GEO, 10 * n), 46 + n)
            index_texts(store, "t", f"bio{n}", "h1", padded(BIO, 10 * n + 5), 56 + n)
        query, qvec = "volcano lava glacier energy note", unit_vectors(1, 66)[0]
        prefetch = 14  # top_k + the store's tie slack is below it, so this is the effective cut
        dense = [h.id for h in search_mode(store, "dense", query, qvec, top_k=prefetch)]
        sparse = [h.id for h in search_mode(store, "sparse", query, qvec, top_k=prefetch)]
        hits = search_mode(store, "hybrid", query, qvec, top_k=5, fusion=fusion, weights=weights, rrf_k=rrf_k,
                           prefetch_k=prefetch)
        expected = manual_rrf([dense, sparse], rrf_k, weights if fusion == "weighted" else None)[:5]
        assert [h.id for h in hits] == [pid for pid, _ in expected]
        assert [h.score for h in hits] == pytest.approx([score for _, score in expected], rel=1e-5)
        assert all(h.payload["tenant"] == "t" and h.payload["live"] is True for h in hits)

    def test_filters_apply_to_both_branches(self, store: VectorStore) -> None:
        qvec = unit_vectors(1, 70)[0]
        near = qvec + 0.05 * unit_vectors(20, 71)
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        # "big" wins both branches by far: filtered only after fusion, "small" would never show.
        index(store, "t", "big", "h1", near, texts=["volcano lava eruption volcano"] * 20, metadata={"lang": "en"})
        index(store, "t", "small", "h1", -near[:3], texts=["a volcano in a quiet valley"] * 3,
              metadata={"lang": "de"}, source="b.md")
        for flt in ({"document_id": "small"}, {"metadata.lang": "de"}, {"source": ["b.md"], "chunk_index": {"lte": 5}}):
            for mode in MODES:
                hits = search_mode(store, mode, "volcano lava", qvec, top_k=3, filter=flt, prefetch_k=10)
                assert sorted(h.payload["chunk_index"] for h in hits) == [0, 1, 2], (mode, flt)
                assert {h.payload["document_id"] for h in hits} == {"small"}, (mode, flt)
        for mode in MODES:
            assert search_mode(store, mode, "volcano", qvec, filter={"metadata.lang": "fr"}) == []

    def test_tenant_isolation_in_every_mode(self, store: VectorStore) -> None:
        qvec = unit_vectors(1, 72)[0]
        index(store, "alice", "secret", "h1", np.stack([qvec] * 3), texts=["glacier secret plans"] * 3)
        index_texts(store, "bob", "mine", "h1", BIO, 73)
        for mode in MODES:
            for flt in (None, {"document_id": "secret"}, {"document_id": ["secret", "mine"]}, {"chunk_index": {"gte": 0}}):
                hits = search_mode(store, mode, "glacier secret plans", qvec, tenant="bob", top_k=10, filter=flt)
                assert all(h.payload["tenant"] == "bob" for h in hits), (mode, flt)
            assert search_mode(store, mode, "glacier secret", qvec, tenant="bob", filter={"document_id": "secret"}) == []
            assert search_mode(store, mode, "glacier secret", qvec, tenant="nobody") == []
            assert len(search_mode(store, mode, "glacier secret", qvec, tenant="alice")) == 3

    def test_unpublished_points_are_invisible_in_every_mode(self, store: VectorStore) -> None:
        qvec = unit_vectors(1, 74)[0]
        store.upsert(COLL, make_points("t", "geo", "h1", unit_vectors(len(GEO), 75), texts=GEO))
        for mode in MODES:
            assert search_mode(store, mode, "glacier", qvec) == [], mode
        store.publish(COLL, "t", "geo", "h1")
        for mode in MODES:
            assert search_mode(store, mode, "glacier", qvec), mode

    def test_equal_scores_are_ordered_by_id(self, store: VectorStore) -> None:
        qvec = unit_vectors(1, 76)[0]
        for doc in ("c", "a", "d", "b"):
            index(store, "t", doc, "h1", np.stack([qvec]), texts=["identical glacier text"])
        ids = sorted(point_id("t", d, "h1", 0) for d in "abcd")
        for mode in ("dense", "sparse"):
            assert [h.id for h in search_mode(store, mode, "glacier", qvec, top_k=3)] == ids[:3], mode
        # Inside each hybrid branch the engine ranks exact duplicates in its own order; all are returned.
        assert sorted(h.id for h in search_mode(store, "hybrid", "glacier", qvec, top_k=4)) == ids

    def test_a_query_of_only_stop_words(self, store: VectorStore) -> None:
        index_texts(store, "t", "geo", "h1", GEO, 77)
        qvec = unit_vectors(1, 78)[0]
        assert SPARSE.encode_query("the of and it").indices == []
        assert search_mode(store, "sparse", "the of and it", qvec) == []
        dense = [h.id for h in search_mode(store, "dense", "the of and it", qvec, top_k=3)]
        assert [h.id for h in search_mode(store, "hybrid", "the of and it", qvec, top_k=3)] == dense

    @pytest.mark.parametrize(
        ("kw", "word"),
        [
            ({"mode": "fuzzy"}, "mode"),
            ({"mode": "dense", "vector": None}, "dense query vector"),
            ({"mode": "hybrid", "vector": None}, "dense query vector"),
            ({"mode": "sparse", "sparse_vector": None}, "sparse query vector"),
            ({"mode": "sparse", "sparse_vector": SparseVector(indices=[1, 2], values=[1.0])}, "length"),
            ({"mode": "hybrid", "fusion": "max"}, "fusion"),
            ({"mode": "hybrid", "rrf_k": 0}, "rrf_k"),
            ({"mode": "hybrid", "prefetch_k": 0}, "prefetch_k"),
            ({"mode": "hybrid", "fusion": "weighted", "weights": (-1.0, 1.0)}, "weights"),
            ({"mode": "hybrid", "fusion": "weighted", "weights": (0.0, 0.0)}, "weights"),
            ({"mode": "hybrid", "fusion": "weighted", "weights": (float("inf"), 1.0)}, "weights"),
            ({"mode": "sparse", "top_k": 0}, "top_k"),
        ],
    )
    def test_bad_search_arguments_raise_bad_request(self, store: VectorStore, kw: dict[str, Any], word: str) -> None:
        index_texts(store, "t", "geo", "h1", GEO, 79)
        args: dict[str, Any] = {"vector": unit_vectors(1, 80)[0].tolist(), "sparse_vector": SPARSE.encode_query("ice"),
                                "top_k": 3, **kw}
        with pytest.raises(BadRequest, match=word):
            store.search(COLL, args.pop("vector"), tenant="t", **args)


def _congruent_stores(tmp_path: Path) -> Iterator[tuple[VectorStore, VectorStore]]:
    from qdrant_client import QdrantClient

    edge, server = EdgeVectorStore(tmp_path / "qdrant"), QdrantServerStore(QdrantClient(":memory:"))
    try:
        for s in (edge, server):
            s.ensure_collection(COLL, DIM)
            for n in range(3):
                index_texts(s, "t", f"geo{n}", "h1", padded(GEO, 10 * n), 90 + n, metadata={"lang": "en", "n": n})
                index_texts(s, "t", f"bio{n}", "h1", padded(BIO, 10 * n + 5), 95 + n, metadata={"lang": "de", "n": n})
            index_texts(s, "u", "other", "h1", GEO + BIO, 99)
            s.upsert(COLL, make_points("t", "geo0", "h2", unit_vectors(2, 100), texts=["glacier lava"] * 2))  # staged
        yield edge, server
    finally:
        edge.close()
        server.close()


def test_both_backends_return_the_same_results_in_every_mode(tmp_path: Path) -> None:
    """Congruence: the embedded engine and qdrant-client agree on ids, order and scores."""
    cases: list[dict[str, Any]] = [{"mode": m} for m in MODES] + [
        {"mode": "hybrid", "rrf_k": 2},
        {"mode": "hybrid", "fusion": "weighted", "weights": (2.0, 0.5)},
        {"mode": "hybrid", "fusion": "weighted", "weights": (0.3, 1.7), "prefetch_k": 12},
        {"mode": "sparse", "filter": {"metadata.lang": "de"}},
        {"mode": "hybrid", "filter": {"metadata.n": {"gte": 1}, "chunk_index": [0, 1, 2]}},
    ]
    # No "note" here: its tiny IDF makes near-equal scores, which qdrant-client's float64 and the
    # engine's float32 may order differently.
    queries = ["glacier ice Alps", "volcano lava plants", "energy glucose", "the and of"]
    stores = _congruent_stores(tmp_path)
    edge, server = next(stores)
    try:
        for i, query in enumerate(queries):
            qvec = unit_vectors(1, 200 + i)[0]
            for case in cases:
                kw = dict(case)
                a = search_mode(edge, kw.pop("mode"), query, qvec, top_k=15, **kw)
                b = search_mode(server, case["mode"], query, qvec, top_k=15, **kw)
                assert [h.id for h in a] == [h.id for h in b], (query, case)
                assert [h.score for h in a] == pytest.approx([h.score for h in b], rel=1e-5), (query, case)
                assert [h.payload for h in a] == [h.payload for h in b]
    finally:
        stores.close()


def test_edge_refuses_a_collection_without_sparse_vectors(tmp_path: Path) -> None:
    from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams

    shard = EdgeShard.create(str(tmp_path / "collections" / COLL),
                             EdgeConfig(vectors={"dense": EdgeVectorParams(size=DIM, distance=Distance.Cosine)}))
    shard.close()
    store = EdgeVectorStore(tmp_path)
    try:
        with pytest.raises(StoreError, match="re-index"):
            store.ensure_collection(COLL, DIM)
    finally:
        store.close()


def test_server_refuses_a_collection_without_sparse_vectors() -> None:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection(COLL, vectors_config={"dense": models.VectorParams(size=DIM, distance=models.Distance.COSINE)})
    store = QdrantServerStore(client)
    try:
        with pytest.raises(StoreError, match="re-index"):
            store.ensure_collection(COLL, DIM)
    finally:
        store.close()


# -- pure functions ----------------------------------------------------------------------------


def test_point_id_is_deterministic_uuid() -> None:
    import uuid

    a = point_id("t", "doc", "h1", 0)
    assert a == point_id("t", "doc", "h1", 0)
    assert uuid.UUID(a).version == 5
    assert len({a, point_id("t", "doc", "h1", 1), point_id("t", "doc", "h2", 0), point_id("u", "doc", "h1", 0),
                point_id("t", "doc2", "h1", 0)}) == 5
    # Separators inside the parts cannot make two different keys collide.
    assert point_id("a|b", "c", "h", 0) != point_id("a", "b|c", "h", 0)


def test_parse_filter_neutral_form() -> None:
    assert parse_filter(None) == ()
    assert parse_filter({"document_id": "d", "chunk_index": [1, 2, 2], "metadata.x": {"gte": 1}}) == (
        FieldMatch("document_id", "d"), FieldMatchAny("chunk_index", (1, 2)), FieldRange("metadata.x", gte=1),
    )
    assert parse_filter({"source": ["only"]}) == (FieldMatch("source", "only"),)
    with pytest.raises(BadRequest):
        parse_filter(["document_id"])  # type: ignore[arg-type]


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    from rag.settings import Settings

    embedded = open_store(Settings(data_dir=tmp_path))
    try:
        assert isinstance(embedded, EdgeVectorStore)
        assert embedded.root == tmp_path / "qdrant"
    finally:
        embedded.close()
    server = open_store(Settings(data_dir=tmp_path, qdrant_url=":memory:"))
    try:
        assert isinstance(server, QdrantServerStore)
    finally:
        server.close()


# -- embedded only -----------------------------------------------------------------------------


def test_edge_reopen_keeps_data_and_pointer(tmp_path: Path) -> None:
    vecs = unit_vectors(6, 30)
    store = EdgeVectorStore(tmp_path)
    store.ensure_collection(COLL, DIM)
    index(store, "t", "d", "h1", vecs[:3])
    store.upsert(COLL, make_points("t", "d", "h2", vecs[3:]))
    store.publish(COLL, "t", "d", "h2")
    store.set_active(COLL)
    store.close()

    store = EdgeVectorStore(tmp_path)
    try:
        assert store.list_collections() == [COLL]
        assert store.get_active() == COLL
        assert store.count(COLL) == 3
        hits = store.search(COLL, vecs[4].tolist(), tenant="t", top_k=3)
        assert [h.payload["chunk_index"] for h in hits][0] == 1
        assert {h.payload["content_hash"] for h in hits} == {"h2"}
        store.ensure_collection(COLL, DIM)  # idempotent on a reopened shard too
        assert store.count(COLL, live=True) == 3
    finally:
        store.close()


def test_edge_same_process_second_open_is_locked(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path)
    try:
        with pytest.raises(StoreLockedError, match=str(tmp_path / ".lock")):
            EdgeVectorStore(tmp_path)
    finally:
        store.close()
    EdgeVectorStore(tmp_path).close()  # released on close


def test_edge_second_process_fails_fast_and_holder_keeps_working(tmp_path: Path) -> None:
    import os

    vecs = unit_vectors(4, 31)
    store = EdgeVectorStore(tmp_path)
    try:
        store.ensure_collection(COLL, DIM)
        index(store, "t", "d", "h1", vecs[:2])
        code = textwrap.dedent(f"""
            import sys
            from rag.errors import StoreLockedError
            from rag.store import EdgeVectorStore
            try:
                EdgeVectorStore({str(tmp_path)!r})
            except StoreLockedError as exc:
                print(exc, file=sys.stderr)
                sys.exit(3)
            sys.exit(0)
        """)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert str(tmp_path / ".lock") in proc.stderr
        assert f"process {os.getpid()}" in proc.stderr
        assert "HTTP API" in proc.stderr

        # The holder is unharmed: upsert, publish (which flushes) and search all still work.
        store.upsert(COLL, make_points("t", "d", "h2", vecs[2:]))
        store.publish(COLL, "t", "d", "h2")
        hits = store.search(COLL, vecs[3].tolist(), tenant="t", top_k=5)
        assert [h.payload["chunk_index"] for h in hits] == [1, 0]
        assert {h.payload["content_hash"] for h in hits} == {"h2"}
        assert store.delete_document(COLL, "t", "d") == 2
    finally:
        store.close()


def test_edge_publish_is_durable_without_close(tmp_path: Path) -> None:
    """A process that dies right after publish/delete returned (no close) loses nothing."""
    code = textwrap.dedent(f"""
        import os
        import numpy as np
        from rag.store import EdgeVectorStore, point_id
        from rag.types import PointRecord
        store = EdgeVectorStore({str(tmp_path)!r})
        store.ensure_collection("c", 8)
        vecs = np.eye(8, dtype=np.float32)
        def pts(doc, gen, rows):
            return [PointRecord(id=point_id("t", doc, gen, i), vector=vecs[r].tolist(),
                                payload={{"tenant": "t", "document_id": doc, "content_hash": gen, "live": False,
                                          "chunk_index": i}}) for i, r in enumerate(rows)]
        store.upsert("c", pts("a", "g1", [0, 1, 2]))
        store.publish("c", "t", "a", "g1")
        store.upsert("c", pts("a", "g2", [3, 4]))
        store.publish("c", "t", "a", "g2")
        store.upsert("c", pts("b", "g1", [5, 6]))
        store.publish("c", "t", "b", "g1")
        store.delete_document("c", "t", "b")
        store.set_active("c")
        os._exit(0)  # no close, no flush at exit: as if the process was killed
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    store = EdgeVectorStore(tmp_path)
    try:
        assert store.get_active() == "c"
        assert store.count("c") == 2
        assert store.count("c", document_id="a", live=True) == 2
        hits = store.search("c", np.eye(8)[4].tolist(), tenant="t", top_k=5)
        assert [(h.payload["content_hash"], h.payload["chunk_index"]) for h in hits][0] == ("g2", 1)
    finally:
        store.close()


def test_edge_concurrent_search_during_writes(tmp_path: Path) -> None:
    """The API searches from threads while the worker writes: no errors, no half-published document."""
    store = EdgeVectorStore(tmp_path)
    try:
        store.ensure_collection(COLL, DIM)
        vecs = unit_vectors(40, 32)
        index(store, "t", "doc", "g0", vecs[:20])
        errors: list[BaseException] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                try:
                    hits = store.search(COLL, vecs[0].tolist(), tenant="t", top_k=50, filter={"document_id": "doc"})
                    # Publish sets the new generation live before deleting the old: never empty.
                    assert hits, "document vanished during publish"
                except BaseException as exc:  # surfaced in the main thread below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=searcher) for _ in range(2)]
        for t in threads:
            t.start()
        for gen in range(1, 15):
            rows = vecs[(gen % 2) * 20:(gen % 2) * 20 + 20]
            store.upsert(COLL, make_points("t", "doc", f"g{gen}", rows))
            store.publish(COLL, "t", "doc", f"g{gen}")
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert store.count(COLL, document_id="doc") == 20
        assert store.count(COLL, document_id="doc", live=True) == 20
    finally:
        store.close()


def test_edge_optimize_builds_hnsw_and_search_stays_right(tmp_path: Path) -> None:
    # A tiny exact-search threshold forces the HNSW path after optimize().
    store = EdgeVectorStore(tmp_path, exact_search_max_points=0)
    try:
        store.ensure_collection(COLL, DIM)
        vecs = unit_vectors(300, 33)
        index(store, "t", "d", "h", vecs)
        store.optimize(COLL)
        for k in (0, 150, 299):
            assert store.search(COLL, vecs[k].tolist(), tenant="t", top_k=1)[0].payload["chunk_index"] == k
    finally:
        store.close()
