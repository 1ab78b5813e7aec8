"""One contract for every VectorStore: the embedded engine (qdrant-edge) and qdrant-client (:memory:).

The contract's capability groups live in tests/store_contract/ (one mixin class each); every backend
class below runs all of them. Then: the two backends agree result for result, and the pure functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.errors import BadRequest, StoreError
from rag.store import (
    ClusterOptions,
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
from rag.store.server import collection_config
from tests.store_contract import VectorStoreContract
from tests.store_contract.helpers import (
    BIO,
    COLL,
    DIM,
    GEO,
    MODES,
    index_texts,
    make_points,
    padded,
    search_mode,
    unit_vectors,
)

# qdrant-client's :memory: mode warns that it ignores payload indexes and search params (other than
# the IDF scope); the server uses them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning"),
    pytest.mark.filterwarnings("ignore:Local mode performs exact:UserWarning"),
]


def _with_collection(store: VectorStore) -> Iterator[VectorStore]:
    store.ensure_collection(COLL, DIM)
    try:
        yield store
    finally:
        store.close()


class TestEdgeVectorStore(VectorStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[VectorStore]:
        yield from _with_collection(EdgeVectorStore(tmp_path / "qdrant"))


class TestQdrantServerStore(VectorStoreContract):
    @pytest.fixture
    def store(self) -> Iterator[VectorStore]:
        from qdrant_client import QdrantClient

        yield from _with_collection(QdrantServerStore(QdrantClient(":memory:")))


CLUSTER = ClusterOptions(shards=2, replication_factor=2, write_consistency_factor=2, on_disk=True,
                         on_disk_payload=True, quantization="int8", write_ordering="strong")


class TestQdrantServerStoreClusterLayout(VectorStoreContract):
    """The whole contract again with a cluster's collection options: sharded, replicated, on-disk vectors
    with an int8 copy in RAM, strongly ordered writes (local mode accepts them; a server applies them)."""

    @pytest.fixture
    def store(self) -> Iterator[VectorStore]:
        from qdrant_client import QdrantClient

        yield from _with_collection(QdrantServerStore(QdrantClient(":memory:"), CLUSTER))

    def test_the_options_reach_the_collection(self, store: VectorStore) -> None:
        params = store.client.get_collection(COLL).config.params
        assert params.vectors["dense"].on_disk is True  # local mode keeps what it can represent
        config = collection_config(CLUSTER, 384)
        assert (config["shard_number"], config["replication_factor"], config["write_consistency_factor"]) == (2, 2, 2)
        assert config["on_disk_payload"] is True and config["sparse_vectors_config"]["bm25"].index.on_disk is True
        dense, sentences = config["vectors_config"]["dense"], config["vectors_config"]["sentences"]
        assert dense.quantization_config.scalar.type == "int8" and dense.quantization_config.scalar.always_ram
        # Sentence vectors are only read by id: no int8 copy in RAM, no graph, float16 on disk.
        assert sentences.quantization_config is None and sentences.hnsw_config.m == 0 and sentences.on_disk
        assert sentences.multivector_config is not None and sentences.datatype == "float16"
        assert collection_config(ClusterOptions(), 384)["vectors_config"]["dense"].quantization_config is None

    def test_settings_name_the_options(self, tmp_path) -> None:
        from rag.settings import Settings

        s = Settings(data_dir=tmp_path, qdrant_url=":memory:", qdrant_shards=3, qdrant_replication_factor=2,
                     qdrant_write_consistency_factor=2, qdrant_on_disk=True, qdrant_quantization="int8",
                     qdrant_write_ordering="strong")
        assert ClusterOptions.from_settings(s) == ClusterOptions(3, 2, 2, True, False, "int8", "strong")
        from rag.errors import SettingsError

        with pytest.raises(SettingsError, match="RAG_QDRANT_WRITE_CONSISTENCY_FACTOR"):
            Settings(data_dir=tmp_path, qdrant_replication_factor=1, qdrant_write_consistency_factor=2)


# -- congruence ------------------------------------------------------------------------------------


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


def _old_edge_store(tmp_path: Path) -> VectorStore:
    from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeSparseVectorParams, EdgeVectorParams, Modifier

    shard = EdgeShard.create(str(tmp_path / "collections" / COLL), EdgeConfig(
        vectors={"dense": EdgeVectorParams(size=DIM, distance=Distance.Cosine)},
        sparse_vectors={"bm25": EdgeSparseVectorParams(modifier=Modifier.Idf)}))
    shard.close()
    return EdgeVectorStore(tmp_path)


def _old_server_store(tmp_path: Path) -> VectorStore:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection(COLL, vectors_config={"dense": models.VectorParams(size=DIM, distance=models.Distance.COSINE)},
                             sparse_vectors_config={"bm25": models.SparseVectorParams(modifier=models.Modifier.IDF)})
    return QdrantServerStore(client)


@pytest.mark.parametrize("make", [_old_edge_store, _old_server_store], ids=["edge", "server"])
def test_a_collection_made_before_sentence_vectors_stores_points_without_them(tmp_path: Path, make) -> None:
    store = make(tmp_path)
    try:
        store.ensure_collection(COLL, DIM)
        assert not store.has_sentence_vectors(COLL)
        points = make_points("t", "doc", "h1", unit_vectors(2, 60))
        for p in points:
            p.sentences = unit_vectors(2, 61).tolist()
        store.upsert(COLL, points)
        store.publish(COLL, "t", "doc", "h1")
        assert store.count(COLL, tenant="t", live=True) == 2
        assert store.sentence_vectors(COLL, [p.id for p in points], tenant="t") == {}
    finally:
        store.close()


def test_sentence_vectors_survive_an_edge_index_build(tmp_path: Path) -> None:
    """The background build loads a copy with the shard's own layout (multivector included) and swaps it in."""
    store = EdgeVectorStore(tmp_path, exact_search_max_points=100, auto_index_points=0)
    try:
        store.ensure_collection(COLL, DIM)
        points = make_points("t", "doc", "h1", unit_vectors(600, 70))
        for i, p in enumerate(points[:50]):
            p.sentences = unit_vectors(1 + i % 3, 71 + i).tolist()
        store.upsert(COLL, points)
        store.publish(COLL, "t", "doc", "h1")
        before = store.sentence_vectors(COLL, [p.id for p in points], tenant="t")
        assert len(before) == 50
        store.build_index(COLL)
        assert (tmp_path / "collections" / f".current-{COLL}").is_file()  # now served from the built copy
        assert store.has_sentence_vectors(COLL)
        after = store.sentence_vectors(COLL, [p.id for p in points], tenant="t")
        assert set(after) == set(before)
        assert all(np.array_equal(after[k][1], before[k][1]) for k in before)
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
