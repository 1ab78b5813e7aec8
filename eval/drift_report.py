"""Drift reports: ``report.json`` (the :class:`~eval.drift.DriftReport`), a self-contained ``report.html``
(tables and inline SVG histograms, nothing fetched) and the summary printed to stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from eval.drift import DriftReport
from eval.report import COLORS as _COLORS, CSS as _CSS, esc as _esc  # the shared look of eval reports

__all__ = ["format_summary", "render_drift_html", "write_drift_report"]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, threshold or note) rows shared by the text summary and the HTML."""
    t = report["thresholds"]
    rows: list[tuple[str, str, str]] = []
    if report.get("mmd"):
        m = report["mmd"]
        rows.append(("MMD² (RBF, unbiased)", _fmt(m["mmd2"]), f"drift if >= {t['min_mmd2']:g} and p < {t['p_value']:g}"))
        rows.append(("MMD permutation p", _fmt(m["p_value"]), f"{m['permutations']} permutations; null p99 "
                                                             f"{_fmt(m['null_p99'])}"))
    if report.get("classifier"):
        c = report["classifier"]
        rows.append(("classifier accuracy (chance 0.5)", _fmt(c["accuracy"]),
                     f"AUC {_fmt(c['auc'])}, binomial p {_fmt(c['p_value'], 3)}, {c['n_test']} held out"))
    if report.get("centroid"):
        c = report["centroid"]
        rows.append(("centroid shift (cosine distance)", _fmt(c["cosine"]),
                     f"drift if > {t['max_centroid_shift']:g} and p < {t['p_value']:g}; permutation p "
                     f"{_fmt(c.get('p_value'), 3)}"))
        rows.append(("centroid shift (L2, relative)", f"{_fmt(c['l2'])} ({_fmt(c['relative'])})",
                     f"norms {_fmt(c['reference_norm'])} → {_fmt(c['current_norm'])}"))
    if report.get("variance"):
        v = report["variance"]
        rows.append(("variance ratio cur/ref (min, median)", f"{_fmt(v['ratio_min'])}, {_fmt(v['ratio_median'])}",
                     f"collapse if a dimension < {v['min_variance_ratio']:g}"))
        rows.append(("collapsed dimensions", f"{v['collapsed_dims']} / {v['dimension']}",
                     f"near-zero variance: ref {v['near_zero_reference']}, cur {v['near_zero_current']}"))
    if report.get("nearest"):
        n = report["nearest"]
        rows.append(("best cosine to reference (median)", f"ref {_fmt(n['reference_median'])}, "
                                                          f"cur {_fmt(n['current_median'])}", "report only"))
        rows.append(("novel share of current", _fmt(n["novel_share"]), f"≈ 0.05 without drift (cut {_fmt(n['novelty_cut'])})"))
    if report.get("overlap"):
        o = report["overlap"]
        rows.append((f"neighbour overlap@{o['k']} (mean)", _fmt(o["mean"]),
                     f"drift if < {t['min_neighbour_overlap']:g}; p10 {_fmt(o['p10'])}, none kept {_fmt(o['zero_share'])}"))
        if o.get("paired_cosine") is not None:
            rows.append(("same text, cosine across encoders", _fmt(o["paired_cosine"]), "report only"))
    return rows


def format_summary(report: DriftReport | dict[str, Any]) -> str:
    r = msgspec.to_builtins(report) if isinstance(report, DriftReport) else report
    ref, cur = r["reference"], r["current"]
    lines = [f"reference: {ref['label']}  {ref['source']}  ({ref['kind']}, {ref['count_used']} of {ref['count_available']}, "
             f"dim {ref['dimension']}, encoder {ref.get('encoder_version') or '?'})",
             f"current:   {cur['label']}  {cur['source']}  ({cur['kind']}, {cur['count_used']} of {cur['count_available']}, "
             f"dim {cur['dimension']}, encoder {cur.get('encoder_version') or '?'})", ""]
    rows = _rows(r)
    width = max((len(a) for a, _, _ in rows), default=10) + 2
    vwidth = max((len(b) for _, b, _ in rows), default=8) + 2
    lines += [f"  {a:<{width}}{b:>{vwidth}}   {c}" for a, b, c in rows]
    lines.append("")
    for note in r.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"VERDICT: {r['verdict'].upper()}" + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else
                                                       " (no threshold crossed)"))
    lines.append(f"took {r['timings_s'].get('total', '?')} s")
    return "\n".join(lines)


