"""Capability group: scrolling every point (re-embedding) and every live dense vector (drift snapshots)."""

from __future__ import annotations

import numpy as np
import pytest

from rag.errors import NotFound
from rag.store import VectorStore
from tests.store_contract.helpers import COLL, GEO, index, index_texts, make_points, unit_vectors


class ScrollTest:
    """iter_points yields every point whole, in batches; iter_dense the dense vectors a filter selects."""

    def test_iter_points_yields_every_point_with_payload_and_vectors(self, store: VectorStore) -> None:
        live = index_texts(store, "t", "geo", "h1", GEO, 120)
        legacy = index(store, "u", "legacy", "h1", unit_vectors(2, 121))  # no sparse vectors
        staged = make_points("t", "geo", "h2", unit_vectors(2, 122), texts=["glacier ice", "lava flow"])
        store.upsert(COLL, staged)
        batches = list(store.iter_points(COLL, batch_size=3))
        assert len(batches) == 3 and all(1 <= len(b) <= 3 for b in batches)
        got = {p.id: p for b in batches for p in b}
        assert set(got) == {p.id for p in live + legacy + staged}  # any tenant, live or not
        for p in live + legacy + staged:
            back = got[p.id]
            assert back.payload == {**p.payload, "live": p in live or p in legacy}
            assert back.vector == pytest.approx(p.vector, abs=1e-5)
            if p.sparse is None:
                assert back.sparse is None
            else:
                assert back.sparse is not None
                stored = dict(zip(back.sparse.indices, back.sparse.values, strict=True))
                assert stored == pytest.approx(dict(zip(p.sparse.indices, p.sparse.values, strict=True)))

    def test_iter_points_of_one_tenant_yields_only_its_points(self, store: VectorStore) -> None:
        a = index(store, "a", "d1", "h", unit_vectors(3, 126))
        staged = make_points("a", "d2", "h", unit_vectors(2, 127))
        store.upsert(COLL, staged)  # live or not, a tenant's points all come
        index(store, "b", "d1", "h", unit_vectors(4, 128))
        got = [p for b in store.iter_points(COLL, tenant="a", batch_size=2) for p in b]
        assert sorted(p.id for p in got) == sorted(p.id for p in a + staged)
        assert {p.payload["tenant"] for p in got} == {"a"}
        assert list(store.iter_points(COLL, tenant="nobody")) == []

    def test_iter_dense_yields_the_vectors_a_filter_selects(self, store: VectorStore) -> None:
        a = index(store, "a", "d1", "h", unit_vectors(3, 123))
        index(store, "b", "d2", "h", unit_vectors(2, 124))
        store.upsert(COLL, make_points("a", "d3", "h", unit_vectors(2, 125)))  # staged
        batches = list(store.iter_dense(COLL, tenant="a", batch_size=2))
        assert [len(ids) for ids, _ in batches] == [2, 1]
        ids = [d for doc_ids, _ in batches for d in doc_ids]
        vectors = [v for _, vs in batches for v in vs]
        assert ids == ["d1"] * 3
        assert np.allclose(sorted(vectors), sorted(p.vector for p in a), atol=1e-5)
        assert sorted(d for doc_ids, _ in store.iter_dense(COLL) for d in doc_ids) == ["d1"] * 3 + ["d2"] * 2
        everything = sorted(d for doc_ids, _ in store.iter_dense(COLL, live=None) for d in doc_ids)
        assert everything == ["d1"] * 3 + ["d2"] * 2 + ["d3"] * 2
        assert sorted(d for doc_ids, _ in store.iter_dense(COLL, live=False) for d in doc_ids) == ["d3"] * 2
        assert list(store.iter_dense(COLL, tenant="nobody")) == []

    def test_scrolling_a_missing_collection_is_not_found(self, store: VectorStore) -> None:
        with pytest.raises(NotFound):
            list(store.iter_points("chunks-missing"))
        with pytest.raises(NotFound):
            list(store.iter_dense("chunks-missing"))
