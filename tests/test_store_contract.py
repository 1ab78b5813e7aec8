"""One contract for every VectorStore: the embedded engine (qdrant-edge) and qdrant-client (:memory:)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.errors import BadRequest, NotFound, StoreError, StoreLockedError
from rag.store import (
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
from rag.types import PointRecord

DIM = 16
COLL = "chunks-test"
REPO = Path(__file__).resolve().parents[1]

# qdrant-client's :memory: mode warns that it ignores payload indexes; the server uses them.
pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def unit_vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_points(
    tenant: str,
    document_id: str,
    content_hash: str,
    vectors: np.ndarray,
    *,
    title: str = "A title",
    source: str = "a.txt",
    metadata: dict[str, Any] | None = None,
) -> list[PointRecord]:
    return [
        PointRecord(
            id=point_id(tenant, document_id, content_hash, i),
            vector=vec.tolist(),
            payload={
                "tenant": tenant, "document_id": document_id, "content_hash": content_hash, "live": False,
                "chunk_index": i, "text": f"chunk {i} of {document_id}", "title": title, "source": source,
                "start": i * 100, "end": i * 100 + 99, "heading_path": ["Intro", f"Part {i}"],
                "metadata": dict(metadata or {}), "encoder_version": "test-v1",
            },
        )
        for i, vec in enumerate(vectors)
    ]


def index(store: VectorStore, tenant: str, document_id: str, content_hash: str, vectors: np.ndarray,
          **kw: Any) -> list[PointRecord]:
    points = make_points(tenant, document_id, content_hash, vectors, **kw)
    store.upsert(COLL, points)
    store.publish(COLL, tenant, document_id, content_hash)
    return points


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorStore]:
    if request.param == "edge":
        s: VectorStore = EdgeVectorStore(tmp_path / "qdrant")
    else:
        from qdrant_client import QdrantClient

        s = QdrantServerStore(QdrantClient(":memory:"))
    s.ensure_collection(COLL, DIM)
    try:
        yield s
    finally:
        s.close()


class TestVectorStoreContract:
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


# -- embedded only -----------------------------------------------------------------------------


def test_edge_reopen_keeps_data_and_pointer(tmp_path: Path) -> None:
    vecs = unit_vectors(6, 30)
    store = EdgeVectorStore(tmp_path)
    store.ensure_collection(COLL, DIM)
    index(store, "t", "d", "h1", vecs[:3])
    store.upsert(COLL, make_points("t", "d", "h2", vecs[3:]))
    store.publish(COLL, "t", "d", "h2")
    store.set_active(COLL)
    store.close()

    store = EdgeVectorStore(tmp_path)
    try:
        assert store.list_collections() == [COLL]
        assert store.get_active() == COLL
        assert store.count(COLL) == 3
        hits = store.search(COLL, vecs[4].tolist(), tenant="t", top_k=3)
        assert [h.payload["chunk_index"] for h in hits][0] == 1
        assert {h.payload["content_hash"] for h in hits} == {"h2"}
        store.ensure_collection(COLL, DIM)  # idempotent on a reopened shard too
        assert store.count(COLL, live=True) == 3
    finally:
        store.close()


def test_edge_same_process_second_open_is_locked(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path)
    try:
        with pytest.raises(StoreLockedError, match=str(tmp_path / ".lock")):
            EdgeVectorStore(tmp_path)
    finally:
        store.close()
    EdgeVectorStore(tmp_path).close()  # released on close


def test_edge_second_process_fails_fast_and_holder_keeps_working(tmp_path: Path) -> None:
    import os

    vecs = unit_vectors(4, 31)
    store = EdgeVectorStore(tmp_path)
    try:
        store.ensure_collection(COLL, DIM)
        index(store, "t", "d", "h1", vecs[:2])
        code = textwrap.dedent(f"""
            import sys
            from rag.errors import StoreLockedError
            from rag.store import EdgeVectorStore
            try:
                EdgeVectorStore({str(tmp_path)!r})
            except StoreLockedError as exc:
                print(exc, file=sys.stderr)
                sys.exit(3)
            sys.exit(0)
        """)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 3, proc.stderr
        assert str(tmp_path / ".lock") in proc.stderr
        assert f"process {os.getpid()}" in proc.stderr
        assert "HTTP API" in proc.stderr

        # The holder is unharmed: upsert, publish (which flushes) and search all still work.
        store.upsert(COLL, make_points("t", "d", "h2", vecs[2:]))
        store.publish(COLL, "t", "d", "h2")
        hits = store.search(COLL, vecs[3].tolist(), tenant="t", top_k=5)
        assert [h.payload["chunk_index"] for h in hits] == [1, 0]
        assert {h.payload["content_hash"] for h in hits} == {"h2"}
        assert store.delete_document(COLL, "t", "d") == 2
    finally:
        store.close()


def test_edge_publish_is_durable_without_close(tmp_path: Path) -> None:
    """A process that dies right after publish/delete returned (no close) loses nothing."""
    code = textwrap.dedent(f"""
        import os
        import numpy as np
        from rag.store import EdgeVectorStore, point_id
        from rag.types import PointRecord
        store = EdgeVectorStore({str(tmp_path)!r})
        store.ensure_collection("c", 8)
        vecs = np.eye(8, dtype=np.float32)
        def pts(doc, gen, rows):
            return [PointRecord(id=point_id("t", doc, gen, i), vector=vecs[r].tolist(),
                                payload={{"tenant": "t", "document_id": doc, "content_hash": gen, "live": False,
                                          "chunk_index": i}}) for i, r in enumerate(rows)]
        store.upsert("c", pts("a", "g1", [0, 1, 2]))
        store.publish("c", "t", "a", "g1")
        store.upsert("c", pts("a", "g2", [3, 4]))
        store.publish("c", "t", "a", "g2")
        store.upsert("c", pts("b", "g1", [5, 6]))
        store.publish("c", "t", "b", "g1")
        store.delete_document("c", "t", "b")
        store.set_active("c")
        os._exit(0)  # no close, no flush at exit: as if the process was killed
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    store = EdgeVectorStore(tmp_path)
    try:
        assert store.get_active() == "c"
        assert store.count("c") == 2
        assert store.count("c", document_id="a", live=True) == 2
        hits = store.search("c", np.eye(8)[4].tolist(), tenant="t", top_k=5)
        assert [(h.payload["content_hash"], h.payload["chunk_index"]) for h in hits][0] == ("g2", 1)
    finally:
        store.close()


