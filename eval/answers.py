"""Answer quality on SQuAD 2.0 dev through the real service (POST /v1/answer), abstention calibration,
and the streaming answer benchmark.

Scoring is offline and SQuAD-style: answers are normalised like SQuAD's ``normalize_answer``
(lower case, no punctuation, no articles, single spaces) before containment, exact match and token F1.
Calibration and reporting use disjoint halves of the questions (:func:`split_of`, a hash of the
question id), so a threshold is never tuned on the questions it is reported on.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import html
import json
import math
import os
import random
import re
import string
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from eval.datasets import QAExample, load_qa

REPORT_SCHEMA = "rag-eval/answers/1"
SEED = 13
SPLITS = ("calibration", "report")

# ---------------------------------------------------------------------------------------------
# Split and sample
# ---------------------------------------------------------------------------------------------


def split_of(question_id: str) -> str:
    """``calibration`` or ``report``: a stable half of the questions, decided by a hash of the id."""
    digest = hashlib.sha256(f"rag-eval-split:{question_id}".encode()).digest()
    return SPLITS[digest[0] & 1]


def sample_questions(examples: Sequence[QAExample], *, split: str, limit: int, seed: int = SEED) -> list[QAExample]:
    """The first ``limit`` answerable and first ``limit`` unanswerable questions of ``split`` after a
    seeded shuffle (0: all of them), interleaved (answerable, unanswerable, …) so that a partial run
    holds both kinds."""
    pool = sorted((e for e in examples if split_of(e.id) == split), key=lambda e: e.id)
    random.Random(seed).shuffle(pool)
    answerable = [e for e in pool if not e.is_impossible]
    impossible = [e for e in pool if e.is_impossible]
    if limit:
        answerable, impossible = answerable[:limit], impossible[:limit]
    out: list[QAExample] = []
    for i in range(max(len(answerable), len(impossible))):
        out += answerable[i : i + 1] + impossible[i : i + 1]
    return out


# ---------------------------------------------------------------------------------------------
# Scoring (SQuAD normalisation)
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—", "…"}
_CITE_MARK = re.compile(r"\[\d{1,3}\]")
_DONT_KNOW = re.compile(r"\b(i don'?t know|i do not know|not (?:mentioned|stated|provided) in the (?:sources|text|context))\b", re.I)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def strip_citations(text: str) -> str:
    return _CITE_MARK.sub(" ", text)


def contains_answer(text: str, golds: Iterable[str]) -> bool:
    """True when some normalised gold answer occurs in the normalised text as whole words."""
    hay = f" {normalize_answer(strip_citations(text))} "
    for g in golds:
        n = normalize_answer(g)
        if n and f" {n} " in hay:
            return True
    return False


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    p = normalize_answer(strip_citations(prediction))
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    p = normalize_answer(strip_citations(prediction)).split()
    scores = [_f1(p, normalize_answer(g).split()) for g in golds]
    return max(scores, default=0.0)


def citations_contain(citations: Sequence[dict[str, Any]], golds: Iterable[str]) -> bool:
    """Some cited source text contains a gold answer."""
    golds = list(golds)
    return any(contains_answer(c.get("text", ""), golds) for c in citations)


def citation_precision(citations: Sequence[dict[str, Any]], golds: Iterable[str]) -> float | None:
    """Share of the cited sources that contain a gold answer (None when nothing is cited)."""
    golds = list(golds)
    if not citations:
        return None
    return sum(contains_answer(c.get("text", ""), golds) for c in citations) / len(citations)


def score_one(example: QAExample, response: dict[str, Any]) -> dict[str, Any]:
    """Per-question scores from one /v1/answer JSON response."""
    answered = bool(response.get("answerable"))
    text = response.get("answer", "") if answered else ""
    cites = response.get("citations") or []
    row: dict[str, Any] = {
        "id": example.id, "question": example.question, "is_impossible": example.is_impossible,
        "golds": list(example.answers), "answered": answered, "mode": response.get("mode"),
        "answer": response.get("answer", ""), "latency_ms": response.get("_client_ms"),
        "support_score": (response.get("retrieval") or {}).get("support_score"),
        "cited_docs": [c.get("document_id") for c in cites], "fallback_reason": response.get("fallback_reason"),
        # answered, yet the text says it does not know (a generative answer that abstains in words)
        "says_unknown": answered and bool(_DONT_KNOW.search(text)),
    }
    if example.is_impossible:
        row["abstained"] = not answered
    else:
        row.update({
            "contains_gold": answered and contains_answer(text, example.answers),
            "cited_contains_gold": answered and citations_contain(cites, example.answers),
            "citation_precision": citation_precision(cites, example.answers) if answered else None,
            "cited_gold_doc": answered and any(c.get("document_id") in example.gold_doc_ids for c in cites),
            "em": exact_match(text, example.answers) if answered else 0.0,
            "f1": f1_score(text, example.answers) if answered else 0.0,
        })
    return row


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate metrics over scored rows (errors excluded and counted)."""
    ok = [r for r in rows if not r.get("error")]
    ans = [r for r in ok if not r["is_impossible"]]
    imp = [r for r in ok if r["is_impossible"]]
    answered = [r for r in ans if r["answered"]]
    precisions = [r["citation_precision"] for r in answered if r.get("citation_precision") is not None]
    lat = [r["latency_ms"] for r in ok if r.get("latency_ms") is not None]
    return {
        "questions": len(rows), "errors": len(rows) - len(ok),
        "answerable": len(ans), "unanswerable": len(imp),
        "answer_rate": _mean([float(r["answered"]) for r in ans]),
        "abstain_rate_unanswerable": _mean([float(r["abstained"]) for r in imp]),
        "contains_gold": _mean([float(r["contains_gold"]) for r in ans]),
        "contains_gold_when_answered": _mean([float(r["contains_gold"]) for r in answered]),
        "cited_contains_gold": _mean([float(r["cited_contains_gold"]) for r in ans]),
        "cited_contains_gold_when_answered": _mean([float(r["cited_contains_gold"]) for r in answered]),
        "citation_precision": _mean(precisions),
        "cited_gold_doc": _mean([float(r["cited_gold_doc"]) for r in ans]),
        "em": _mean([r["em"] for r in ans]), "f1": _mean([r["f1"] for r in ans]),
        "answered_but_says_unknown": {"answerable": sum(r["says_unknown"] for r in ans),
                                      "unanswerable": sum(r["says_unknown"] for r in imp)},
        "modes": dict(collections.Counter(r["mode"] for r in ok if r["answered"])),
        "fallbacks": dict(collections.Counter(r["fallback_reason"] for r in ok if r["answered"] and r.get("fallback_reason"))),
        "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
    }


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def pick_threshold(answerable: Sequence[float], unanswerable: Sequence[float], target_answer_rate: float) -> float:
    """The largest threshold (answer when score >= threshold) that still answers at least
    ``target_answer_rate`` of the answerable questions; the largest abstains on the most unanswerable."""
    if not answerable:
        raise ValueError("no answerable scores")
    if not 0 < target_answer_rate <= 1:
        raise ValueError("target_answer_rate must be in (0, 1]")
    ordered = sorted(answerable, reverse=True)
    k = math.ceil(target_answer_rate * len(ordered) - 1e-9)
    return ordered[max(k, 1) - 1]


