"""Capability groups: writing points, publishing generations, deleting documents."""

from __future__ import annotations

import pytest

from rag.store import VectorStore
from tests.store_contract.helpers import COLL, index, make_points, unit_vectors


class WriteTest:
    """Upsert is idempotent per point id; delete removes a document of one tenant, every generation."""

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

    def test_delete_tenant_removes_its_points_and_only_its(self, store: VectorStore) -> None:
        index(store, "a", "d1", "h1", unit_vectors(3, 15))
        store.upsert(COLL, make_points("a", "d2", "h1", unit_vectors(2, 16)))  # staged ones go too
        kept = index(store, "b", "d1", "h1", unit_vectors(2, 17))
        assert store.delete_tenant(COLL, "a") == 5
        assert store.count(COLL, tenant="a") == 0
        assert store.count(COLL, tenant="b") == 2
        hits = store.search(COLL, kept[0].vector, tenant="b", top_k=10)
        assert {h.id for h in hits} == {p.id for p in kept}
        assert store.delete_tenant(COLL, "a") == 0


class PublishTest:
    """A generation is invisible until published; publishing replaces the older generations."""

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
