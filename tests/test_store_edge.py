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

from rag.errors import StoreError, StoreLockedError
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


# -- the HNSW index built in a child process --------------------------------------------------------

BUILD_DIM = 384
BUILD_POINTS = 9_000  # above the engine's indexing threshold (~6.6k 384-d vectors), so HNSW is built


def _clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres: closer to real text embeddings than uniform noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, BUILD_DIM))
    v = (centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, BUILD_DIM))).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _points(vecs: np.ndarray, start: int, doc: str, tenant: str = "t") -> list:
    from rag.types import PointRecord

    return [PointRecord(id=f"00000000-0000-0000-0000-{start + i:012d}", vector=v.tolist(),
                        payload={"tenant": tenant, "document_id": doc, "content_hash": "h", "chunk_index": start + i,
                                 "live": True}) for i, v in enumerate(vecs)]


def _leftovers(root: Path) -> list[str]:
    """Build copies that no ``.current-`` file names."""
    cdir = root / "collections"
    current = {p.read_text().strip() for p in cdir.glob(".current-*")}
    return sorted(p.name for p in cdir.glob(".build-*") if p.name not in current)


@pytest.fixture(scope="module")
def built_vectors() -> np.ndarray:
    return _clustered(BUILD_POINTS + 2_000, 41)


