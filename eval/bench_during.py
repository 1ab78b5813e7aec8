"""``bench search --during adapt|ingest`` and ``bench search --with-answers N``: search latency while other work runs.

Each run measures its own baseline first, on the same service: ``/v1/search`` alone (idle), then
the same requests while the load runs:

- ``--during ingest``: a large slice of the corpus uploaded as another tenant (one bulk job);
- ``--during adapt``: ``POST /v1/encoders/adapt`` (small settings: one epoch over ``--adapt-pairs``
  pairs), measured from its training stage on;
- ``--with-answers N``: N clients asking ``/v1/answer`` (extractive: no LLM process) without pause
  beside the searches.

The load must still be running when the window closes (checked and reported); it is cancelled
then. Searches run with the query cache off (``RAG_QUERY_CACHE_SIZE=0`` for a service the bench
starts), so every request pays its query encode. Run once with ``RAG_BACKGROUND_PROCESS=no`` for
the numbers without the background process.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from eval.bench import corpus_slice, environment, percentile
from eval.service import Service, service_headers, start_service, wait_ready
from rag.settings import Settings

FINAL = ("succeeded", "failed", "cancelled")
# The service settings these benchmarks report (the run's environment decides them).
REPORTED = ("RAG_BACKGROUND_PROCESS", "RAG_BACKGROUND_THREADS", "RAG_BACKGROUND_NICE", "RAG_ANSWER_CONCURRENCY",
            "RAG_TORCH_THREADS")


def _queries(dataset: Path) -> list[str]:
    return [json.loads(line)["text"] for line in (dataset / "queries.jsonl").read_text().splitlines() if line.strip()]


def _cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the service process and by each of its children, by name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        ppid, cpu = int(rest[1]), (int(rest[11]) + int(rest[12])) / tick
        if int(proc.name) == pid:
            out["api"] = cpu
        elif ppid == pid:
            out[f"child:{name}"] = out.get(f"child:{name}", 0.0) + cpu
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 1) for k, v in after.items()}


async def _timed_load(url: str, bodies: list[dict[str, Any]], path: str, *, seconds: float, concurrency: int,
                      tenant: str, stop: asyncio.Event | None = None,
                      max_requests: int = 0) -> tuple[list[float], float, int]:
    """(latencies in ms, wall seconds, errors) of ``concurrency`` clients posting ``bodies`` in turn to ``path``
    until ``seconds`` pass (or ``max_requests`` were sent, or ``stop`` is set)."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=service_headers(tenant),
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one_client() -> None:
            nonlocal errors, sent
            while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
                if max_requests and sent >= max_requests:
                    return
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors


def _row(label: str, lat: list[float], wall: float, errors: int, **extra: Any) -> dict[str, Any]:
    return {"phase": label, "requests": len(lat), "errors": errors,
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "p95_ms": round(percentile(lat, 95), 1) if lat else None,
            "req_per_s": round(len(lat) / wall, 2) if wall else None, **extra}


