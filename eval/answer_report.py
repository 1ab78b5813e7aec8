"""Reports of an answer evaluation: ``report.json``, a self-contained ``report.html`` (in the look of
every eval report, :mod:`eval.report`), and the summary printed to stdout; each with the ragas
section when the run computed one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.answer_curves import answer_curves, curves_html
from eval.answer_scoring import AnswerRow, summarise
from eval.report import CSS, esc

__all__ = ["REPORT_SCHEMA", "format_curves", "format_ragas", "format_summary", "render_html", "write_answer_report"]

REPORT_SCHEMA = "rag-eval/answers/1"

_TABLE_ROWS = (
    ("answer rate (answerable)", "answer_rate"), ("abstain rate (unanswerable)", "abstain_rate_unanswerable"),
    ("answer contains gold", "contains_gold"), ("  … when answered", "contains_gold_when_answered"),
    ("citations contain gold", "cited_contains_gold"), ("  … when answered", "cited_contains_gold_when_answered"),
    ("citation precision", "citation_precision"), ("cited a gold document", "cited_gold_doc"),
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


def format_curves(curves: dict[str, Any]) -> str:
    """The answerability figures of report.json's ``curves``, as printed after the summary."""
    rel, tr = curves["reliability"], curves["tradeoff"]
    ece = "-" if rel["ece_correct"] is None else f"{rel['ece_correct']:.3f}"
    line = f"  {'predicted by':30}{rel['source']}; calibration error {ece}"
    if tr["auc"] is not None:
        line += f"; AUC {tr['auc']:.3f}"
    return line + ("" if tr["kind"] == "answer_vs_abstain" else "\n  (no unanswerable questions: the trade-off "
                   "plot shows answer rate vs contains-gold precision)")


def render_html(report: dict[str, Any]) -> str:
    s = report["summary"]
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
    return (f"<!doctype html><html><head><meta charset=utf-8><title>answer eval</title><style>{CSS}</style></head><body>"
            f"<h1>Answer quality — {esc(report['meta'].get('dataset'))}</h1><table class=meta>{meta}</table>"
            f"<h2>Summary</h2><table><tr><th class=l>metric</th><th>value</th></tr>{rows}</table>"
            f"{curves_html(report['curves']) if report.get('curves') else ''}{_ragas_html(report)}"
            f"<h2>Misses (first 200)</h2><table><tr><th class=l>question</th><th class=l>gold</th><th class=l>answer</th>"
            f"<th>support</th></tr>{miss_rows}</table></body></html>")


def write_answer_report(out: Path, meta: dict[str, Any], rows: list[AnswerRow],
                        ragas: dict[str, Any] | None = None) -> dict[str, Any]:
    report = {"schema": REPORT_SCHEMA, "meta": meta, "summary": summarise(rows), "curves": answer_curves(rows),
              "rows": rows}
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
