"""Training the answerability model and choosing the sentence ranking weights, from calibration answers.

``python -m eval calibrate`` asks the calibration half through the real service with
``RAG_ANSWER_EXPLAIN=true`` and no model (so the service ranks sentences by similarity alone and
nothing abstains); each response lists its sources (fused scores, texts) and every ranked sentence
with its cosine and lexical parts. From those, offline and with the service's own functions:

1. the retrieval prior's weights (:func:`rag.extractive.retrieval_priors`) are chosen on a small grid
   by how often the extractive answer contains a gold answer (answerable questions);
2. :func:`rag.answerability.features` is computed on the ranking those weights give — the very
   function the service runs — and a standardised logistic regression is trained on them;
3. 5-fold cross-validated probabilities give the AUC, the reliability curve and the operating points
   stored with the model; the final fit uses every calibration question.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.answer_scoring import auc, contains_answer
from eval.datasets import QAExample
from rag.answerability import FEATURES, SCHEMA, features
from rag.extractive import LEXICAL_WEIGHT, answer_from_ranked, retrieval_priors

RANK_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
FUSED_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3)
FOLDS = 5
C_VALUES = (0.03, 0.1, 0.3, 1.0)


@dataclass(slots=True)
class _Src:
    n: int
    score: float
    text: str


@dataclass(slots=True)
class _Sent:
    n: int
    document_id: str
    text: str
    start: int
    end: int
    score: float
    cosine: float
    lexical: float
    prior: float


def _parse(body: dict[str, Any]) -> tuple[list[_Src], list[_Sent]]:
    explain = (body.get("retrieval") or {}).get("explain")
    if explain is None:
        raise ValueError("a response without retrieval.explain: run the service with RAG_ANSWER_EXPLAIN=true")
    sources = [_Src(int(s["n"]), float(s["score"]), s["text"]) for s in explain["sources"]]
    text = {s.n: s.text for s in sources}
    sentences = [_Sent(int(x["n"]), "", text[int(x["n"])][x["start"]:x["end"]], x["start"], x["end"], 0.0,
                       float(x["cosine"]), float(x["lexical"]), 0.0) for x in explain["sentences"]]
    return sources, sentences


def rerank(sources: Sequence[_Src], sentences: Sequence[_Sent], weights: tuple[float, float]) -> list[_Sent]:
    """The sentences as the service ranks them under ``weights`` (same score, same order on ties)."""
    priors = retrieval_priors(list(sources), *weights)  # type: ignore[arg-type]
    out = []
    for s in sentences:
        p = priors.get(s.n, 0.0)
        # float32 like the service, so that near-ties break the same way
        score = float(np.float32(s.cosine) + np.float32(LEXICAL_WEIGHT) * np.float32(s.lexical) + np.float32(p))
        out.append(_Sent(s.n, s.document_id, s.text, s.start, s.end, score, s.cosine, s.lexical, p))
    return sorted(out, key=lambda s: -s.score)


def choose_weights(items: Sequence[tuple[QAExample, list[_Src], list[_Sent]]]) -> tuple[tuple[float, float], list[dict]]:
    """The (rank, fused) prior weights whose extractive answers contain a gold answer most often
    (answerable questions); ties go to the smaller weights."""
    answerable = [(ex, src, sen) for ex, src, sen in items if not ex.is_impossible]
    table = []
    for rw in RANK_WEIGHTS:
        for fw in FUSED_WEIGHTS:
            hits = 0
            for ex, src, sen in answerable:
                ranked = rerank(src, sen, (rw, fw))
                text = answer_from_ranked(ranked, max_sentences=2).text  # type: ignore[arg-type]
                hits += contains_answer(text, ex.answers)
            table.append({"rank_weight": rw, "fused_weight": fw, "contains_gold": hits / max(1, len(answerable))})
    best = max(table, key=lambda r: (round(r["contains_gold"], 6), -(r["rank_weight"] + r["fused_weight"])))
    return (best["rank_weight"], best["fused_weight"]), table


def reliability(probs: Sequence[float], labels: Sequence[int], bins: int = 10) -> list[dict[str, float]]:
    """Per probability bin: its mean predicted probability and the observed share answerable."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(probs) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            out.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": len(idx), "mean_probability": float(np.mean([probs[i] for i in idx])),
                        "observed_answerable": float(np.mean([labels[i] for i in idx]))})
    return out


