"""Parse uploaded bytes into Documents.

``load`` never raises for bad input: each problem comes out as a ``LoadFailure`` next to the
documents that did load (a JSONL corpus with one bad line still yields its other lines).
Library errors are caught narrowly, per format, and turned into a short reason.

Every text goes through ``normalize_text``: newlines unified to ``\\n``, control characters
(NUL included) removed, trailing spaces stripped, runs of more than two blank lines collapsed to
two, leading blank lines and trailing whitespace dropped. Structure that the chunker uses is
written as Markdown: HTML ``<h1>``-``<h6>`` and docx "Heading N" paragraphs become ``#`` lines,
paragraphs are separated by blank lines.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from rag.errors import DocumentError
from rag.types import Document

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LoadFailure",
    "default_document_id",
    "load",
    "load_document",
    "normalize_text",
]


class LoadFailure(msgspec.Struct):
    """A document (or one JSONL line) that could not be loaded, and why."""

    document_id: str | None
    source: str
    reason: str

    def to_error(self) -> DocumentError:
        return DocumentError(f"{self.source}: {self.reason}")


_MAX_ID_LEN = 200
_ID_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


def default_document_id(filename: str) -> str:
    """A deterministic, readable id for a file name: its base name sanitized to ``[A-Za-z0-9._-]``.

    Accents are folded (``résumé.txt`` -> ``resume...``). When sanitizing or truncating to 200
    characters loses information, 8 hex digits of the name's sha1 are added before the suffix
    (``my report.txt`` -> ``my_report-<hash>.txt``) so that distinct names (``報告.pdf``,
    ``計画.pdf``) do not collapse onto the same id and overwrite each other.
    """
    base = re.split(r"[/\\]", filename)[-1]
    folded = "".join(
        ch for ch in unicodedata.normalize("NFKD", base) if not unicodedata.combining(ch)
    )
    name = _ID_INVALID.sub("_", folded).strip(".")
    lossless = bool(name) and name == base and len(name) <= _MAX_ID_LEN
    if lossless:
        return name
    digest = hashlib.sha1(base.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix) > 16:
        stem, suffix = name, ""
    else:
        suffix = "." + suffix
    stem = stem.strip("._-") or "document"
    stem = stem[: _MAX_ID_LEN - len(suffix) - len(digest) - 1]
    return f"{stem}-{digest}{suffix}"


# -- text normalization -------------------------------------------------------------------------

_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# C0/C1 controls except \t and \n, a stray BOM, and lone surrogates (unencodable as UTF-8).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_TRAILING = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")


def normalize_text(text: str) -> str:
    """Unify newlines, drop control characters, strip trailing spaces, cap blank runs at two."""
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.lstrip("\n").rstrip()


# -- entry points -------------------------------------------------------------------------------


class _Failed(Exception):
    """Internal: a single-document parser gives up with this reason."""


_Parsed = tuple[str, str | None, dict[str, Any]]  # text, own title, extra metadata


def load(
    filename: str,
    data: bytes,
    *,
    document_id: str | None = None,
    title: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Iterator[Document | LoadFailure]:
    """Parse ``data`` (the bytes of ``filename``) into Documents; failures are yielded, not raised.

    The format is chosen by the file name's suffix (case-insensitive; see ``SUPPORTED_SUFFIXES``).
    A ``.jsonl`` file is a BEIR corpus: one Document per line, with the line's ``_id`` as its id
    (``document_id`` and ``title`` are then ignored; ``metadata`` is merged under each line's own).
    Other formats give one Document, whose id is ``document_id`` or
    ``default_document_id(filename)`` and whose title is ``title``, else the document's own title,
    else the file's base name.
    """
    base_meta = dict(metadata or {})
    suffix = _suffix(filename)
    if suffix in (".jsonl",):
        yield from _load_jsonl(filename, data, base_meta)
        return
    doc_id = document_id or default_document_id(filename)
    parser = _PARSERS.get(suffix)
    if parser is None:
        yield LoadFailure(
            doc_id,
            filename,
            f"unsupported file type {suffix or '(no suffix)'!r}; supported: "
            + ", ".join(sorted(SUPPORTED_SUFFIXES)),
        )
        return
    if not data.strip():
        yield LoadFailure(doc_id, filename, "empty document")
        return
    try:
        raw_text, own_title, extra = parser(data)
    except _Failed as exc:
        yield LoadFailure(doc_id, filename, str(exc))
        return
    text = normalize_text(raw_text)
    if not text:
        yield LoadFailure(doc_id, filename, "empty document")
        return
    final_title = _clean_title(title) or _clean_title(own_title) or _base_name(filename)
    yield Document(
        id=doc_id,
        text=text,
        title=final_title,
        source=filename,
        metadata={**extra, **base_meta},
    )


def load_document(
    filename: str,
    data: bytes,
    *,
    document_id: str | None = None,
    title: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Document:
    """Load exactly one Document, raising ``DocumentError`` on failure (for single-file uploads)."""
    results = list(load(filename, data, document_id=document_id, title=title, metadata=metadata))
    for result in results:
        if isinstance(result, LoadFailure):
            raise result.to_error()
    if len(results) != 1:
        raise DocumentError(f"{filename}: holds {len(results)} documents, expected one")
    result = results[0]
    assert isinstance(result, Document)
    return result


def _suffix(filename: str) -> str:
    base = _base_name(filename)
    dot = base.rfind(".")
    return base[dot:].lower() if dot > 0 else ""


def _base_name(filename: str) -> str:
    return re.split(r"[/\\]", filename)[-1]


def _clean_title(title: str | None) -> str:
    if not title:
        return ""
    return " ".join(_CONTROL.sub("", title).split())


# -- text decoding ------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _decode_text(data: bytes, *, html: bool = False) -> str:
    if data.startswith(codecs.BOM_UTF8):
        text = _strict(data[len(codecs.BOM_UTF8) :], "utf-8")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = _strict(data, "utf-16")  # the BOM says which byte order
    else:
        text = _strict(data, "utf-8")
        if text is None and html:
            m = _META_CHARSET.search(data[:8192])
            if m:
                try:
                    codec = codecs.lookup(m.group(1).decode("ascii")).name
                except LookupError:
                    raise _Failed(
                        f"not valid UTF-8 text, and the declared charset "
                        f"{m.group(1).decode('ascii')!r} is unknown"
                    ) from None
                text = _strict(data, codec)
    if text is None:
        raise _Failed("not valid UTF-8 text")
    if "\x00" in text:
        raise _Failed("binary data (NUL bytes), not text")
    return text


def _strict(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return None


# -- plain text and Markdown --------------------------------------------------------------------


def _parse_txt(data: bytes) -> _Parsed:
    return _decode_text(data), None, {"format": "text"}


_MD_H1 = re.compile(r" {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
_MD_FENCE = re.compile(r" {0,3}(```|~~~)")


def _parse_markdown(data: bytes) -> _Parsed:
    text = _decode_text(data)
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


# -- HTML ---------------------------------------------------------------------------------------

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


def _parse_html(data: bytes) -> _Parsed:
    from bs4 import BeautifulSoup

    text = _decode_text(data, html=True)
    try:
        soup = BeautifulSoup(text, "lxml")
        title_tag = soup.title
        title = title_tag.get_text() if title_tag is not None else None
        body = _HtmlText().render(soup)
    except (RecursionError, ValueError) as exc:  # absurd nesting, parser rejects the input
        raise _Failed(f"unparseable HTML ({type(exc).__name__})") from exc
    return body, title, {"format": "html"}


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
                name = exits.pop()
                if name in ("td", "th"):
                    continue
                self._flush()
                if name in _HTML_ITEMS:
                    self.open_items -= 1
                else:
                    self.boundary = True
                continue
            if isinstance(node, PreformattedString):  # comments, CDATA, doctype, ...
                continue
            if isinstance(node, NavigableString):
                # Source newlines are just whitespace; only <br> and blocks break lines.
                self.buf.append(_HTML_SPACE.sub(" ", str(node)))
                continue
            if not isinstance(node, Tag):
                continue
            name = (node.name or "").lower()
            if name in _HTML_DROP:
                continue
            if name == "br":
                self.buf.append("\n")
                continue
            if name in _HTML_HEADINGS:
                self._flush()
                heading = " ".join(node.get_text().split())
                if heading:
                    self._emit("#" * _HTML_HEADINGS[name] + " " + heading, item=False)
                continue
            if name == "pre":
                self._flush()
                pre = node.get_text().strip("\n")
                if pre.strip():
                    self._emit(pre, item=False)
                continue
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
                stack.extend(reversed(node.contents))  # inline: no boundary
                continue
            exits.append(name)
            stack.append(exit_marker)
            stack.extend(reversed(node.contents))
        self._flush()
        return "".join(self.parts)

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


# -- PDF ----------------------------------------------------------------------------------------


def _pdf_errors() -> tuple[type[BaseException], ...]:
    from pypdf.errors import PyPdfError

    # pypdf surfaces malformed input as its own errors and, deeper in its parsers, as these.
    return (
        PyPdfError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        EOFError,
        OSError,
        RecursionError,
        ZeroDivisionError,
        zlib.error,
        struct.error,
    )


def _parse_pdf(data: bytes) -> _Parsed:
    from pypdf.errors import DependencyError

    try:
        return _read_pdf(data)
    except DependencyError as exc:
        # AES-encrypted PDFs decrypt lazily, object by object, and need `cryptography`.
        raise _Failed(f"encrypted PDF (cannot decrypt: {exc})") from exc


def _read_pdf(data: bytes) -> _Parsed:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    errors = _pdf_errors()
    try:
        reader = PdfReader(io.BytesIO(data))
    except errors as exc:
        raise _Failed(f"corrupt PDF ({_describe(exc)})") from exc
    try:
        encrypted = reader.is_encrypted
    except errors as exc:
        raise _Failed(f"corrupt PDF ({_describe(exc)})") from exc
    if encrypted:
        try:
            decrypted = reader.decrypt("") != PasswordType.NOT_DECRYPTED
        except DependencyError as exc:
            raise _Failed(f"encrypted PDF (cannot decrypt: {exc})") from exc
        except errors:
            decrypted = False
        if not decrypted:
            raise _Failed("encrypted PDF (password required)")
    try:
        pages = list(reader.pages)
    except errors as exc:
        raise _Failed(f"corrupt PDF ({_describe(exc)})") from exc
    texts: list[str] = []
    unreadable: list[int] = []
    for number, page in enumerate(pages, start=1):
        try:
            page_text = page.extract_text() or ""
        except errors:
            unreadable.append(number)  # one broken page should not lose the whole document
            continue
        if page_text.strip():
            texts.append(page_text)
    if not texts:
        if unreadable:
            raise _Failed(f"corrupt PDF (no page could be read, {len(unreadable)} failed)")
        raise _Failed("PDF has no text layer (scanned images? run OCR first)")
    title: str | None = None
    try:
        info = reader.metadata
        title = info.title if info is not None else None
    except errors:
        title = None
    extra: dict[str, Any] = {"format": "pdf", "pages": len(pages)}
    if unreadable:
        extra["unreadable_pages"] = unreadable
    return "\n\n".join(texts), title if isinstance(title, str) else None, extra


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {message[:200]}" if message else name


# -- docx ---------------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"heading\s*([1-9])", re.I)


def _parse_docx(data: bytes) -> _Parsed:
    import docx
    from docx.opc.exceptions import OpcError
    from docx.table import Table
    from docx.text.paragraph import Paragraph
    from lxml.etree import LxmlError

    errors = (zipfile.BadZipFile, OpcError, KeyError, ValueError, LxmlError, EOFError, OSError)
    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        for item in document.iter_inner_content():
            if isinstance(item, Paragraph):
                text = " ".join(item.text.split())
                if not text:
                    continue
                level = _docx_heading_level(item)
                blocks.append(f"{'#' * level} {text}" if level else text)
            elif isinstance(item, Table):
                rows = _docx_table_rows(item)
                if rows:
                    blocks.append("\n".join(rows))
        title = document.core_properties.title
    except errors as exc:
        raise _Failed(f"corrupt .docx ({_describe(exc)})") from exc
    return "\n\n".join(blocks), title, {"format": "docx"}


def _docx_heading_level(paragraph: Any) -> int:
    style = paragraph.style
    if style is None:
        return 0
    for name in (style.name or "", getattr(style, "style_id", "") or ""):
        m = _DOCX_HEADING.fullmatch(name.strip())
        if m:
            return min(int(m.group(1)), 6)
    return 0


def _docx_table_rows(table: Any) -> list[str]:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if cell._tc is previous:  # a merged cell is reported once per grid column it spans
                continue
            previous = cell._tc
            text = " ".join(cell.text.split())
            if text:
                cells.append(text)
        if cells:
            rows.append(" | ".join(cells))
    return rows


# -- JSONL (BEIR corpus) ------------------------------------------------------------------------


def _load_jsonl(
    filename: str, data: bytes, base_meta: dict[str, Any]
) -> Iterator[Document | LoadFailure]:
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    seen: set[str] = set()
    loaded = 0
    failed = 0
    decoder = msgspec.json.Decoder()
    for number, line in enumerate(data.split(b"\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = _jsonl_record(decoder, line, filename, base_meta)
        except _LineError as exc:
            failed += 1
            yield LoadFailure(exc.document_id, filename, f"line {number}: {exc}")
            continue
        if doc.id in seen:
            failed += 1
            yield LoadFailure(doc.id, filename, f"line {number}: duplicate _id {doc.id!r}")
            continue
        seen.add(doc.id)
        loaded += 1
        yield doc
    if not loaded and not failed:
        yield LoadFailure(None, filename, "empty document")


class _LineError(Exception):
    def __init__(self, reason: str, document_id: str | None = None) -> None:
        super().__init__(reason)
        self.document_id = document_id


def _jsonl_record(
    decoder: msgspec.json.Decoder, line: bytes, filename: str, base_meta: dict[str, Any]
) -> Document:
    try:
        record = decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise _LineError(f"invalid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise _LineError("not valid UTF-8 text") from exc
    if not isinstance(record, dict):
        raise _LineError(f"expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("_id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise _LineError("missing _id" if raw_id is None else "_id must be a string or an integer")
    doc_id = str(raw_id).strip()
    if not doc_id:
        raise _LineError("empty _id")
    title = record.get("title")
    text = record.get("text")
    meta = record.get("metadata")
    if title is not None and not isinstance(title, str):
        raise _LineError("title must be a string", doc_id)
    if text is not None and not isinstance(text, str):
        raise _LineError("text must be a string", doc_id)
    if meta is not None and not isinstance(meta, dict):
        raise _LineError("metadata must be an object", doc_id)
    clean_title = _clean_title(title)
    clean_text = normalize_text(text or "")
    if not clean_text and not clean_title:
        raise _LineError("no text and no title", doc_id)
    return Document(
        id=doc_id,
        # A title-only record is still searchable by its title.
        text=clean_text or clean_title,
        title=clean_title,
        source=filename,
        metadata={**base_meta, **(meta or {})},
    )


_PARSERS: dict[str, Callable[[bytes], _Parsed]] = {
    ".txt": _parse_txt,
    ".md": _parse_markdown,
    ".markdown": _parse_markdown,
    ".html": _parse_html,
    ".htm": _parse_html,
    ".pdf": _parse_pdf,
    ".docx": _parse_docx,
}

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({*_PARSERS, ".jsonl"})
