"""The embedded store alone: reopening, the process lock, durability without close, threads, HNSW.

The VectorStore contract it shares with the server store runs in tests/test_store_contract.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from rag.errors import StoreLockedError
from rag.store import EdgeVectorStore
from tests.store_contract.helpers import COLL, DIM, index, make_points, unit_vectors

REPO = Path(__file__).resolve().parents[1]


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
