"""Reports of a retrieval evaluation: ``report.json``, a self-contained ``report.html``, TREC run files,
the comparison table printed to stdout, and ``compare`` (two reports side by side, a regression gate).
"""

from __future__ import annotations

import html
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from eval.metrics import CURVE_KS, DEFAULT_METRICS, paired_bootstrap_ci, parse_metric

__all__ = [
    "COLORS",
    "CSS",
    "REPORT_SCHEMA",
    "CompareError",
    "build_report",
    "compare_reports",
    "esc",
    "format_table",
    "git_info",
    "load_report",
    "render_html",
    "write_reports",
]

REPORT_SCHEMA = "rag-eval/retrieval/1"
_TOP_IN_REPORT = 10  # retrieved documents kept per query in report.json (the full runs go to runs/*.trec)


class CompareError(Exception):
    """A usage problem with ``compare`` (missing file, unknown metric or mode): exit status 2."""


def git_info(cwd: Path | None = None) -> dict[str, Any]:
    cwd = cwd or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def build_report(run) -> dict[str, Any]:
    """The JSON-ready report of an :class:`eval.retrieval.RetrievalRun`."""
    ds = run.dataset
    opts = run.options
    modes: dict[str, Any] = {}
    for mode, res in run.results.items():
        s = res.summary
        per_query = []
        for qid in run.query_ids:
            judged = ds.qrels.get(qid, {})
            ranking = res.runs.get(qid, [])
            first = next((i + 1 for i, (d, _) in enumerate(ranking) if judged.get(d, 0) > 0), None)
            per_query.append({
                "id": qid, "query": ds.queries[qid],
                "metrics": {k: _num(v) for k, v in s.per_query.get(qid, {}).items()},
                "relevant": judged, "first_relevant_rank": first,
                "top": [[d, round(score, 6), judged.get(d, 0)] for d, score in ranking[:_TOP_IN_REPORT]],
            })
        modes[mode] = {
            "metrics": {k: _num(v) for k, v in s.metrics.items()},
            "ci95": {k: [_num(lo), _num(hi)] for k, (lo, hi) in s.ci.items()},
            "curves": {f: {str(k): _num(v) for k, v in by_k.items()} for f, by_k in s.curves.items()},
            "queries_evaluated": s.evaluated, "queries_skipped_no_qrels": s.skipped,
            "queries_no_relevant": s.no_relevant, "queries_no_results": s.no_results,
            "latency_ms": res.latency_ms, "seconds": res.seconds, "per_query": per_query,
        }
    return {
        "schema": REPORT_SCHEMA,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(run.started_at)),
        "dataset": {
            "name": ds.name, "path": str(ds.root), "split": ds.split, "hash": ds.hash,
            "corpus_sha256": ds.corpus_hash, "files": [p.relative_to(ds.root).as_posix() for p in ds.files],
            "queries_in_split": len(ds.qrels), "queries_run": len(run.query_ids),
            "limit_queries": opts.limit_queries or None,
        },
        "encoder_version": run.encoder_version,
        "target": run.target,
        "git": git_info(),
        "settings": run.settings,
        "options": {"top_chunks": opts.top_chunks, "top_docs": opts.top_docs, "tenant": opts.tenant,
                    "ignore_identical_ids": opts.ignore_identical_ids, "bootstrap_resamples": opts.resamples,
                    "bootstrap_seed": opts.seed, "doc_score": "max over the document's retrieved chunks",
                    "ties": "score descending, then document id descending (trec_eval)"},
        "index": None if run.index is None else {
            k: getattr(run.index, k) for k in ("data_dir", "collection", "reused", "documents", "failed_documents",
                                               "chunks", "ingest_s", "signature", "failures")
        },
        "extra": run.extra,
        "modes": modes,
    }


def _trec_lines(mode: str, runs: dict[str, list[tuple[str, float]]]) -> list[str]:
    return [f"{qid} Q0 {doc} {i + 1} {score:.6f} {mode}" for qid, ranking in runs.items()
            for i, (doc, score) in enumerate(ranking)]


