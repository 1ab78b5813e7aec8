"""The answerability decision: a small calibrated model over signals the answer pipeline has anyway.

A single threshold on the best sentence's support separates answerable from unanswerable SQuAD 2.0
questions poorly (AUC 0.65): an unanswerable question is usually written to look like its paragraph,
and what gives it away is a detail — a name, a number or a rare word of the question that the best
sentence does not hold, or a "when" question whose sentence holds no date. :func:`features` turns
the question, the context's sources (fused retrieval scores, in rank order) and the ranked sentences
into a fixed vector of such signals; :class:`AnswerabilityModel` is a logistic regression over them
(standardised), trained and calibrated by ``python -m eval calibrate`` on the calibration half of SQuAD
2.0 dev only, and shipped as JSON (coefficients, never pickle: loading it runs no code).

The model file also carries (a) the cross-validated probabilities of its calibration questions, from
which an operating point (``RAG_ANSWERABILITY_OPERATING_POINT``: a target answer rate, a target
precision or a plain probability) becomes a threshold at load, and (b) the sentence ranking weights
chosen with it (the retrieval prior of :func:`rag.extractive.retrieval_priors`), since the features
describe the sentence that ranking picks. Its version is ``answerability@<sha256[:12]>`` of the file,
reported on every answer like ``prompt@hash``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rag.errors import SettingsError
from rag.extractive import content_words

SCHEMA = "rag/answerability/1"
BUNDLED = Path(__file__).parent / "models" / "answerability.json"


class AnswerabilityModelError(SettingsError):
    """The configured model file is missing, unreadable or not a model this code can use."""

    code = "invalid_answerability_model"


class _Source(Protocol):
    n: int
    text: str
    score: float


class _Sentence(Protocol):
    n: int
    text: str
    score: float
    cosine: float
    lexical: float


# -- features -----------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][\w'-]*|\d[\d,.]*")
_NUMBER = re.compile(r"\d")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})s?\b")
_MONTHS = re.compile(r"\b(january|february|march|april|may|june|july|august|september|october|november|december|"
                     r"century|centuries|decade|year|years|bc|ad|bce|ce)\b", re.I)
_NUMBER_WORDS = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|"
                           r"fifty|hundred|hundreds|thousand|thousands|million|millions|billion|percent|dozen|half)\b",
                           re.I)
_NEGATION = re.compile(r"\b(not|never|no|none|neither|nor|without)\b|n't\b", re.I)
_QTYPES = ("when", "how_many", "who", "where", "why", "how", "which", "what")


def question_type(question: str) -> str:
    """The question's type: ``when``, ``how_many`` (how many/much/long/old/far…, what year/percentage …),
    ``who``, ``where``, ``why``, ``how``, ``which``, ``what``, or ``other``."""
    q = question.lower()
    if re.search(r"\bhow (many|much|long|old|far|large|big|tall|high|often|fast)\b|\bwhat (percent|percentage|number|amount)\b", q):
        return "how_many"
    if re.search(r"\bwhen\b|\bwhat (year|century|decade|date|day|month|time|period)\b|\bwhich (year|century|decade)\b", q):
        return "when"
    for t, pat in (("who", r"\b(who|whom|whose)\b"), ("where", r"\bwhere\b"), ("why", r"\bwhy\b"),
                   ("how", r"\bhow\b"), ("which", r"\bwhich\b"), ("what", r"\bwhat\b")):
        if re.search(pat, q):
            return t
    return "other"


def _names(text: str) -> set[str]:
    """Capitalised words that are not the first word of the text (names, places, titles), lower-cased."""
    words = _WORD.findall(text)
    return {w.lower() for w in words[1:] if w[0].isupper()}


def _numbers(text: str) -> set[str]:
    return {w.rstrip(".,") for w in _WORD.findall(text) if w[0].isdigit()}


def _has_date(text: str) -> bool:
    return bool(_YEAR.search(text) or _MONTHS.search(text))


def _has_number(text: str) -> bool:
    return bool(_NUMBER.search(text) or _NUMBER_WORDS.search(text))


def _share(part: set[str], whole: set[str]) -> float:
    return len(part & whole) / len(part) if part else 1.0


FEATURES: tuple[str, ...] = (
    "n_sources", "fused_top", "fused_gap", "fused_second_ratio",
    "best_score", "second_score", "score_gap", "best_cosine", "best_lexical", "best_prior",
    "best_source_rank", "top3_same_source", "top5_mean_score",
    "q_words", "cover_sentence", "cover_chunk", "cover_context",
    "missing_chunk", "missing_context",
    "q_long_words", "cover_long_sentence", "cover_long_chunk",
    "q_names", "cover_names_sentence", "cover_names_chunk",
    "q_numbers", "cover_numbers_sentence", "cover_numbers_chunk",
    "q_negation", "sentence_negation",
    *(f"type_{t}" for t in (*_QTYPES, "other")),
    "sentence_has_date", "sentence_has_number", "sentence_has_name", "sentence_new_number", "sentence_new_name",
    "chunk_new_number",
    "when_no_date", "how_many_no_number", "who_no_name", "chunk_when_no_date", "chunk_how_many_no_number",
    "sentence_words", "question_words",
)


def features(question: str, sources: Sequence[_Source], ranked: Sequence[_Sentence]) -> dict[str, float]:
    """The answerability signals of one question, by name (every name of :data:`FEATURES`).

    ``sources`` are the context's sources in rank order (``score``: the fused retrieval score);
    ``ranked`` the sentences best first, as :func:`rag.extractive.rank_sentences` returns them.
    Coverage features are shares of the question's words (content words, long words of 7+ letters —
    rare in general —, capitalised names, numbers) found in the best sentence, its source, or anywhere
    in the context; a share is 1 when the question has no such word.
    """
    f = dict.fromkeys(FEATURES, 0.0)
    q_words = content_words(question)
    q_long = {w for w in q_words if len(w) >= 7}
    q_names, q_numbers = _names(question), _numbers(question)
    qtype = question_type(question)
    f["n_sources"] = float(len(sources))
    f["q_words"] = float(len(q_words))
    f["q_long_words"], f["q_names"], f["q_numbers"] = float(len(q_long)), float(len(q_names)), float(len(q_numbers))
    f["q_negation"] = float(bool(_NEGATION.search(question)))
    f[f"type_{qtype}"] = 1.0
    f["question_words"] = float(len(_WORD.findall(question)))
    if sources:
        scores = [s.score for s in sources]
        top = scores[0] if scores[0] else max(scores)
        f["fused_top"] = top
        second = scores[1] if len(scores) > 1 else 0.0
        f["fused_gap"] = top - second
        f["fused_second_ratio"] = second / top if top else 0.0
    if not ranked:
        for k in ("cover_sentence", "cover_chunk", "cover_context"):
            f[k] = 0.0
        f["missing_chunk"] = f["missing_context"] = float(len(q_words))
        f["best_score"] = f["second_score"] = -1.0
        return f
    best = ranked[0]
    f["best_score"], f["best_cosine"], f["best_lexical"] = best.score, best.cosine, best.lexical
    f["best_prior"] = best.score - best.cosine - 0.2 * best.lexical
    f["second_score"] = ranked[1].score if len(ranked) > 1 else -1.0
    f["score_gap"] = best.score - (ranked[1].score if len(ranked) > 1 else 0.0)
    order = [s.n for s in sources]
    f["best_source_rank"] = float(order.index(best.n) + 1) if best.n in order else float(len(order) + 1)
    f["top3_same_source"] = sum(s.n == best.n for s in ranked[1:3]) / 2
    top5 = [s.score for s in ranked[:5]]
    f["top5_mean_score"] = sum(top5) / len(top5)
    chunk = next((s.text for s in sources if s.n == best.n), best.text)
    context = " ".join(s.text for s in sources)
    s_words, c_words, all_words = content_words(best.text), content_words(chunk), content_words(context)
    f["cover_sentence"], f["cover_chunk"] = _share(q_words, s_words), _share(q_words, c_words)
    f["cover_context"] = _share(q_words, all_words)
    f["missing_chunk"] = float(len(q_words - c_words))
    f["missing_context"] = float(len(q_words - all_words))
    f["cover_long_sentence"], f["cover_long_chunk"] = _share(q_long, s_words), _share(q_long, c_words)
    s_lower, c_lower = set(_WORD.findall(best.text.lower())), set(_WORD.findall(chunk.lower()))
    f["cover_names_sentence"], f["cover_names_chunk"] = _share(q_names, s_lower), _share(q_names, c_lower)
    f["cover_numbers_sentence"] = _share(q_numbers, _numbers(best.text))
    f["cover_numbers_chunk"] = _share(q_numbers, _numbers(chunk))
    f["sentence_negation"] = float(bool(_NEGATION.search(best.text)))
    # What the sentence adds to the question: a number or name the question does not already hold (the answer
    # to "when"/"how many"/"who" is one of those, not the year the question itself names).
    q_lower = set(_WORD.findall(question.lower()))
    new_number = bool(_numbers(best.text) - q_numbers) or bool(
        {w for w in _NUMBER_WORDS.findall(best.text.lower())} - q_lower)
    new_name = bool(_names(best.text) - q_lower)
    date = _has_date(best.text)
    f["sentence_has_date"], f["sentence_has_number"] = float(date), float(_has_number(best.text))
    f["sentence_has_name"] = float(bool(_names(best.text)))
    f["sentence_new_number"], f["sentence_new_name"] = float(new_number), float(new_name)
    chunk_new_number = bool(_numbers(chunk) - q_numbers)
    f["chunk_new_number"] = float(chunk_new_number)
    f["when_no_date"] = float(qtype == "when" and not new_number and not (date and not _has_date(question)))
    f["how_many_no_number"] = float(qtype == "how_many" and not new_number)
    f["who_no_name"] = float(qtype == "who" and not new_name)
    f["chunk_when_no_date"] = float(qtype == "when" and not chunk_new_number and not _MONTHS.search(chunk))
    f["chunk_how_many_no_number"] = float(qtype == "how_many" and not chunk_new_number
                                          and not _NUMBER_WORDS.search(chunk))
    f["sentence_words"] = float(len(_WORD.findall(best.text)))
    return f


# -- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    probability: float
    answerable: bool


class AnswerabilityModel:
    """A logistic regression over :func:`features`, loaded from its JSON file; see the module docstring."""

    def __init__(self, spec: dict[str, Any], *, version: str, operating_point: str = "answer_rate=0.9",
                 path: str = "") -> None:
        self.path = path
        self.version = version
        try:
            if spec.get("schema") != SCHEMA:
                raise ValueError(f"schema is {spec.get('schema')!r}, expected {SCHEMA!r}")
            self.features: list[str] = list(spec["features"])
            unknown = [n for n in self.features if n not in FEATURES]
            if unknown:
                raise ValueError(f"features this code does not compute: {', '.join(unknown)}")
            self.kind = spec.get("kind", "logistic_regression")
            if self.kind == "logistic_regression":
                self.mean = [float(x) for x in spec["mean"]]
                self.scale = [float(x) or 1.0 for x in spec["scale"]]
                self.coef = [float(x) for x in spec["coef"]]
                self.intercept = float(spec["intercept"])
                if not len(self.features) == len(self.mean) == len(self.scale) == len(self.coef):
                    raise ValueError("features, mean, scale and coef differ in length")
            elif self.kind == "gradient_boosting":
                self.init = float(spec["init"])
                self.learning_rate = float(spec["learning_rate"])
                self.trees = [Tree.of(t, len(self.features)) for t in spec["trees"]]
                if not self.trees:
                    raise ValueError("no trees")
            else:
                raise ValueError(f"kind {self.kind!r} is neither logistic_regression nor gradient_boosting")
            ranking = spec.get("sentence_ranking") or {}
            self.retrieval_weights = (float(ranking.get("rank_weight", 0.0)), float(ranking.get("fused_weight", 0.0)))
            cv = spec["calibration"]["cv_probabilities"]
            self._pos = sorted(float(p) for p in cv["answerable"])
            self._neg = sorted(float(p) for p in cv["unanswerable"])
            if not self._pos or not self._neg:
                raise ValueError("calibration.cv_probabilities holds no answerable or no unanswerable question")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AnswerabilityModelError(f"answerability model {path or version}: {exc}") from exc
        self.operating_point = operating_point
        self.threshold = self.threshold_for(operating_point)

    def threshold_for(self, operating_point: str) -> float:
        """The probability threshold of an operating point: ``answer_rate=R`` (answer at least R of the
        answerable calibration questions), ``precision=P`` (the lowest threshold whose answers were at least
        P answerable on the calibration sample, half answerable) or ``probability=T``."""
        kind, target = parse_operating_point(operating_point)
        if kind == "probability":
            return target
        if kind == "answer_rate":
            ordered = sorted(self._pos, reverse=True)
            k = max(1, math.ceil(target * len(ordered) - 1e-9))
            return ordered[min(k, len(ordered)) - 1]
        for t in sorted(set(self._pos) | set(self._neg)):
            tp = sum(p >= t for p in self._pos)
            fp = sum(p >= t for p in self._neg)
            if tp and tp / (tp + fp) >= target:
                return t
        return 1.0  # no threshold reaches that precision: answer only what is certain

    def probability(self, feats: dict[str, float]) -> float:
        x = [float(feats.get(n, 0.0)) for n in self.features]
        if self.kind == "gradient_boosting":
            z = self.init + self.learning_rate * sum(t.value(x) for t in self.trees)
        else:
            z = self.intercept + sum(c * (v - m) / s for v, c, m, s in zip(x, self.coef, self.mean, self.scale, strict=True))
        return 1.0 / (1.0 + math.exp(-max(-40.0, min(40.0, z))))

    def decide(self, feats: dict[str, float]) -> Decision:
        p = self.probability(feats)
        return Decision(probability=p, answerable=p >= self.threshold)


@dataclass(frozen=True, slots=True)
class Tree:
    """One regression tree of a gradient boosting model, as sklearn's arrays (a leaf has left == -1)."""

    feature: list[int]
    threshold: list[float]
    left: list[int]
    right: list[int]
    leaf: list[float]

    @classmethod
    def of(cls, spec: dict[str, Any], n_features: int) -> Tree:
        t = cls([int(x) for x in spec["feature"]], [float(x) for x in spec["threshold"]],
                [int(x) for x in spec["left"]], [int(x) for x in spec["right"]], [float(x) for x in spec["value"]])
        n = len(t.feature)
        if not n or not n == len(t.threshold) == len(t.left) == len(t.right) == len(t.leaf):
            raise ValueError("a tree's arrays differ in length")
        for i in range(n):
            if t.left[i] != -1 and not (i < t.left[i] < n and i < t.right[i] < n and 0 <= t.feature[i] < n_features):
                raise ValueError("a tree points outside itself")
        return t

    def value(self, x: list[float]) -> float:
        i = 0
        while self.left[i] != -1:  # children always come after their parent (checked above): this ends
            i = self.left[i] if x[self.feature[i]] <= self.threshold[i] else self.right[i]
        return self.leaf[i]


