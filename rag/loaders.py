"""Parse uploaded bytes into Documents.

``load`` never raises for bad input: each problem comes out as a ``LoadFailure`` next to the
documents that did load (a JSONL corpus with one bad line still yields its other lines).
Library errors are caught narrowly, per format, and turned into a short reason.

Every text goes through ``normalize_text``: newlines unified to ``\\n``, control characters
(NUL included) removed, trailing spaces stripped, runs of more than two blank lines collapsed to
two, leading blank lines and trailing whitespace dropped. Structure that the chunker uses is
written as Markdown: HTML ``<h1>``-``<h6>`` and docx "Heading N" paragraphs become ``#`` lines,
paragraphs are separated by blank lines.

Every upload is bounded by ``LoadLimits`` (extracted characters, inflated bytes, PDF pages, JSON
nesting, metadata and title sizes); a limit exceeded is a ``LoadFailure`` naming its ``RAG_*``
setting. Archives and page trees are measured before a library expands them, because the
libraries trust declared sizes and counts. Whatever a parser raises (``RecursionError`` and
``MemoryError`` included) becomes a ``LoadFailure`` too, so hostile input never escapes ``load``.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import re
import struct
import traceback
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from rag.errors import DocumentError
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.logs import get_logger
from rag.types import Document

__all__ = [
    "SUPPORTED_SUFFIXES",
    "LoadFailure",
    "LoadLimits",
    "default_document_id",
    "load",
    "load_document",
    "normalize_text",
]

log = get_logger("rag.loaders")


class LoadFailure(msgspec.Struct):
    """A document (or one JSONL line) that could not be loaded, and why."""

    document_id: str | None
    source: str
    reason: str

    def to_error(self) -> DocumentError:
        return DocumentError(f"{self.source}: {self.reason}")


class LoadLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on what loading one upload may spend; each maps to a ``RAG_*`` setting.

    ``max_chars`` caps the text extracted from any file (and each JSONL line's text);
    ``max_decompressed_bytes`` caps what a .docx inflates to (all zip members together) and what
    the page content streams of a PDF inflate to (summed over pages); ``max_pages`` caps a PDF's
    page count; ``max_json_depth`` caps the nesting of a JSONL line and of metadata;
    ``max_metadata_bytes`` caps a document's metadata as JSON (it is copied into every chunk);
    ``max_title_chars`` caps a given title.
    """

    max_chars: int = 5_000_000
    max_decompressed_bytes: int = 200 * 1024 * 1024
    max_pages: int = 2000
    max_json_depth: int = 32
    max_metadata_bytes: int = 16 * 1024
    max_title_chars: int = 1000

    def __post_init__(self) -> None:
        for field in self.__struct_fields__:
            if getattr(self, field) < 1:
                raise ValueError(f"LoadLimits.{field} must be positive")

    @classmethod
    def from_settings(cls, settings: Any) -> LoadLimits:
        """The limits configured in ``settings`` (a ``rag.settings.Settings``)."""
        return cls(
            max_chars=settings.max_text_chars,
            max_decompressed_bytes=settings.max_decompressed_bytes,
            max_pages=settings.max_pdf_pages,
            max_json_depth=settings.max_json_depth,
            max_metadata_bytes=settings.max_metadata_bytes,
            max_title_chars=settings.max_title_chars,
        )


# The settings behind each limit, named in failure reasons so an operator knows what to raise.
_TEXT_SETTING = "RAG_MAX_TEXT_CHARS"
_INFLATE_SETTING = "RAG_MAX_DECOMPRESSED_BYTES"
_PAGES_SETTING = "RAG_MAX_PDF_PAGES"
_DEPTH_SETTING = "RAG_MAX_JSON_DEPTH"
_METADATA_SETTING = "RAG_MAX_METADATA_BYTES"
_TITLE_SETTING = "RAG_MAX_TITLE_CHARS"


def _over(subject: str, size: int, unit: str, limit: int, setting: str, *, more: bool = False) -> str:
    """``text is 6,000,000 characters; the limit is 5,000,000 (RAG_MAX_TEXT_CHARS)``."""
    amount = f"more than {limit:,}" if more else f"{size:,}"
    return f"{subject} {amount} {unit}; the limit is {limit:,} ({setting})"


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
_Parser = Callable[[bytes, LoadLimits], _Parsed]