def _job(url: str, job_id: str, tenant: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/jobs/{job_id}", headers=service_headers(tenant), timeout=30).json()


def _start_service(settings: Settings, args) -> Service:
    if args.url:
        wait_ready(args.url, None)
        return Service(url=args.url)
    overrides = {"RAG_LLM_LOCAL": "no", "RAG_QUERY_CACHE_SIZE": "0", "RAG_LOG_LEVEL": "warning"}
    print(f"starting the service on {args.data_dir} …", flush=True)
    return start_service(args.data_dir.resolve(), args.port, overrides)


def _index(url: str, args) -> None:
    from ingest.cli import add_via_api

    print("indexing the corpus slice through the API (a no-op when --data-dir already holds it) …", flush=True)
    summary = add_via_api(url, [corpus_slice(args.dataset, args.limit)], tenant="default", headers=service_headers())
    print("\n".join(summary.lines()), flush=True)


def _bulk_upload(url: str, dataset: Path, offset: int, count: int, tenant: str) -> str:
    """One job uploading ``count`` documents of the corpus (from line ``offset``) as ``tenant``; its id."""
    lines = []
    with (dataset / "corpus.jsonl").open() as fh:
        for i, line in enumerate(fh):
            if i >= offset + count:
                break
            if i >= offset:
                lines.append(line.rstrip("\n"))
    body = ("\n".join(lines) + "\n").encode()
    r = httpx.post(f"{url}/v1/documents", files={"file": ("bulk.jsonl", body, "application/jsonl")},
                   headers=service_headers(tenant), timeout=300)
    r.raise_for_status()
    return r.json()["jobs"][0]["job_id"]


def _wait_job(url: str, job_id: str, tenant: str, ready, timeout: float, *, fail: bool = True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(url, job_id, tenant)
        if ready(job) or job["status"] in FINAL or (time.monotonic() > deadline and not fail):
            return job
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise SystemExit(f"error: job {job_id} did not reach the awaited state within {timeout:.0f}s")


def bench_search_during(settings: Settings, args) -> dict[str, Any]:
    """``/v1/search`` p50/p95 at concurrency 1: idle, then while an ingest or an adaptation runs."""
    queries = _queries(args.dataset)
    body = lambda q: {"query": q, "top_k": args.top_k[0], "mode": args.mode}  # noqa: E731
    svc = _start_service(settings, args)
    rows: list[dict[str, Any]] = []
    try:
        _index(svc.url, args)
        pid = svc.proc.pid if svc.proc is not None else None
        asyncio.run(_timed_load(svc.url, [body(q) for q in queries[:20]], "/v1/search", seconds=60, concurrency=1,
                                tenant="default", max_requests=20))  # warm up
        idle_bodies = [body(q) for q in queries[20:20 + args.requests]]
        cpu0 = _cpu_seconds(pid) if pid else {}
        lat, wall, errors = asyncio.run(_timed_load(svc.url, idle_bodies, "/v1/search", seconds=args.seconds,
                                                    concurrency=1, tenant="default"))
        rows.append(_row("idle", lat, wall, errors, cpu_s=_cpu_delta(cpu0, _cpu_seconds(pid)) if pid else None))
        if args.during == "ingest":
            tenant = f"bulk-{int(time.time())}"  # a fresh tenant: every document is new work
            job_id = _bulk_upload(svc.url, args.dataset, args.limit, args.bulk_docs, tenant)
            started = _wait_job(svc.url, job_id, tenant, lambda j: j["status"] == "running", 600)
        else:
            tenant = "default"
            r = httpx.post(f"{svc.url}/v1/encoders/adapt", headers=service_headers(tenant), timeout=60,
                           json={"epochs": 1, "promote": False, "max_pairs": args.adapt_pairs})
            r.raise_for_status()
            job_id = r.json()["job_id"]
            print("waiting for the adaptation to reach its training stage …", flush=True)
            started = _wait_job(svc.url, job_id, tenant, lambda j: (j.get("stage") or "").startswith("training"), 1200)
        if started["status"] in FINAL:
            raise SystemExit(f"error: the {args.during} job ended before the measurement: {started}")
        print(f"{args.during} job {job_id} is {started['status']} ({started.get('stage') or ''}); "
              f"measuring for {args.seconds:.0f}s …", flush=True)
        during_bodies = [body(q) for q in queries[20 + args.requests:]] or idle_bodies
        cpu0 = _cpu_seconds(pid) if pid else {}
        lat, wall, errors = asyncio.run(_timed_load(svc.url, during_bodies, "/v1/search", seconds=args.seconds,
                                                    concurrency=1, tenant="default"))
        cpu = _cpu_delta(cpu0, _cpu_seconds(pid)) if pid else None
        ended = _job(svc.url, job_id, tenant)
        still = ended["status"] not in FINAL
        rows.append(_row(f"during {args.during}", lat, wall, errors, cpu_s=cpu, job_running_at_end=still,
                         stage_at_start=started.get("stage"), stage_at_end=ended.get("stage"),
                         job_progress_at_end=ended.get("progress")))
        if still:  # cancelled, and waited for (a training step ends first), so the next run starts quiet
            httpx.post(f"{svc.url}/v1/jobs/{job_id}/cancel", headers=service_headers(tenant), timeout=30)
            _wait_job(svc.url, job_id, tenant, lambda j: False, 120, fail=False)
    finally:
        svc.stop()
    idle = rows[0]["p50_ms"]
    for row in rows:
        row["ratio_p50_vs_idle"] = round(row["p50_ms"] / idle, 2) if row["p50_ms"] and idle else None
    _print(rows)
    if not rows[-1].get("job_running_at_end"):
        print(f"warning: the {args.during} job was no longer running at the end of the window: the figure mixes "
              "in idle time (use a smaller --seconds or a bigger load)")
    return {"benchmark": f"search-during-{args.during}", "dataset": str(args.dataset), "url": svc.url,
            "indexed_documents": args.limit, "bulk_docs": args.bulk_docs if args.during == "ingest" else None,
            "adapt_pairs": args.adapt_pairs if args.during == "adapt" else None, "seconds": args.seconds,
            "mode": args.mode, "top_k": args.top_k[0], "service_env": _service_env(), "rows": rows,
            "environment": environment(settings)}


def bench_search_with_answers(settings: Settings, args) -> dict[str, Any]:
    """``/v1/search`` at concurrency C alone, then beside N clients asking ``/v1/answer`` (extractive) non-stop."""
    queries = _queries(args.dataset)
    concurrency = max(args.concurrency)
    search = [{"query": q, "top_k": args.top_k[0], "mode": args.mode} for q in queries]
    # Other questions than the searches', so that no cache answers either from the other's work.
    answers = [{"question": q, "top_k": 8} for q in reversed(queries)]
    svc = _start_service(settings, args)
    rows: list[dict[str, Any]] = []
    try:
        _index(svc.url, args)
        pid = svc.proc.pid if svc.proc is not None else None
        asyncio.run(_timed_load(svc.url, search[:20], "/v1/search", seconds=60, concurrency=4, tenant="default",
                                max_requests=20))
        asyncio.run(_timed_load(svc.url, answers[:4], "/v1/answer", seconds=120, concurrency=2, tenant="default",
                                max_requests=4))  # warm up both paths
        half = len(search) // 2
        cpu0 = _cpu_seconds(pid) if pid else {}
        lat, wall, errors = asyncio.run(_timed_load(svc.url, search[20:half], "/v1/search", seconds=args.seconds,
                                                    concurrency=concurrency, tenant="default"))
        rows.append(_row(f"search alone, c={concurrency}", lat, wall, errors,
                         cpu_s=_cpu_delta(cpu0, _cpu_seconds(pid)) if pid else None))

        async def mixed() -> tuple[tuple, tuple]:
            stop = asyncio.Event()
            searches = asyncio.create_task(_timed_load(svc.url, search[half:], "/v1/search", seconds=args.seconds,
                                                       concurrency=concurrency, tenant="default"))
            asking = asyncio.create_task(_timed_load(svc.url, answers[4:], "/v1/answer", seconds=args.seconds,
                                                     concurrency=args.with_answers, tenant="default", stop=stop))
            s = await searches
            stop.set()  # answers in flight finish; none starts after the searches' window
            return s, await asking

        cpu0 = _cpu_seconds(pid) if pid else {}
        (lat, wall, errors), (alat, awall, aerrors) = asyncio.run(mixed())
        cpu = _cpu_delta(cpu0, _cpu_seconds(pid)) if pid else None
        rows.append(_row(f"search, c={concurrency}, beside {args.with_answers} answer clients", lat, wall, errors,
                         cpu_s=cpu))
        rows.append(_row(f"  /v1/answer (extractive), c={args.with_answers}", alat, awall, aerrors))
    finally:
        svc.stop()
    base = rows[0]
    for row in rows[1:2]:
        row["ratio_p50_vs_alone"] = round(row["p50_ms"] / base["p50_ms"], 2) if row["p50_ms"] else None
        row["throughput_vs_alone"] = round(row["req_per_s"] / base["req_per_s"], 3) if row["req_per_s"] else None
    _print(rows)
    return {"benchmark": "search-with-answers", "dataset": str(args.dataset), "url": svc.url,
            "indexed_documents": args.limit, "search_concurrency": concurrency, "answer_clients": args.with_answers,
            "seconds": args.seconds, "mode": args.mode, "top_k": args.top_k[0], "service_env": _service_env(),
            "rows": rows, "environment": environment(settings)}


def _service_env() -> dict[str, str]:
    return {k: os.environ.get(k, "(default)") for k in REPORTED}


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'phase':52}{'requests':>9}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>8}{'ratio':>7}  cpu s")
    for r in rows:
        ratio = r.get("ratio_p50_vs_idle", r.get("ratio_p50_vs_alone"))
        print(f"{r['phase']:52}{r['requests']:>9}{r['p50_ms'] or 0:>9.1f}{r['p95_ms'] or 0:>9.1f}"
              f"{r['req_per_s'] or 0:>8.1f}{'-' if ratio is None else f'{ratio:.2f}':>7}  {r.get('cpu_s') or ''}")
    print("\n".join(f"{k}={v}" for k, v in _service_env().items()))

