"""Citations checked against their sources before a generative answer is returned.

A small model cites ``[2]`` for what source 1 says, or cites a source for something no source says.
:func:`verify_citations` takes each sentence of the reply that carries a ``[n]`` (the *claim*, its
markers removed; a claim of fewer than three words, like "Paris [1]", is read together with the
question) and scores it against every sentence of the context with the same support model as the
extractive answers (:func:`rag.extractive.rank_sentences`, the claim embedded like a document, as
:func:`rag.extractive.best_support` does). For each cited ``[n]``:

- ``kept``: a sentence of source n supports the claim at ``threshold`` or more;
- ``repointed``: it does not, but a sentence of another source m does: ``[n]`` becomes ``[m]``
  (the best-supporting source);
- ``dropped``: no source supports it (or n is no source): the marker is removed.

The threshold is ``RAG_CITATION_THRESHOLD``; its default reuses the abstention threshold's value
(0.6439, chosen on the SQuAD 2.0 dev calibration half for question-to-sentence support), not a value
fitted to claims.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import msgspec
import numpy as np

from rag.context import Context
from rag.embedding import Embedder
from rag.extractive import SupportingSentence, rank_sentences, split_sentences
from rag.vector_cache import VectorCache

__all__ = ["CitationCheck", "verify_citations"]

_MARKER = re.compile(r"(\s*)\[(\d{1,3})\]")
_WORD = re.compile(r"\w+")
MIN_CLAIM_WORDS = 3


class CitationCheck(msgspec.Struct, kw_only=True):
    """What became of one ``[n]`` of the reply: ``to`` is the source it points to now (None when dropped)."""

    n: int
    status: Literal["kept", "repointed", "dropped"]
    to: int | None
    support: float  # the best support of the claim by a sentence of source n (-1: n is no source)
    claim: str


def verify_citations(text: str, question: str, context: Context, embedder: Embedder, *, threshold: float,
                     cache: VectorCache | None = None, namespace: str = "",
                     known: Mapping[str, np.ndarray] | None = None) -> tuple[str, list[CitationCheck]]:
    """``text`` with every ``[n]`` kept, re-pointed or dropped, and what was done to each (in order). ``known``:
    sentence vectors already at hand (stored at ingest), not embedded again."""
    if not _MARKER.search(text):
        return text, []
    valid = {s.n for s in context.sources}
    checks: list[CitationCheck] = []
    pieces: list[str] = []
    at = 0
    for start, end in _claim_spans(text):
        sentence = text[start:end]
        if not _MARKER.search(sentence):
            continue
        claim = " ".join(_MARKER.sub(" ", sentence).split()).strip("\"'\u201c\u201d ")
        if len(_WORD.findall(claim)) < MIN_CLAIM_WORDS:
            claim = f"{question} {claim}".strip()
        best = _best_by_source(claim, context, embedder, cache, namespace, known)
        top = max(best.values(), key=lambda s: s.score, default=None)
        kept_here: set[int] = set()

        def decide(m: re.Match[str]) -> str:
            n = int(m.group(2))
            support = best[n].score if n in best else -1.0
            if n in valid and support >= threshold:
                status, to = "kept", n
            elif top is not None and top.score >= threshold and top.n != n:
                status, to = "repointed", top.n
            else:
                status, to = "dropped", None
            checks.append(CitationCheck(n=n, status=status, to=to, support=round(support, 4), claim=claim))
            if to is None or to in kept_here:  # dropped, or the same source cited twice in a row now
                return ""
            kept_here.add(to)
            return f"{m.group(1)}[{to}]"

        pieces.append(text[at:start])
        pieces.append(_MARKER.sub(decide, sentence))
        at = end
    pieces.append(text[at:])
    return "".join(pieces), checks


def _claim_spans(text: str) -> list[tuple[int, int]]:
    """Sentence spans of ``text``; markers standing after a sentence's period ("… long. [1]") join it."""
    spans: list[tuple[int, int]] = []
    for start, end in split_sentences(text):
        if spans and not _WORD.search(_MARKER.sub(" ", text[start:end])):
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def _best_by_source(claim: str, context: Context, embedder: Embedder, cache: VectorCache | None,
                    namespace: str, known: Mapping[str, np.ndarray] | None = None) -> dict[int, SupportingSentence]:
    claim_vec = embedder.embed_documents([claim])[0]
    best: dict[int, SupportingSentence] = {}
    for s in rank_sentences(claim, claim_vec, context, embedder, cache=cache, namespace=namespace, known=known):
        best.setdefault(s.n, s)  # ranked best first
    return best
