"""Capability group: sparse (BM25) and hybrid (RRF-fused) search."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rag.errors import BadRequest
from rag.store import VectorStore, point_id
from rag.types import SparseVector
from tests.store_contract.helpers import (
    BIO,
    COLL,
    GEO,
    MODES,
    SPARSE,
    index,
    index_texts,
    make_points,
    manual_bm25,
    manual_rrf,
    padded,
    search_mode,
    unit_vectors,
)


class HybridTest:
    """Sparse scores are BM25 over the tenant's live points; hybrid is RRF of both branches, each filtered."""

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
