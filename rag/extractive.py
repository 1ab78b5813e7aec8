"""Extractive answers: the source sentences that best answer a question, quoted with their ``[n]``.

A small local LLM often answers off the point; the sentence of the context most similar to the
question is a strong answer on its own (with the gold SQuAD paragraph as context, the top MiniLM
sentence contains the gold answer 84 % of the time, SmolLM2-135M's free answer 39 %). This module
makes that path first-class: :func:`extract_answer` picks the best sentence(s), and
:func:`best_support` finds the sentence that backs a generated answer.

Scoring (``score`` on every sentence)::

    score = cosine(question, sentence) + LEXICAL_WEIGHT * overlap

``cosine`` comes from the embedder (``embed_queries`` for the question, ``embed_documents`` for the
sentences; both L2-normalised). ``overlap`` is the share of the question's content words (lower-cased,
stop words removed, common suffixes stripped) that occur in the sentence, in [0, 1]. Sentences of fewer
than MIN_WORDS words (headings, list stubs) are not chosen while a longer sentence exists.

Calibration, on 400 random answerable SQuAD 2.0 *dev* questions with the gold paragraph as the only
source (no test split was looked at), share of top-1 sentences containing a gold answer:
LEXICAL_WEIGHT 0 → 0.812, 0.1 → 0.840, 0.2 → 0.845, 0.3 → 0.855, 0.5 → 0.858 (plural-only
stemming; the suffix stripper used now scores 0.848 at 0.2). We take 0.2: most of
the gain while the cosine still carries the ranking; SQuAD questions copy
words from their paragraph, so a larger weight would fit SQuAD more than real questions. A second
sentence within SECOND_SENTENCE_MARGIN (0.03) of the best is quoted too (in ~10 % of questions),
which lifts containment to 0.880 for ~7 more characters on average. Embedding each sentence
together with the one before it (to resolve "It …") was tried: it helped only together with the
lexical term and hurt on its own, so it was left out; a sentence that starts with a pronoun can lose
to the sentence that names the subject.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
import numpy as np

from rag.context import Context, Source
from rag.embedding import Embedder
from rag.sentences import split_sentences
from rag.vector_cache import VectorCache

__all__ = [
    "LEXICAL_WEIGHT",
    "SECOND_SENTENCE_MARGIN",
    "ExtractiveAnswer",
    "SupportingSentence",
    "best_support",
    "content_words",
    "retrieval_priors",
    "extract_answer",
    "split_sentences",
]

LEXICAL_WEIGHT = 0.2
# A second (third, …) sentence is quoted only if it scores within this margin of the best one:
# a close runner-up often carries the answer when the best sentence only restates the question.
SECOND_SENTENCE_MARGIN = 0.03
MIN_WORDS = 3
NO_EVIDENCE_SCORE = -1.0  # best_score when the context has no sentence at all


class SupportingSentence(msgspec.Struct, kw_only=True):
    """A sentence of source ``n``; ``start``/``end`` are character offsets into that source's text."""

    n: int
    document_id: str
    text: str
    start: int
    end: int
    score: float
    # The parts of ``score``: cosine to the question, lexical overlap, and the retrieval prior of its source.
    cosine: float = 0.0
    lexical: float = 0.0
    prior: float = 0.0


class ExtractiveAnswer(msgspec.Struct, kw_only=True):
    """``text`` quotes the chosen sentences, each followed by its citation: ``"<sentence> [n]"``."""

    text: str
    sentences: list[SupportingSentence]
    best_score: float


# -- scoring ------------------------------------------------------------------------------------

_STOP_WORDS = frozenset(
    """a an the and or but if of to in on at by for from with without as is are was were be been being
    am do does did done has have had having it its this that these those there here what which who whom
    whose when where why how than then so such not no nor can could should would may might must will
    shall into onto about above below over under between during before after up down out off again
    further once all any both each few more most other some own same too very s t just also i me my we
    our you your he him his she her they them their one many much""".split()
)
_TOKEN = re.compile(r"\w+")
_CITATION = re.compile(r"\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")