def rate_at(scores: Sequence[float], threshold: float) -> float:
    return sum(s >= threshold for s in scores) / len(scores) if scores else 0.0


def roc_table(answerable: Sequence[float], unanswerable: Sequence[float], thresholds: Iterable[float]) -> list[dict[str, float]]:
    return [{"threshold": round(t, 4), "answer_rate": rate_at(answerable, t),
             "abstain_rate_unanswerable": 1 - rate_at(unanswerable, t) if unanswerable else 0.0}
            for t in sorted(set(thresholds))]


def auc(answerable: Sequence[float], unanswerable: Sequence[float]) -> float | None:
    """P(score of an answerable > score of an unanswerable), ties count half."""
    if not answerable or not unanswerable:
        return None
    wins = 0.0
    for a in answerable:
        for u in unanswerable:
            wins += 1.0 if a > u else 0.5 if a == u else 0.0
    return wins / (len(answerable) * len(unanswerable))


# ---------------------------------------------------------------------------------------------
# Service and requests
# ---------------------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_service(data_dir: Path, port: int, env_overrides: dict[str, str], log_path: Path | None = None) -> Service:
    """``python -m rag serve`` on ``port`` with its own data dir; RAG_* of this process are passed on
    unless overridden."""
    env = dict(os.environ)
    env.update({"RAG_DATA_DIR": str(data_dir), "RAG_PORT": str(port), "RAG_LOG_LEVEL": "warning", **env_overrides})
    data_dir.mkdir(parents=True, exist_ok=True)
    out = (log_path or data_dir / f"serve-{port}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "rag", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    svc = Service(url=f"http://127.0.0.1:{port}", proc=proc)
    try:
        wait_ready(svc.url, proc)
    except BaseException:
        svc.stop()
        raise
    return svc


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"error: the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("error: the service did not become ready")


def upload_corpus(url: str, dataset: Path, tenant: str) -> str:
    from ingest.cli import add_via_api

    summary = add_via_api(url, [dataset / "corpus.jsonl"], tenant=tenant)
    return "\n".join(summary.lines())


async def ask_all(url: str, examples: Sequence[QAExample], *, tenant: str, concurrency: int = 2, top_k: int = 8,
                  on_result=None, timeout_s: float = 180) -> list[tuple[QAExample, dict[str, Any]]]:
    """POST /v1/answer for each question; ``on_result(example, response)`` as each one lands."""
    queue = list(enumerate(examples))
    results: dict[int, tuple[QAExample, dict[str, Any]]] = {}
    it = iter(queue)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers={"X-Tenant": tenant}) as client:
        async def worker() -> None:
            for i, ex in it:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/answer", json={"question": ex.question, "top_k": top_k})
                    body = r.json() if r.status_code == 200 else {"error": f"HTTP {r.status_code}: {r.text[:300]}"}
                except httpx.HTTPError as exc:
                    body = {"error": f"{type(exc).__name__}: {exc}"}
                body["_client_ms"] = round((time.perf_counter() - t0) * 1000, 2)
                results[i] = (ex, body)
                if on_result is not None:
                    on_result(ex, body)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [results[i] for i in sorted(results)]


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

