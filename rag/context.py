"""Turn ranked search hits into the numbered, token-bounded context block a prompt quotes.

:func:`build_context` walks the hits best first and, in that one pass:

1. **Drops duplicates**, keeping the better-ranked copy. *Exact*: the same text once runs of
   whitespace are collapsed. *Near*: the Jaccard similarity of the two texts' word 3-shingle sets
   (words are lower-cased runs of letters and digits; a text of fewer than three words is one
   shingle) is at least ``near_duplicate_threshold`` (0.9 by default: a 200-token chunk that differs
   from a better one by a word or two is dropped, while two chunks that merely share a paragraph are
   not). A hit is compared with every better-ranked hit that was not itself a duplicate, except its
   own neighbours in the same document (those are merged instead, see 2).
2. **Merges** a chunk into the source holding its neighbours: chunks of one document (same tenant,
   id and content hash) whose character spans overlap or touch, or whose ``chunk_index`` values are
   consecutive, become one source whose text is the union span. Overlapping parts are written once
   (the overlap is checked to agree; if it does not, the chunks stay separate sources). A gap between
   consecutive chunks (whitespace the chunker skipped) is written as a line break (a blank line when
   the gap is two characters or more), so ``Source.text`` equals the document's text over
   ``[start, end)`` up to that whitespace. A chunk that joins two sources merges all three.
3. **Fits the budget greedily**: a chunk is taken if the whole rendered block, headers included,
   still fits in ``budget_tokens``; if not it is left out (reason ``"budget"``) and the walk goes on,
   since a later, shorter chunk may still fit. A chunk is never cut, except the best-ranked one when
   it alone exceeds the budget: it is truncated at a token boundary, snapped back to a whole
   character, and ``Context.truncated`` says so.

Sources are ordered by their best-ranked chunk (so ``[1]`` is the most relevant evidence and is read
first; a small model attends most to what comes first) and numbered from 1 in that order.

Each source is rendered as data between delimiters, its header being the opening tag::

    <source id="1" title="Normans" from="wiki/normans.md">
    The Normans were ...
    </source>

Attribute values are escaped, and a ``<source`` / ``</source`` inside a document's text is written
as ``&lt;source`` so a document cannot close its own delimiter. Each block ends with ``>\\n`` and the
next starts with ``<``: tiktoken's pre-tokenizer never merges across that seam, so the token count
of the whole block equals the sum over sources (the total is still checked exactly at the end).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import tiktoken

from rag.types import ScoredPoint

__all__ = ["Context", "LeftOut", "Source", "build_context", "render_source"]

LeftOutReason = Literal["budget", "duplicate", "near_duplicate"]

SHINGLE_WORDS = 3

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")
_DELIMITER = re.compile(r"<(/?)(source)", re.IGNORECASE)


class Source(msgspec.Struct, kw_only=True):
    """One numbered source: a chunk, or several adjacent chunks of one document merged."""

    n: int
    document_id: str
    chunk_ids: list[str]  # in document order
    title: str
    source: str
    text: str
    start: int  # character offsets of ``text`` in the document
    end: int
    score: float  # the best score among its chunks
    heading_path: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class LeftOut(msgspec.Struct, kw_only=True):
    chunk_id: str
    document_id: str
    reason: LeftOutReason


class Context(msgspec.Struct, kw_only=True):
    """The context given to a prompt: its sources, their rendered block and what was left out."""

    sources: list[Source]
    text: str  # the rendered sources, each delimited as data
    tokens: int  # exact token count of ``text``
    left_out: list[LeftOut] = msgspec.field(default_factory=list)
    truncated: bool = False  # the first source was cut to fit the budget


def render_source(n: int, title: str, source: str, text: str) -> str:
    """One source block as it appears in ``Context.text``."""
    attrs = f' id="{n}"'
    if title:
        attrs += f' title="{_attr(title)}"'
    if source:
        attrs += f' from="{_attr(source)}"'
    body = _DELIMITER.sub(lambda m: f"&lt;{m.group(1)}{m.group(2)}", text)
    return f"<source{attrs}>\n{body}\n</source>\n"


def build_context(
    hits: Sequence[ScoredPoint],
    *,
    budget_tokens: int,
    encoding: tiktoken.Encoding,
    near_duplicate_threshold: float = 0.9,
) -> Context:
    """Select, de-duplicate, merge and number ``hits`` (best first) within ``budget_tokens``.

    See the module docstring for the rules. The returned ``Context.tokens`` is the exact count of
    ``Context.text`` in ``encoding`` and never exceeds ``budget_tokens``.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be positive, got {budget_tokens}")
    if not 0.0 < near_duplicate_threshold <= 1.0:
        raise ValueError(f"near_duplicate_threshold must be in (0, 1], got {near_duplicate_threshold}")
    builder = _Builder(budget_tokens, encoding)
    seen_exact: set[str] = set()
    seen_shingles: list[tuple[_Piece, frozenset[tuple[str, ...]]]] = []
    for rank, hit in enumerate(hits):
        piece = _Piece.from_hit(hit, rank)
        if not piece.text.strip():
            continue  # nothing to quote; the chunker never emits such chunks
        normalised = _SPACE.sub(" ", piece.text).strip()
        if normalised in seen_exact:
            builder.left_out.append(LeftOut(chunk_id=piece.id, document_id=piece.document_id, reason="duplicate"))
            continue
        shingles = _shingles(normalised)
        # A neighbour in the same document is merged, not compared: with a large chunk overlap it
        # could look like a near duplicate while it still adds text.
        if any(
            _jaccard(shingles, other) >= near_duplicate_threshold and not _touch(piece, seen)
            for seen, other in seen_shingles
        ):
            builder.left_out.append(
                LeftOut(chunk_id=piece.id, document_id=piece.document_id, reason="near_duplicate")
            )
            continue
        seen_exact.add(normalised)
        seen_shingles.append((piece, shingles))
        builder.add(piece)
    return builder.finish()