def load(
    filename: str,
    data: bytes,
    *,
    document_id: str | None = None,
    title: str | None = None,
    metadata: dict[str, Any] | None = None,
    limits: LoadLimits | None = None,
) -> Iterator[Document | LoadFailure]:
    """Parse ``data`` (the bytes of ``filename``) into Documents; failures are yielded, not raised.

    The format is chosen by the file name's suffix (case-insensitive; see ``SUPPORTED_SUFFIXES``).
    A ``.jsonl`` file is a BEIR corpus: one Document per line, with the line's ``_id`` as its id
    (``document_id`` and ``title`` are then ignored; ``metadata`` is merged under each line's own).
    Other formats give one Document, whose id is ``document_id`` or
    ``default_document_id(filename)`` and whose title is ``title``, else the document's own title
    (cut to ``limits.max_title_chars``), else the file's base name.

    ``limits`` (default: ``LoadLimits()``) bounds the work and memory one upload may take; going
    over a limit is a ``LoadFailure`` whose reason names the ``RAG_*`` setting. No exception
    escapes for any input: a parser that crashes gives ``could not parse <suffix> (<type>)``.
    """
    limits = limits or LoadLimits()
    suffix = _suffix(filename)
    doc_id = None if suffix == ".jsonl" else document_id or default_document_id(filename)
    try:
        yield from _load(filename, data, suffix, doc_id, title, metadata, limits)
    except Exception as exc:  # the last line of defence: a parser bug must not fail the caller
        _log_crash(exc, source=filename, suffix=suffix, document_id=doc_id)
        yield LoadFailure(doc_id, filename, f"could not parse {suffix or 'file'} ({type(exc).__name__})")


def _log_crash(exc: BaseException, **context: Any) -> None:
    # Type and code location only: an exception's message may quote the document's text.
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
    log.warning("document_parse_crashed", error=type(exc).__name__, where=where, **context)


def _load(
    filename: str,
    data: bytes,
    suffix: str,
    doc_id: str | None,
    title: str | None,
    metadata: dict[str, Any] | None,
    limits: LoadLimits,
) -> Iterator[Document | LoadFailure]:
    base_meta = dict(metadata or {})
    # The API checks these too; checked again so that no caller can bypass the bounds.
    # (A .jsonl file ignores ``title``, so its length does not matter there.)
    problem = _check_metadata(base_meta, limits) or (
        None if suffix == ".jsonl" else _check_title(title, limits)
    )
    if problem:
        yield LoadFailure(doc_id, filename, problem)
        return
    if suffix in (".jsonl",):
        yield from _load_jsonl(filename, data, base_meta, limits)
        return
    assert doc_id is not None
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
        raw_text, own_title, extra = parser(data, limits)
    except _Failed as exc:
        yield LoadFailure(doc_id, filename, str(exc))
        return
    text = normalize_text(raw_text)
    del raw_text
    if not text:
        yield LoadFailure(doc_id, filename, "empty document")
        return
    if len(text) > limits.max_chars:
        yield LoadFailure(
            doc_id, filename, _over("text is", len(text), "characters", limits.max_chars, _TEXT_SETTING)
        )
        return
    final_title = (
        _clean_title(title)
        # The document's own title is cut rather than refused: the uploader did not choose it.
        or _clean_title(own_title)[: limits.max_title_chars].rstrip()
        or _base_name(filename)[: limits.max_title_chars]
    )
    yield Document(
        id=doc_id,
        text=text,
        title=final_title,
        source=filename,
        metadata={**extra, **base_meta},
    )


def _check_title(title: str | None, limits: LoadLimits) -> str | None:
    clean = _clean_title(title)
    if len(clean) > limits.max_title_chars:
        return _over("title is", len(clean), "characters", limits.max_title_chars, _TITLE_SETTING)
    return None


def _check_metadata(meta: dict[str, Any], limits: LoadLimits) -> str | None:
    """Why ``meta`` may not be stored (too big or too deep as JSON), or None."""
    if not meta:
        return None
    try:
        encoded = msgspec.json.encode(meta)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        return f"metadata cannot be stored as JSON ({type(exc).__name__})"
    if len(encoded) > limits.max_metadata_bytes:
        return _over(
            "metadata is", len(encoded), "bytes as JSON", limits.max_metadata_bytes, _METADATA_SETTING
        )
    try:
        check_json_depth(encoded, limits.max_json_depth)
    except JsonTooDeep as exc:
        return f"metadata: {exc} ({_DEPTH_SETTING})"
    return None


