"""Capability groups: tenant scoping and user filters, dense ranking."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from rag.errors import BadRequest
from rag.store import VectorStore
from tests.store_contract.helpers import COLL, index, unit_vectors


class FilterTest:
    """Every search is scoped to one tenant; user filters narrow it, and invalid ones are a BadRequest."""

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


class SearchTest:
    """Dense search: best first by cosine, cut to top_k."""

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
