"""The answerability curves of an answer report, computed from scored rows and drawn as inline SVG.

- **Reliability**: the predicted probability that a question is answerable (the response's
  ``answerable_probability`` when every response has one, else its ``support_score`` clipped to
  [0, 1] — a similarity, not a calibrated probability) in equal-width bins, against the observed
  share of questions in the bin that are answerable, and that are answerable *and* answered with an
  answer containing a gold answer; with the count of each bin and the expected calibration error
  against the second.
- **Trade-off**: the threshold on that prediction swept from the lowest to above the highest value.
  With unanswerable questions: the share of answerable questions it would answer against the share
  of unanswerable ones it would abstain on (a decision on the score alone, as ``calibrate`` makes
  it), with the AUC. Without any: answer rate against contains-gold precision over the questions
  the service answered (only those have an answer to judge), so the curve ends at the operating
  point. Either way the operating point is what the service actually did.

Plots are hand-written SVG (no plotting library, no script, nothing fetched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eval.answer_scoring import AnswerRow, auc
from eval.report import esc

__all__ = ["answer_curves", "curves_html", "reliability", "tradeoff"]

BINS = 10
MAX_POINTS = 200

NO_UNANSWERABLE = ("The file holds no unanswerable questions, so abstention cannot be measured: the plot shows "
                   "the answer rate on answerable questions against the share of answers that contain a gold "
                   "answer (contains-gold precision) as the threshold rises, over the questions the service answered.")


def prediction_source(rows: Sequence[AnswerRow]) -> str:
    """``answerable_probability`` when every scored row carries one, else ``support_score``."""
    ok = [r for r in rows if not r.get("error")]
    if ok and all(r.get("answerable_probability") is not None for r in ok):
        return "answerable_probability"
    return "support_score"


def predicted(row: AnswerRow, source: str) -> float | None:
    value = row.get(source)  # type: ignore[misc]
    return None if value is None else min(1.0, max(0.0, float(value)))


def _scored(rows: Sequence[AnswerRow], source: str) -> list[tuple[float, AnswerRow]]:
    out = []
    for r in rows:
        if r.get("error"):
            continue
        p = predicted(r, source)
        if p is not None:
            out.append((p, r))
    return out


def _correct(r: AnswerRow) -> bool:
    return not r["is_impossible"] and bool(r.get("contains_gold"))


def reliability(rows: Sequence[AnswerRow], bins: int = BINS) -> dict[str, Any]:
    source = prediction_source(rows)
    scored = _scored(rows, source)
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(p, r) for p, r in scored if (lo <= p < hi) or (b == bins - 1 and p == 1.0)]
        n = len(inside)
        table.append({
            "lo": lo, "hi": hi, "count": n,
            "mean_predicted": sum(p for p, _ in inside) / n if n else None,
            "answerable_share": sum(not r["is_impossible"] for _, r in inside) / n if n else None,
            "correct_share": sum(_correct(r) for _, r in inside) / n if n else None,
        })
    total = sum(b["count"] for b in table)
    ece = (sum(b["count"] * abs(b["mean_predicted"] - b["correct_share"]) for b in table if b["count"]) / total
           if total else None)
    return {"source": source, "questions": total, "bins": table, "ece_correct": ece,
            "note": None if source == "answerable_probability" else
            "support_score (the best sentence's similarity to the question, clipped to [0, 1]) stands in for a "
            "probability: the responses carry no answerable_probability"}


def _thresholds(values: Sequence[float]) -> list[float]:
    ts = sorted(set(values))
    if len(ts) > MAX_POINTS:
        ts = [ts[round(i * (len(ts) - 1) / (MAX_POINTS - 1))] for i in range(MAX_POINTS)]
    return ts


def tradeoff(rows: Sequence[AnswerRow]) -> dict[str, Any]:
    source = prediction_source(rows)
    scored = _scored(rows, source)
    pos = [p for p, r in scored if not r["is_impossible"]]
    neg = [p for p, r in scored if r["is_impossible"]]
    ok = [r for r in rows if not r.get("error")]
    ans = [r for r in ok if not r["is_impossible"]]
    imp = [r for r in ok if r["is_impossible"]]
    answered = [r for r in ans if r["answered"]]
    if imp:
        thresholds = _thresholds([p for p, _ in scored])
        points = [{"threshold": t, "answer_rate": sum(p >= t for p in pos) / len(pos) if pos else None,
                   "abstain_rate_unanswerable": sum(p < t for p in neg) / len(neg) if neg else None}
                  for t in thresholds]
        if thresholds:
            points.append({"threshold": None, "answer_rate": 0.0, "abstain_rate_unanswerable": 1.0})  # above every score
        return {"kind": "answer_vs_abstain", "source": source, "points": points, "auc": auc(pos, neg),
                "operating_point": {"answer_rate": len(answered) / len(ans) if ans else None,
                                    "abstain_rate_unanswerable": sum(not r["answered"] for r in imp) / len(imp)},
                "note": None}
    judged = [(p, r) for p, r in scored if not r["is_impossible"] and r["answered"]]
    points = []
    for t in _thresholds([p for p, _ in judged]):
        kept = [r for p, r in judged if p >= t]
        if kept:
            points.append({"threshold": t, "answer_rate": len(kept) / len(ans),
                           "precision": sum(bool(r.get("contains_gold")) for r in kept) / len(kept)})
    return {"kind": "answer_vs_precision", "source": source, "points": points, "auc": None,
            "operating_point": {"answer_rate": len(answered) / len(ans) if ans else None,
                                "precision": (sum(bool(r.get("contains_gold")) for r in answered) / len(answered)
                                              if answered else None)},
            "note": NO_UNANSWERABLE}


def answer_curves(rows: Sequence[AnswerRow]) -> dict[str, Any]:
    """report.json's ``curves``: ``reliability`` and ``tradeoff``."""
    return {"reliability": reliability(rows), "tradeoff": tradeoff(rows)}


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------

