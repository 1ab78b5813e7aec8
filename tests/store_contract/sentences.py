"""Capability group: the sentence vectors stored with each chunk (rag/sentence_vectors.py)."""

from __future__ import annotations

import numpy as np

from rag.store import VectorStore
from tests.store_contract.helpers import COLL, index, make_points, unit_vectors


class SentenceVectorTest:
    """Sentence vectors round-trip by point id (float16 storage), per tenant, and stay out of scrolls."""

    def test_sentence_vectors_round_trip_by_id_for_the_tenant_only(self, store: VectorStore) -> None:
        assert store.has_sentence_vectors(COLL)
        points = make_points("a", "doc", "h1", unit_vectors(3, 40))
        stored = {p.id: unit_vectors(i + 1, 41 + i) for i, p in enumerate(points[:2])}  # 1 and 2 sentences
        for p in points[:2]:
            p.sentences = stored[p.id].tolist()
        store.upsert(COLL, points)  # the third point has none
        other = make_points("b", "doc", "h1", unit_vectors(1, 44))
        other[0].sentences = unit_vectors(2, 45).tolist()
        store.upsert(COLL, other)
        asked = [p.id for p in points] + [other[0].id, "00000000-0000-0000-0000-00000000abcd"]
        got = store.sentence_vectors(COLL, asked, tenant="a")
        assert set(got) == set(stored)  # not b's point, not the point without any, not a missing one
        for pid, (version, vectors) in got.items():
            assert version == "test-v1" and vectors.dtype == np.float32
            assert vectors.shape == stored[pid].shape
            np.testing.assert_allclose(vectors, stored[pid], atol=2e-3)  # float16 storage
        assert set(store.sentence_vectors(COLL, asked, tenant="b")) == {other[0].id}
        assert store.sentence_vectors(COLL, [], tenant="a") == {}

    def test_sentence_vectors_change_no_search_and_no_scroll(self, store: VectorStore) -> None:
        plain = index(store, "t", "plain", "h1", unit_vectors(2, 46))
        with_sentences = make_points("t", "rich", "h1", unit_vectors(2, 46))  # the same dense vectors
        for p in with_sentences:
            p.sentences = unit_vectors(3, 47).tolist()
        store.upsert(COLL, with_sentences)
        store.publish(COLL, "t", "rich", "h1")
        hits = store.search(COLL, plain[0].vector, tenant="t", top_k=4)
        score = {(h.payload["document_id"], h.payload["chunk_index"]): h.score for h in hits}
        assert len(score) == 4 and all(abs(score[("plain", i)] - score[("rich", i)]) < 1e-5 for i in (0, 1))
        records = [p for batch in store.iter_points(COLL, tenant="t") for p in batch]
        assert len(records) == 4 and all(p.sentences is None for p in records)
        # A record scrolled out and written back (re-embedding, repair) drops its sentence vectors, never fails.
        store.upsert(COLL, [r for r in records if r.payload["document_id"] == "rich"])
        assert store.sentence_vectors(COLL, [p.id for p in with_sentences], tenant="t") == {}
