"""``python -m eval bench scale``: the embedded store at a large number of chunks.

Vectors: ``--real`` texts of a BEIR corpus are embedded with the configured encoder (real MiniLM
vectors of real text); the ``--chunks`` points are drawn around them (a random real vector plus
isotropic Gaussian noise of ``--noise`` per dimension, re-normalised: cosine ~0.9 to its source), so
that the collection has the neighbourhood structure of real chunk vectors at a size this machine
cannot embed in a bench run. Queries are the corpus's real query texts, embedded as queries.

Steps, all through :class:`rag.store.EdgeVectorStore` (the code the service runs):

1. Upsert every point (``--tenants`` tenants, payload as the worker writes it): upsert throughput.
2. Filtered top-10 search before the index exists (the engine scans exactly).
3. Traffic without a build for ``--idle-s`` (one thread searching without pause, another upserting 10
   points every 50 ms): the baseline of this machine, in the same run.
4. :meth:`~rag.store.EdgeVectorStore.build_index` (child process, copy, journal, switch) under the same
   traffic: time to index and, per step of the build, p50/p95 and the longest call (the stalls).
5. Filtered top-10 search with the index, per ``--ef``: p50/p95 and recall@10 against an exact scan
   of the same collection (taken after the build, since the traffic added points).
6. Process RSS (current, peak) and the store's disk use.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from eval.datasets import iter_corpus, load_queries
from rag.errors import StoreError
from rag.store import EdgeVectorStore
from rag.types import PointRecord

COLLECTION = "scale"


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def _rss_mib() -> tuple[float, float]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def _pressure() -> tuple[int, ...]:
    """The kernel's stall counters (PSI, microseconds since boot): some task waiting for memory, for I/O, and
    every task waiting for I/O; zeros where /proc/pressure is missing."""
    out = []
    for name, kind in (("memory", "some"), ("io", "some"), ("io", "full")):
        try:
            line = next(ln for ln in Path(f"/proc/pressure/{name}").read_text().splitlines() if ln.startswith(kind))
            out.append(int(line.rsplit("total=", 1)[1]))
        except (OSError, StopIteration, ValueError, IndexError):
            out.append(0)
    return tuple(out)


def _thread_cpu_ms(tids: dict[str, int | None]) -> dict[str, float]:
    """CPU ms (user + system) of each named thread of this process so far, and of the whole process."""
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    out = {}
    for name, tid in {**tids, "process": None}.items():
        path = "/proc/self/stat" if tid is None else f"/proc/self/task/{tid}/stat"
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) * tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def _disk_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1024 if out else float("nan")


def _real_vectors(settings, dataset: Path, n_real: int, n_queries: int) -> tuple[np.ndarray, np.ndarray, str]:
    from rag.embedding import load_embedder

    encoder = load_embedder(settings)
    texts = []
    for doc in iter_corpus(dataset / "corpus.jsonl"):
        texts.append(f"{doc.title}\n{doc.text}" if doc.title else doc.text)
        if len(texts) >= n_real:
            break
    queries = list(load_queries(dataset / "queries.jsonl").values())[:n_queries]
    docs = np.asarray(encoder.embed_documents(texts), dtype=np.float32)
    qs = np.asarray(encoder.embed_queries(queries), dtype=np.float32)
    return docs, qs, encoder.version


def _points(real: np.ndarray, start: int, count: int, rng: np.random.Generator, noise: float,
            tenants: int) -> list[PointRecord]:
    src = real[rng.integers(0, len(real), count)]
    v = src + noise * rng.standard_normal(src.shape).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    out = []
    for i in range(count):
        n = start + i
        out.append(PointRecord(id=str(uuid.UUID(int=n + 1)), vector=v[i].tolist(), payload={
            "tenant": f"t{n % tenants}", "document_id": f"d{n // 8}", "content_hash": "h", "chunk_index": n % 8,
            "live": True}))
    return out


def _searches(store: EdgeVectorStore, queries: np.ndarray, tenants: int, top_k: int = 10) -> tuple[list[float], list[list[str]]]:
    times, ids = [], []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        hits = store.search(COLLECTION, q.tolist(), tenant=f"t{i % tenants}", top_k=top_k)
        times.append(1000 * (time.perf_counter() - t0))
        ids.append([h.id for h in hits])
    return times, ids


def _calls(rows: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(kind, row) for kind, row in rows.items() if kind in ("search", "upsert")]


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 3), "p95_ms": round(_pct(ms, 95), 3),
            "max_ms": round(max(ms), 3), "n": len(ms)}


def _unfiltered(store: EdgeVectorStore, queries: np.ndarray, efs: list[int]) -> list[dict[str, Any]]:
    """Top-10 over all tenants, straight on the engine (the store's search always filters to one tenant;
    an operator tool would not): with the index at each ef, and exact, with recall against exact."""
    from qdrant_edge import Query, QueryRequest, SearchParams

    from rag.store.protocol import VECTOR_NAME

    handle = store._shard(COLLECTION)

    def run(params) -> tuple[list[float], list[set[Any]]]:
        times, ids = [], []
        for q in queries:
            t0 = time.perf_counter()
            hits = handle.query(QueryRequest(limit=10, query=Query.Nearest(q.tolist(), using=VECTOR_NAME),
                                             params=params))
            times.append(1000 * (time.perf_counter() - t0))
            ids.append({h.id for h in hits})
        return times, ids

    exact_ms, exact_ids = run(SearchParams(exact=True))
    rows = [{"ef": "exact", **_summary(exact_ms), "recall_at_10": 1.0}]
    for ef in efs:
        ms, ids = run(SearchParams(hnsw_ef=ef))
        recall = float(np.mean([len(a & e) / max(1, len(e)) for a, e in zip(ids, exact_ids)]))
        rows.append({"ef": ef, **_summary(ms), "recall_at_10": round(recall, 4),
                     "mean_hits": round(float(np.mean([len(a) for a in ids])), 2)})
    for row in rows:
        print(f"unfiltered (engine, all tenants), ef {row['ef']}: p50 {row['p50_ms']:.2f} ms, "
              f"recall@10 {row['recall_at_10']:.4f}")
    return rows


def bench_scale(settings, args) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    cache = args.vectors_cache
    if cache is not None and cache.exists():
        with np.load(cache) as saved:
            real, queries, version = saved["real"], saved["queries"], str(saved["version"])
        if len(real) != args.real or len(queries) != args.queries:
            raise SystemExit(f"{cache} holds {len(real)} texts and {len(queries)} queries, not {args.real} and "
                             f"{args.queries}; delete it or name another file")
    else:
        real, queries, version = _real_vectors(settings, args.dataset, args.real, args.queries)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, real=real, queries=queries, version=np.str_(version))
    embed_s = time.perf_counter() - t0
    print(f"embedded {len(real)} real texts and {len(queries)} queries with {version} in {embed_s:.0f} s")
    data_dir = args.data_dir
    if data_dir.exists():
        subprocess.run(["rm", "-rf", str(data_dir)], check=True)
    store = EdgeVectorStore(data_dir, exact_search_max_points=0, hnsw_ef=128, auto_index_points=0,
                            hnsw_m=args.hnsw_m, hnsw_payload_m=args.payload_m, hnsw_ef_construct=args.ef_construct)
    print(f"HNSW layout: m {args.hnsw_m}, payload_m {args.payload_m if args.payload_m is not None else 'unset (= m)'}, "
          f"ef_construct {args.ef_construct}")
    try:
        store.ensure_collection(COLLECTION, real.shape[1])
        t0 = time.perf_counter()
        batch = 2_000
        for start in range(0, args.chunks, batch):
            store.upsert(COLLECTION, _points(real, start, min(batch, args.chunks - start), rng, args.noise, args.tenants))
        store._shard(COLLECTION).flush()
        upsert_s = time.perf_counter() - t0
        print(f"upserted {args.chunks} points in {upsert_s:.0f} s ({args.chunks / upsert_s:.0f} points/s)")

        exact_ms, exact_ids = _searches(store, queries, args.tenants)
        print(f"before the index (exact scan): p50 {statistics.median(exact_ms):.2f} ms, p95 {_pct(exact_ms, 95):.2f} ms")

        def traffic(work) -> tuple[dict[str, list[tuple[float, float]]], list[str], float, float, Any]:
            """Run ``work()`` while one thread searches without pause and another upserts 10 points every
            50 ms; returns every call's (start, ms), the errors, the window, and work's result."""
            events: dict[str, list[tuple[float, float, dict[str, float]]]] = {"search": [], "upsert": []}
            stop = threading.Event()
            errors: list[str] = []

            def usage() -> Any:  # this thread's CPU time, context switches and page faults, and the machine's PSI
                return resource.getrusage(resource.RUSAGE_THREAD), _pressure()

            def spent(before: Any, after: Any) -> dict[str, float]:
                # What one call did besides wait: its own CPU time; voluntary switches (it slept: the GIL,
                # a lock, I/O); involuntary ones (the scheduler took the core away); page faults (major: disk
                # reads); and how long some task of the machine waited for memory or I/O meanwhile (PSI).
                (a, pa), (b, pb) = before, after
                return {"cpu_ms": round(1000 * (b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime), 1),
                        "voluntary_switches": b.ru_nvcsw - a.ru_nvcsw, "involuntary_switches": b.ru_nivcsw - a.ru_nivcsw,
                        "major_faults": b.ru_majflt - a.ru_majflt, "minor_faults": b.ru_minflt - a.ru_minflt,
                        "memory_stall_ms": round((pb[0] - pa[0]) / 1000, 1), "io_stall_ms": round((pb[1] - pa[1]) / 1000, 1),
                        "io_full_stall_ms": round((pb[2] - pa[2]) / 1000, 1)}

            def searcher() -> None:
                i = 0
                while not stop.is_set():
                    s, u = time.perf_counter(), usage()
                    try:
                        store.search(COLLECTION, queries[i % len(queries)].tolist(), tenant=f"t{i % args.tenants}",
                                     top_k=10)
                    except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
                        errors.append(f"search: {exc}")
                    events["search"].append((s, 1000 * (time.perf_counter() - s), spent(u, usage())))
                    i += 1

            def writer() -> None:
                nonlocal written
                while not stop.is_set():
                    points = _points(real, written, 10, wrng, args.noise, args.tenants)
                    s, u = time.perf_counter(), usage()
                    try:
                        store.upsert(COLLECTION, points)
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"upsert: {exc}")
                    events["upsert"].append((s, 1000 * (time.perf_counter() - s), spent(u, usage())))
                    written += 10
                    stop.wait(0.05)

            def watchdog() -> None:
                # Sleeps 5 ms at a time: waking needs the GIL, so a late wake-up is a time when another thread
                # held it (or the process had no core): the GIL gaps the stalls are compared against. Each gap
                # keeps the CPU time every thread used in it: the one that ran held the GIL.
                tids = {"main": main_tid, **{t.name: t.native_id for t in threads[:2]}}
                last = _thread_cpu_ms(tids)
                while not stop.is_set():
                    s = time.perf_counter()
                    time.sleep(0.005)
                    late = time.perf_counter() - s - 0.005
                    now = _thread_cpu_ms(tids)
                    if late > 0.02:
                        gil_gaps.append((s + 0.005, 1000 * late))
                        gap_cpu[s + 0.005] = {k: round(now[k] - last.get(k, now[k])) for k in now}
                    last = now

            main_tid = threading.get_native_id()
            threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (searcher, writer, watchdog)]
            begin = time.perf_counter()
            for t in threads:
                t.start()
            try:
                result = work()
            finally:
                end = time.perf_counter()
                stop.set()
                for t in threads:
                    t.join()
            return events, errors, begin, end, result

        def overlap_ms(spans: list[tuple[float, float]], s: float, ms: float) -> float:
            return round(sum(min(g + d / 1000, s + ms / 1000) - max(g, s) for g, d in spans
                             if g < s + ms / 1000 and g + d / 1000 > s) * 1000, 1)

        def window(events, lo: float, hi: float) -> dict[str, dict[str, float]]:
            out = {}
            for kind, ev in events.items():
                # A call counts in the step it ended in: one that waited for a step (the lock, the GIL) ends with it.
                calls = [e for e in ev if lo <= e[0] + e[1] / 1000 < hi]
                out[kind] = _summary([e[1] for e in calls] or [float("nan")])
                if calls:  # what the longest call did and overlapped: GIL gaps (watchdog), Python's GC pauses
                    s, ms, did = max(calls, key=lambda e: e[1])
                    out[kind]["longest_major_faults"] = did["major_faults"]
                    out[kind]["longest"] = {**did, "gil_gap_ms": overlap_ms(gil_gaps, s, ms),
                                            "gc_ms": overlap_ms(gc_pauses, s, ms)}
                    out[kind]["longest_gc_ms"] = out[kind]["longest"]["gc_ms"]
            gaps = [(d, g) for g, d in gil_gaps if lo <= g + d / 1000 < hi]
            out["gil_gaps"] = {"count_over_20ms": len(gaps), "longest_ms": round(max(gaps, default=(0.0, 0))[0], 1)}
            if gaps:  # when the longest began (seconds into the window) and which thread ran in it (CPU ms)
                d, g = max(gaps)
                out["gil_gaps"]["longest_at_s"] = round(g - lo, 2)
                out["gil_gaps"]["longest_cpu_ms"] = gap_cpu.get(g, {})
            return out

        gil_gaps: list[tuple[float, float]] = []  # (start, ms) the watchdog thread woke late
        gap_cpu: dict[float, dict[str, int]] = {}  # start of a gap -> CPU ms of each thread (and the process) in it
        gc_pauses: list[tuple[float, float]] = []  # (start, ms) of every collection of the bench process
        gc_started = [0.0]

        def on_gc(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_started[0] = time.perf_counter()
            else:
                gc_pauses.append((gc_started[0], 1000 * (time.perf_counter() - gc_started[0])))

        gc.callbacks.append(on_gc)

        written = args.chunks
        wrng = np.random.default_rng(args.seed + 1)
        # Baseline: the same traffic with no build, in this run (this machine's own noise).
        idle_events, idle_errors, lo, hi, _ = traffic(lambda: time.sleep(args.idle_s))
        idle = window(idle_events, lo, hi)
        for kind, row in _calls(idle):
            print(f"no build ({args.idle_s:.0f} s), {kind}: {row['n']} calls, p50 {row['p50_ms']:.2f} ms, "
                  f"p95 {row['p95_ms']:.2f} ms, longest {row['max_ms']:.1f} ms")
        def build() -> dict[str, float]:
            try:
                return store.build_index(COLLECTION, timeout_s=args.timeout)
            except StoreError as exc:  # e.g. past --timeout: report what was measured up to there
                print(f"the index build failed: {exc}")
                return {}

        events, errors, lo, hi, steps = traffic(build)
        if not steps:
            return {"bench": "scale", "chunks": args.chunks, "error": "index build failed or timed out",
                    "timeout_s": args.timeout, "upsert": {"seconds": round(upsert_s, 1),
                                                          "points_per_s": round(args.chunks / upsert_s)},
                    "exact_search": _summary(exact_ms), "traffic_without_build": idle,
                    "during_failed_build": window(events, lo, hi), "cpus": os.cpu_count()}
        errors += idle_errors
        index_s = hi - lo
        print(f"index built in {index_s:.0f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
        # The build's steps, in order, from the moment it began (the traffic threads start just before).
        # catch_up_s begins with reading the built files and EdgeShard.load (the GIL held): a step of its own here.
        loading = steps.get("prefetch_s", 0.0) + steps.get("load_s", 0.0)
        spans = {"copy": steps["copy_s"], "build": steps["build_s"], "load": loading,
                 "catch_up": steps["catch_up_s"] - loading, "swap": steps["swap_s"]}
        bounds, t = {}, hi - sum(spans.values())
        for k, span in spans.items():
            bounds[k] = (t, t + span)
            t += span
        during = {"whole": window(events, lo, hi), **{k: window(events, a, b) for k, (a, b) in bounds.items()}}
        for phase, rows in during.items():
            for kind, row in _calls(rows):
                did = row.get("longest", {})
                print(f"during the build ({phase}), {kind}: {row['n']} calls, p50 {row['p50_ms']:.2f} ms, "
                      f"p95 {row['p95_ms']:.2f} ms, longest {row['max_ms']:.1f} ms (in it: CPU {did.get('cpu_ms', 0)} ms, "
                      f"GIL gaps {did.get('gil_gap_ms', 0)} ms, GC {did.get('gc_ms', 0)} ms, "
                      f"{did.get('voluntary_switches', 0)}/{did.get('involuntary_switches', 0)} vol/invol switches, "
                      f"{did.get('major_faults', 0)}/{did.get('minor_faults', 0)} major/minor faults; machine stalled on memory "
                      f"{did.get('memory_stall_ms', 0)} ms, I/O {did.get('io_stall_ms', 0)} ms)")
            gaps = rows["gil_gaps"]
            print(f"during the build ({phase}): longest GIL gap {gaps['longest_ms']} ms "
                  f"at {gaps.get('longest_at_s', 0)} s, CPU ms in it {gaps.get('longest_cpu_ms', {})} "
                  f"({gaps['count_over_20ms']} over 20 ms)")

        # Ground truth now (the writes during the build changed the neighbours): an exact scan.
        store._exact_max = 10**12
        exact_after_ms, exact_ids = _searches(store, queries, args.tenants)
        store._exact_max = 0
        indexed = []
        for ef in args.ef:
            store._hnsw_ef = ef
            _searches(store, queries[:20], args.tenants)  # warm
            ms, ids = _searches(store, queries, args.tenants)
            recall = float(np.mean([len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(ids, exact_ids)]))
            indexed.append({"ef": ef, **_summary(ms), "recall_at_10": round(recall, 4)})
            print(f"with the index, ef {ef}: p50 {statistics.median(ms):.2f} ms, p95 {_pct(ms, 95):.2f} ms, "
                  f"recall@10 {recall:.4f} (exact scan now: p50 {statistics.median(exact_after_ms):.2f} ms)")
        unfiltered = _unfiltered(store, queries, args.ef)
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rss, peak = _rss_mib()
        disk = _disk_mib(data_dir)
        print(f"RSS {rss:.0f} MiB (peak {peak:.0f}; index-building child peak {child_peak:.0f}), disk {disk:.0f} MiB")
        return {
            "bench": "scale", "chunks": args.chunks, "tenants": args.tenants, "queries": len(queries),
            "vectors": f"{len(real)} real {version} vectors of {args.dataset.name} texts; points = a random real "
                       f"vector + N(0, {args.noise}^2) per dimension, re-normalised; queries: real query texts",
            "encoder": version, "embed_s": round(embed_s, 1),
            "upsert": {"seconds": round(upsert_s, 1), "points_per_s": round(args.chunks / upsert_s)},
            "exact_search": _summary(exact_ms),
            "traffic_without_build": idle,
            "build": {"seconds": round(index_s, 1), **{k: round(v, 3) for k, v in steps.items()},
                      "during": during, "errors": errors[:10], "error_count": len(errors)},
            "exact_search_after_build": _summary(exact_after_ms),
            "indexed_search": indexed, "unfiltered_engine_search": unfiltered,
            "hnsw": {"m": args.hnsw_m, "payload_m": args.payload_m, "ef_construct": args.ef_construct},
            "rss_mib": round(rss), "peak_rss_mib": round(peak), "child_peak_rss_mib": round(child_peak),
            "disk_mib": round(disk),
            "cpus": os.cpu_count(),
        }
    finally:
        store.close()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(data_dir)], check=False)