W, H, L, R, T, B = 420, 340, 52, 16, 28, 46  # size and margins


def _x(v: float) -> float:
    return L + v * (W - L - R)


def _y(v: float) -> float:
    return H - B - v * (H - T - B)


def _frame(svg_id: str, title: str, xlabel: str, ylabel: str) -> list[str]:
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{svg_id}" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}" font-family="system-ui,sans-serif" '
             f'font-size="11">', f'<title>{esc(title)}</title>',
             f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{esc(title)}</text>']
    for i in range(6):
        v = i / 5
        parts.append(f'<line x1="{_x(0)}" y1="{_y(v):.1f}" x2="{_x(1)}" y2="{_y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<line x1="{_x(v):.1f}" y1="{_y(0)}" x2="{_x(v):.1f}" y2="{_y(1)}" stroke="#eee"/>')
        parts.append(f'<text x="{L - 6}" y="{_y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        parts.append(f'<text x="{_x(v):.1f}" y="{H - B + 15}" text-anchor="middle">{v:.1f}</text>')
    parts.append(f'<rect x="{_x(0)}" y="{_y(1)}" width="{_x(1) - _x(0)}" height="{_y(0) - _y(1)}" fill="none" '
                 f'stroke="#999"/>')
    parts.append(f'<text x="{(_x(0) + _x(1)) / 2}" y="{H - 10}" text-anchor="middle">{esc(xlabel)}</text>')
    parts.append(f'<text transform="translate(14,{(_y(0) + _y(1)) / 2}) rotate(-90)" text-anchor="middle">'
                 f'{esc(ylabel)}</text>')
    return parts


def _polyline(points: Sequence[tuple[float, float]], color: str, dash: str = "") -> str:
    if not points:
        return ""
    coords = " ".join(f"{_x(x):.1f},{_y(y):.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"{extra}/>'


def _legend(items: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for i, (color, label) in enumerate(items):
        yy = y + i * 14
        out.append(f'<rect x="{x}" y="{yy - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{x + 14}" y="{yy + 1}">{esc(label)}</text>')
    return out


def reliability_svg(rel: dict[str, Any]) -> str:
    xlabel = "predicted answerable probability" if rel["source"] == "answerable_probability" \
        else "support score (clipped to 0–1)"
    parts = _frame("reliability", "Reliability", xlabel, "observed share")
    parts.append(_polyline([(0, 0), (1, 1)], "#aaa", "4 3"))
    filled = [b for b in rel["bins"] if b["count"]]
    most = max((b["count"] for b in filled), default=1)
    for key, color in (("answerable_share", "#9ab"), ("correct_share", "#c33")):
        pts = [(b["mean_predicted"], b[key]) for b in filled]
        parts.append(_polyline(pts, color))
        for (x, y), b in zip(pts, filled):
            r = 2.5 + 4.5 * (b["count"] / most) ** 0.5
            parts.append(f'<circle cx="{_x(x):.1f}" cy="{_y(y):.1f}" r="{r:.1f}" fill="{color}">'
                         f'<title>{esc(key)} {y:.3f}, mean predicted {x:.3f}, n={b["count"]}</title></circle>')
    for b in filled:  # counts along the bottom, under each bin's mean prediction
        parts.append(f'<text x="{_x(b["mean_predicted"]):.1f}" y="{_y(0) - 4:.1f}" text-anchor="middle" '
                     f'fill="#555" font-size="9">{b["count"]}</text>')
    parts += _legend([("#c33", "answerable and answer contains gold"), ("#9ab", "answerable")], _x(0) + 8, _y(1) + 14)
    parts.append("</svg>")
    return "".join(parts)


def tradeoff_svg(tr: dict[str, Any]) -> str:
    op = tr["operating_point"]
    if tr["kind"] == "answer_vs_abstain":
        parts = _frame("tradeoff", "Answer rate vs abstention", "abstains on unanswerable", "answers answerable")
        pts = [(p["abstain_rate_unanswerable"], p["answer_rate"]) for p in tr["points"]
               if p["answer_rate"] is not None and p["abstain_rate_unanswerable"] is not None]
        here = (op["abstain_rate_unanswerable"], op["answer_rate"])
        label = f"operating point: answers {op['answer_rate']:.0%}, abstains {op['abstain_rate_unanswerable']:.0%}" \
            if None not in here else ""
    else:
        parts = _frame("tradeoff", "Answer rate vs contains-gold precision", "answers answerable",
                       "answer contains gold (of answered)")
        pts = [(p["answer_rate"], p["precision"]) for p in tr["points"]]
        here = (op["answer_rate"], op["precision"])
        label = f"operating point: answers {op['answer_rate']:.0%}, precision {op['precision']:.0%}" \
            if None not in here else ""
    parts.append(_polyline(pts, "#36c"))
    if None not in here:
        x, y = _x(here[0]), _y(here[1])
        parts.append(f'<circle class="operating-point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="#c33" '
                     f'stroke-width="2.5"><title>{esc(label)}</title></circle>')
    parts += _legend([("#36c", f"threshold swept on the {tr['source']}"), ("#c33", label)], _x(0) + 8, _y(0) - 24)
    parts.append("</svg>")
    return "".join(parts)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def curves_html(curves: dict[str, Any]) -> str:
    rel, tr = curves["reliability"], curves["tradeoff"]
    notes = []
    if rel.get("note"):
        notes.append(f"<p class=small>{esc(rel['note'])}.</p>")
    if tr.get("note"):
        notes.append(f"<p class=note>{esc(tr['note'])}</p>")
    figures = [f"reliability: {rel['questions']} questions with a prediction",
               "expected calibration error (vs answerable and contains gold): "
               + ("-" if rel["ece_correct"] is None else f"{rel['ece_correct']:.3f}")]
    if tr["auc"] is not None:
        figures.append(f"AUC (answerable above unanswerable): {tr['auc']:.3f}")
    mean = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    bins = "".join(f"<tr><td>{b['lo']:.1f}–{b['hi']:.1f}</td><td>{b['count']}</td><td>{mean(b['mean_predicted'])}</td>"
                   f"<td>{_pct(b['answerable_share'])}</td><td>{_pct(b['correct_share'])}</td></tr>"
                   for b in rel["bins"])
    return (f"<h2>Answerability</h2>{''.join(notes)}<p class=small>{esc('; '.join(figures))}</p>"
            f"<div class=grid>{reliability_svg(rel)}{tradeoff_svg(tr)}</div>"
            f"<details><summary>reliability bins</summary><table><tr><th>predicted</th><th>questions</th>"
            f"<th>mean predicted</th><th>answerable</th><th>answerable, contains gold</th></tr>{bins}</table></details>")
