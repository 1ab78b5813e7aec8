"""``python -m eval answers|calibrate`` and ``python -m eval bench answer``: answer quality on SQuAD 2.0
dev — or any QA JSONL with its corpus (``--qa``, ``--corpus``) — through the real service
(POST /v1/answer), abstention calibration, and the streaming answer benchmark.

The rooms behind the commands: :mod:`eval.answer_scoring` (the split, gold matching, scores and
calibration, all offline), :mod:`eval.service` (the service subprocess and the HTTP client) and
:mod:`eval.answer_report` (report.json, report.html and the printed summary).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from eval.answer_report import format_curves, format_ragas, format_summary, write_answer_report
from eval.answer_scoring import AnswerRow, calibrate, percentile, sample_questions, score_all
from eval.datasets import DatasetError, QAExample, iter_corpus, load_qa, load_qa_jsonl
from eval.service import Service, ask_all, running_service, service_headers, upload_corpus

# The service answers from the extractive pipeline only: no local LLM started, no remote one called.
EXTRACTIVE = {"RAG_LLM_LOCAL": "no", "RAG_LLM_BASE_URL": ""}


def corpus_paths(args) -> list[Path] | None:
    """What the run uploads: ``--corpus`` (a BEIR folder's corpus.jsonl, a .jsonl, or any files or folder the
    service ingests), else ``--dataset``'s corpus.jsonl; None with neither (documents already ingested)."""
    corpus: Path | None = getattr(args, "corpus", None)
    if corpus is None:
        return [args.dataset / "corpus.jsonl"] if args.dataset else None
    if corpus.is_dir() and (corpus / "corpus.jsonl").is_file():
        return [corpus / "corpus.jsonl"]
    if not corpus.exists():
        raise DatasetError(corpus, "not found (--corpus: a BEIR folder with corpus.jsonl, a .jsonl, or documents)")
    return [corpus]


def corpus_documents(paths: list[Path]) -> dict[str, str]:
    """Document id -> text ("" where only the service's loader can read it) of the corpus files, as the service
    names them: a .jsonl line's ``_id``, any other file's sanitized name."""
    from ingest.worker import iter_paths
    from rag.loaders import SUPPORTED_SUFFIXES
    from rag.loaders.core import default_document_id

    docs: dict[str, str] = {}
    for f in iter_paths(paths, SUPPORTED_SUFFIXES):
        if f.suffix.lower() == ".jsonl":
            docs.update((d.id, d.text) for d in iter_corpus(f))
        else:
            docs[default_document_id(f.name)] = ""
    return docs


def load_questions(args) -> tuple[list[QAExample], list[Path] | None]:
    """The run's questions and the corpus to upload: ``--qa`` (any QA JSONL, gold document ids checked against the
    corpus when there is one) or ``--dataset``'s SQuAD-format qa.jsonl."""
    qa: Path | None = getattr(args, "qa", None)
    if qa is None and args.dataset is None:
        raise DatasetError("--qa", "give --qa FILE (a QA JSONL) with --corpus, or --dataset (a folder with qa.jsonl "
                                   "and corpus.jsonl)")
    paths = corpus_paths(args)
    if paths is None and not args.no_upload:
        raise DatasetError(qa or args.dataset, "no corpus to upload: give --corpus PATH, or --no-upload when the service "
                               "already holds the documents")
    if qa is None:
        return load_qa(args.dataset / "qa.jsonl"), paths
    documents = corpus_documents(paths) if paths else None
    return load_qa_jsonl(qa, documents=documents), paths