def load_document(
    filename: str,
    data: bytes,
    *,
    document_id: str | None = None,
    title: str | None = None,
    metadata: dict[str, Any] | None = None,
    limits: LoadLimits | None = None,
) -> Document:
    """Load exactly one Document, raising ``DocumentError`` on failure (for single-file uploads)."""
    results = list(
        load(filename, data, document_id=document_id, title=title, metadata=metadata, limits=limits)
    )
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


def _parse_txt(data: bytes, limits: LoadLimits) -> _Parsed:
    return _decode_text(data), None, {"format": "text"}


_MD_H1 = re.compile(r" {0,3}#[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*")
_MD_FENCE = re.compile(r" {0,3}(```|~~~)")


def _parse_markdown(data: bytes, limits: LoadLimits) -> _Parsed:
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


def _parse_html(data: bytes, limits: LoadLimits) -> _Parsed:
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


def _parse_pdf(data: bytes, limits: LoadLimits) -> _Parsed:
    from pypdf.errors import DependencyError

    try:
        return _read_pdf(data, limits)
    except DependencyError as exc:
        # AES-encrypted PDFs decrypt lazily, object by object, and need `cryptography`.
        raise _Failed(f"encrypted PDF (cannot decrypt: {exc})") from exc


_MAX_LISTED_PAGES = 100  # unreadable page numbers kept in metadata (it is copied into every chunk)


def _read_pdf(data: bytes, limits: LoadLimits) -> _Parsed:
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
        _check_page_count(reader, limits.max_pages)
        pages = list(reader.pages)
    except errors as exc:
        raise _Failed(f"corrupt PDF ({_describe(exc)})") from exc
    if len(pages) > limits.max_pages:  # pypdf disagrees with the walk above; trust the larger count
        raise _Failed(_over("PDF has", len(pages), "pages", limits.max_pages, _PAGES_SETTING))
    texts: list[str] = []
    unreadable: list[int] = []
    first_error = ""  # the type of the first page failure, for the reason when no page reads
    chars = 0
    inflated = 0
    for number, page in enumerate(pages, start=1):
        try:
            # Decoded once here and cached by pypdf, so extract_text does not decode it again.
            content = page.get_contents()
            inflated += len(content.get_data()) if content is not None else 0
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside pypdf only loses this page
            unreadable.append(number)
            first_error = first_error or type(exc).__name__
            continue
        if inflated > limits.max_decompressed_bytes:
            # A shared content stream is counted once per page: it is parsed once per page.
            raise _Failed(
                _over(
                    "PDF page content inflates to", inflated, "bytes", limits.max_decompressed_bytes,
                    _INFLATE_SETTING, more=True,
                )
            )
        try:
            page_text = page.extract_text() or ""
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - unknown /Filter (NotImplementedError), pypdf bugs
            unreadable.append(number)  # one broken page should not lose the whole document
            first_error = first_error or type(exc).__name__
            continue
        if page_text.strip():
            texts.append(page_text)
            chars += len(normalize_text(page_text)) + 2
            if chars > limits.max_chars + 2:
                raise _Failed(
                    _over("text is", chars, "characters", limits.max_chars, _TEXT_SETTING, more=True)
                )
    if not texts:
        if unreadable:
            raise _Failed(
                f"corrupt PDF (no page could be read, {len(unreadable)} failed: {first_error})"
            )
        raise _Failed("PDF has no text layer (scanned images? run OCR first)")
    title: str | None = None
    try:
        info = reader.metadata
        title = info.title if info is not None else None
    except errors:
        title = None
    extra: dict[str, Any] = {"format": "pdf", "pages": len(pages)}
    if unreadable:
        extra["unreadable_pages"] = unreadable[:_MAX_LISTED_PAGES]
        if len(unreadable) > _MAX_LISTED_PAGES:
            extra["unreadable_page_count"] = len(unreadable)
    return "\n\n".join(texts), title if isinstance(title, str) else None, extra


