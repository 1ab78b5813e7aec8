"""Sentence spans of a text: shared by the chunker (where chunks are cut) and extractive answers.

:func:`split_sentences` returns ``(start, end)`` character offsets into the text, trimmed of
surrounding whitespace; see its docstring for the rules (abbreviations, initials, decimals,
headings and list items, CJK full stops).
"""

from __future__ import annotations

import re

__all__ = ["split_sentences"]

# Words that end with a period without ending a sentence (compared lower-case, without the period).
_ABBREVIATIONS = frozenset(
    """mr mrs ms mx dr prof sr jr st mt ft rev hon gov sen rep pres gen col lt sgt capt cmdr adm
    messrs mme mlle vs etc al cf ca approx est inc ltd co corp bros dept univ assn ave blvd rd
    jan feb apr jun jul aug sep sept oct nov dec""".split()
)
# Abbreviations that only stay glued to a following number ("No. 5", "Fig. 3", "pp. 12").
_NUMBER_ABBREVIATIONS = frozenset("no nos fig figs eq eqs vol vols pp art sec ch op".split())
# Sentence punctuation plus closing quotes/brackets, followed by whitespace or the end; or a CJK stop.
_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)|[\u3002\uff01\uff1f]")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # "U.S", "e.g", "J" (before the final period)
_NEWLINE = re.compile(r"\n")
# A line that starts a unit of its own: heading, list item, quote, table row.
_STRUCTURAL_LINE = re.compile(r"[ \t]*(?:#{1,6}(?:\s|$)|[-*+\u2022]\s|\d{1,3}[.)]\s|>|\|)")
_OPENERS = "\"'\u201c\u2018([{"


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans ``(start, end)`` of ``text``, trimmed of surrounding whitespace.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (with any closing quotes or brackets) followed
    by whitespace, unless the next word starts lower-case or the period ends an abbreviation
    (``Dr.``, ``e.g.``, ``U.S.``, an initial ``J.``, ``No. 5``); decimals (``3.14``) never split.
    A blank line always ends a sentence; a single line break does when either line is a heading,
    list item, quote or table row, so wrapped prose stays one sentence.
    """
    cuts: set[int] = set()
    for m in _END.finditer(text):
        if _ends_sentence(text, m.start(), m.end()):
            cuts.add(m.end())
    lines = [0] + [m.end() for m in _NEWLINE.finditer(text)]
    for prev_start, start in zip(lines, lines[1:], strict=False):
        stop = text.find("\n", start)
        line = text[start : stop if stop >= 0 else len(text)]
        prev = text[prev_start : start - 1]
        if not line.strip() or not prev.strip() or _STRUCTURAL_LINE.match(line) or _STRUCTURAL_LINE.match(prev):
            cuts.add(start)
    spans: list[tuple[int, int]] = []
    begin = 0
    for cut in [*sorted(cuts), len(text)]:
        s, e = begin, cut
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e:
            spans.append((s, e))
        begin = max(begin, cut)
    return spans


def _ends_sentence(text: str, start: int, end: int) -> bool:
    nxt = end
    while nxt < len(text) and text[nxt].isspace():
        nxt += 1
    if nxt == len(text):
        return True
    following = text[nxt]
    if following.islower():
        return False
    if text[start] != "." or end - start > 1 and text[start : end].rstrip("\"'\u201d\u2019)]") != ".":
        return True  # "!", "?", "…" or "..." before a capital
    word_start = start
    while word_start > 0 and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:start].lstrip(_OPENERS)
    lowered = word.lower()
    if lowered in _ABBREVIATIONS or _INITIALS.fullmatch(word):
        return False
    if lowered in _NUMBER_ABBREVIATIONS and following.isdigit():
        return False
    return True