_TABLE_ROWS = (
    ("answer rate (answerable)", "answer_rate"), ("abstain rate (unanswerable)", "abstain_rate_unanswerable"),
    ("answer contains gold", "contains_gold"), ("  … when answered", "contains_gold_when_answered"),
    ("citations contain gold", "cited_contains_gold"), ("  … when answered", "cited_contains_gold_when_answered"),
    ("citation precision", "citation_precision"), ("cited the gold paragraph", "cited_gold_doc"),
    ("exact match", "em"), ("token F1", "f1"),
)


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['answerable']} answerable + {s['unanswerable']} unanswerable questions ({s['errors']} errors)"]
    for label, key in _TABLE_ROWS:
        v = s.get(key)
        lines.append(f"  {label:30}{'-' if v is None else f'{100 * v:7.1f} %':>10}")
    lines.append(f"  {'modes':30}{json.dumps(s['modes'])}")
    lines.append(f"  {'answered, says unknown':30}{json.dumps(s['answered_but_says_unknown'])}")
    if s.get("fallbacks"):
        lines.append(f"  {'fallbacks':30}{json.dumps(s['fallbacks'])}")
    p50, p95 = s.get("latency_p50_ms"), s.get("latency_p95_ms")
    lines.append(f"  {'latency p50 / p95':30}{p50 or 0:8.0f} / {p95 or 0:.0f} ms")
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    from eval.report import _CSS  # one look for every eval report

    s = report["summary"]
    esc = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    rows = "".join(f"<tr><td class=l>{esc(label)}</td><td>{'-' if s.get(k) is None else f'{100 * s[k]:.1f} %'}</td></tr>"
                   for label, k in _TABLE_ROWS)
    rows += f"<tr><td class=l>modes</td><td>{esc(json.dumps(s['modes']))}</td></tr>"
    rows += f"<tr><td class=l>latency p50 / p95</td><td>{s['latency_p50_ms'] or 0:.0f} / {s['latency_p95_ms'] or 0:.0f} ms</td></tr>"
    meta = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in report["meta"].items())
    misses = [r for r in report["rows"] if not r.get("error") and (
        (r["is_impossible"] and not r["abstained"]) or (not r["is_impossible"] and not r["contains_gold"]))][:200]
    miss_rows = "".join(
        f"<tr><td class=q>{esc(r['question'])}</td><td class=q>{esc(' | '.join(r['golds']) or '(unanswerable)')}</td>"
        f"<td class=q>{esc(r['answer'][:400])}</td><td>{esc(r.get('support_score'))}</td></tr>" for r in misses)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>answer eval</title><style>{_CSS}</style></head><body>"
            f"<h1>Answer quality — {esc(report['meta'].get('dataset'))}</h1><table class=meta>{meta}</table>"
            f"<h2>Summary</h2><table><tr><th class=l>metric</th><th>value</th></tr>{rows}</table>{_ragas_html(report)}"
            f"<h2>Misses (first 200)</h2><table><tr><th class=l>question</th><th class=l>gold</th><th class=l>answer</th>"
            f"<th>support</th></tr>{miss_rows}</table></body></html>")


