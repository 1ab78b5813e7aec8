"""Capability groups: collections (create, name, dimension, missing, optimize, close) and the active pointer."""

from __future__ import annotations

import pytest

from rag.errors import BadRequest, NotFound, StoreError
from rag.store import VectorStore
from tests.store_contract.helpers import COLL, DIM, index, unit_vectors


class CollectionTest:
    """Creating, naming, optimizing and closing collections."""

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


class ActivePointerTest:
    """The active pointer: set, switch, survive a failed switch, cleared with its collection."""

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