# -- internals ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Piece:
    """A hit's payload, as far as the context cares; ``text`` is stripped and offsets follow it."""

    id: str
    rank: int
    score: float
    key: tuple[str, str, str]  # (tenant, document_id, content_hash): one version of one document
    document_id: str
    index: int | None
    text: str
    start: int | None  # None when the payload has no usable offsets: such a chunk is never merged
    end: int | None
    title: str
    source: str
    heading_path: list[str]
    metadata: dict[str, Any]

    @classmethod
    def from_hit(cls, hit: ScoredPoint, rank: int) -> _Piece:
        p = hit.payload
        raw = str(p.get("text") or "")
        text = raw.strip()
        start, end, index = p.get("start"), p.get("end"), p.get("chunk_index")
        if _is_int(start) and _is_int(end) and end - start == len(raw):
            start += len(raw) - len(raw.lstrip())
            end = start + len(text)
        else:
            start = end = None
        document_id = str(p.get("document_id", ""))
        return cls(
            id=str(hit.id),
            rank=rank,
            score=float(hit.score),
            key=(str(p.get("tenant", "")), document_id, str(p.get("content_hash", ""))),
            document_id=document_id,
            index=index if _is_int(index) else None,
            text=text,
            start=start,
            end=end,
            title=str(p.get("title") or ""),
            source=str(p.get("source") or ""),
            heading_path=[str(h) for h in p.get("heading_path") or []],
            metadata=dict(p.get("metadata") or {}),
        )


@dataclass(eq=False, slots=True)
class _Group:
    """A source under construction: one chunk, or adjacent chunks of one document merged."""

    pieces: list[_Piece]  # in document order
    text: str
    truncated: bool = False
    counts: dict[int, int] = field(default_factory=dict)  # source number -> tokens of its block

    @property
    def best(self) -> _Piece:
        return min(self.pieces, key=lambda p: p.rank)

    @property
    def rank(self) -> int:
        return self.best.rank

    def render(self, n: int) -> str:
        return render_source(n, self.best.title, self.best.source, self.text)


