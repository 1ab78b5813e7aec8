"""Benchmarks: each prints a table and writes JSON, with its baseline measured in the same run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from rag.chunking import chunk
from rag.embedding import load_embedder
from rag.loaders import load
from rag.settings import Settings
from rag.tokens import get_encoding
from rag.types import Document


def write_report(report: dict[str, Any], out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    return path


def _environment(settings: Settings) -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "git_commit": commit,
            "settings": msgspec.to_builtins(settings, enc_hook=str)}


def _corpus_slice(dataset: Path, limit: int) -> Path:
    """The corpus file, or a temporary copy of its first ``limit`` lines."""
    corpus = dataset / "corpus.jsonl"
    if not corpus.exists():
        raise SystemExit(f"error: {corpus} not found (a BEIR folder holds corpus.jsonl)")
    if not limit:
        return corpus
    tmp = Path(tempfile.mkdtemp(prefix="bench-corpus-")) / "corpus.jsonl"
    with corpus.open() as src, tmp.open("w") as dst:
        for i, line in enumerate(src):
            if i >= limit:
                break
            dst.write(line)
    return tmp


def bench_ingest(settings: Settings, dataset: Path, *, limit: int = 0) -> dict[str, Any]:
    """End-to-end chunks/s through the real worker vs raw ``encode`` of the same chunk texts."""
    from rag.types import embedding_text

    corpus = _corpus_slice(dataset, limit)
    data = corpus.read_bytes()
    docs = [d for d in load(corpus.name, data) if isinstance(d, Document)]
    encoding = get_encoding(settings.tokenizer_encoding)
    t0 = time.perf_counter()
    chunked = [(d, c) for d in docs for c in chunk(d, settings.chunk_tokens, settings.chunk_overlap, encoding)]
    chunk_s = time.perf_counter() - t0
    texts = [embedding_text(d.title, c.heading_path, c.text) for d, c in chunked]
    embedder = load_embedder(settings)
    embedder.embed_documents(texts[:64])  # warm up

    print(f"{len(docs)} documents, {len(texts)} chunks; raw encode …", flush=True)
    t0 = time.perf_counter()
    for start in range(0, len(texts), 512):  # the worker's group size, so both see the same batches
        embedder.embed_documents(texts[start : start + 512])
    raw_s = time.perf_counter() - t0

    print("end-to-end ingest through the worker …", flush=True)
    e2e_s, indexed_chunks, stored, status = _ingest_through_worker(settings, corpus, embedder)

    raw_cps = len(texts) / raw_s
    e2e_cps = indexed_chunks / e2e_s
    report = {
        "benchmark": "ingest", "dataset": str(dataset), "documents": len(docs), "chunks": len(texts),
        "chunks_indexed": indexed_chunks, "points_stored": stored, "job_status": status,
        "chunking_s": round(chunk_s, 3),
        "raw_encode": {"seconds": round(raw_s, 2), "chunks_per_s": round(raw_cps, 2), "docs_per_s": round(len(docs) / raw_s, 2)},
        "end_to_end": {"seconds": round(e2e_s, 2), "chunks_per_s": round(e2e_cps, 2), "docs_per_s": round(len(docs) / e2e_s, 2)},
        "ratio_end_to_end_vs_raw": round(e2e_cps / raw_cps, 4),
        "encoder_version": embedder.version, "environment": _environment(settings),
    }
    print(f"{'':24}{'seconds':>10}{'chunks/s':>12}{'docs/s':>10}")
    print(f"{'raw encode (baseline)':24}{raw_s:>10.1f}{raw_cps:>12.1f}{len(docs) / raw_s:>10.1f}")
    print(f"{'end to end (worker)':24}{e2e_s:>10.1f}{e2e_cps:>12.1f}{len(docs) / e2e_s:>10.1f}")
    print(f"ratio end-to-end / raw: {e2e_cps / raw_cps:.3f}  (chunking alone: {chunk_s:.1f}s)")
    return report


def _ingest_through_worker(settings: Settings, corpus: Path, embedder) -> tuple[float, int, int, str]:
    """(seconds, chunks indexed, points stored, job status) of one ingest job in a throwaway data directory."""
    from ingest.worker import IngestWorker
    from rag.registry import JobItem, SqliteRegistry
    from rag.store import open_store

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    run_settings = msgspec.structs.replace(settings, data_dir=work)
    store = open_store(run_settings)
    registry = SqliteRegistry(run_settings.registry_path)
    try:
        upload = work / "corpus.jsonl"
        shutil.copyfile(corpus, upload)
        worker = IngestWorker(run_settings, registry, store, embedder)
        job = registry.create_job("default", [JobItem(filename="corpus.jsonl", path=str(upload))])
        t0 = time.perf_counter()
        worker.run_once()
        e2e_s = time.perf_counter() - t0
        final = registry.get_job(job.id)
        stored = store.count(worker.collection, tenant="default")
    finally:
        registry.close()
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return e2e_s, final.chunks, stored, final.status


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def _load(url: str, make_request, n: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one_user() -> None:
            for i in counter:
                method, path, body = make_request(i)
                t0 = time.perf_counter()
                resp = await client.request(method, path, json=body)
                latencies.append((time.perf_counter() - t0) * 1000)
                resp.raise_for_status()

        await asyncio.gather(*(one_user() for _ in range(concurrency)))
    return latencies


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def bench_search(settings: Settings, args) -> dict[str, Any]:
    """p50/p95 of ``/v1/search`` over HTTP, beside two floors: ``/healthz`` (transport) and in-process encode."""
    queries = [json.loads(line)["text"] for line in (args.dataset / "queries.jsonl").read_text().splitlines() if line.strip()]
    proc = None
    url = args.url
    try:
        if url is None:
            url = f"http://127.0.0.1:{args.port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
            env.update({"RAG_DATA_DIR": str(args.data_dir), "RAG_PORT": str(args.port), "RAG_LOG_LEVEL": "warning",
                        "RAG_LLM_LOCAL": "no"})  # search only: no LLM process beside it
            proc = subprocess.Popen([sys.executable, "-m", "rag", "serve"], env=env)
            from eval.service import wait_ready

            wait_ready(url, proc)
            from ingest.cli import add_via_api

            print("indexing the corpus through the API (a no-op when --data-dir already holds it) …", flush=True)
            summary = add_via_api(url, [_corpus_slice(args.dataset, args.limit)], tenant="default")
            print("\n".join(summary.lines()), flush=True)
        rows = []
        embedder = load_embedder(settings)
        encode_ms = []
        for q in queries[:200]:
            t0 = time.perf_counter()
            embedder.embed_queries([q])
            encode_ms.append((time.perf_counter() - t0) * 1000)
        rows.append({"target": "encode in-process (floor)", "concurrency": 1, "top_k": None,
                     "p50_ms": round(statistics.median(encode_ms), 2), "p95_ms": round(_percentile(encode_ms, 95), 2),
                     "requests": len(encode_ms)})
        del embedder
        for concurrency in args.concurrency:
            lat = asyncio.run(_load(url, lambda i: ("GET", "/healthz", None), args.requests, concurrency))
            rows.append({"target": "GET /healthz (floor)", "concurrency": concurrency, "top_k": None,
                         "p50_ms": round(statistics.median(lat), 2), "p95_ms": round(_percentile(lat, 95), 2),
                         "requests": len(lat)})
            for top_k in args.top_k:
                asyncio.run(_load(url, lambda i: ("POST", "/v1/search", {"query": queries[i % len(queries)], "top_k": top_k, "mode": args.mode}), 20, concurrency))
                lat = asyncio.run(_load(
                    url, lambda i: ("POST", "/v1/search", {"query": queries[(i + 20) % len(queries)], "top_k": top_k, "mode": args.mode}),
                    args.requests, concurrency,
                ))
                rows.append({"target": f"POST /v1/search {args.mode}", "concurrency": concurrency, "top_k": top_k,
                             "p50_ms": round(statistics.median(lat), 2), "p95_ms": round(_percentile(lat, 95), 2),
                             "requests": len(lat)})
        peak = _peak_rss_mb(proc.pid) if proc else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"{'target':28}{'conc':>6}{'top_k':>7}{'p50 ms':>10}{'p95 ms':>10}")
    for r in rows:
        print(f"{r['target']:28}{r['concurrency']:>6}{str(r['top_k'] or '-'):>7}{r['p50_ms']:>10.2f}{r['p95_ms']:>10.2f}")
    if peak is not None:
        print(f"API peak RSS: {peak:.0f} MB")
    return {"benchmark": "search", "dataset": str(args.dataset), "url": url, "rows": rows,
            "api_peak_rss_mb": peak, "environment": _environment(settings)}


def bench_tenants(settings: Settings, args) -> dict[str, Any]:
    """Tenant-filtered dense top-10 search with the corpus held by 1 tenant vs split over N equal tenants.

    The vectors are real: the dense vectors of an existing data dir (e.g. the one ``python -m eval
    retrieval`` built for SciFact), copied into two fresh embedded stores; the queries are the dataset's
    queries, embedded with the same encoder. The baseline (1 tenant) runs in the same process.
    """
    import random

    from rag.embedding import SentenceTransformerEmbedder
    from rag.store import open_store, point_id
    from rag.types import PointRecord

    source = open_store(Settings(data_dir=args.data_dir))
    try:
        collection = source.get_active() or source.list_collections()[0]
        vectors = [v for _, batch in source.iter_dense(collection, live=True) for v in batch]
    finally:
        source.close()
    queries = [json.loads(line)["text"] for line in (args.dataset / "queries.jsonl").open() if line.strip()]
    queries = queries[: args.queries]
    query_vectors = SentenceTransformerEmbedder().embed_queries(queries)
    rng = random.Random(13)
    results: dict[str, Any] = {}
    for tenants in (1, args.tenants):
        root = Path(tempfile.mkdtemp(prefix=f"bench-tenants-{tenants}-"))
        store = open_store(Settings(data_dir=root))
        try:
            store.ensure_collection("bench", len(vectors[0]))
            points = [PointRecord(id=point_id(f"t{i % tenants}", f"d{i}", "h", 0), vector=v,
                                  payload={"tenant": f"t{i % tenants}", "document_id": f"d{i}", "content_hash": "h",
                                           "chunk_index": 0, "live": True, "text": ""})
                      for i, v in enumerate(vectors)]
            started = time.perf_counter()
            store.upsert("bench", points)
            upsert_s = time.perf_counter() - started
            times: list[float] = []
            for q in query_vectors:
                tenant = f"t{rng.randrange(tenants)}"
                t0 = time.perf_counter()
                store.search("bench", q.tolist(), tenant=tenant, top_k=10)
                times.append((time.perf_counter() - t0) * 1000)
            results[f"{tenants}_tenants"] = {
                "tenants": tenants, "points": len(points), "points_per_tenant": len(points) // tenants,
                "upsert_s": round(upsert_s, 2), "queries": len(times),
                "p50_ms": round(statistics.median(times), 3), "p95_ms": round(_percentile(times, 95), 3),
            }
        finally:
            store.close()
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'tenants':>8} {'points/tenant':>14} {'p50 ms':>8} {'p95 ms':>8}")
    for row in results.values():
        print(f"{row['tenants']:>8} {row['points_per_tenant']:>14} {row['p50_ms']:>8} {row['p95_ms']:>8}")
    return {"benchmark": "tenants", "source": str(args.data_dir), "collection": collection, "results": results,
            "environment": _environment(settings)}


def _rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_encoders(settings: Settings, args) -> dict[str, Any]:
    """The per-tenant encoder cache: resident memory each loaded encoder adds, the time a load takes, and a
    query's encode through a cached encoder vs one that must be loaded first (an evicted tenant's).

    The tenants' versions are copies of the configured encoder's weights under their own version names,
    exactly as adaptation lays them out; the baseline (the default encoder alone) is measured in the same run.
    """
    import gc

    from rag.embedding import model_version
    from rag.encoder_pool import EncoderPool
    from rag.encoders import EncoderRecord, EncoderRegistry
    from rag.index import ensure_collection_for
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    root = Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    run = msgspec.structs.replace(settings, data_dir=root, encoder_cache_size=args.cache_size, encoder_poll_s=3600.0)
    gc.collect()
    rss0 = _rss_mb()
    default = load_embedder(run)
    default.embed_queries(["warm up"])
    rss_default = _rss_mb()
    source = Path(default.model_name) if Path(default.model_name).is_dir() else None
    if source is None:
        raise SystemExit("error: bench encoders copies the encoder's folder; set RAG_ENCODER_MODEL to a local folder")
    registry = EncoderRegistry(run.encoders_dir)
    versions = [f"bench-tenant-{i}" for i in range(args.tenants)]
    for version in versions:
        model = registry.folder(version) / "model"
        shutil.copytree(source, model)
        (model / "rag_version.txt").write_text(version + "\n")
        registry.save(EncoderRecord(version=version, path=str(model), base_model=model_version(str(source)),
                                    tenant=version, created_at=time.time()))
    store = open_store(run)
    jobs = SqliteRegistry(run.registry_path)
    try:
        ensure_collection_for(store, default)
        pool = EncoderPool(run, store, jobs, default)
        loads, rss_after, cold, warm = [], [], [], []
        for i, version in enumerate(versions):
            t0 = time.perf_counter()
            pool.embedder(version).embed_queries([f"question {i}"])  # load (evicting past the cache size) + encode
            cold.append((time.perf_counter() - t0) * 1000)
            loads.append(cold[-1])
            rss_after.append(_rss_mb())
            t0 = time.perf_counter()
            pool.embedder(version).embed_queries([f"question {i} again"])
            warm.append((time.perf_counter() - t0) * 1000)
        gc.collect()
        rss_end = _rss_mb()
        held = len(pool.loaded())
    finally:
        jobs.close()
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    filled = rss_after[: args.cache_size]
    per_encoder = (filled[-1] - rss_default) / len(filled) if filled else float("nan")
    result = {
        "tenants": args.tenants, "cache_size": args.cache_size, "held_at_end": held,
        "rss_mb": {"before_any": round(rss0, 1), "default_only": round(rss_default, 1),
                   "after_each_load": [round(x, 1) for x in rss_after], "end": round(rss_end, 1)},
        "default_encoder_mb": round(rss_default - rss0, 1),
        "per_cached_encoder_mb": round(per_encoder, 1),
        "query_ms": {"cached_p50": round(statistics.median(warm), 2),
                     "load_then_query_p50": round(statistics.median(cold), 2)},
    }
    print(f"default encoder alone: +{result['default_encoder_mb']} MiB (baseline); each cached tenant encoder: "
          f"+{result['per_cached_encoder_mb']} MiB; RSS at the end with {held} loaded: {result['rss_mb']['end']} MiB")
    print(f"query encode p50: cached {result['query_ms']['cached_p50']} ms vs load-then-encode "
          f"{result['query_ms']['load_then_query_p50']} ms (an evicted tenant's first query)")
    return {"benchmark": "encoders", "results": result, "environment": _environment(settings)}


# Shared with eval/bench_during.py (``bench search --during …``, ``--with-answers``), the same benchmark family.
corpus_slice, environment, percentile = _corpus_slice, _environment, _percentile
