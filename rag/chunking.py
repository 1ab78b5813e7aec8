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
4. A block longer than ``max_tokens`` is cut into windows of at most ``max_tokens`` tokens; each
   window ends at the last sentence end or line end in its second half if there is one, else at a
   token boundary (snapped down to a character boundary, so a multi-byte character whose UTF-8
   bytes are spread over several tokens is never cut). Consecutive windows overlap by about
   ``overlap`` tokens; chunks made of whole blocks do not overlap. The last window of a long block
   may be packed together with the blocks that follow it.

Every chunk satisfies ``chunk.text == doc.text[chunk.start:chunk.end]``; it starts and ends on
non-whitespace, and ``chunk.token_count == len(encoding.encode_ordinary(chunk.text)) <=
max_tokens`` (counts are exact, not estimates: a chunk assembled from several pieces is re-encoded
once to check it). Each block is encoded once; a long block's tokens are reused for its windows.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

import numpy as np
import tiktoken

from rag.types import Chunk, Document

# The smallest budget that always fits one code point (at most 4 UTF-8 bytes, one token each).
MIN_MAX_TOKENS = 4

_BLANK_RUN = re.compile(r"\n(?:[^\S\n]*\n)+")
# Any line that might be structural; if none matches, paragraphs are split by regex alone.
_STRUCTURE_HINT = re.compile(r"^ {0,3}(?:#|```|~~~|=+[ \t]*$|-+[ \t]*$)", re.MULTILINE)
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
# Where a window may end: after sentence punctuation (plus closing quotes/brackets) that is
# followed by whitespace, after CJK full stops, or at the end of a line.
_BREAK = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]+|[^\n](?=\n)")


@dataclass(slots=True)
class _Block:
    start: int
    end: int
    heading_path: list[str]
    is_heading: bool = False
    tokens: list[int] | None = None


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
        """Cut ``text[start:end]`` into overlapping windows; the last one stays pending."""
        sub = self.text[start:end]
        if tokens is None:
            tokens = self.enc.encode_ordinary(sub)
        n = len(tokens)
        if n <= self.max:
            self.pending = _Pending(start, end, heading_path, n, False, True, [end])
            return
        bounds = _token_char_bounds(self.enc, sub, tokens)
        breaks = [m.end() for m in _BREAK.finditer(sub)]
        sub_len = _rstrip_end(sub, 0, len(sub))
        min_fill = min(self.max, max(self.max // 2, self.overlap + 1))

        t0 = 0
        prev_end = -1
        while True:
            c0 = _skip_space(sub, bounds[t0], sub_len)
            if c0 >= sub_len:
                return
            if n - t0 <= self.max:
                ce = sub_len
            else:
                hi = bounds[t0 + self.max]
                lo = bounds[t0 + min_fill]
                i = bisect_right(breaks, hi) - 1
                ce = breaks[i] if i >= 0 and breaks[i] > lo else hi
            ce = _rstrip_end(sub, c0, ce)
            if ce <= c0:
                ce = c0 + 1
            count = len(self.enc.encode_ordinary(sub[c0:ce]))
            while count > self.max:
                # Shrink by the excess, at token boundaries, keeping at least one character.
                # bisect_left: tokens of one split character share a boundary; starting from the
                # first of them guarantees the end moves back.
                te = bisect_left(bounds, ce)
                te = max(te - (count - self.max), t0)
                new_end = _rstrip_end(sub, c0, bounds[te])
                ce = new_end if new_end > c0 else c0 + 1
                count = len(self.enc.encode_ordinary(sub[c0:ce]))
                if ce == c0 + 1:
                    break  # unreachable when max_tokens >= MIN_MAX_TOKENS
            if ce >= sub_len:
                self.pending = _Pending(
                    start + c0, start + ce, heading_path, count, False, True, [start + ce]
                )
                return
            if ce <= prev_end:
                # With a large overlap the shrunk window can end where the previous one did; it
                # would be a redundant sub-chunk, so slide on instead.
                t0 = _next_start(bounds, t0 + 1, c0, n)
                continue
            self._emit(start + c0, start + ce, heading_path, count)
            prev_end = ce
            te = bisect_right(bounds, ce) - 1
            t0 = _next_start(bounds, max(te - self.overlap, t0 + 1), c0, n)

    # -- helpers --------------------------------------------------------------------------------

    def _count(self, start: int, end: int) -> int:
        return len(self.enc.encode_ordinary(self.text[start:end]))

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


def _next_start(bounds: list[int], t: int, c0: int, n: int) -> int:
    """First token index from ``t`` whose boundary lies past ``c0`` (tokens of one split
    multi-byte character share a boundary)."""
    while t < n and bounds[t] <= c0:
        t += 1
    return t


def _skip_space(text: str, pos: int, end: int) -> int:
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _rstrip_end(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


__all__ = ["MIN_MAX_TOKENS", "chunk"]