def test_an_index_build_runs_beside_searches_and_writes_and_loses_none(tmp_path: Path, built_vectors) -> None:
    vecs = built_vectors
    store = EdgeVectorStore(tmp_path, exact_search_max_points=1_000, auto_index_points=0)
    try:
        store.ensure_collection("c", BUILD_DIM)
        store.upsert("c", _points(vecs[:BUILD_POINTS], 0, "bulk"))
        stop = threading.Event()
        errors: list[BaseException] = []
        written: list[int] = []

        def searcher() -> None:
            k = 0
            while not stop.is_set():
                try:
                    store.search("c", vecs[k % 500].tolist(), tenant="t", top_k=10)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                k += 1

        def writer() -> None:
            n = BUILD_POINTS
            while not stop.is_set() and n < len(vecs) - 10:
                store.upsert("c", _points(vecs[n:n + 10], n, f"late-{n}"))
                store.publish("c", "t", f"late-{n}", "h")
                written.append(n)
                n += 10
                stop.wait(0.02)

        threads = [threading.Thread(target=searcher), threading.Thread(target=writer)]
        for t in threads:
            t.start()
        try:
            report = store.build_index("c")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[0]
        assert written, "no write landed during the build"
        assert report["replayed_writes"] > 0 and report["build_s"] > 0
        # Every write made during the build is in the shard now serving, and searchable.
        total = BUILD_POINTS + 10 * len(written)
        assert store.count("c") == total
        for n in written[:: max(1, len(written) // 5)]:
            hit = store.search("c", vecs[n].tolist(), tenant="t", top_k=1)[0]
            assert hit.payload["chunk_index"] == n
        # The HNSW path (not exact) finds a bulk point's own vector first.
        hits = [store.search("c", vecs[k].tolist(), tenant="t", top_k=1)[0].payload["chunk_index"] for k in range(0, 9_000, 450)]
        assert hits == list(range(0, 9_000, 450))
        assert (tmp_path / "collections" / ".current-c").is_file()
        assert store.list_collections() == ["c"]
    finally:
        store.close()
    assert _leftovers(tmp_path) == []  # the replaced shard went on close
    again = EdgeVectorStore(tmp_path, auto_index_points=0)
    try:
        assert again.count("c") == total and again.list_collections() == ["c"]
        again.drop_collection("c")
        assert again.list_collections() == [] and not (tmp_path / "collections" / ".current-c").exists()
    finally:
        again.close()


def test_a_failed_index_build_leaves_the_live_shard_as_it_was(tmp_path: Path, built_vectors) -> None:
    store = EdgeVectorStore(tmp_path, auto_index_points=0)
    try:
        store.ensure_collection("c", BUILD_DIM)
        store.upsert("c", _points(built_vectors[:BUILD_POINTS], 0, "bulk"))
        with pytest.raises(StoreError, match="took over"):
            store.build_index("c", timeout_s=0.05)
        assert _leftovers(tmp_path) == [] and not (tmp_path / "collections" / ".current-c").exists()
        assert store.count("c") == BUILD_POINTS
        store.upsert("c", _points(built_vectors[BUILD_POINTS:BUILD_POINTS + 5], BUILD_POINTS, "after"))
        assert store.count("c") == BUILD_POINTS + 5
    finally:
        store.close()


def test_what_a_crash_leaves_of_an_index_build_is_cleared_on_open(tmp_path: Path, built_vectors) -> None:
    import shutil

    store = EdgeVectorStore(tmp_path, auto_index_points=0)
    store.ensure_collection("c", BUILD_DIM)
    store.upsert("c", _points(built_vectors[:100], 0, "d"))
    store.close()
    cdir = tmp_path / "collections"
    # A crash during the build: a copy that no .current- file names; it must not be taken for data.
    shutil.copytree(cdir / "c", cdir / ".build-c-deadbeef")
    store = EdgeVectorStore(tmp_path, auto_index_points=0)
    try:
        assert _leftovers(tmp_path) == [] and store.list_collections() == ["c"] and store.count("c") == 100
    finally:
        store.close()
    # A crash just after the switch: the new copy is current, the replaced shard still on disk.
    shutil.copytree(cdir / "c", cdir / ".build-c-feedf00d")
    (cdir / ".current-c").write_text(".build-c-feedf00d\n")
    store = EdgeVectorStore(tmp_path, auto_index_points=0)
    try:
        assert not (cdir / "c").exists() and store.list_collections() == ["c"] and store.count("c") == 100
        store.upsert("c", _points(built_vectors[100:110], 100, "e"))
        assert store.count("c") == 110
    finally:
        store.close()


def test_writes_past_the_threshold_start_an_index_build_in_the_background(tmp_path: Path, built_vectors) -> None:
    store = EdgeVectorStore(tmp_path, auto_index_points=BUILD_POINTS)
    try:
        store.ensure_collection("c", BUILD_DIM)
        store.upsert("c", _points(built_vectors[:BUILD_POINTS], 0, "bulk"))
        store.publish("c", "t", "bulk", "h")  # a publish ends with a flush: the moment the store checks
        thread = store._index_threads.get("c")
        assert thread is not None
        with pytest.raises(StoreError, match="already running"):
            # Give the background build time to take the collection, then a second build is refused.
            for _ in range(100):
                if "c" in store._building:
                    store.build_index("c")
                threading.Event().wait(0.05)
        thread.join(300)
        assert (tmp_path / "collections" / ".current-c").is_file()
        assert store.count("c", live=True) == BUILD_POINTS
    finally:
        store.close()


@pytest.mark.parametrize("helper", ["works", "fails"])
def test_writes_go_on_while_an_index_build_copies_the_shard_and_none_is_lost(tmp_path: Path, built_vectors, helper,
                                                                           monkeypatch) -> None:
    vecs = built_vectors
    if helper == "fails":  # the helper process dies at once: the pass under the lock is done in this process
        import rag.store.edge as edge_module

        monkeypatch.setattr(edge_module, "_start_resync_helper", lambda *_: subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.exit(3)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    store = EdgeVectorStore(tmp_path, exact_search_max_points=1_000, auto_index_points=0)
    try:
        store.ensure_collection("c", BUILD_DIM)
        store.upsert("c", _points(vecs[:BUILD_POINTS], 0, "bulk"))
        store.upsert("c", _points(vecs[BUILD_POINTS:BUILD_POINTS + 50], BUILD_POINTS, "doomed"))
        store.publish("c", "t", "doomed", "h")
        done: list[str] = []

        def write_while_copying() -> None:
            # Runs in another thread while build_index waits in its hook after the bulk copy: it completes only
            # if the build holds no lock the writes need.
            store.upsert("c", _points(vecs[BUILD_POINTS + 100:BUILD_POINTS + 140], BUILD_POINTS + 100, "new"))
            store.publish("c", "t", "new", "h")
            assert store.delete_document("c", "t", "doomed") == 50
            done.append("written")

        def on_copied() -> None:
            writer = threading.Thread(target=write_while_copying)
            writer.start()
            writer.join(120)  # a guard against a deadlock, not a timing: the writer never waits for the build
            assert not writer.is_alive(), "writes waited for the copy of the shard"

        report = store.build_index("c", on_copied=on_copied)
        assert done == ["written"]
        # Nothing was written after the copy was made consistent, so the journal is empty: what the writer did
        # reached the built shard only through the files copied again under the lock.
        assert report["replayed_writes"] == 0 and report["recopied_files"] > 0
        assert report["resync_in_process"] == (helper == "fails")  # else the helper did the pass under the lock
        assert (tmp_path / "collections" / ".current-c").is_file()
        assert store.count("c") == BUILD_POINTS + 40
        assert store.count("c", document_id="new", live=True) == 40
        assert store.count("c", document_id="doomed") == 0
        hit = store.search("c", vecs[BUILD_POINTS + 120].tolist(), tenant="t", top_k=1)[0]
        assert hit.payload["chunk_index"] == BUILD_POINTS + 120
    finally:
        store.close()
    again = EdgeVectorStore(tmp_path, auto_index_points=0)
    try:
        assert again.count("c") == BUILD_POINTS + 40 and again.count("c", document_id="doomed") == 0
    finally:
        again.close()


def test_per_tenant_graphs_without_a_global_one_serve_each_tenants_search(tmp_path: Path) -> None:
    # 1536-d, so that 2,500 points a tenant pass the engine's filtered full-scan threshold (10 MB of vectors):
    # a tenant's search then goes through the graph, which with m=0 holds only the per-tenant links.
    dim, per_tenant = 1536, 2_500
    rng = np.random.default_rng(44)
    centres = rng.standard_normal((30, dim))
    vecs = (centres[rng.integers(0, 30, 2 * per_tenant)] + 0.6 * rng.standard_normal((2 * per_tenant, dim)))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    from rag.types import PointRecord

    def points(tenant: str, offset: int) -> list:
        return [PointRecord(id=f"00000000-0000-0000-0000-{offset + i:012d}", vector=vecs[offset + i].tolist(),
                            payload={"tenant": tenant, "document_id": f"d{(offset + i) // 10}", "content_hash": "h",
                                     "chunk_index": offset + i, "live": True}) for i in range(per_tenant)]

    store = EdgeVectorStore(tmp_path, exact_search_max_points=0, auto_index_points=0, hnsw_m=0, hnsw_payload_m=16,
                            hnsw_ef_construct=64)
    try:
        store.ensure_collection("c", dim)
        store.upsert("c", points("a", 0))
        store.upsert("c", points("b", per_tenant))
        store.build_index("c")
        shard_dir = tmp_path / "collections" / (tmp_path / "collections" / ".current-c").read_text().strip()
        import json

        saved = json.loads((shard_dir / "edge_config.json").read_text())["hnsw_config"]
        assert saved["m"] == 0 and saved["payload_m"] == 16 and saved["ef_construct"] == 64
        schema = store._shard("c").info().payload_schema
        assert schema["live"].params.enable_hnsw is False and schema["content_hash"].params.enable_hnsw is False
        for tenant, offset in (("a", 0), ("b", per_tenant)):
            for k in range(offset, offset + per_tenant, 250):
                hits = store.search("c", vecs[k].tolist(), tenant=tenant, top_k=5)
                assert len(hits) == 5 and {h.payload["tenant"] for h in hits} == {tenant}
                assert hits[0].payload["chunk_index"] == k
    finally:
        store.close()


def test_the_locked_resync_makes_a_stale_copy_equal_writing_only_the_blocks_that_differ(tmp_path: Path) -> None:
    import os

    from rag.store.edge import _copy_tree
    from rag.store.edge_copy import SYNC_BLOCK as _SYNC_BLOCK
    from rag.store.edge_copy import Resync, resync_changed

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "seg").mkdir(parents=True)
    rng = np.random.default_rng(7)
    (src / "seg" / "unchanged.dat").write_bytes(b"u" * 64)
    big = src / "seg" / "chunk.mmap"  # preallocated and sparse, as the engine's storage files are
    with open(big, "wb") as fh:
        fh.truncate(32 * _SYNC_BLOCK)
        fh.write(rng.bytes(8 * _SYNC_BLOCK))
        fh.seek(20 * _SYNC_BLOCK)
        fh.write(rng.bytes(_SYNC_BLOCK))
    (src / "seg" / "gone.dat").write_bytes(b"x" * 100)
    (src / "wal").write_bytes(rng.bytes(3000))
    assert _copy_tree(src, dst) is None
    since_ns = os.stat(big).st_mtime_ns + 1
    (dst / "seg" / "unchanged.dat").write_bytes(b"v" * 64)  # a file older than the mark is not even read
    # What writes do after the copy: an append into the preallocated space, an update in place, a region punched
    # back to zeros, a file shrunk, a new file and a deleted one.
    with open(big, "r+b") as fh:
        fh.seek(8 * _SYNC_BLOCK)
        fh.write(b"appended")
        fh.seek(3 * _SYNC_BLOCK + 17)
        fh.write(b"updated in place")
        fh.seek(20 * _SYNC_BLOCK)
        fh.write(bytes(_SYNC_BLOCK))
    with open(src / "wal", "r+b") as fh:
        fh.truncate(1000)
    (src / "seg" / "new.dat").write_bytes(b"new")
    (src / "seg" / "gone.dat").unlink()
    for path in (big, src / "wal"):
        os.utime(path, ns=(since_ns + 10**9, since_ns + 10**9))

    stats = Resync()
    assert resync_changed(src, dst, since_ns, stats) == 3  # chunk.mmap, wal and new.dat; nothing else compared
    for path in (big, src / "wal", src / "seg" / "new.dat"):
        rel = path.relative_to(src)
        assert (dst / rel).read_bytes() == path.read_bytes(), rel
    assert not (dst / "seg" / "gone.dat").exists()
    assert (dst / "seg" / "unchanged.dat").read_bytes() == b"v" * 64
    # Only the changed blocks were written: the append, the update and the zeroed region; the holes were skipped.
    assert stats.written <= 3 * _SYNC_BLOCK + 3
    assert stats.compared <= 10 * _SYNC_BLOCK
    assert os.stat(dst / "seg" / "chunk.mmap").st_blocks * 512 < 16 * _SYNC_BLOCK  # still sparse


def test_when_the_pass_outside_the_lock_fails_the_locked_pass_covers_the_writes_it_missed(
        tmp_path: Path, built_vectors, monkeypatch) -> None:
    import rag.store.edge as edge_module

    vecs = built_vectors
    real_copy = edge_module._copy_tree
    store = EdgeVectorStore(tmp_path, exact_search_max_points=1_000, auto_index_points=0)

    def copy_then_write(src: Path, dst: Path) -> str | None:
        # Writes after the bulk copy, before the pass outside the lock: only a pass that starts from the first
        # mark brings them into the copy (the journal starts later, under the lock).
        error = real_copy(src, dst)
        store.upsert("c", _points(vecs[BUILD_POINTS:BUILD_POINTS + 30], BUILD_POINTS, "late"))
        store.publish("c", "t", "late", "h")
        return error

    def vanished(*_: object) -> int:
        raise FileNotFoundError("a segment file vanished mid-pass")

    try:
        store.ensure_collection("c", BUILD_DIM)
        store.upsert("c", _points(vecs[:BUILD_POINTS], 0, "bulk"))
        monkeypatch.setattr(edge_module, "_copy_tree", copy_then_write)
        monkeypatch.setattr(edge_module, "resync_changed", vanished)  # the in-process pass; the helper's is real
        report = store.build_index("c")
        assert report["replayed_writes"] == 0 and report["resync_in_process"] == 0
        assert store.count("c") == BUILD_POINTS + 30
        assert store.count("c", document_id="late", live=True) == 30
    finally:
        store.close()