def run_answers(args) -> int:
    """``python -m eval answers``."""
    examples, corpus = load_questions(args)
    split = getattr(args, "split", "report")
    chosen = sample_questions(examples, split=split, limit=args.limit, seed=args.seed)
    if not chosen:
        raise DatasetError(args.qa or args.dataset, f"no question of the {split!r} split (--split all asks every one)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    meta = {"dataset": str(args.qa or args.dataset), "corpus": ", ".join(map(str, corpus or [])) or "already ingested",
            "split": split, "seed": args.seed, "limit_per_kind": args.limit,
            "git_commit": _git_commit(), "abstain_threshold_env": os.environ.get("RAG_ABSTAIN_THRESHOLD"),
            "llm_local_env": os.environ.get("RAG_LLM_LOCAL"),
            "answerability_model_env": os.environ.get("RAG_ANSWERABILITY_MODEL"),
            "answerability_operating_point_env": os.environ.get("RAG_ANSWERABILITY_OPERATING_POINT"), "started": _now()}
    if args.score_only:
        by_id = {e.id: e for e in examples}
        pairs = [(by_id[r["id"]], r["response"]) for r in map(json.loads, results_path.read_text().splitlines())
                 if r["id"] in by_id]
        meta["partial"] = f"{len(pairs)} of {len(chosen)}"
        _score_and_report(args, out, meta, pairs)
        return 0
    with running_service(args.url, args.data_dir, args.port, {}) as svc:
        _index_corpus(args, svc, corpus)
        meta["service"] = httpx.get(f"{svc.url}/readyz", timeout=5).json()
        with results_path.open("w") as fh:
            pairs = asyncio.run(ask_all(svc.url, chosen, tenant=args.tenant, concurrency=args.concurrency,
                                        top_k=args.top_k, on_result=_progress(len(chosen), every=25, sink=fh)))
    meta["finished"] = _now()
    _score_and_report(args, out, meta, pairs)
    print(f"wrote {out / 'report.json'}\nwrote {out / 'report.html'}")
    return 0