def _check_page_count(reader: Any, limit: int) -> None:
    """Fail when the page tree holds more than ``limit`` pages, before pypdf flattens it.

    A few shared /Pages nodes can describe 2**40 pages in a kilobyte, and older pypdf versions
    flatten the tree recursively and without bound, so the tree is walked here with an explicit
    stack and a budget of node visits (which also ends cycles).
    """
    from pypdf.generic import ArrayObject, DictionaryObject

    root = reader.trailer["/Root"].get_object()["/Pages"].get_object()
    declared = root.get("/Count") if isinstance(root, DictionaryObject) else None
    leaves = 0
    budget = 4 * limit + 1000  # intermediate nodes of any sane tree are far fewer than its pages
    stack: list[Any] = [root]
    while stack:
        budget -= 1
        if budget < 0:
            break
        node = stack.pop()
        node = node.get_object() if hasattr(node, "get_object") else node
        if not isinstance(node, DictionaryObject):
            continue
        kind = node.get("/Type")
        kids = node.get("/Kids")
        if kind == "/Page" or (kind is None and kids is None):
            leaves += 1
            if leaves > limit:
                break
            continue
        kids = kids.get_object() if kids is not None else None
        if isinstance(kids, ArrayObject):
            if len(kids) > budget:
                break
            stack.extend(reversed(kids))  # resolved when popped, within the budget
    else:
        return
    if isinstance(declared, int) and declared > limit:
        raise _Failed(_over("PDF has", int(declared), "pages", limit, _PAGES_SETTING))
    raise _Failed(_over("PDF has", leaves, "pages", limit, _PAGES_SETTING, more=True))


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {message[:200]}" if message else name


# -- docx ---------------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"heading\s*([1-9])", re.I)


def _parse_docx(data: bytes, limits: LoadLimits) -> _Parsed:
    import docx
    from docx.opc.exceptions import OpcError
    from docx.table import Table
    from docx.text.paragraph import Paragraph
    from lxml.etree import LxmlError

    _check_docx_zip(data, limits)
    # After the check above every member inflates to exactly its declared size, within budget;
    # what can still go wrong is inside python-docx and lxml (bad XML, missing parts, ...).
    errors = (
        zipfile.BadZipFile, OpcError, KeyError, ValueError, LxmlError, EOFError, OSError,
        zlib.error, NotImplementedError, struct.error, AttributeError, TypeError,
    )  # fmt: skip
    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        chars = 0
        for item in document.iter_inner_content():
            if isinstance(item, Paragraph):
                text = " ".join(item.text.split())
                if not text:
                    continue
                level = _docx_heading_level(item)
                blocks.append(f"{'#' * level} {text}" if level else text)
            elif isinstance(item, Table):
                rows = _docx_table_rows(item)
                if not rows:
                    continue
                blocks.append("\n".join(rows))
            else:
                continue
            chars += len(blocks[-1]) + 2
            if chars > limits.max_chars + 2:
                raise _Failed(
                    _over("text is", chars, "characters", limits.max_chars, _TEXT_SETTING, more=True)
                )
        title = document.core_properties.title
    except errors as exc:
        raise _Failed(f"corrupt .docx ({_describe(exc)})") from exc
    return "\n\n".join(blocks), title, {"format": "docx"}


