"""The bounded embedding cache of the answer path (real encoder): same vectors, per tenant, bounded."""

from __future__ import annotations

import numpy as np

from rag.vector_cache import VectorCache

TEXTS = ["Basalt columns form as lava cools.", "Granite cools slowly underground.", "The Nile flows north."]


class Counting:
    """The real encoder, counting the texts it is asked to embed."""

    def __init__(self, embedder) -> None:
        self.inner, self.version, self.dimension, self.embedded = embedder, embedder.version, embedder.dimension, 0

    def embed_documents(self, texts):
        self.embedded += len(texts)
        return self.inner.embed_documents(texts)

    def embed_queries(self, texts):
        self.embedded += len(texts)
        return self.inner.embed_queries(texts)


def test_cached_vectors_equal_fresh_ones_and_are_embedded_once(embedder) -> None:
    enc = Counting(embedder)
    cache = VectorCache(100)
    first = cache.documents(enc, TEXTS, namespace="acme")
    assert np.allclose(first, embedder.embed_documents(TEXTS), atol=1e-6)
    again = cache.documents(enc, [TEXTS[2], TEXTS[0], TEXTS[0]], namespace="acme")
    assert np.array_equal(again, first[[2, 0, 0]])
    assert enc.embedded == 3 and cache.hits == 3 and cache.misses == 3
    q = cache.queries(enc, ["why does lava cool?"], namespace="acme")
    assert np.allclose(q, embedder.embed_queries(["why does lava cool?"]), atol=1e-6)


def test_tenants_never_share_entries(embedder) -> None:
    enc = Counting(embedder)
    cache = VectorCache(100)
    cache.documents(enc, TEXTS, namespace="acme")
    cache.documents(enc, TEXTS, namespace="globex")  # no hit from acme's: no timing tells globex what acme read
    assert enc.embedded == 6 and cache.hits == 0
    assert cache.lookup(embedder.version, TEXTS[0], namespace="globex", kind="d") is not None
    assert cache.lookup("another-version", TEXTS[0], namespace="globex", kind="d") is None


def test_the_cache_is_bounded_and_least_recently_used_goes_first(embedder) -> None:
    enc = Counting(embedder)
    cache = VectorCache(2)
    cache.documents(enc, TEXTS[:2], namespace="t")
    cache.documents(enc, TEXTS[:1], namespace="t")  # TEXTS[0] is now the most recent
    cache.documents(enc, TEXTS[2:], namespace="t")  # evicts TEXTS[1]
    assert len(cache) == 2
    assert cache.lookup(embedder.version, TEXTS[1], namespace="t", kind="d") is None
    assert cache.lookup(embedder.version, TEXTS[0], namespace="t", kind="d") is not None
    off = VectorCache(0)
    off.documents(enc, TEXTS, namespace="t")
    assert len(off) == 0


def test_an_answer_embeds_its_context_sentences_once(app_client) -> None:
    """The second time a question's context comes back, its sentences come from the cache: same answer."""
    client = app_client
    r = client.post("/v1/documents", json={"id": "nile", "text": "The Nile is a major north-flowing river in "
                                           "northeastern Africa. It flows into the Mediterranean Sea. The Nile is "
                                           "about 6,650 kilometres long."})
    job = r.json()["job_ids"][0]
    from tests.conftest import wait_for

    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)
    cache = client.services.answers.sentence_cache
    first = client.post("/v1/answer", json={"question": "How long is the Nile?"}).json()
    misses = cache.misses
    second = client.post("/v1/answer", json={"question": "Where does the Nile flow into?"}).json()
    assert cache.misses == misses + 1  # only the new question; every context sentence was cached
    assert "6,650" in first["answer"]
    client.services.answers.sentence_cache = VectorCache(0)  # the same question without any cache
    uncached = client.post("/v1/answer", json={"question": "Where does the Nile flow into?"}).json()
    assert uncached["answer"] == second["answer"] and uncached["citations"] == second["citations"]