def run_calibrate(args) -> int:
    """``python -m eval calibrate``: support scores on the calibration split, extractive, nothing abstains; then
    the answerability model and sentence ranking weights from the same answers (eval/answerability_train.py)."""
    examples, corpus = load_questions(args)
    chosen = sample_questions(examples, split="calibration", limit=args.limit, seed=args.seed)
    if args.url:
        print("note: --url must point at a service run with RAG_LLM_LOCAL=no, RAG_ABSTAIN_THRESHOLD=0, "
              "RAG_ANSWERABILITY_MODEL= and RAG_ANSWER_EXPLAIN=true", flush=True)
    # No model (sentences ranked by similarity alone, the fallback threshold's scores), nothing abstains, and
    # every response explains its ranking so that the model is trained on what the service computes.
    env = {**EXTRACTIVE, "RAG_ABSTAIN_THRESHOLD": "0", "RAG_ANSWERABILITY_MODEL": "", "RAG_ANSWER_EXPLAIN": "true"}
    # The responses are kept beside the report: --from-responses retrains from them without a service.
    responses = args.out.with_suffix(".responses.jsonl")
    t0 = time.perf_counter()
    if args.from_responses:
        by_id = {e.id: e for e in chosen}
        pairs = [(by_id[r["id"]], r["response"]) for r in map(json.loads, args.from_responses.read_text().splitlines())
                 if r["id"] in by_id]
    else:
        responses.parent.mkdir(parents=True, exist_ok=True)
        with running_service(args.url, args.data_dir, args.port, env) as svc, responses.open("w") as fh:
            _index_corpus(args, svc, corpus)
            t0 = time.perf_counter()
            pairs = asyncio.run(ask_all(svc.url, chosen, tenant=args.tenant, concurrency=args.concurrency,
                                        top_k=args.top_k, on_result=_progress(len(chosen), every=50, sink=fh)))
    elapsed = time.perf_counter() - t0
    pos = [b["retrieval"]["support_score"] for ex, b in pairs if "error" not in b and not ex.is_impossible]
    neg = [b["retrieval"]["support_score"] for ex, b in pairs if "error" not in b and ex.is_impossible]
    errors = sum("error" in b for _, b in pairs)
    cal = calibrate(pos, neg, args.target_answer_rate)
    print(f"{len(pos)} answerable + {len(neg)} unanswerable calibration questions ({errors} errors), {elapsed:.0f}s")
    print(f"{'threshold':>10}{'answer %':>10}{'abstain % (unans.)':>20}")
    for row in cal["table"]:
        mark = "  <- chosen" if row["threshold"] == cal["threshold"] else ""
        print(f"{row['threshold']:>10.4f}{100 * row['answer_rate']:>10.1f}{100 * row['abstain_rate_unanswerable']:>20.1f}{mark}")
    print(f"chosen threshold {cal['threshold']} (target answer rate {args.target_answer_rate}): answers "
          f"{100 * cal['answer_rate']:.1f} % of answerable, abstains on {100 * cal['abstain_rate_unanswerable']:.1f} % "
          f"of unanswerable; AUC {'-' if cal['auc'] is None else format(cal['auc'], '.3f')}")
    result = {"schema": "rag-eval/calibration/1", "dataset": str(args.qa or args.dataset), "split": "calibration",
              "seed": args.seed, "limit_per_kind": args.limit, "target_answer_rate": args.target_answer_rate,
              "threshold": cal["threshold"], "answer_rate": cal["answer_rate"],
              "abstain_rate_unanswerable": cal["abstain_rate_unanswerable"], "auc": cal["auc"], "answerable": len(pos),
              "unanswerable": len(neg), "errors": errors, "table": cal["table"], "git_commit": _git_commit(),
              "scores": {"answerable": pos, "unanswerable": neg}}
    if not args.no_model:
        from eval.answerability_train import format_training, train, write_model
        from rag.answerability import BUNDLED

        model_out = args.model_out or BUNDLED
        spec = train([(ex, b) for ex, b in pairs], meta={"dataset": Path(args.dataset).name, "split": "calibration",
                                                         "seed": args.seed, "limit_per_kind": args.limit,
                                                         "git_commit": _git_commit()})
        print(format_training(spec))
        version = write_model(spec, model_out)
        print(f"wrote {model_out} ({version})")
        result["answerability"] = {"version": version, "path": str(model_out),
                                   **{k: v for k, v in spec["calibration"].items() if k != "cv_probabilities"},
                                   "sentence_ranking": spec["sentence_ranking"], "top_features": spec["top_features"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


def _index_corpus(args, svc: Service, corpus: list[Path] | None) -> None:
    if not args.no_upload and corpus:
        from ingest.cli import add_via_api

        print("indexing the corpus (a no-op when the data dir already holds it) …", flush=True)
        summary = add_via_api(svc.url, corpus, tenant=args.tenant, headers=service_headers())
        print("\n".join(summary.lines()), flush=True)


def _progress(total: int, *, every: int, sink: IO[str] | None = None) -> Callable[[QAExample, dict[str, Any]], None]:
    """An ``on_result`` for :func:`ask_all`: a line every ``every`` answers; each response to ``sink`` (JSONL) as it lands."""
    done = 0
    t0 = time.perf_counter()

    def on_result(ex: QAExample, body: dict[str, Any]) -> None:
        nonlocal done
        if sink is not None:
            sink.write(json.dumps({"id": ex.id, "response": body}) + "\n")
            sink.flush()
        done += 1
        if done % every == 0:
            print(f"  {done}/{total} in {time.perf_counter() - t0:.0f}s", flush=True)

    return on_result


def _score_and_report(args, out: Path, meta: dict[str, Any], pairs: Sequence[tuple[QAExample, dict[str, Any]]]) -> None:
    rows = score_all(pairs)
    report = write_answer_report(out, meta, rows, ragas_section(args, pairs, rows))
    print(format_summary(report["summary"]))
    print(format_curves(report["curves"]))
    s = report["summary"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"  AUC support score / answerable probability: {fmt(s.get('auc_support_score'))} / "
          f"{fmt(s.get('auc_answerable_probability'))}; server latency p50 {s.get('server_p50_ms') or 0:.0f} ms")
    print(format_ragas(report.get("ragas")))


def ragas_section(args, pairs: Sequence[tuple[QAExample, dict[str, Any]]],
                  rows: list[AnswerRow]) -> dict[str, Any] | None:
    """ragas metrics (eval/ragas_metrics.py) for the run; per-row scores go on ``rows`` as ``row["ragas"]``.
    None with ``--no-ragas``; ``{"error": …}`` when the ``eval`` extra is not installed."""
    if getattr(args, "no_ragas", False):
        return None
    from eval import ragas_metrics

    try:
        ragas_metrics.ragas_version()
    except ImportError as exc:
        print(f"warning: ragas metrics skipped ({exc}); install the extra: pip install -e '.[eval]'", file=sys.stderr)
        return {"error": f"ragas not installed: {exc}"}
    from rag.embedding import load_embedder
    from rag.settings import load_settings

    judge = ragas_metrics.JudgeConfig.from_args(args)
    print("ragas metrics (offline" + (f"; judge {judge.model} at {judge.url}" if judge else "; no judge configured")
          + ") …", flush=True)
    embedder = load_embedder(load_settings(log_format="json", log_level="warning"))
    section, per_row = ragas_metrics.evaluate_answers(pairs, embedder=embedder, judge=judge)
    for row in rows:
        if row.get("id") in per_row:
            row["ragas"] = per_row[row["id"]]
    return section


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# bench answer
# ---------------------------------------------------------------------------------------------


async def _stream_once(client: httpx.AsyncClient, path: str, body: dict[str, Any], *, sse_openai: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    timings: dict[str, float] = {}
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        event = None
        async for line in r.aiter_lines():
            if sse_openai:
                if ttft is None and line.startswith("data:") and '"content"' in line and '"content": ""' not in line \
                        and '"content":""' not in line:
                    ttft = (time.perf_counter() - t0) * 1000
            elif line.startswith("event:"):
                event = line[6:].strip()
                if event == "token" and ttft is None:
                    ttft = (time.perf_counter() - t0) * 1000
            elif line.startswith("data:") and event == "done":
                timings = json.loads(line[5:]).get("timings") or {}
    return {"ttft_ms": ttft, "total_ms": (time.perf_counter() - t0) * 1000, "timings": timings}


async def _bench_target(url: str, path: str, make_body, n: int, *, tenant: str, sse_openai: bool = False,
                        stream: bool = True) -> list[dict[str, Any]]:
    out = []
    headers = service_headers(tenant)
    if sse_openai:
        # llama-server may close a kept-alive connection after a stream; a fresh one per request is the fair floor.
        headers["Connection"] = "close"
    async with httpx.AsyncClient(base_url=url, timeout=180, headers=headers) as client:
        for i in range(n):
            if stream:
                try:
                    out.append(await _stream_once(client, path, make_body(i), sse_openai=sse_openai))
                except httpx.HTTPError as exc:
                    out.append({"ttft_ms": None, "total_ms": None, "error": repr(exc)})
            else:
                t0 = time.perf_counter()
                r = await client.post(path, json=make_body(i))
                r.raise_for_status()
                out.append({"ttft_ms": None, "total_ms": (time.perf_counter() - t0) * 1000})
    return out


STAGES = ("retrieve_ms", "rerank_ms", "context_ms", "llm_ms")


def _row(target: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [s["ttft_ms"] for s in samples if s["ttft_ms"] is not None]
    total = [s["total_ms"] for s in samples if s["total_ms"] is not None]
    r = lambda x: None if x is None else round(x, 1)  # noqa: E731
    row = {"target": target, "requests": len(samples), "ttft_p50_ms": r(percentile(ttft, 50)),
           "ttft_p95_ms": r(percentile(ttft, 95)), "total_p50_ms": r(percentile(total, 50)),
           "total_p95_ms": r(percentile(total, 95)), "errors": sum(1 for s in samples if s.get("error"))}
    errors = [s["error"] for s in samples if s.get("error")]
    if errors:
        row["first_error"] = errors[0]
    timed = [s["timings"] for s in samples if s.get("timings")]
    if timed:
        # Share of the server-side time per stage, summed over requests (medians of each stage beside it).
        sums = {k: sum(t.get(k, 0.0) for t in timed) for k in STAGES}
        whole = sum(sums.values()) or 1.0
        row["stage_share"] = {k.removesuffix("_ms"): round(v / whole, 3) for k, v in sums.items()}
        row["stage_p50_ms"] = {k.removesuffix("_ms"): r(percentile([t.get(k, 0.0) for t in timed], 50)) for k in STAGES}
    return row


def run_bench_answer(args) -> dict[str, Any]:
    """Streaming /v1/answer TTFT and total latency, local LLM vs extractive, beside /v1/search and the raw LLM."""
    examples = load_qa(args.dataset / "qa.jsonl")
    questions = [e.question for e in sample_questions(examples, split="report", limit=args.requests, seed=args.seed)
                 if not e.is_impossible][: args.requests]
    # The baseline of the same run: sentences embedded at answer time (stored vectors ignored; cache as configured).
    configs = [("extractive", EXTRACTIVE),
               ("extractive, no stored sentence vectors", {**EXTRACTIVE, "RAG_SENTENCE_VECTORS": "false"})]
    if not args.extractive_only:
        configs.append(("local LLM", {"RAG_LLM_LOCAL": "yes", "RAG_LLM_BASE_URL": "", "RAG_LLM_LOCAL_PORT": str(args.llm_port)}))
    if args.url:
        configs = [("service at --url", {})]
    rows: list[dict[str, Any]] = []
    for label, env in configs:
        with running_service(args.url, args.data_dir, args.port, env) as svc:
            if not args.url and not args.no_upload:
                print(upload_corpus(svc.url, args.dataset, args.tenant), flush=True)
            rows += _bench_one(args, label, svc, questions)
    _print_bench(rows)
    return {"benchmark": "answer", "dataset": str(args.dataset), "requests": len(questions), "rows": rows,
            "cpus": os.cpu_count(), "git_commit": _git_commit()}


def _bench_one(args, label: str, svc: Service, questions: list[str]) -> list[dict[str, Any]]:
    """The rows of one service configuration: its search floors, its streamed answers, and (local LLM) the raw LLM."""
    n, warm = len(questions), 3
    rows: list[dict[str, Any]] = []
    body = lambda i: {"question": questions[i % n], "stream": True}  # noqa: E731
    # Warm-up questions from outside the measured ones: no measured question's vector is cached before its answer.
    extra = [e.question for e in sample_questions(load_qa(args.dataset / "qa.jsonl"), split="report",
                                                  limit=n + warm, seed=args.seed + 1)
             if not e.is_impossible and e.question not in questions][:warm] or questions[:1]
    asyncio.run(_bench_target(svc.url, "/v1/answer", lambda i: {"question": extra[i % len(extra)], "stream": True},
                              warm, tenant=args.tenant))
    print(f"{label}: /v1/answer stream …", flush=True)
    rows.append(_row(f"[{label}] POST /v1/answer stream", asyncio.run(_bench_target(
        svc.url, "/v1/answer", body, n, tenant=args.tenant))))
    # After the answers: the floors search questions whose vectors are cached now (retrieval without the encoder).
    for mode in ("dense", "hybrid"):
        print(f"{label}: /v1/search {mode} …", flush=True)
        rows.append(_row(f"[{label}] POST /v1/search {mode} (retrieval floor, cached query vector)",
                         asyncio.run(_bench_target(svc.url, "/v1/search",
                                                   lambda i, m=mode: {"query": questions[i % n], "top_k": 8, "mode": m},
                                                   n, tenant=args.tenant, stream=False))))
    if label == "local LLM":
        llm_url = f"http://127.0.0.1:{args.llm_port}"
        print(f"{label}: raw llama-server …", flush=True)
        raw = lambda i: {"messages": [{"role": "user", "content": questions[i % n]}], "stream": True,  # noqa: E731
                         "max_tokens": 256, "temperature": 0}
        rows.append(_row("[local LLM] raw /v1/chat/completions (question only, floor)", asyncio.run(_bench_target(
            llm_url, "/v1/chat/completions", raw, n, tenant=args.tenant, sse_openai=True))))
    return rows


def _print_bench(rows: list[dict[str, Any]]) -> None:
    print(f"{'target':62}{'n':>5}{'TTFT p50':>10}{'p95':>8}{'total p50':>11}{'p95':>8}")
    fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    for r in rows:
        print(f"{r['target']:62}{r['requests']:>5}{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p95_ms']):>8}"
              f"{fmt(r['total_p50_ms']):>11}{fmt(r['total_p95_ms']):>8}")
    for r in rows:
        if "stage_share" in r:
            shares = ", ".join(f"{k} {v:.1%} (p50 {r['stage_p50_ms'][k]} ms)" for k, v in r["stage_share"].items())
            print(f"time share {r['target']}: {shares}")