_INFLATE_CHUNK = 1 << 20  # output bytes per zlib call while checking members: bounds memory
_RAW_CHUNK = 1 << 16  # compressed bytes fed per call (unconsumed_tail copies at most this)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _check_docx_zip(data: bytes, limits: LoadLimits) -> None:
    """Refuse a .docx zip before python-docx reads it: too big inflated, odd methods, lying sizes.

    ``ZipFile.read`` inflates a whole member in one zlib call of up to 2 GiB and only then cuts it
    to the declared size, so a member that declares 3 KB and inflates to 1 GiB costs 1 GiB of
    memory there. Each member is therefore inflated here first, in bounded chunks that are
    counted and dropped, and must stop at exactly its declared size; the declared sizes together
    must fit ``max_decompressed_bytes``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _Failed(f"corrupt .docx ({_describe(exc)})") from exc
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_decompressed_bytes:
        raise _Failed(
            _over(".docx inflates to", declared, "bytes", limits.max_decompressed_bytes, _INFLATE_SETTING)
        )
    view = memoryview(data)
    for info in infos:
        name = repr(info.filename[:100])
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Failed(f"unsupported zip compression method {info.compress_type} ({name})")
        if info.flag_bits & 0x1:
            raise _Failed(f"encrypted .docx ({name})")
        start = info.header_offset
        header = view[start : start + _LOCAL_HEADER.size]
        if len(header) < _LOCAL_HEADER.size:
            raise _Failed(f"corrupt .docx (member {name} lies outside the file)")
        signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise _Failed(f"corrupt .docx (bad local header for {name})")
        begin = start + _LOCAL_HEADER.size + name_len + extra_len
        raw = view[begin : begin + info.compress_size]
        if len(raw) < info.compress_size:
            raise _Failed(f"corrupt .docx (member {name} is truncated)")
        if info.compress_type == zipfile.ZIP_STORED:
            size = len(raw)
        else:
            try:
                size = _inflated_size(raw, info.file_size)
            except zlib.error as exc:
                raise _Failed(f"corrupt .docx ({name}: {str(exc)[:200]})") from exc
        if size > info.file_size:
            raise _Failed(
                f"corrupt .docx (member {name} inflates to more than its declared "
                f"{info.file_size:,} bytes)"
            )
        if size < info.file_size:
            raise _Failed(f"corrupt .docx (member {name} is shorter than declared)")


def _inflated_size(raw: memoryview, cap: int) -> int:
    """How many bytes the raw deflate stream ``raw`` inflates to, stopping once past ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    for offset in range(0, len(raw), _RAW_CHUNK):
        pending: bytes | memoryview = raw[offset : offset + _RAW_CHUNK]
        while pending and not inflater.eof:
            size += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if size > cap:
                return size
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    while not inflater.eof:  # output zlib still holds after the last input (bounded calls too)
        out = inflater.decompress(b"", _INFLATE_CHUNK)
        if not out:
            break
        size += len(out)
        if size > cap:
            break
    return size


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
    filename: str, data: bytes, base_meta: dict[str, Any], limits: LoadLimits
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
            doc = _jsonl_record(decoder, line, filename, base_meta, limits)
        except _LineError as exc:
            failed += 1
            yield LoadFailure(exc.document_id, filename, f"line {number}: {exc}")
            continue
        except Exception as exc:  # a crash on one line must not stop the others
            failed += 1
            _log_crash(exc, source=filename, suffix=".jsonl", line=number)
            yield LoadFailure(
                None, filename, f"line {number}: could not parse .jsonl ({type(exc).__name__})"
            )
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
    decoder: msgspec.json.Decoder,
    line: bytes,
    filename: str,
    base_meta: dict[str, Any],
    limits: LoadLimits,
) -> Document:
    try:
        # Checked here, not left to msgspec, whose message for it changes between versions.
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError("not valid UTF-8 text") from exc
    try:
        # Before decoding: msgspec recurses once per level and would hit RecursionError.
        check_json_depth(line, limits.max_json_depth)
    except JsonTooDeep as exc:
        raise _LineError(f"{exc} ({_DEPTH_SETTING})") from exc
    try:
        record = decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise _LineError(f"invalid JSON ({exc})") from exc
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
    problem = _check_title(title, limits)
    if problem:
        raise _LineError(problem, doc_id)
    clean_title = _clean_title(title)
    clean_text = normalize_text(text or "")
    if len(clean_text) > limits.max_chars:
        raise _LineError(
            _over("text is", len(clean_text), "characters", limits.max_chars, _TEXT_SETTING), doc_id
        )
    if not clean_text and not clean_title:
        raise _LineError("no text and no title", doc_id)
    metadata = {**base_meta, **(meta or {})}
    problem = _check_metadata(metadata, limits)
    if problem:
        raise _LineError(problem, doc_id)
    return Document(
        id=doc_id,
        # A title-only record is still searchable by its title.
        text=clean_text or clean_title,
        title=clean_title,
        source=filename,
        metadata=metadata,
    )


_PARSERS: dict[str, _Parser] = {
    ".txt": _parse_txt,
    ".md": _parse_markdown,
    ".markdown": _parse_markdown,
    ".html": _parse_html,
    ".htm": _parse_html,
    ".pdf": _parse_pdf,
    ".docx": _parse_docx,
}

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({*_PARSERS, ".jsonl"})
