"""The bounded embedding cache of the answer path (real encoder): same vectors, per tenant, bounded."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

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


@pytest.fixture(params=[True, False], ids=["stored-sentence-vectors", "embedded-at-answer-time"])
def settings(settings, request):
    return msgspec.structs.replace(settings, sentence_vectors=request.param)


def test_an_answer_embeds_its_context_sentences_once(app_client) -> None:
    """Context sentences are embedded at most once: at ingest (stored with the chunk, RAG_SENTENCE_VECTORS) or,
    without stored vectors, at the first question whose context holds them (the cache). Same answer either way."""
    client = app_client
    r = client.post("/v1/documents", json={"id": "nile", "text": "The Nile is a major north-flowing river in "
                                           "northeastern Africa. It flows into the Mediterranean Sea. The Nile is "
                                           "about 6,650 kilometres long."})
    job = r.json()["job_ids"][0]
    from tests.conftest import wait_for

    wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)
    answers = client.services.answers
    stored = answers.settings.sentence_vectors
    cache = answers.sentence_cache
    first = client.post("/v1/answer", json={"question": "How long is the Nile?"}).json()
    misses = cache.misses
    # The question's vector is retrieval's; stored: no sentence was embedded either, else the three were.
    assert misses == (0 if stored else 3)
    second = client.post("/v1/answer", json={"question": "Where does the Nile flow into?"}).json()
    assert cache.misses == misses  # every sentence was at hand
    assert "6,650" in first["answer"]
    answers.sentence_cache = VectorCache(0)  # the same question without any cache, and without stored vectors
    answers.settings = msgspec.structs.replace(answers.settings, sentence_vectors=False)
    fresh = client.post("/v1/answer", json={"question": "Where does the Nile flow into?"}).json()
    assert fresh["answer"] == second["answer"] and fresh["citations"] == second["citations"]
    # float16 storage: the support score moves by less than a thousandth.
    assert abs(fresh["retrieval"]["support_score"] - second["retrieval"]["support_score"]) < 1e-3