def test_edge_concurrent_search_during_writes(tmp_path: Path) -> None:
    """The API searches from threads while the worker writes: no errors, no half-published document."""
    store = EdgeVectorStore(tmp_path)
    try:
        store.ensure_collection(COLL, DIM)
        vecs = unit_vectors(40, 32)
        index(store, "t", "doc", "g0", vecs[:20])
        errors: list[BaseException] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                try:
                    hits = store.search(COLL, vecs[0].tolist(), tenant="t", top_k=50, filter={"document_id": "doc"})
                    # Publish sets the new generation live before deleting the old: never empty.
                    assert hits, "document vanished during publish"
                except BaseException as exc:  # surfaced in the main thread below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=searcher) for _ in range(2)]
        for t in threads:
            t.start()
        for gen in range(1, 15):
            rows = vecs[(gen % 2) * 20:(gen % 2) * 20 + 20]
            store.upsert(COLL, make_points("t", "doc", f"g{gen}", rows))
            store.publish(COLL, "t", "doc", f"g{gen}")
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert store.count(COLL, document_id="doc") == 20
        assert store.count(COLL, document_id="doc", live=True) == 20
    finally:
        store.close()


def test_edge_optimize_builds_hnsw_and_search_stays_right(tmp_path: Path) -> None:
    # A tiny exact-search threshold forces the HNSW path after optimize().
    store = EdgeVectorStore(tmp_path, exact_search_max_points=0)
    try:
        store.ensure_collection(COLL, DIM)
        vecs = unit_vectors(300, 33)
        index(store, "t", "d", "h", vecs)
        store.optimize(COLL)
        for k in (0, 150, 299):
            assert store.search(COLL, vecs[k].tolist(), tenant="t", top_k=1)[0].payload["chunk_index"] == k
    finally:
        store.close()