class _Builder:
    def __init__(self, budget: int, encoding: tiktoken.Encoding) -> None:
        self.budget = budget
        self.enc = encoding
        self.groups: list[_Group] = []  # in source order (best rank first)
        self.left_out: list[LeftOut] = []
        self.truncated = False

    def _tokens(self, group: _Group, n: int) -> int:
        count = group.counts.get(n)
        if count is None:
            count = group.counts[n] = len(self.enc.encode_ordinary(group.render(n)))
        return count

    def _fits(self, groups: list[_Group]) -> bool:
        return sum(self._tokens(g, n) for n, g in enumerate(groups, start=1)) <= self.budget

    def add(self, piece: _Piece) -> None:
        neighbours = [g for g in self.groups if not g.truncated and _adjacent(g, piece)]
        new = _merge([p for g in neighbours for p in g.pieces] + [piece]) if neighbours else None
        if new is None:  # no neighbour, or texts that disagree on their overlap
            neighbours, new = [], _Group(pieces=[piece], text=piece.text)
        # Numbers follow rank; a merge can move later sources up by one, so counts are per number.
        candidate = sorted([g for g in self.groups if g not in neighbours] + [new], key=lambda g: g.rank)
        if self._fits(candidate):
            self.groups = candidate
        elif not self.groups:
            self._truncate_first(new, piece)
        else:
            self.left_out.append(LeftOut(chunk_id=piece.id, document_id=piece.document_id, reason="budget"))

    def _truncate_first(self, group: _Group, piece: _Piece) -> None:
        tokens = self.enc.encode_ordinary(group.text)
        overhead = len(self.enc.encode_ordinary(group.render(1))) - len(tokens)
        keep = min(len(tokens) - 1, self.budget - overhead)
        # Re-encoding a decoded prefix can differ by a token from the prefix itself: step back until it fits.
        while keep > 0:
            text = _decode_prefix(self.enc, tokens[:keep]).rstrip()
            if text:
                cut = _Group(pieces=group.pieces, text=text, truncated=True)
                if self._fits([cut]):
                    self.groups = [cut]
                    self.truncated = True
                    return
            keep -= 1
        self.left_out.append(LeftOut(chunk_id=piece.id, document_id=piece.document_id, reason="budget"))

    def finish(self) -> Context:
        sources = [_source(n, g) for n, g in enumerate(self.groups, start=1)]
        blocks = [g.render(n) for n, g in enumerate(self.groups, start=1)]
        text = "".join(blocks)
        tokens = len(self.enc.encode_ordinary(text))
        # The seam between blocks makes counts additive; should an encoding ever disagree, drop the
        # lowest-ranked sources rather than exceed the budget.
        while tokens > self.budget and sources:
            dropped = self.groups.pop()
            sources.pop()
            blocks.pop()
            self.left_out.extend(
                LeftOut(chunk_id=p.id, document_id=p.document_id, reason="budget") for p in dropped.pieces
            )
            text = "".join(blocks)
            tokens = len(self.enc.encode_ordinary(text))
        return Context(sources=sources, text=text, tokens=tokens, left_out=self.left_out, truncated=self.truncated)


def _source(n: int, group: _Group) -> Source:
    first, last, best = group.pieces[0], group.pieces[-1], group.best
    if first.start is not None and last.end is not None:
        start = first.start
        end = start + len(group.text) if group.truncated else last.end
    else:
        start, end = 0, len(group.text)
    return Source(
        n=n,
        document_id=best.document_id,
        chunk_ids=[p.id for p in group.pieces],
        title=best.title,
        source=best.source,
        text=group.text,
        start=start,
        end=end,
        score=max(p.score for p in group.pieces),
        heading_path=best.heading_path,
        metadata=best.metadata,
    )


def _adjacent(group: _Group, piece: _Piece) -> bool:
    return any(_touch(p, piece) for p in group.pieces)


def _touch(a: _Piece, b: _Piece) -> bool:
    """Whether two chunks of one document version can be merged into one span."""
    if a.key != b.key or a.start is None or a.end is None or b.start is None or b.end is None:
        return False  # without offsets the union span cannot be rebuilt
    if a.start <= b.end and b.start <= a.end:  # overlapping or touching spans
        return True
    return a.index is not None and b.index is not None and abs(a.index - b.index) == 1


def _merge(pieces: list[_Piece]) -> _Group | None:
    """The union span of ``pieces`` (one document, all with offsets), or None if their texts disagree."""
    pieces = sorted(pieces, key=lambda p: (p.start, p.end))
    first = pieces[0]
    assert first.start is not None and first.end is not None
    text, end = first.text, first.end
    # Index in ``text`` of document offset x (x after the last gap) is x - base.
    base = first.start
    for p in pieces[1:]:
        assert p.start is not None and p.end is not None
        if p.start <= end:
            shared_end = min(p.end, end)
            if text[p.start - base : shared_end - base] != p.text[: shared_end - p.start]:
                return None
            if p.end > end:
                text += p.text[end - p.start :]
                end = p.end
        else:
            gap = "\n\n" if p.start - end >= 2 else "\n"
            base = p.start - len(text) - len(gap)
            text += gap + p.text
            end = p.end
    return _Group(pieces=pieces, text=text)


def _decode_prefix(enc: tiktoken.Encoding, tokens: list[int]) -> str:
    """Decode tokens, dropping a trailing partial UTF-8 sequence (a character split across tokens)."""
    data = enc.decode_bytes(tokens)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data[: exc.start].decode("utf-8", errors="replace")


def _shingles(text: str) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1))


def _jaccard(a: frozenset[tuple[str, ...]], b: frozenset[tuple[str, ...]]) -> float:
    inter = len(a & b)
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _attr(value: str) -> str:
    return html.escape(_SPACE.sub(" ", value).strip(), quote=True)