def write_answer_report(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                        ragas: dict[str, Any] | None = None) -> dict[str, Any]:
    report = {"schema": REPORT_SCHEMA, "meta": meta, "summary": summarise(rows), "rows": rows}
    if ragas is not None:
        report["ragas"] = ragas
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.html").write_text(render_html(report))
    return report


_RAGAS_ROWS = (
    ("semantic similarity", "semantic_similarity"), ("string similarity (Levenshtein)", "string_similarity"),
    ("context precision (non-LLM)", "context_precision"), ("context recall (non-LLM)", "context_recall"),
    ("answer correctness (judge)", "answer_correctness"), ("faithfulness (judge)", "faithfulness"),
)


def ragas_section(args, pairs: Sequence[tuple[QAExample, dict[str, Any]]],
                  rows: list[dict[str, Any]]) -> dict[str, Any] | None:
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


def format_ragas(section: dict[str, Any] | None) -> str:
    if section is None:
        return "ragas: skipped (--no-ragas)"
    if "error" in section:
        return f"ragas: {section['error']}"
    metrics = section["metrics"]
    judge = section["judge_metrics"] if not section["judge"] else f"judge {section['judge']['model']}"
    lines = [f"ragas {section['ragas_version']} on {section['population_size']} answered answerable questions "
             f"(similarity encoder {section['similarity_encoder']}; {judge})"]
    for label, key in _RAGAS_ROWS:
        m = metrics.get(key)
        if m is None:
            continue
        v = "-" if m["mean"] is None else f"{m['mean']:.3f}"
        failed = f", {m['failed']} failed" if m["failed"] else ""
        lines.append(f"  {label:32}{v:>8}   (n={m['scored']}{failed})")
        for reason, count in list(m["failure_reasons"].items())[:2]:
            lines.append(f"      {count} × {reason[:110]}")
    return "\n".join(lines)


def _ragas_html(report: dict[str, Any]) -> str:
    section = report.get("ragas")
    if not section:
        return ""
    esc = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    if "error" in section:
        return f"<h2>ragas</h2><p>{esc(section['error'])}</p>"
    rows = ""
    for label, key in _RAGAS_ROWS:
        m = section["metrics"].get(key)
        if m is None:
            continue
        value = "-" if m["mean"] is None else f"{m['mean']:.3f}"
        reasons = "; ".join(f"{c} × {r}" for r, c in m["failure_reasons"].items())
        rows += (f"<tr><td class=l>{esc(label)}</td><td>{value}</td><td>{m['scored']}</td><td>{m['failed']}</td>"
                 f"<td class=l>{esc(m['population'])}</td><td class=l>{esc(m['compares'])}"
                 f"{'<br>' + esc(reasons) if reasons else ''}</td></tr>")
    judge = section["judge"]
    note = esc(section["judge_metrics"] if not judge else f"judge {judge['model']} at {judge['url']}")
    return (f"<h2>ragas {esc(section['ragas_version'])}</h2><p>similarity encoder {esc(section['similarity_encoder'])}; "
            f"{note}</p><table><tr><th class=l>metric</th><th>mean</th><th>scored</th><th>failed</th>"
            f"<th class=l>population</th><th class=l>compares</th></tr>{rows}</table>")


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def _service_env(args) -> dict[str, str]:
    return {}


