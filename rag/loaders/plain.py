"""Plain text (.txt) and Markdown (.md, .markdown): decoded as they are; a Markdown title is its first ``#``."""

from __future__ import annotations

import re

from rag.loaders.base import LoadLimits, Parsed
from rag.loaders.normalize import decode_text


def parse_txt(data: bytes, limits: LoadLimits) -> Parsed:
    return decode_text(data), None, {"format": "text"}


_MD_H1 = re.compile(r" {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
_MD_FENCE = re.compile(r" {0,3}(```|~~~)")


def parse_markdown(data: bytes, limits: LoadLimits) -> Parsed:
    text = decode_text(data)
    return text, _markdown_title(text), {"format": "markdown"}


def _markdown_title(text: str) -> str | None:
    in_fence = False
    for line in text.splitlines():
        if _MD_FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            m = _MD_H1.fullmatch(line)
            if m:
                return m.group(1)
    return None