def write_reports(run, out_dir: Path, report: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.html`` and ``runs/<mode>.trec`` (TREC run format) under ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    report = build_report(run) if report is None else report
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False))
    paths["html"].write_text(render_html(report), encoding="utf-8")
    for mode, res in run.results.items():
        p = out_dir / "runs" / f"{mode}.trec"
        p.write_text("\n".join(_trec_lines(mode, res.runs)) + "\n")
        paths[f"run-{mode}"] = p
    return paths


# ---------------------------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------------------------


def format_table(report: dict[str, Any], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """Modes as rows, metrics as columns: ``mean [ci low, ci high]``."""
    width = 22
    lines = [f"{'mode':8}" + "".join(f"{m:>{width}}" for m in metrics) + f"{'p50 ms':>9}{'p95 ms':>9}"]
    for mode, m in report["modes"].items():
        cells = []
        for name in metrics:
            v = m["metrics"].get(name)
            lo, hi = m["ci95"].get(name, [None, None])
            cells.append(f"{v:.4f} [{lo:.3f},{hi:.3f}]" if v is not None else "-")
        lat = m.get("latency_ms") or {}
        lines.append(f"{mode:8}" + "".join(f"{c:>{width}}" for c in cells)
                     + f"{lat.get('p50_ms', float('nan')):>9.1f}{lat.get('p95_ms', float('nan')):>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# HTML (inline CSS and SVG, nothing fetched)
# ---------------------------------------------------------------------------------------------

# One look for every eval report (retrieval, answers, drift): they share these three helpers.
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}.ci{color:#777;font-size:12px}
.meta td{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:16px}
.q{max-width:520px;text-align:left;white-space:normal}.small{font-size:12px;color:#555}
.zero{background:#fdecea}details{margin:8px 0}code{font-size:12px}
"""


def esc(x: Any) -> str:
    """``x`` as text safe inside HTML, attribute values included."""
    return html.escape(str(x), quote=True)


def _histogram_svg(values: list[float], title: str, color: str, bins: int = 10) -> str:
    w, h, pad_l, pad_b, pad_t = 360, 220, 40, 36, 24
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    top = max(counts) or 1
    bw = (w - pad_l - 10) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{esc(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    plot_h = h - pad_b - pad_t
    for i, c in enumerate(counts):
        bh = plot_h * c / top
        x = pad_l + i * bw
        y = pad_t + plot_h - bh
        parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" fill="{color}">'
                     f'<title>{i / bins:.1f}–{(i + 1) / bins:.1f}: {c} queries</title></rect>')
        if c:
            parts.append(f'<text x="{x + bw / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">{c}</text>')
    base = pad_t + plot_h
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{w - 10}" y2="{base}" stroke="#333"/>')
    for i in range(0, bins + 1, 2):
        x = pad_l + i * bw
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle" font-size="10">{i / bins:.1f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 4}" text-anchor="middle" font-size="11">per-query value</text>')
    parts.append(f'<text x="12" y="{pad_t + plot_h / 2}" font-size="11" transform="rotate(-90 12 {pad_t + plot_h / 2})"'
                 ' text-anchor="middle">queries</text>')
    parts.append("</svg>")
    return "".join(parts)


def _curve_svg(series: dict[str, dict[int, float]], title: str) -> str:
    """Lines of metric vs k (log-spaced x axis) for each mode."""
    w, h, pad_l, pad_r, pad_b, pad_t = 360, 240, 44, 12, 40, 24
    ks = sorted({k for s in series.values() for k in s})
    if not ks:
        return ""
    lo_x, hi_x = math.log(ks[0]), math.log(ks[-1]) if ks[-1] > ks[0] else math.log(ks[0]) + 1
    plot_w, plot_h = w - pad_l - pad_r, h - pad_t - pad_b

    def px(k: int) -> float:
        return pad_l + plot_w * (math.log(k) - lo_x) / (hi_x - lo_x)

    def py(v: float) -> float:
        return pad_t + plot_h * (1 - v)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{esc(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    for t in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{pad_l}" y1="{py(t):.1f}" x2="{w - pad_r}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{pad_l - 4}" y="{py(t) + 3:.1f}" text-anchor="end" font-size="10">{t:g}</text>')
    for k in ks:
        parts.append(f'<text x="{px(k):.1f}" y="{pad_t + plot_h + 14}" text-anchor="middle" font-size="10">{k}</text>')
    parts.append(f'<text x="{pad_l + plot_w / 2}" y="{h - 14}" text-anchor="middle" font-size="11">k</text>')
    for i, (mode, by_k) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        pts = [(px(k), py(v)) for k, v in sorted(by_k.items()) if v is not None]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        for (x, y), (k, v) in zip(pts, sorted(by_k.items()), strict=False):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{esc(mode)} @{k}: {v:.4f}'
                         '</title></circle>')
        parts.append(f'<rect x="{pad_l + 8 + i * 80}" y="{h - 10}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{pad_l + 22 + i * 80}" y="{h - 6}" font-size="10">{esc(mode)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    ds = report["dataset"]
    modes = report["modes"]
    metrics = list(next(iter(modes.values()))["metrics"]) if modes else list(DEFAULT_METRICS)
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>Retrieval eval: {esc(ds['name'])} / {esc(ds['split'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Retrieval evaluation — {esc(ds['name'])} ({esc(ds['split'])})</h1>"]
    out.append("<table class='meta'>" + "".join(f"<tr><th class='l'>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                                 for k, v in _meta_rows(report)) + "</table>")
    out += _summary_html(modes, metrics)
    notes = _notes(modes)
    if notes:
        out.append("<p class='small'>" + "<br>".join(esc(n) for n in notes) + "</p>")

    out.append("<h2>Metric vs k</h2><div class='grid'>")
    names = {"ndcg": "nDCG@k", "recall": "recall@k", "p": "precision@k", "mrr": "MRR@k"}
    for family, label in names.items():
        series = {mode: {int(k): v for k, v in m["curves"].get(family, {}).items()} for mode, m in modes.items()}
        out.append(_curve_svg(series, label))
    out.append("</div>")

    out.append("<h2>Per-query nDCG@10 distribution</h2><div class='grid'>")
    for i, (mode, m) in enumerate(modes.items()):
        values = [q["metrics"].get("ndcg@10") for q in m["per_query"] if q["metrics"].get("ndcg@10") is not None]
        zero = sum(1 for v in values if v == 0)
        out.append(_histogram_svg(values, f"{mode}: nDCG@10 ({len(values)} queries, {zero} at 0)",
                                  COLORS[i % len(COLORS)]))
    out.append("</div>")
    out += _per_query_html(modes)
    out.append("<p class='small'>Metrics follow trec_eval / pytrec_eval (BEIR): nDCG with linear graded gains and "
               "log2(rank+1) discount, recall = relevant retrieved / all relevant, P@k over k, MRR cut at k. "
               f"Curves at k = {', '.join(map(str, CURVE_KS))}.</p>")
    out.append("</body></html>")
    return "\n".join(out)


def _meta_rows(report: dict[str, Any]) -> list[tuple[str, Any]]:
    ds = report["dataset"]
    git = report.get("git") or {}
    index = report.get("index") or {}
    settings = report.get("settings") or {}
    return [
        ("created", report["created_at"]), ("target", report["target"]), ("encoder", report["encoder_version"]),
        ("git commit", f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}"),
        ("dataset hash", ds["hash"]), ("queries run", f"{ds['queries_run']} of {ds['queries_in_split']}"),
        ("chunking", f"{settings.get('chunk_tokens', '?')} tokens, overlap {settings.get('chunk_overlap', '?')}, "
                     f"{settings.get('tokenizer_encoding', '?')}"),
        ("index", f"{index.get('documents', '?')} documents, {index.get('chunks', '?')} chunks, "
                  f"{index.get('failed_documents', 0)} failed, {'reused' if index.get('reused') else 'built'} "
                  f"in {index.get('data_dir', '?')}" if index else "the service's"),
        ("ranking", f"top {report['options']['top_chunks']} chunks → documents by best chunk, first "
                    f"{report['options']['top_docs']} kept; ties: {report['options']['ties']}"),
    ]


def _summary_html(modes: dict[str, Any], metrics: list[str]) -> list[str]:
    out = ["<h2>Summary (mean over queries, 95% bootstrap CI)</h2><table><tr><th class='l'>mode</th>"
           + "".join(f"<th>{esc(m)}</th>" for m in metrics) + "<th>queries</th><th>p50 / p95 ms</th></tr>"]
    for mode, m in modes.items():
        cells = []
        for name in metrics:
            v = m["metrics"].get(name)
            lo, hi = m["ci95"].get(name, [None, None])
            cells.append(f"<td>{v:.4f}<br><span class='ci'>[{lo:.3f}, {hi:.3f}]</span></td>" if v is not None
                         else "<td>-</td>")
        lat = m.get("latency_ms") or {}
        out.append(f"<tr><td class='l'>{esc(mode)}</td>{''.join(cells)}<td>{m['queries_evaluated']}</td>"
                   f"<td>{lat.get('p50_ms', '-')} / {lat.get('p95_ms', '-')}</td></tr>")
    out.append("</table>")
    return out


def _notes(modes: dict[str, Any]) -> list[str]:
    notes = []
    for mode, m in modes.items():
        if m["queries_skipped_no_qrels"]:
            notes.append(f"{mode}: {len(m['queries_skipped_no_qrels'])} queries skipped (no qrels)")
        if m["queries_no_relevant"]:
            notes.append(f"{mode}: {len(m['queries_no_relevant'])} queries have no relevant document (score 0)")
        if m["queries_no_results"]:
            notes.append(f"{mode}: {len(m['queries_no_results'])} queries retrieved nothing")
    return notes


def _per_query_html(modes: dict[str, Any]) -> list[str]:
    out = ["<h2>Per query</h2><details><summary>table of every query (rows with nDCG@10 = 0 in any mode are "
           "shaded)</summary><table><tr><th class='l'>query</th><th class='l'>text</th><th>relevant</th>"]
    for mode in modes:
        out.append(f"<th>{esc(mode)}<br>nDCG@10</th><th>{esc(mode)}<br>R@100</th><th>{esc(mode)}<br>1st rel</th>")
    out.append("</tr>")
    by_mode = {mode: {q["id"]: q for q in m["per_query"]} for mode, m in modes.items()}
    first_mode = next(iter(modes), None)
    for q in (modes[first_mode]["per_query"] if first_mode else []):
        rows = [by_mode[mode].get(q["id"], {}) for mode in modes]
        shade = any((r.get("metrics") or {}).get("ndcg@10") == 0 for r in rows)
        cells = ""
        for r in rows:
            mm = r.get("metrics") or {}
            nd, rc = mm.get("ndcg@10"), mm.get("recall@100")
            cells += (f"<td>{'-' if nd is None else f'{nd:.3f}'}</td><td>{'-' if rc is None else f'{rc:.2f}'}</td>"
                      f"<td>{r.get('first_relevant_rank') or '-'}</td>")
        out.append(f"<tr{' class=zero' if shade else ''}><td class='l'><code>{esc(q['id'])}</code></td>"
                   f"<td class='q'>{esc(q['query'])}</td><td>{len([g for g in q['relevant'].values() if g > 0])}</td>"
                   f"{cells}</tr>")
    out.append("</table></details>")
    return out


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def load_report(path: Path) -> dict[str, Any]:
    """A ``report.json`` (or a folder holding one); :class:`CompareError` if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("modes"), dict) or not report["modes"]:
        raise CompareError(f"{path}: not a retrieval report (no 'modes')")
    report["_path"] = str(path)
    return report


def _metric_value(mode_report: dict[str, Any], metric: str) -> float | None:
    if metric in mode_report.get("metrics", {}):
        return mode_report["metrics"][metric]
    family, k = parse_metric(metric)
    return mode_report.get("curves", {}).get(family, {}).get(str(k))


def _per_query(mode_report: dict[str, Any], metric: str) -> dict[str, float]:
    return {q["id"]: q["metrics"][metric] for q in mode_report.get("per_query", [])
            if q.get("metrics", {}).get(metric) is not None}


def compare_reports(
    a: dict[str, Any], b: dict[str, Any], *, metric: str, max_drop: float, mode: str | None = None,
) -> tuple[str, bool]:
    """Side-by-side text of baseline ``a`` and candidate ``b``, and whether ``metric`` regressed.

    A regression is ``b - a < -max_drop`` in any compared mode (all modes both reports hold, or
    just ``mode``). Raises :class:`CompareError` on an unknown metric or mode.
    """
    try:
        metric = "{}@{}".format(*parse_metric(metric))
    except ValueError as exc:
        raise CompareError(str(exc)) from None
    if not (max_drop >= 0 and math.isfinite(max_drop)):
        raise CompareError(f"--max-drop must be a finite number >= 0, not {max_drop}")
    common = _compared_modes(a, b, metric, mode)
    lines = [f"A (baseline):  {a['_path']}  encoder={a.get('encoder_version')}  "
             f"commit={str((a.get('git') or {}).get('commit'))[:12]}",
             f"B (candidate): {b['_path']}  encoder={b.get('encoder_version')}  "
             f"commit={str((b.get('git') or {}).get('commit'))[:12]}"]
    da, db = a.get("dataset", {}), b.get("dataset", {})
    if da.get("hash") != db.get("hash") or da.get("split") != db.get("split"):
        lines.append(f"WARNING: different data: A {da.get('name')}/{da.get('split')} {str(da.get('hash'))[:12]} vs "
                     f"B {db.get('name')}/{db.get('split')} {str(db.get('hash'))[:12]}")
    names = list(dict.fromkeys([*DEFAULT_METRICS, metric]))
    regressed = False
    for m in common:
        ma, mb = a["modes"][m], b["modes"][m]
        lines.append("")
        lines.append(f"mode {m}  (queries: A {ma.get('queries_evaluated')}, B {mb.get('queries_evaluated')})")
        lines.append(f"  {'metric':12}{'A':>10}{'B':>10}{'B - A':>10}   paired 95% CI of B - A")
        for name in names:
            va, vb = _metric_value(ma, name), _metric_value(mb, name)
            if va is None or vb is None:
                continue
            qa, qb = _per_query(ma, name), _per_query(mb, name)
            shared = sorted(set(qa) & set(qb))
            ci = ""
            if shared and len(shared) == len(qa) == len(qb):
                lo, hi = paired_bootstrap_ci([qa[q] for q in shared], [qb[q] for q in shared])
                ci = f"[{lo:+.4f}, {hi:+.4f}]"
            mark = ""
            if name == metric:
                bad = vb - va < -max_drop
                regressed |= bad
                mark = "  <- REGRESSION" if bad else "  <- gate ok"
            lines.append(f"  {name:12}{va:>10.4f}{vb:>10.4f}{vb - va:>+10.4f}   {ci}{mark}")
    verdict = "FAIL" if regressed else "PASS"
    lines.append("")
    lines.append(f"{verdict}: {metric} {'dropped' if regressed else 'did not drop'} by more than {max_drop:g} "
                 f"in {'mode ' + mode if mode else 'modes ' + ', '.join(common)}")
    return "\n".join(lines), regressed


def _compared_modes(a: dict[str, Any], b: dict[str, Any], metric: str, mode: str | None) -> list[str]:
    """The modes both reports hold (or just ``mode``), each with ``metric``; else :class:`CompareError`."""
    common = [m for m in a["modes"] if m in b["modes"]]
    if mode is not None:
        missing = [p for p, r in (("A", a), ("B", b)) if mode not in r["modes"]]
        if missing:
            raise CompareError(f"mode {mode!r} is not in report {' and '.join(missing)} "
                               f"(A has {sorted(a['modes'])}, B has {sorted(b['modes'])})")
        common = [mode]
    if not common:
        raise CompareError(f"the reports share no mode (A has {sorted(a['modes'])}, B has {sorted(b['modes'])})")
    for m in common:
        for label, r in (("A", a), ("B", b)):
            if _metric_value(r["modes"][m], metric) is None:
                raise CompareError(f"metric {metric} is not in report {label} for mode {m!r}")
    return common