def run_answers(args) -> int:
    """``python -m eval answers``."""
    examples = load_qa(args.dataset / "qa.jsonl")
    chosen = sample_questions(examples, split="report", limit=args.limit, seed=args.seed)
    by_id = {e.id: e for e in examples}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    meta = {"dataset": str(args.dataset), "split": "report", "seed": args.seed, "limit_per_kind": args.limit,
            "git_commit": _git_commit(), "abstain_threshold_env": os.environ.get("RAG_ABSTAIN_THRESHOLD"),
            "llm_local_env": os.environ.get("RAG_LLM_LOCAL"), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.score_only:
        pairs = [(by_id[r["id"]], r["response"]) for r in map(json.loads, results_path.read_text().splitlines())
                 if r["id"] in by_id]
        rows = [score_one(ex, body) if "error" not in body else
                {"id": ex.id, "is_impossible": ex.is_impossible, "error": body["error"]} for ex, body in pairs]
        meta["partial"] = f"{len(rows)} of {len(chosen)}"
        report = write_answer_report(out, meta, rows, ragas_section(args, pairs, rows))
        print(format_summary(report["summary"]))
        print(format_ragas(report.get("ragas")))
        return 0
    svc = Service(url=args.url) if args.url else start_service(args.data_dir, args.port, {})
    try:
        if not args.no_upload:
            print("indexing the corpus (a no-op when the data dir already holds it) …", flush=True)
            print(upload_corpus(svc.url, args.dataset, args.tenant), flush=True)
        ready = httpx.get(f"{svc.url}/readyz", timeout=5).json()
        meta["service"] = ready
        fh = results_path.open("w")
        done = [0]
        t_start = time.perf_counter()

        def on_result(ex: QAExample, body: dict[str, Any]) -> None:
            fh.write(json.dumps({"id": ex.id, "response": body}) + "\n")
            fh.flush()
            done[0] += 1
            if done[0] % 25 == 0:
                print(f"  {done[0]}/{len(chosen)} in {time.perf_counter() - t_start:.0f}s", flush=True)

        pairs = asyncio.run(ask_all(svc.url, chosen, tenant=args.tenant, concurrency=args.concurrency,
                                    top_k=args.top_k, on_result=on_result))
        fh.close()
    finally:
        if svc.proc is not None:
            svc.stop()
    rows = [score_one(ex, body) if "error" not in body else
            {"id": ex.id, "is_impossible": ex.is_impossible, "error": body["error"]} for ex, body in pairs]
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = write_answer_report(out, meta, rows, ragas_section(args, pairs, rows))
    print(format_summary(report["summary"]))
    print(format_ragas(report.get("ragas")))
    print(f"wrote {out / 'report.json'}\nwrote {out / 'report.html'}")
    return 0


def run_calibrate(args) -> int:
    """``python -m eval calibrate``: support scores on the calibration split, extractive, nothing abstains."""
    examples = load_qa(args.dataset / "qa.jsonl")
    chosen = sample_questions(examples, split="calibration", limit=args.limit, seed=args.seed)
    if args.url:
        print("note: --url must point at a service run with RAG_LLM_LOCAL=no and RAG_ABSTAIN_THRESHOLD=0", flush=True)
        svc = Service(url=args.url)
    else:
        svc = start_service(args.data_dir, args.port, {"RAG_LLM_LOCAL": "no", "RAG_LLM_BASE_URL": "",
                                                       "RAG_ABSTAIN_THRESHOLD": "0"})
    try:
        if not args.no_upload:
            print("indexing the corpus (a no-op when the data dir already holds it) …", flush=True)
            print(upload_corpus(svc.url, args.dataset, args.tenant), flush=True)
        t0 = time.perf_counter()
        done = [0]

        def progress(ex: QAExample, body: dict[str, Any]) -> None:
            done[0] += 1
            if done[0] % 50 == 0:
                print(f"  {done[0]}/{len(chosen)} in {time.perf_counter() - t0:.0f}s", flush=True)

        pairs = asyncio.run(ask_all(svc.url, chosen, tenant=args.tenant, concurrency=args.concurrency, top_k=args.top_k,
                                    on_result=progress))
        elapsed = time.perf_counter() - t0
    finally:
        if svc.proc is not None:
            svc.stop()
    pos = [b["retrieval"]["support_score"] for ex, b in pairs if "error" not in b and not ex.is_impossible]
    neg = [b["retrieval"]["support_score"] for ex, b in pairs if "error" not in b and ex.is_impossible]
    errors = sum("error" in b for _, b in pairs)
    t = pick_threshold(pos, neg, args.target_answer_rate)
    # The response rounds support_score to 4 decimals while the service compares the raw score: step
    # down one unit so a question scored exactly at the threshold is still answered.
    chosen_t = round(t - 1e-4, 4)
    lo, hi = min(pos + neg), max(pos + neg)
    grid = [lo + (hi - lo) * i / 20 for i in range(21)] + [chosen_t]
    table = roc_table(pos, neg, grid)
    print(f"{len(pos)} answerable + {len(neg)} unanswerable calibration questions ({errors} errors), {elapsed:.0f}s")
    print(f"{'threshold':>10}{'answer %':>10}{'abstain % (unans.)':>20}")
    for row in table:
        mark = "  <- chosen" if row["threshold"] == chosen_t else ""
        print(f"{row['threshold']:>10.4f}{100 * row['answer_rate']:>10.1f}{100 * row['abstain_rate_unanswerable']:>20.1f}{mark}")
    area = auc(pos, neg)
    print(f"chosen threshold {chosen_t} (target answer rate {args.target_answer_rate}): answers "
          f"{100 * rate_at(pos, chosen_t):.1f} % of answerable, abstains on {100 * (1 - rate_at(neg, chosen_t)):.1f} % "
          f"of unanswerable; AUC {area:.3f}")
    result = {"schema": "rag-eval/calibration/1", "dataset": str(args.dataset), "split": "calibration",
              "seed": args.seed, "limit_per_kind": args.limit, "target_answer_rate": args.target_answer_rate,
              "threshold": chosen_t, "answer_rate": rate_at(pos, chosen_t),
              "abstain_rate_unanswerable": 1 - rate_at(neg, chosen_t), "auc": area, "answerable": len(pos),
              "unanswerable": len(neg), "errors": errors, "table": table, "git_commit": _git_commit(),
              "scores": {"answerable": pos, "unanswerable": neg}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


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
    headers = {"X-Tenant": tenant}
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
    n = len(questions)
    rows: list[dict[str, Any]] = []
    configs = [("extractive", {"RAG_LLM_LOCAL": "no", "RAG_LLM_BASE_URL": ""})]
    if not args.extractive_only:
        configs.append(("local LLM", {"RAG_LLM_LOCAL": "yes", "RAG_LLM_BASE_URL": "", "RAG_LLM_LOCAL_PORT": str(args.llm_port)}))
    if args.url:
        configs = [("service at --url", {})]
    warm = 3
    for label, env in configs:
        svc = Service(url=args.url) if args.url else start_service(args.data_dir, args.port, env)
        try:
            if not args.url and not args.no_upload:
                print(upload_corpus(svc.url, args.dataset, args.tenant), flush=True)
            body = lambda i: {"question": questions[i % n], "stream": True}  # noqa: E731
            asyncio.run(_bench_target(svc.url, "/v1/answer", lambda i: body(i + 1), warm, tenant=args.tenant))
            for mode in ("dense", "hybrid"):
                print(f"{label}: /v1/search {mode} …", flush=True)
                rows.append(_row(f"[{label}] POST /v1/search {mode} (retrieval floor)", asyncio.run(_bench_target(
                    svc.url, "/v1/search", lambda i, m=mode: {"query": questions[i % n], "top_k": 8, "mode": m}, n,
                    tenant=args.tenant, stream=False))))
            print(f"{label}: /v1/answer stream …", flush=True)
            rows.append(_row(f"[{label}] POST /v1/answer stream", asyncio.run(_bench_target(
                svc.url, "/v1/answer", body, n, tenant=args.tenant))))
            if label == "local LLM":
                llm_url = f"http://127.0.0.1:{args.llm_port}"
                print(f"{label}: raw llama-server …", flush=True)
                raw = lambda i: {"messages": [{"role": "user", "content": questions[i % n]}], "stream": True,  # noqa: E731
                                 "max_tokens": 256, "temperature": 0}
                rows.append(_row("[local LLM] raw /v1/chat/completions (question only, floor)", asyncio.run(_bench_target(
                    llm_url, "/v1/chat/completions", raw, n, tenant=args.tenant, sse_openai=True))))
        finally:
            svc.stop()
    print(f"{'target':62}{'n':>5}{'TTFT p50':>10}{'p95':>8}{'total p50':>11}{'p95':>8}")
    fmt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    for r in rows:
        print(f"{r['target']:62}{r['requests']:>5}{fmt(r['ttft_p50_ms']):>10}{fmt(r['ttft_p95_ms']):>8}"
              f"{fmt(r['total_p50_ms']):>11}{fmt(r['total_p95_ms']):>8}")
    for r in rows:
        if "stage_share" in r:
            shares = ", ".join(f"{k} {v:.1%} (p50 {r['stage_p50_ms'][k]} ms)" for k, v in r["stage_share"].items())
            print(f"time share {r['target']}: {shares}")
    return {"benchmark": "answer", "dataset": str(args.dataset), "requests": n, "rows": rows, "cpus": os.cpu_count(),
            "git_commit": _git_commit()}