def parse_operating_point(value: str) -> tuple[str, float]:
    """``answer_rate=0.9`` → ("answer_rate", 0.9); SettingsError naming the problem otherwise."""
    kind, sep, number = value.partition("=")
    kind = kind.strip()
    try:
        target = float(number)
    except ValueError:
        target = math.nan
    if not sep or kind not in ("answer_rate", "precision", "probability") or not 0 <= target <= 1:
        raise SettingsError(f"RAG_ANSWERABILITY_OPERATING_POINT must be answer_rate=R, precision=P or probability=T "
                            f"with a number in [0, 1], not {value!r}")
    return kind, target


def version_of(raw: bytes) -> str:
    return f"answerability@{hashlib.sha256(raw).hexdigest()[:12]}"


def load_model(location: str, operating_point: str = "answer_rate=0.9") -> AnswerabilityModel | None:
    """The model named by ``RAG_ANSWERABILITY_MODEL``: ``bundled`` (rag/models/answerability.json), a path,
    or empty (None: the pipeline falls back to ``RAG_ABSTAIN_THRESHOLD``). A file that is missing,
    unreadable or malformed is an :class:`AnswerabilityModelError` naming it, so a service never starts
    on a decision it was not configured with."""
    if not location.strip():
        return None
    path = BUNDLED if location == "bundled" else Path(location)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AnswerabilityModelError(f"answerability model {path}: cannot read it ({exc.strerror or exc}); "
                                      "set RAG_ANSWERABILITY_MODEL= (empty) to decide by RAG_ABSTAIN_THRESHOLD") from exc
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise AnswerabilityModelError(f"answerability model {path}: not JSON ({exc})") from exc
    if not isinstance(spec, dict):
        raise AnswerabilityModelError(f"answerability model {path}: not a JSON object")
    return AnswerabilityModel(spec, version=version_of(raw), operating_point=operating_point, path=str(path))
