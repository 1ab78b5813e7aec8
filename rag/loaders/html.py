"""HTML (.html, .htm): visible text with ``<h1>``-``<h6>`` as Markdown headings, blocks as paragraphs."""

from __future__ import annotations

import re
from typing import Any, Literal

from rag.loaders.base import Failed, LoadLimits, Parsed
from rag.loaders.normalize import decode_text

_HTML_DROP = frozenset(
    {"script", "style", "noscript", "template", "head", "iframe", "object", "svg"}
)
_HTML_SPACE = re.compile(r"\s+")
_HTML_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_HTML_ITEMS = frozenset({"li", "tr", "dt", "dd"})  # one line each, no blank line between
_HTML_BLOCKS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "center", "details",
        "dialog", "div", "dl", "fieldset", "figcaption", "figure", "footer", "form", "header",
        "hgroup", "hr", "html", "legend", "main", "menu", "nav", "ol", "p", "section", "summary",
        "table", "tbody", "tfoot", "thead", "ul",
    }
)  # fmt: skip


def parse_html(data: bytes, limits: LoadLimits) -> Parsed:
    from bs4 import BeautifulSoup

    text = decode_text(data, html=True)
    try:
        soup = BeautifulSoup(text, "lxml")
        title_tag = soup.title
        title = title_tag.get_text() if title_tag is not None else None
        body = _HtmlText().render(soup)
    except (RecursionError, ValueError) as exc:  # absurd nesting, parser rejects the input
        raise Failed(f"unparseable HTML ({type(exc).__name__})") from exc
    return body, title, {"format": "html"}


# What entering an element asks of the walk: nothing more (dropped, or rendered whole here), its
# children without a boundary (inline), or its children and then a call to ``_leave`` (a block).
_Entered = Literal["done", "inline", "block"]


class _HtmlText:
    """Renders parsed HTML as plain text with Markdown headings; iterative (no recursion limit).

    Blocks are separated by a blank line, except consecutive items (list items, table rows) of
    the same list or table, which go on consecutive lines.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.buf: list[str] = []
        self.open_items = 0
        self.last_was_item = False
        self.boundary = False  # a block element began or ended since the last emitted block

    def render(self, soup: Any) -> str:
        from bs4.element import NavigableString, PreformattedString, Tag

        exit_marker = object()
        stack: list[Any] = list(reversed(soup.contents))
        exits: list[str] = []
        while stack:
            node = stack.pop()
            if node is exit_marker:
                self._leave(exits.pop())
            elif isinstance(node, PreformattedString):  # comments, CDATA, doctype, ...
                continue
            elif isinstance(node, NavigableString):
                # Source newlines are just whitespace; only <br> and blocks break lines.
                self.buf.append(_HTML_SPACE.sub(" ", str(node)))
            elif isinstance(node, Tag):
                name = (node.name or "").lower()
                entered = self._enter(name, node)
                if entered == "done":
                    continue
                if entered == "block":
                    exits.append(name)
                    stack.append(exit_marker)
                stack.extend(reversed(node.contents))
        self._flush()
        return "".join(self.parts)

    def _enter(self, name: str, node: Any) -> _Entered:
        if name in _HTML_DROP:
            return "done"
        if name == "br":
            self.buf.append("\n")
            return "done"
        if name in _HTML_HEADINGS:
            self._flush()
            heading = " ".join(node.get_text().split())
            if heading:
                self._emit("#" * _HTML_HEADINGS[name] + " " + heading, item=False)
            return "done"
        if name == "pre":
            self._flush()
            pre = node.get_text().strip("\n")
            if pre.strip():
                self._emit(pre, item=False)
            return "done"
        if name in ("td", "th"):
            if "".join(self.buf).strip():
                self.buf.append(" | ")
        elif name in _HTML_ITEMS:
            self._flush()
            self.open_items += 1
        elif name in _HTML_BLOCKS:
            self._flush()
            self.boundary = True
        else:
            return "inline"
        return "block"

    def _leave(self, name: str) -> None:
        if name in ("td", "th"):
            return
        self._flush()
        if name in _HTML_ITEMS:
            self.open_items -= 1
        else:
            self.boundary = True

    def _flush(self) -> None:
        if not self.buf:
            return
        raw = "".join(self.buf)
        self.buf.clear()
        lines = (" ".join(segment.split()) for segment in raw.split("\n"))
        text = "\n".join(line for line in lines if line)
        if text:
            self._emit(text, item=self.open_items > 0)

    def _emit(self, text: str, *, item: bool) -> None:
        if self.parts:
            tight = item and self.last_was_item and not self.boundary
            self.parts.append("\n" if tight else "\n\n")
        self.parts.append(text)
        self.last_was_item = item
        self.boundary = False
