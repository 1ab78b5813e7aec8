"""The BM25 sparse encoder: tokens, weights, stable ids, and the Retriever built on it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rag.errors import BadRequest
from rag.sparse import DEFAULT_AVG_LEN, DEFAULT_B, DEFAULT_K1, SparseEncoder
from rag.types import SparseVector

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def enc() -> SparseEncoder:
    return SparseEncoder()


def terms(enc: SparseEncoder, text: str) -> set[int]:
    return set(enc.encode_query(text).indices)


def test_lowercase_stem_and_stop_words(enc: SparseEncoder) -> None:
    assert terms(enc, "running") == terms(enc, "runs") == terms(enc, "Run") == terms(enc, "RUNNING")
    assert terms(enc, "cells") == terms(enc, "cell")
    assert terms(enc, "the of and is a to") == set()
    assert terms(enc, "the cells of the body") == terms(enc, "cell bodies")
    assert terms(enc, "IL-6") == terms(enc, "il") | terms(enc, "6")  # punctuation splits tokens
    assert len(terms(enc, "p53 TNF-alpha COVID-19")) == 5


def test_ids_are_pinned() -> None:
    # Stored collections hold these ids: an engine upgrade that changed the hashing or the stemmer
    # would silently stop queries from matching documents indexed before it. Re-index if this fails.
    enc = SparseEncoder()
    assert enc.encode_query("running").indices == [243905464]
    assert sorted(enc.encode_query("glacier cells").indices) == sorted(
        enc.encode_query("glacier").indices + enc.encode_query("cells").indices)
    assert enc.encode_query("cell").indices == [668881362]


def test_ids_are_the_same_in_another_process(enc: SparseEncoder) -> None:
    text = "Mitochondria produce ATP through oxidative phosphorylation in eukaryotic cells."
    code = textwrap.dedent(f"""
        from rag.sparse import SparseEncoder
        v = SparseEncoder().encode_document({text!r})
        print(v.indices, v.values)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    here = enc.encode_document(text)
    assert out.stdout.strip() == f"{here.indices} {here.values}"


def test_document_weights_are_saturated_and_length_normalised() -> None:
    enc = SparseEncoder(k1=1.2, b=0.75, avg_len=4.0)

    def weight(text: str, word: str) -> float:
        v = enc.encode_document(text)
        (i,) = enc.encode_query(word).indices
        return v.values[v.indices.index(i)]

    def bm25(tf: int, length: int) -> float:
        return tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * length / 4.0))

    assert weight("glacier ice rock lava", "glacier") == pytest.approx(bm25(1, 4), rel=1e-5)
    assert weight("glacier glacier ice rock", "glacier") == pytest.approx(bm25(2, 4), rel=1e-5)
    # Stop words do not count towards the length.
    assert weight("the glacier and the ice", "glacier") == pytest.approx(bm25(1, 2), rel=1e-5)
    long = "glacier " + " ".join(f"word{i}" for i in range(15))
    assert weight(long, "glacier") == pytest.approx(bm25(1, 16), rel=1e-5)
    assert weight(long, "glacier") < weight("glacier ice rock lava", "glacier")  # longer chunk, lower weight
    # Saturation: ten occurrences are worth far less than ten times one.
    assert weight("glacier " * 10, "glacier") < 3 * weight("glacier", "glacier")


def test_query_weights_are_one_per_distinct_term(enc: SparseEncoder) -> None:
    q = enc.encode_query("glacier glacier melting glaciers ice")
    assert len(q.indices) == len(set(q.indices)) == 3  # glacier(s) stem together; melting; ice
    assert q.values == [1.0, 1.0, 1.0]
    assert isinstance(q, SparseVector)


def test_documents_in_batch_equal_one_by_one(enc: SparseEncoder) -> None:
    texts = ["Glaciers carve valleys.", "", "the of", "Lava cools into basalt rock, and rock weathers."]
    batch = enc.encode_documents(texts)
    assert batch == [enc.encode_document(t) for t in texts]
    assert batch[1].indices == [] and batch[2].indices == []


def test_version_names_the_configuration() -> None:
    default = SparseEncoder()
    assert default.version == f"bm25-english-k{DEFAULT_K1:g}-b{DEFAULT_B:g}-avg{DEFAULT_AVG_LEN:g}"
    assert SparseEncoder(k1=0.9).version != default.version
    assert SparseEncoder(b=0.4).version != default.version
    assert SparseEncoder(avg_len=256).version != default.version


@pytest.mark.parametrize("kw", [{"k1": -1}, {"b": 1.5}, {"b": float("nan")}, {"avg_len": 0}, {"language": "klingon"}])
def test_bad_configuration_is_rejected(kw: dict) -> None:
    with pytest.raises(BadRequest):
        SparseEncoder(**kw)


# -- the Retriever (sync path, as the eval harness uses it) ----------------------------------------


def test_retriever_modes_over_a_real_worker_index(tmp_path: Path, embedder) -> None:
    import msgspec

    from ingest.worker import IngestWorker
    from rag.registry import JobItem, SqliteRegistry
    from rag.search import Retriever
    from rag.settings import Settings
    from rag.store import open_store

    settings = Settings(data_dir=tmp_path, search_mode="sparse")
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    try:
        docs = [
            {"_id": "etna", "title": "Etna", "text": "Mount Etna is an active stratovolcano on the east coast of Sicily."},
            {"_id": "aletsch", "title": "Aletsch", "text": "The Aletsch Glacier is the largest glacier in the Alps."},
            {"_id": "photo", "title": "Photosynthesis", "text": "Chloroplasts convert light energy into glucose."},
        ]
        upload = tmp_path / "docs.jsonl"
        upload.write_text("\n".join(msgspec.json.encode(d).decode() for d in docs) + "\n")
        sparse = SparseEncoder()
        worker = IngestWorker(settings, registry, store, embedder, sparse)
        registry.create_job("default", [JobItem(filename="docs.jsonl", path=str(upload))])
        assert worker.run_once()
        assert sparse.version in worker.signature
        retriever = Retriever(store, worker.collection, embedder, sparse, settings)
        assert retriever.fusion == "rrf"

        # A rare exact term: BM25 finds it; the default mode here is sparse.
        hits = retriever.search("Aletsch", tenant="default", top_k=3)
        assert [h.payload["document_id"] for h in hits] == ["aletsch"]
        for mode in ("dense", "sparse", "hybrid"):
            hits = retriever.search("largest glacier in the Alps", tenant="default", top_k=3, mode=mode)
            assert hits[0].payload["document_id"] == "aletsch", mode
        assert retriever.search("glacier", tenant="other", top_k=3, mode="hybrid") == []
        hits = retriever.search("glacier volcano", tenant="default", top_k=3, mode="hybrid",
                                filter={"document_id": "etna"})
        assert [h.payload["document_id"] for h in hits] == ["etna"]
        with pytest.raises(BadRequest):
            retriever.search("x", tenant="default", top_k=3, mode="fuzzy")

        weighted = Retriever(store, worker.collection, embedder, sparse,
                             msgspec.structs.replace(settings, dense_weight=2.0, sparse_weight=0.5))
        assert weighted.fusion == "weighted" and weighted.weights == (2.0, 0.5)
        assert weighted.search("largest glacier", tenant="default", top_k=1, mode="hybrid")[0].payload[
            "document_id"] == "aletsch"
    finally:
        registry.close()
        store.close()
