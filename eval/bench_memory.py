"""``python -m eval bench memory``: the API process's resident memory over many mixed requests.

A service is started per configuration (``python -m rag serve`` on a data dir of its own, extractive
answers, no LLM process), a QA corpus is indexed, then N requests run at a small concurrency: searches,
extractive answers and small uploads in a fixed, seeded mix of real questions. The process's RSS is
sampled every ``--every`` requests. Reported per configuration: RSS after the warm-up (the first
``--settle`` requests), at the end, the growth between the two, and the peak (VmHWM); the child processes
(the background compute child) are reported beside it, never summed into the API's figure. The baseline
configuration (glibc's default malloc arenas) runs in the same invocation as the tuned one.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import httpx

from eval.datasets import load_qa
from eval.service import service_headers, start_service, upload_corpus

CONFIGS = {
    # glibc gives every thread that allocates its own arena (up to 8 per core); freed memory stays in them.
    "malloc default": {"RAG_MALLOC_ARENA_MAX": "0"},
    "malloc arenas 2": {"RAG_MALLOC_ARENA_MAX": "2"},
}


def _rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", float("nan")), values.get("VmHWM", float("nan"))


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the background compute child, a local llama-server when on)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _children_rss(pid: int) -> tuple[float, float]:
    """(summed VmRSS, summed VmHWM) of ``pid``'s descendants in MiB; reported beside, never in, the API's."""
    rss = peak = 0.0
    for child in _children(pid):
        try:
            r, h = _rss(child)
        except OSError:  # it ended meanwhile
            continue
        rss, peak = rss + r, peak + h
    return rss, peak


def _requests(questions: list[str], n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """A seeded mix: 60 % searches, 30 % extractive answers, 10 % one-paragraph uploads (replacing a few ids)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = questions[rng.randrange(len(questions))]
        r = rng.random()
        if r < 0.6:
            out.append(("/v1/search", {"query": q, "top_k": rng.choice((5, 10, 50)), "mode": rng.choice(
                ("dense", "hybrid", "sparse"))}))
        elif r < 0.9:
            out.append(("/v1/answer", {"question": q, "top_k": 5}))
        else:
            out.append(("/v1/documents", {"id": f"memory-bench-{i % 50}", "title": "Note",
                                          "text": f"Question asked in the memory benchmark: {q}"}))
    return out


async def _drive(url: str, plan: list[tuple[str, dict[str, Any]]], pid: int, *, concurrency: int, every: int,
                 tenant: str) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    done = 0
    errors = 0
    todo = iter(plan)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=service_headers(tenant)) as client:
        async def user() -> None:
            nonlocal done, errors
            for path, body in todo:
                resp = await client.post(path, json=body)
                if resp.status_code >= 400:
                    errors += 1
                done += 1
                if done % every == 0:
                    rss, hwm = _rss(pid)
                    child_rss, child_hwm = _children_rss(pid)
                    samples.append({"requests": done, "rss_mb": round(rss, 1), "peak_mb": round(hwm, 1),
                                    "children_rss_mb": round(child_rss, 1), "children_peak_mb": round(child_hwm, 1),
                                    "seconds": round(time.perf_counter() - started, 1), "errors": errors})
                    print(f"  {done:>6} requests  RSS {rss:7.1f} MiB  peak {hwm:7.1f} MiB  "
                          f"(child processes {child_rss:7.1f} MiB)  errors {errors}", flush=True)

        await asyncio.gather(*(user() for _ in range(concurrency)))
    return samples


def bench_memory(args) -> dict[str, Any]:
    examples = load_qa(args.dataset / "qa.jsonl")
    questions = [e.question for e in examples][:5000]
    plan = _requests(questions, args.requests, args.seed)
    results: dict[str, Any] = {}
    for label, env in CONFIGS.items():
        if args.only and label not in args.only:
            continue
        data_dir = Path(args.data_dir)
        print(f"{label}: starting the service on {data_dir} …", flush=True)
        svc = start_service(data_dir, args.port, {"RAG_LLM_LOCAL": "no", "RAG_LLM_BASE_URL": "", **env})
        try:
            print(upload_corpus(svc.url, args.dataset, args.tenant), flush=True)
            start_rss, _ = _rss(svc.proc.pid)
            samples = asyncio.run(_drive(svc.url, plan, svc.proc.pid, concurrency=args.concurrency,
                                         every=args.every, tenant=args.tenant))
        finally:
            svc.stop()
        settled = next((s for s in samples if s["requests"] >= args.settle), samples[0] if samples else None)
        end = samples[-1] if samples else None
        growth = (end["rss_mb"] / settled["rss_mb"] - 1) * 100 if settled and end else float("nan")
        results[label] = {"env": env, "rss_after_indexing_mb": round(start_rss, 1), "samples": samples,
                          "rss_after_settle_mb": settled and settled["rss_mb"], "rss_end_mb": end and end["rss_mb"],
                          "growth_pct": round(growth, 1), "peak_mb": end and end["peak_mb"],
                          "children_peak_mb": end and end["children_peak_mb"],
                          "errors": end and end["errors"]}
    print(f"\n{'configuration':18}{'after ' + str(args.settle):>14}{'end':>10}{'growth':>9}{'peak':>10}"
          f"{'children peak':>15}")
    for label, r in results.items():
        print(f"{label:18}{r['rss_after_settle_mb']:>12.1f}MB{r['rss_end_mb']:>8.1f}MB{r['growth_pct']:>8.1f}%"
              f"{r['peak_mb']:>8.1f}MB{r['children_peak_mb']:>13.1f}MB")
    return {"benchmark": "memory", "dataset": str(args.dataset), "requests": args.requests,
            "concurrency": args.concurrency, "settle": args.settle, "results": results}
