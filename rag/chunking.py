"""Split a document into token-bounded chunks that follow its structure.

Rules, in order of preference:

1. The text is cut into *blocks*: paragraphs (separated by blank lines), Markdown ATX headings
   (``# Title``; also setext ``Title\\n=====`` / ``Title\\n-----`` on a one-line paragraph), and
   fenced code blocks (kept whole; ``#`` lines inside a fence are not headings).
2. Whole blocks are packed greedily into a chunk while it stays within ``max_tokens``.
3. A heading always starts a new chunk, so every chunk lies in exactly one section and its
   ``heading_path`` is well defined. The one exception: a chunk holding nothing but headings
   (``# Install`` directly followed by ``## Linux``) is not emitted alone; it is carried into the
   next chunk, whose path is then the deepest one (``["Install", "Linux"]``).
4. A block longer than ``max_tokens`` is cut into windows of whole *units*: its sentences
   (:func:`rag.sentences.split_sentences`); the words of a sentence longer than ``max_tokens``; and
   runs of at most ``max_tokens`` tokens of a word longer than that (unspaced CJK text, a long URL),
   snapped to character boundaries so that a multi-byte character whose UTF-8 bytes are spread
   over several tokens is never cut. Windows are packed greedily (counted exactly); a window that
   holds new text stops before a sentence too long for a window, which so starts the next one. The
   next window starts at the suffix of whole units of the previous one whose token count is
   nearest ``overlap`` (ties to the shorter; none when ``overlap`` is 0). So a chunk after the
   first of a long paragraph starts at a sentence, unless it lies inside a sentence longer than a
   window, and then at a word. Chunks made of whole blocks do not overlap. The last window of a
   long block may be packed together with the blocks that follow it.

Every chunk satisfies ``chunk.text == doc.text[chunk.start:chunk.end]``; it starts and ends on
non-whitespace, and ``chunk.token_count == len(encoding.encode_ordinary(chunk.text)) <=
max_tokens`` (counts are exact, not estimates: a chunk assembled from several pieces is re-encoded
once to check it). The output is a pure function of the text and the parameters (chunk ids are
``(tenant, document, content hash, index)``; :data:`CHUNKER_VERSION` is part of the content hash).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np
import tiktoken

from rag.sentences import split_sentences
from rag.types import Chunk, Document

# Part of the ingest signature: a change to where chunks are cut changes every document's content
# hash, so re-ingesting a document after an upgrade re-chunks it (new point ids, the old generation
# replaced) instead of finding it "unchanged"; and the eval harness keys its index by it.
CHUNKER_VERSION = "sentences-1"

# The smallest budget that always fits one code point (at most 4 UTF-8 bytes, one token each).
MIN_MAX_TOKENS = 4

_BLANK_RUN = re.compile(r"\n(?:[^\S\n]*\n)+")
# Any line that might be structural; if none matches, paragraphs are split by regex alone.
_STRUCTURE_HINT = re.compile(r"^ {0,3}(?:#|```|~~~|=+[ \t]*$|-+[ \t]*$)", re.MULTILINE)
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
_WORD = re.compile(r"\S+")


@dataclass(slots=True)
class _Block:
    start: int
    end: int
    heading_path: list[str]
    is_heading: bool = False
    tokens: list[int] | None = None


@dataclass(slots=True)
class _Unit:
    """A piece of a long span that windows never cut: offsets into the span, its own token count."""

    start: int
    end: int
    tokens: int
    long_head: bool = False  # the first word of a sentence too long for one window


@dataclass(slots=True)
class _Pending:
    """The chunk being packed: a run of pieces of the text inside one section."""

    start: int
    end: int
    heading_path: list[str]
    tokens: int  # exact if ``exact``, else an estimate
    headings_only: bool
    exact: bool
    piece_ends: list[int] = field(default_factory=list)


def chunk(
    doc: Document, max_tokens: int, overlap: int, encoding: tiktoken.Encoding
) -> list[Chunk]:
    """Split ``doc.text`` into chunks of at most ``max_tokens`` tokens (see the module docstring).

    ``overlap`` (0 <= overlap < max_tokens) is the number of tokens that consecutive windows of a
    long block share. Empty or whitespace-only text gives ``[]``.
    """
    if max_tokens < MIN_MAX_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_MAX_TOKENS}, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got {overlap} for {max_tokens}")
    text = doc.text
    if not text or text.isspace():
        return []
    return _Chunker(doc.id, text, max_tokens, overlap, encoding).run()


class _Chunker:
    def __init__(
        self, doc_id: str, text: str, max_tokens: int, overlap: int, enc: tiktoken.Encoding
    ) -> None:
        self.doc_id = doc_id
        self.text = text
        self.max = max_tokens
        self.overlap = overlap
        self.enc = enc
        self.out: list[Chunk] = []
        self.pending: _Pending | None = None

    # -- driver ---------------------------------------------------------------------------------

    def run(self) -> list[Chunk]:
        for block in _blocks(self.text):
            block.tokens = self.enc.encode_ordinary(self.text[block.start : block.end])
            self._add(block)
        if self.pending is not None:
            self._flush()
        return self.out

    def _add(self, block: _Block) -> None:
        n = len(block.tokens or ())
        pending = self.pending
        if block.is_heading and pending is not None and not pending.headings_only:
            self._flush()
            pending = None
        if pending is not None:
            # Blocks are separated by a blank line (~1 token) or a single newline; the estimate
            # is checked exactly when the chunk is emitted.
            estimate = pending.tokens + 1 + n
            exact = False
            if self.max < estimate <= self.max + len(pending.piece_ends):
                # Close call: a join can cost nothing (".\n\n" is one token), so count exactly
                # rather than leave a chunk underfilled.
                estimate = self._count(pending.start, block.end)
                exact = True
            if estimate <= self.max:
                pending.end = block.end
                pending.tokens = estimate
                pending.exact = exact
                pending.piece_ends.append(block.end)
                pending.heading_path = block.heading_path
                pending.headings_only = pending.headings_only and block.is_heading
                return
            if n > self.max and pending.headings_only:
                # Keep the section's headings with the first window of its long paragraph.
                self.pending = None
                self._split(pending.start, block.end, block.heading_path, None)
                return
            self._flush()
        if n > self.max:
            self._split(block.start, block.end, block.heading_path, block.tokens)
            return
        self.pending = _Pending(
            start=block.start,
            end=block.end,
            heading_path=block.heading_path,
            tokens=n,
            headings_only=block.is_heading,
            exact=True,
            piece_ends=[block.end],
        )

    def _flush(self) -> None:
        pending = self.pending
        self.pending = None
        assert pending is not None
        if pending.exact:
            self._emit(pending.start, pending.end, pending.heading_path, pending.tokens)
            return
        count = self._count(pending.start, pending.end)
        if count <= self.max:
            self._emit(pending.start, pending.end, pending.heading_path, count)
            return
        # The estimate was optimistic (rare: tokens merge differently across piece joins). Emit
        # the longest prefix of whole pieces that fits, then start over from the next piece.
        ends = pending.piece_ends
        for i in range(len(ends) - 2, -1, -1):
            count = self._count(pending.start, ends[i])
            if count <= self.max:
                self._emit(pending.start, ends[i], pending.heading_path, count)
                rest = _skip_space(self.text, ends[i], pending.end)
                break
        else:
            rest = pending.start
        self._split(rest, pending.end, pending.heading_path, None)
        if self.pending is not None:  # the split's last window: exact, so emitted directly
            self._flush()

    # -- long spans -----------------------------------------------------------------------------

    def _split(
        self, start: int, end: int, heading_path: list[str], tokens: list[int] | None
    ) -> None:
        """Cut ``text[start:end]`` into overlapping windows of whole units; the last one stays pending."""
        sub = self.text[start:end]
        if tokens is None:
            tokens = self.enc.encode_ordinary(sub)
        if len(tokens) <= self.max:
            self.pending = _Pending(start, end, heading_path, len(tokens), False, True, [end])
            return
        units = self._units(sub)
        n = len(units)
        i = 0
        prev_last = -1  # the last unit of the previous window
        while i < n:
            j, count = self._window(sub, units, i, prev_last)
            if j <= prev_last:
                # The overlap and the next unit do not fit together: start after the overlap.
                i = prev_last + 1
                continue
            s, e = start + units[i].start, start + units[j].end
            if j == n - 1:
                self.pending = _Pending(s, e, heading_path, count, False, True, [e])
                return
            self._emit(s, e, heading_path, count)
            prev_last = j
            i = self._overlap_start(units, i, j)

    def _window(self, sub: str, units: list[_Unit], i: int, prev_last: int) -> tuple[int, int]:
        """The last unit ``j`` of the longest run ``units[i..j]`` within budget, and its exact count.

        Units are packed by their own counts (an estimate: a run re-encodes a few tokens
        differently at the joins), then the run is counted exactly and shrunk or grown by whole
        units. A window that already holds new text stops before a sentence too long for a window
        of its own, so that such a sentence starts a window.
        """
        n = len(units)

        def stops_before(k: int, j: int) -> bool:
            return units[k].long_head and j > prev_last

        j, estimate = i, units[i].tokens
        while j + 1 < n and not stops_before(j + 1, j) and estimate + units[j + 1].tokens <= self.max:
            j += 1
            estimate += units[j].tokens
        count = self._count_sub(sub, units[i].start, units[j].end)
        while count > self.max and j > i:
            j -= 1
            count = self._count_sub(sub, units[i].start, units[j].end)
        while j + 1 < n and not stops_before(j + 1, j):
            grown = self._count_sub(sub, units[i].start, units[j + 1].end)
            if grown > self.max:
                break
            j, count = j + 1, grown
        return j, count

    def _overlap_start(self, units: list[_Unit], i: int, j: int) -> int:
        """Where the window after ``units[i..j]`` starts: the suffix of whole units whose token count
        is nearest ``overlap`` (ties to the shorter), leaving room for the next unit."""
        best, best_diff = j + 1, self.overlap
        room = self.max - units[j + 1].tokens
        shared = 0
        for k in range(j, i, -1):
            shared += units[k].tokens
            if shared > room or shared - self.overlap >= best_diff:
                break
            diff = abs(shared - self.overlap)
            if diff < best_diff:
                best, best_diff = k, diff
        return best

    def _units(self, sub: str) -> list[_Unit]:
        """What windows are made of: sentences; the words of a sentence over budget; and token runs
        (snapped to character boundaries) of a word over budget, such as unspaced CJK text."""
        units: list[_Unit] = []
        for s, e in split_sentences(sub):
            n = self._count_sub(sub, s, e)
            if n <= self.max:
                units.append(_Unit(s, e, n))
                continue
            head = True
            for m in _WORD.finditer(sub, s, e):
                ws, we = m.span()
                wn = self._count_sub(sub, ws, we)
                if wn <= self.max:
                    units.append(_Unit(ws, we, wn, long_head=head))
                else:
                    for k, (ps, pe, pn) in enumerate(self._token_runs(sub[ws:we])):
                        units.append(_Unit(ws + ps, ws + pe, pn, long_head=head and k == 0))
                head = False
        return units

    def _token_runs(self, word: str) -> list[tuple[int, int, int]]:
        """``word`` cut into runs of at most ``max_tokens`` tokens at character boundaries."""
        tokens = self.enc.encode_ordinary(word)
        bounds = _token_char_bounds(self.enc, word, tokens)
        n = len(tokens)
        out: list[tuple[int, int, int]] = []
        t0 = c0 = 0
        while c0 < len(word):
            te = min(t0 + self.max, n)
            ce = bounds[te] if te < n else len(word)
            ce = max(ce, c0 + 1)
            count = self._count_sub(word, c0, ce)
            while count > self.max and ce > c0 + 1:
                # Shrink by the excess at token boundaries. bisect_left: the tokens of one split
                # character share a boundary; starting from the first of them moves the end back.
                te = max(bisect_left(bounds, ce) - (count - self.max), t0)
                ce = max(bounds[te], c0 + 1)
                count = self._count_sub(word, c0, ce)
            out.append((c0, ce, count))
            c0 = ce
            t0 = bisect_left(bounds, ce)
        return out

    # -- helpers --------------------------------------------------------------------------------

    def _count(self, start: int, end: int) -> int:
        return len(self.enc.encode_ordinary(self.text[start:end]))

    def _count_sub(self, sub: str, start: int, end: int) -> int:
        return len(self.enc.encode_ordinary(sub[start:end]))

    def _emit(self, start: int, end: int, heading_path: list[str], count: int) -> None:
        self.out.append(
            Chunk(
                document_id=self.doc_id,
                index=len(self.out),
                text=self.text[start:end],
                start=start,
                end=end,
                heading_path=list(heading_path),
                token_count=count,
            )
        )


# -- block segmentation -------------------------------------------------------------------------


def _blocks(text: str) -> list[_Block]:
    if _STRUCTURE_HINT.search(text) is None:
        return _paragraphs(text, 0, len(text), [])
    return _structured_blocks(text)


def _paragraphs(text: str, start: int, end: int, path: list[str]) -> list[_Block]:
    """Blank-line separated paragraphs of ``text[start:end]``, trimmed of surrounding space."""
    out: list[_Block] = []
    pos = start
    for m in _BLANK_RUN.finditer(text, start, end):
        _append_trimmed(out, text, pos, m.start(), path)
        pos = m.end()
    _append_trimmed(out, text, pos, end, path)
    return out


def _append_trimmed(out: list[_Block], text: str, s: int, e: int, path: list[str]) -> None:
    s = _skip_space(text, s, e)
    e = _rstrip_end(text, s, e)
    if e > s:
        out.append(_Block(s, e, path))


def _structured_blocks(text: str) -> list[_Block]:
    """Markdown-ish blocks of ``text``: headings (with their path) and paragraphs, fenced code kept whole."""
    # One piece on purpose: this is a single state machine over lines (open paragraph, open fence,
    # heading stack), and a setext underline rewrites the paragraph just opened. Split into functions,
    # every step would take and return all of that state; read top to bottom, each branch is one transition.
    out: list[_Block] = []
    stack: list[tuple[int, str]] = []  # (level, heading text)
    path: list[str] = []
    para_start = -1  # start of the open paragraph, -1 if none
    para_lines = 0
    fence: str | None = None  # the opening fence marker while inside a fenced block

    def close_para(end: int) -> None:
        nonlocal para_start, para_lines
        if para_start >= 0:
            _append_trimmed(out, text, para_start, end, path)
        para_start, para_lines = -1, 0

    def push_heading(level: int, title: str, s: int, e: int) -> None:
        nonlocal path
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
        path = [t for _, t in stack]
        s = _skip_space(text, s, e)
        out.append(_Block(s, _rstrip_end(text, s, e), path, is_heading=True))

    pos = 0
    n = len(text)
    while pos < n:
        nl = text.find("\n", pos)
        line_end = n if nl < 0 else nl
        next_pos = n if nl < 0 else nl + 1
        line = text[pos:line_end].rstrip("\r")

        if fence is not None:
            m = _FENCE.match(line)
            if m and _closes(fence, m.group(1), line[m.end() :]):
                fence = None
                close_para(line_end)
            pos = next_pos
            continue

        if not line.strip():
            close_para(pos)
            pos = next_pos
            continue

        m = _FENCE.match(line)
        if m:
            close_para(pos)
            fence = m.group(1)
            para_start, para_lines = pos, 1
            pos = next_pos
            continue

        m = _ATX.fullmatch(line)
        if m:
            close_para(pos)
            title = (m.group(2) or "").strip()
            push_heading(len(m.group(1)), title, pos, pos + len(line))
            pos = next_pos
            continue

        m = _SETEXT.fullmatch(line)
        if m and para_start >= 0 and para_lines == 1:
            title = text[para_start:pos].strip()
            level = 1 if m.group(1)[0] == "=" else 2
            s = para_start
            para_start, para_lines = -1, 0
            push_heading(level, title, s, pos + len(line))
            pos = next_pos
            continue

        if para_start < 0:
            para_start = pos
        para_lines += 1
        pos = next_pos

    close_para(n)
    return out


# -- offsets ------------------------------------------------------------------------------------


def _token_char_bounds(enc: tiktoken.Encoding, text: str, tokens: list[int]) -> list[int]:
    """Character offset of every token boundary (``len(tokens) + 1`` values, non-decreasing).

    Tokens are byte sequences; a boundary that falls inside a character's UTF-8 bytes is snapped
    down to that character's start.
    """
    lengths = _token_byte_lengths(enc)[np.asarray(tokens, dtype=np.int64)]
    byte_bounds = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum(lengths, out=byte_bounds[1:])
    if text.isascii():
        return byte_bounds.tolist()
    # surrogatepass: a lone surrogate takes 3 bytes, like the U+FFFD tiktoken encodes it as.
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    # starts_upto[i] = number of characters starting at or before byte i, so the character that
    # contains byte i (or starts there) has index starts_upto[i] - 1.
    starts_upto = np.cumsum((raw & 0xC0) != 0x80)
    total = len(raw)
    chars = starts_upto[np.minimum(byte_bounds, total - 1)] - 1
    chars[byte_bounds >= total] = len(text)
    return chars.tolist()


_byte_length_tables: dict[int, tuple[tiktoken.Encoding, np.ndarray]] = {}


def _token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """Byte length of every token id of ``enc`` (built once per encoding object)."""
    cached = _byte_length_tables.get(id(enc))
    if cached is not None and cached[0] is enc:
        return cached[1]
    table = np.zeros(enc.max_token_value + 1, dtype=np.int64)
    for token in range(enc.max_token_value + 1):
        try:
            table[token] = len(enc.decode_single_token_bytes(token))
        except KeyError:  # unused ids between the regular and the special tokens
            pass
    _byte_length_tables[id(enc)] = (enc, table)
    return table


def _closes(fence: str, marker: str, rest: str) -> bool:
    """Whether a fence line closes the open fence (same character, at least as long, bare)."""
    return marker[0] == fence[0] and len(marker) >= len(fence) and not rest.strip()


def _skip_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _rstrip_end(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


__all__ = ["CHUNKER_VERSION", "MIN_MAX_TOKENS", "chunk"]
