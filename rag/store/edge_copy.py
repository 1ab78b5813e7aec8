"""Bringing a shard's copy up to date block by block: the index build's pass under the write lock, in its own process.

:meth:`rag.store.edge.EdgeVectorStore.build_index` copies a live shard while writes go on, then, under the write
lock, makes the copy equal to the flushed shard again (:func:`resync_changed`). That pass is many short system
calls, and in the serving process each of them gives up the GIL: a search thread then takes it and keeps it for
a whole engine call (the bindings hold it), 15 ms at 200k points, 65 ms at 1M, so the pass, and the writers
waiting for the lock, took a search's time per call (0.6 s at 200k). Run here instead, the pass costs the
serving process one wait. This file imports only the standard library: it starts fast as a script.

``python -I edge_copy.py SRC DST SINCE_NS`` writes DST out to disk (fdatasync), prints "ready", waits for a line
on stdin ("go"), brings DST up to date with SRC
(files modified at or after SINCE_NS), prints one JSON line (files, compared, written bytes) and exits 0; exits 1
with the error on stderr. Any other line, or the end of stdin, makes it exit without touching DST.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

class Resync:
    """What :func:`resync_changed` read and wrote (bytes), and whether it ran in the serving process."""

    def __init__(self) -> None:
        self.compared = 0
        self.written = 0
        self.in_process = False
        self.seconds = 0.0  # the helper's own time for the pass


def resync_changed(src: Path, dst: Path, since_ns: int, stats: Resync) -> int:
    """Make ``dst`` (a copy of ``src`` taken while ``src`` was being written) equal to ``src`` again.

    Brings up to date every file of ``src`` modified (mtime or ctime) at or after ``since_ns``, or missing or of
    another size in ``dst``, writing only the blocks that differ (:func:`_sync_file`), and deletes what ``dst``
    holds that ``src`` no longer does. Sound because the shard was flushed after ``since_ns`` was taken and
    before the copy (which reads through the page cache, so it sees every write made before it): a write after
    that flush, through ``write`` or through a clean (write-protected) memory-mapped page, sets the file's
    mtime to its own time. Returns the number of files compared.
    """
    synced = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target = dst / rel
        target.mkdir(exist_ok=True)
        present = set(dirnames) | set(filenames)
        for stale in os.listdir(target):
            if stale not in present:
                doomed = target / stale
                if doomed.is_dir() and not doomed.is_symlink():
                    shutil.rmtree(doomed)
                else:
                    doomed.unlink()
        for name in filenames:
            source, copy = Path(dirpath) / name, target / name
            st = source.lstat()
            try:
                same_size = copy.lstat().st_size == st.st_size
            except FileNotFoundError:
                same_size = False
            if not same_size or max(st.st_mtime_ns, st.st_ctime_ns) >= since_ns:
                _sync_file(source, copy, stats)
                synced += 1
    return synced


# Blocks compared (and, when they differ, written) at a time by _sync_file.
SYNC_BLOCK = 1 << 20


def _sync_file(src: Path, dst: Path, stats: Resync) -> None:
    """Make ``dst`` hold the bytes of ``src``, writing only the blocks that differ (a new file is copied whole).

    Reads ``src``'s data extents (its holes read as zeros) and the same ranges of ``dst``: an append or an update
    in place costs a block or two, not the file (the engine preallocates its files, tens of MiB each).
    """
    if not dst.is_file() or dst.is_symlink():
        _copy_sparse(src, dst)
        stats.written += src.stat().st_size
        return
    want, have = bytearray(SYNC_BLOCK), bytearray(SYNC_BLOCK)  # reused: no allocation per block
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fi, fo = fin.fileno(), fout.fileno()
        size = os.fstat(fi).st_size
        if os.fstat(fo).st_size > size:
            os.ftruncate(fo, size)
        offset = 0
        for start, end in [*data_extents(fi, size), (size, size)]:
            stats.written += _zero_range(fo, offset, start, have)  # a hole of src: dst must read zeros there too
            pos = start
            while pos < end:
                n = os.preadv(fi, [memoryview(want)[:min(SYNC_BLOCK, end - pos)]], pos)
                if n <= 0:
                    break
                got = os.preadv(fo, [memoryview(have)[:n]], pos)
                stats.compared += n
                same = got == n and (want == have if n == SYNC_BLOCK else want[:n] == have[:n])
                if not same:
                    os.pwrite(fo, memoryview(want)[:n], pos)
                    stats.written += n
                pos += n
            offset = end
        os.ftruncate(fo, size)
    shutil.copystat(src, dst)


def data_extents(fd: int, size: int, offset: int = 0) -> list[tuple[int, int]]:
    """The (start, end) ranges of the file from ``offset`` to ``size`` that hold data (not holes), in order."""
    extents = []
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


_ZEROS = bytes(SYNC_BLOCK)


def _zero_range(fd: int, lo: int, hi: int, buf: bytearray) -> int:
    """Make ``[lo, hi)`` of the file read as zeros, writing only where it holds other bytes; returns bytes written."""
    written = 0
    for start, end in data_extents(fd, hi, lo):
        pos = max(start, lo)
        while pos < end:
            n = os.preadv(fd, [memoryview(buf)[:min(SYNC_BLOCK, end - pos)]], pos)
            if n <= 0:
                break
            if (buf != _ZEROS) if n == SYNC_BLOCK else (buf[:n] != _ZEROS[:n]):
                os.pwrite(fd, _ZEROS[:n], pos)
                written += n
            pos += n
    return written


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy one file, leaving its holes as holes (the engine preallocates sparse storage files)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end in data_extents(fin.fileno(), size):
            while start < end:
                sent = os.copy_file_range(fin.fileno(), fout.fileno(), end - start, start, start)
                if sent == 0:
                    break
                start += sent
        fout.truncate(size)
    shutil.copystat(src, dst)


def fdatasync_tree(path: Path) -> None:
    """Write every file under ``path`` out to disk."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)


def main(argv: list[str]) -> int:
    src, dst, since_ns = Path(argv[0]), Path(argv[1]), int(argv[2])
    # First write the copy out to disk, before the serving process takes the lock: its flush under the lock
    # would otherwise wait for the file system's journal, which waits for the bulk copy's data (ext4, ordered).
    try:
        fdatasync_tree(dst)
    except OSError as exc:
        print(f"cannot write {dst} out: {exc}", file=sys.stderr)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 0
    stats = Resync()
    started = time.perf_counter()
    try:
        files = resync_changed(src, dst, since_ns, stats)
    except OSError as exc:
        print(f"cannot bring {dst} up to date: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"files": files, "compared": stats.compared, "written": stats.written,
                      "seconds": time.perf_counter() - started}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