def write_drift_report(report: DriftReport, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json`` and ``report.html`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = msgspec.to_builtins(report)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    paths["json"].write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    paths["html"].write_text(render_drift_html(data), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def _hist_svg(h: dict[str, Any]) -> str:
    """Overlaid histograms (translucent bars, shared bins) with an optional vertical marker."""
    edges = h["edges"]
    series = h["series"]
    w, pad_l, pad_r, pad_t, plot_h = 420, 48, 28, 24, 160
    pad_b = 40 + 14 * len(series)  # axis, its label, one legend line per series
    ht = pad_t + plot_h + pad_b
    bins = len(edges) - 1
    if bins < 1 or not series:
        return ""
    lo, hi = edges[0], edges[-1]
    top = max((max(c) for c in series.values() if c), default=1) or 1
    plot_w = w - pad_l - pad_r

    def px(x: float) -> float:
        return pad_l + plot_w * (x - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{ht}" role="img" aria-label="{_esc(h["title"])}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{_esc(h["title"])}</text>']
    base = pad_t + plot_h
    multi = len(series) > 1
    for i, (name, counts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        total = sum(counts) or 1
        for b, c in enumerate(counts):
            if not c:
                continue
            x0, x1 = px(edges[b]), px(edges[b + 1])
            bh = plot_h * c / top
            parts.append(f'<rect x="{x0:.1f}" y="{base - bh:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" height="{bh:.1f}" '
                         f'fill="{color}" fill-opacity="{0.45 if multi else 0.8}"><title>{_esc(name)}: '
                         f'{edges[b]:.4g} – {edges[b + 1]:.4g}: {c} ({100 * c / total:.1f} %)</title></rect>')
        y_leg = pad_t + plot_h + 36 + 14 * i
        parts.append(f'<rect x="{pad_l}" y="{y_leg}" width="10" height="10" fill="{color}" '
                     f'fill-opacity="0.6"/><text x="{pad_l + 14}" y="{y_leg + 9}" font-size="10">'
                     f'{_esc(name)} (n={sum(counts)})</text>')
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{w - pad_r}" y2="{base}" stroke="#333"/>')
    for j in range(5):
        x = lo + (hi - lo) * j / 4
        parts.append(f'<text x="{px(x):.1f}" y="{base + 13}" text-anchor="middle" font-size="10">{x:.3g}</text>')
    parts.append(f'<text x="{pad_l + plot_w / 2}" y="{base + 28}" text-anchor="middle" font-size="11">'
                 f'{_esc(h["xlabel"])}</text>')
    parts.append(f'<text x="12" y="{pad_t + plot_h / 2}" font-size="11" transform="rotate(-90 12 {pad_t + plot_h / 2})"'
                 f' text-anchor="middle">count (max {top})</text>')
    if h.get("marker") is not None:
        off_scale = h["marker"] > hi or h["marker"] < lo
        mx = px(min(max(h["marker"], lo), hi))
        label = h.get("marker_label", "") + (" (off scale)" if off_scale else "")
        anchor, tx = ("end", mx - 4) if mx > pad_l + plot_w / 2 else ("start", mx + 4)
        parts.append(f'<line x1="{mx:.1f}" y1="{pad_t}" x2="{mx:.1f}" y2="{base}" stroke="#d62728" stroke-width="2" '
                     f'stroke-dasharray="4 2"/><text x="{tx:.1f}" y="{pad_t + 10}" font-size="10" text-anchor="{anchor}" '
                     f'fill="#d62728">{_esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _sample_rows(s: dict[str, Any]) -> str:
    detail = ", ".join(f"{k}: {v}" for k, v in s.get("detail", {}).items())
    return (f"<tr><td class='l'>{_esc(s['label'])}</td><td class='l'><code>{_esc(s['source'])}</code></td>"
            f"<td class='l'>{_esc(s['kind'])}</td><td>{s['count_used']} of {s['count_available']}</td>"
            f"<td>{s['dimension']}</td><td class='l'>{_esc(s.get('encoder_version') or '-')}</td>"
            f"<td class='l'><code>{_esc((s.get('dataset_hash') or '-')[:16])}</code></td>"
            f"<td class='l small'>{_esc(detail)}</td></tr>")


def render_drift_html(report: dict[str, Any]) -> str:
    verdict = report["verdict"]
    color = "#d62728" if verdict == "drift" else "#2ca02c"
    git = report.get("git") or {}
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>Embedding drift: {_esc(verdict)}</title><style>{_CSS}"
           ".verdict{font-size:20px;font-weight:600;padding:8px 12px;border-radius:4px;display:inline-block;color:#fff}"
           "</style></head><body>",
           f"<h1>Embedding drift — {_esc(report['kind'])}</h1>",
           f"<p><span class='verdict' style='background:{color}'>{_esc(verdict.upper())}</span></p>"]
    if report["reasons"]:
        out.append("<ul>" + "".join(f"<li>{_esc(r)}</li>" for r in report["reasons"]) + "</ul>")
    else:
        out.append("<p>No threshold crossed.</p>")
    for note in report.get("notes", []):
        out.append(f"<p class='small'>Note: {_esc(note)}</p>")
    meta = [("created", report["created_at"]), ("encoder", report.get("encoder_version") or "-"),
            ("git commit", f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}"),
            ("options", ", ".join(f"{k}={v}" for k, v in report["options"].items())),
            ("timings (s)", ", ".join(f"{k} {v}" for k, v in report["timings_s"].items()))]
    out.append("<table class='meta'>" + "".join(f"<tr><th class='l'>{_esc(k)}</th><td>{_esc(v)}</td></tr>"
                                                 for k, v in meta) + "</table>")
    out.append("<h2>Samples</h2><table><tr><th class='l'>side</th><th class='l'>source</th><th class='l'>kind</th>"
               "<th>rows used</th><th>dim</th><th class='l'>encoder</th><th class='l'>dataset hash</th>"
               "<th class='l'>detail</th></tr>")
    out.append(_sample_rows(report["reference"]) + _sample_rows(report["current"]) + "</table>")
    out.append("<h2>Figures</h2><table><tr><th class='l'>figure</th><th>value</th><th class='l'>threshold / context</th></tr>")
    out += [f"<tr><td class='l'>{_esc(a)}</td><td>{_esc(b)}</td><td class='l small'>{_esc(c)}</td></tr>"
            for a, b, c in _rows(report)]
    out.append("</table>")
    out.append("<h2>Thresholds (settings)</h2><table>" + "".join(
        f"<tr><th class='l'>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in report["thresholds"].items()) + "</table>")
    if report.get("histograms"):
        out.append("<h2>Distributions</h2><div class='grid'>")
        out += [_hist_svg(h) for h in report["histograms"]]
        out.append("</div>")
    out.append("<p class='small'>MMD: unbiased MMD² with an RBF kernel whose bandwidth is the median pairwise distance "
               "of the pooled sample; p-value from label permutations. Classifier test: logistic regression trained on "
               "half of a balanced sample, accuracy on the other half (binomial test against 0.5). Novel share: current "
               "vectors whose best cosine to the reference is below the 5th percentile of the reference's own best "
               "cosines (about 0.05 without drift). Neighbour overlap@k: per text, the share of its k nearest "
               "neighbours (cosine, within each encoder's own space) both encoders agree on.</p>")
    out.append("<details><summary>settings</summary><pre>" + _esc(json.dumps(report.get("settings", {}), indent=1))
               + "</pre></details>")
    out.append("</body></html>")
    return "\n".join(out)