def train(pairs: Sequence[tuple[QAExample, dict[str, Any]]], *, meta: dict[str, Any]) -> dict[str, Any]:
    """The model file's content (see :mod:`rag.answerability`), with its cross-validated report."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    items = [(ex, *_parse(body)) for ex, body in pairs if "error" not in body]
    weights, weight_table = choose_weights(items)
    X = np.array([[features(ex.question, src, rerank(src, sen, weights))[n] for n in FEATURES]  # type: ignore[arg-type]
                  for ex, src, sen in items], dtype=np.float64)
    y = np.array([0 if ex.is_impossible else 1 for ex, _, _ in items])
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=13)

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    def cv_auc(probs: np.ndarray) -> float:
        return auc([p for p, t in zip(probs, y, strict=True) if t], [p for p, t in zip(probs, y, strict=True) if not t]) or 0.0

    by_c = {c: cross_val_predict(model(c), X, y, cv=folds, method="predict_proba")[:, 1] for c in C_VALUES}
    c_table = {c: cv_auc(p) for c, p in by_c.items()}
    best_c = max(C_VALUES, key=lambda c: c_table[c])
    cv = by_c[best_c]
    # The same folds for the old single score (support_score under the chosen weights), for comparison.
    support = X[:, FEATURES.index("best_score")]
    fitted = model(best_c).fit(X, y)
    scaler, lr = fitted[0], fitted[1]
    from sklearn.ensemble import GradientBoostingClassifier

    def gbm_model():
        return GradientBoostingClassifier(n_estimators=150, max_depth=3, learning_rate=0.05, subsample=0.8,
                                          random_state=13)

    gbm_cv = cross_val_predict(gbm_model(), X, y, cv=folds, method="predict_proba")[:, 1]
    gbm_auc = cv_auc(gbm_cv)
    coef = lr.coef_[0]
    body: dict[str, Any] = {
        "kind": "logistic_regression",
        "mean": [round(float(x), 6) for x in scaler.mean_],
        "scale": [round(float(x), 6) for x in scaler.scale_],
        "coef": [round(float(x), 6) for x in coef],
        "intercept": round(float(lr.intercept_[0]), 6),
        "C": best_c,
    }
    lr_auc = cv_auc(cv)
    # Boosting ships only when it wins clearly on the calibration folds: the linear model is easier to read.
    if gbm_auc > lr_auc + 0.01:
        gbm = gbm_model().fit(X, y)
        body = _gbm_spec(gbm, X, y)
        cv = gbm_cv
    return {
        "schema": SCHEMA,
        **body,
        "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "trained_on": {**meta, "questions": len(items), "answerable": int(y.sum()), "unanswerable": int((1 - y).sum())},
        "features": list(FEATURES),
        "sentence_ranking": {"rank_weight": weights[0], "fused_weight": weights[1], "grid": weight_table},
        "calibration": {
            "folds": FOLDS, "cv_auc": cv_auc(cv), "logistic_regression_cv_auc_by_C": {str(c): v for c, v in c_table.items()},
            "support_score_auc": cv_auc(support), "gradient_boosting_cv_auc": gbm_auc,
            "reliability": reliability(list(cv), list(y)),
            "cv_probabilities": {"answerable": [round(float(p), 4) for p, t in zip(cv, y, strict=True) if t],
                                 "unanswerable": [round(float(p), 4) for p, t in zip(cv, y, strict=True) if not t]},
        },
        "top_features": sorted(({"feature": n, "coef": round(float(c), 3)} for n, c in zip(FEATURES, coef, strict=True)),
                               key=lambda r: -abs(r["coef"]))[:12],
    }


def _gbm_spec(gbm, X: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """A fitted binary GradientBoostingClassifier as JSON arrays, checked against sklearn's own scores."""
    from rag.answerability import Tree

    p = float(y.mean())
    init = math.log(p / (1 - p))
    trees = []
    for est in gbm.estimators_[:, 0]:
        t = est.tree_
        trees.append({"feature": [int(v) for v in t.feature], "threshold": [float(v) for v in t.threshold],
                      "left": [int(v) for v in t.children_left], "right": [int(v) for v in t.children_right],
                      "value": [float(v) for v in t.value[:, 0, 0]]})
    mine = [init + gbm.learning_rate * sum(Tree.of(t, X.shape[1]).value(list(map(float, row))) for t in trees)
            for row in X.astype(np.float32)]
    theirs = gbm.decision_function(X)
    if not np.allclose(mine, theirs, atol=1e-4):
        raise RuntimeError("the exported trees do not reproduce sklearn's scores")
    return {"kind": "gradient_boosting", "init": init, "learning_rate": gbm.learning_rate, "trees": trees,
            "n_estimators": gbm.n_estimators, "max_depth": gbm.max_depth}


def format_training(spec: dict[str, Any]) -> str:
    cal, ranking = spec["calibration"], spec["sentence_ranking"]
    base = next(r for r in ranking["grid"] if r["rank_weight"] == 0 and r["fused_weight"] == 0)
    best = next(r for r in ranking["grid"] if (r["rank_weight"], r["fused_weight"]) ==
                (ranking["rank_weight"], ranking["fused_weight"]))
    lines = [
        f"sentence ranking: rank weight {ranking['rank_weight']}, fused weight {ranking['fused_weight']}: extractive "
        f"answer contains gold {100 * best['contains_gold']:.1f} % of answerable (similarity alone "
        f"{100 * base['contains_gold']:.1f} %)",
        f"answerability model ({spec['kind'].replace('_', ' ')}), {cal['folds']}-fold cross-validated AUC on the "
        f"calibration half: {cal['cv_auc']:.3f} (support score alone {cal['support_score_auc']:.3f}; logistic regression "
        f"by C {json.dumps(cal['logistic_regression_cv_auc_by_C'])}; gradient boosting {cal['gradient_boosting_cv_auc']:.3f})",
        "reliability (cross-validated): bin, questions, mean probability, observed answerable",
    ]
    lines += [f"  {r['bin']:>8}{r['n']:>6}{r['mean_probability']:>8.3f}{r['observed_answerable']:>8.3f}"
              for r in cal["reliability"]]
    lines.append("largest logistic regression coefficients (standardised): " + ", ".join(
        f"{r['feature']} {r['coef']:+.2f}" for r in spec["top_features"]))
    return "\n".join(lines)


def write_model(spec: dict[str, Any], path: Path) -> str:
    """Write the model file; returns the version the service will report for it."""
    from rag.answerability import version_of

    raw = (json.dumps(spec, indent=1) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return version_of(raw)