def _stem(word: str) -> str:
    """A light suffix stripper, so that "released", "releases" and "release" meet."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def content_words(text: str) -> set[str]:
    """The text's content words: lower-cased, stop words removed, light suffixes stripped (the lexical overlap's unit)."""
    return {_stem(w) for w in _TOKEN.findall(text.lower()) if w not in _STOP_WORDS}


def _overlap(query_words: set[str], sentence: str) -> float:
    if not query_words:
        return 0.0
    return len(query_words & content_words(sentence)) / len(query_words)


@dataclass(slots=True)
class _Candidate:
    source: Source
    start: int
    end: int
    text: str
    words: int


def _candidates(context: Context) -> list[_Candidate]:
    out = []
    for source in context.sources:
        for s, e in split_sentences(source.text):
            sentence = source.text[s:e]
            out.append(_Candidate(source, s, e, sentence, len(_TOKEN.findall(sentence))))
    return out


def _sentence_vectors(texts: list[str], embedder: Embedder, cache: VectorCache | None, namespace: str,
                      known: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The sentences' vectors: from ``known`` (stored at ingest), else the cache, else embedded now."""
    def embed(some: list[str]) -> np.ndarray:
        return embedder.embed_documents(some) if cache is None else cache.documents(embedder, some, namespace=namespace)

    if not known:
        return embed(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    row = dict(zip(missing, embed(missing), strict=True)) if missing else {}
    return np.stack([known[t] if t in known else row[t] for t in texts]).astype(np.float32, copy=False)


def _parts(query: str, query_vec: np.ndarray, candidates: list[_Candidate], embedder: Embedder,
           cache: VectorCache | None = None, namespace: str = "",
           known: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    vectors = _sentence_vectors([c.text for c in candidates], embedder, cache, namespace, known)
    cosine = vectors @ np.asarray(query_vec, dtype=np.float32).reshape(-1)
    words = content_words(query)
    lexical = np.array([_overlap(words, c.text) for c in candidates], dtype=np.float32)
    return cosine, lexical


def _scores(query: str, query_vec: np.ndarray, candidates: list[_Candidate], embedder: Embedder,
            cache: VectorCache | None = None, namespace: str = "") -> np.ndarray:
    cosine, lexical = _parts(query, query_vec, candidates, embedder, cache, namespace)
    return cosine + LEXICAL_WEIGHT * lexical


def retrieval_priors(sources: list[Source] | tuple[Source, ...], rank_weight: float, fused_weight: float) -> dict[int, float]:
    """Each source's retrieval prior, added to its sentences' scores: ``rank_weight / rank`` (rank 1 is the
    first source of the context) plus ``fused_weight * score / best score`` (the fused retrieval score
    relative to the best source's). Both weights 0 (the default) rank by the sentence alone."""
    if not sources or (rank_weight == 0 and fused_weight == 0):
        return {s.n: 0.0 for s in sources}
    top = max(s.score for s in sources)
    return {s.n: rank_weight / rank + (fused_weight * s.score / top if top > 0 else 0.0)
            for rank, s in enumerate(sources, start=1)}


def _ranked(candidates: list[_Candidate], scores: np.ndarray) -> list[int]:
    """Candidate indices best first; headings and stubs only when there is no real sentence."""
    eligible = [i for i, c in enumerate(candidates) if c.words >= MIN_WORDS] or list(range(len(candidates)))
    return sorted(eligible, key=lambda i: -float(scores[i]))


def _supporting(c: _Candidate, score: float, cosine: float = 0.0, lexical: float = 0.0,
                prior: float = 0.0) -> SupportingSentence:
    return SupportingSentence(
        n=c.source.n, document_id=c.source.document_id, text=c.text, start=c.start, end=c.end, score=float(score),
        cosine=float(cosine), lexical=float(lexical), prior=float(prior),
    )


def rank_sentences(
    question: str, question_vec: np.ndarray | None, context: Context, embedder: Embedder, *,
    cache: VectorCache | None = None, namespace: str = "", retrieval_weights: tuple[float, float] = (0.0, 0.0),
    known: Mapping[str, np.ndarray] | None = None,
) -> list[SupportingSentence]:
    """Every sentence of the context scored against ``question``, best first (see :func:`extract_answer`).

    With a ``cache``, sentences (and the question) embedded before under ``namespace`` (the tenant) and
    this encoder are not embedded again: a chunk retrieved for many questions costs one embedding.
    ``retrieval_weights`` ``(rank, fused)`` add each sentence's source prior (:func:`retrieval_priors`):
    a sentence of the best-retrieved chunk beats an equally similar one of the eighth. ``known`` maps sentence
    texts to vectors already at hand (stored at ingest, :mod:`rag.sentence_vectors`): those are not embedded.
    """
    candidates = _candidates(context)
    if not candidates:
        return []
    if question_vec is None:
        question_vec = (embedder.embed_queries([question]) if cache is None
                        else cache.queries(embedder, [question], namespace=namespace))[0]
    cosine, lexical = _parts(question, question_vec, candidates, embedder, cache, namespace, known)
    priors = retrieval_priors(context.sources, *retrieval_weights)
    prior = np.array([priors[c.source.n] for c in candidates], dtype=np.float32)
    scores = cosine + LEXICAL_WEIGHT * lexical + prior
    return [_supporting(candidates[i], scores[i], cosine[i], lexical[i], prior[i]) for i in _ranked(candidates, scores)]


def answer_from_ranked(ranked: list[SupportingSentence], *, max_sentences: int = 2) -> ExtractiveAnswer:
    """The extractive answer from already ranked sentences: the best, plus close runners-up."""
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
    if not ranked:
        return ExtractiveAnswer(text="", sentences=[], best_score=NO_EVIDENCE_SCORE)
    best = ranked[0].score
    sentences = [s for s in ranked[:max_sentences] if s.score >= best - SECOND_SENTENCE_MARGIN]
    text = " ".join(f"{s.text} [{s.n}]" for s in sentences)
    return ExtractiveAnswer(text=text, sentences=sentences, best_score=sentences[0].score)


def extract_answer(
    question: str,
    question_vec: np.ndarray | None,
    context: Context,
    embedder: Embedder,
    *,
    max_sentences: int = 2,
) -> ExtractiveAnswer:
    """Quote the context sentence(s) that best answer ``question``, each with its ``[n]``.

    ``question_vec`` is the question's embedding if the caller already has it (retrieval does);
    otherwise it is computed with ``embedder.embed_queries``. The best sentence is always quoted;
    up to ``max_sentences - 1`` more follow, best first, if they score within
    :data:`SECOND_SENTENCE_MARGIN` of it. With no sentence in the context the answer is empty and
    ``best_score`` is -1.0.
    """
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be at least 1, got {max_sentences}")
    return answer_from_ranked(rank_sentences(question, question_vec, context, embedder), max_sentences=max_sentences)


def best_support(answer_text: str, context: Context, embedder: Embedder) -> SupportingSentence | None:
    """The context sentence that best supports ``answer_text`` (e.g. an LLM's answer), or None.

    Citation markers (``[1]``, ``[1, 2]``) are removed from the answer first; the answer and the
    sentences are embedded alike (``embed_documents``) and scored like :func:`extract_answer`.
    """
    claim = _CITATION.sub(" ", answer_text).strip().strip("\"'\u201c\u201d")
    candidates = _candidates(context)
    if not claim or not candidates:
        return None
    claim_vec = embedder.embed_documents([claim])[0]
    scores = _scores(claim, claim_vec, candidates, embedder)
    i = _ranked(candidates, scores)[0]
    return _supporting(candidates[i], scores[i])
