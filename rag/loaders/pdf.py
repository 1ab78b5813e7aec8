"""PDF (.pdf): the text layer of each page, via pypdf.

The page tree is counted before pypdf flattens it and the page content streams are measured as
they inflate, because pypdf trusts declared counts. A page that fails to read is skipped and
listed in the metadata (``unreadable_pages``); a PDF with no readable page fails.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from rag.loaders.base import (
    INFLATE_SETTING,
    PAGES_SETTING,
    Failed,
    LoadLimits,
    Parsed,
    describe,
    over,
    text_over,
)
from rag.loaders.normalize import normalize_text


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


def parse_pdf(data: bytes, limits: LoadLimits) -> Parsed:
    from pypdf.errors import DependencyError

    try:
        return _read_pdf(data, limits)
    except DependencyError as exc:
        # AES-encrypted PDFs decrypt lazily, object by object, and need `cryptography`.
        raise Failed(f"encrypted PDF (cannot decrypt: {exc})") from exc


_MAX_LISTED_PAGES = 100  # unreadable page numbers kept in metadata (it is copied into every chunk)


def _read_pdf(data: bytes, limits: LoadLimits) -> Parsed:
    errors = _pdf_errors()
    reader, pages = _open_pdf(data, limits, errors)
    texts, unreadable, first_error = _page_texts(pages, limits)
    if not texts:
        if unreadable:
            raise Failed(
                f"corrupt PDF (no page could be read, {len(unreadable)} failed: {first_error})"
            )
        raise Failed("PDF has no text layer (scanned images? run OCR first)")
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


def _open_pdf(
    data: bytes, limits: LoadLimits, errors: tuple[type[BaseException], ...]
) -> tuple[Any, list[Any]]:
    """The reader and its pages: decrypted with the empty password if need be, page count checked."""
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
    except errors as exc:
        raise Failed(f"corrupt PDF ({describe(exc)})") from exc
    try:
        encrypted = reader.is_encrypted
    except errors as exc:
        raise Failed(f"corrupt PDF ({describe(exc)})") from exc
    if encrypted:
        try:
            decrypted = reader.decrypt("") != PasswordType.NOT_DECRYPTED
        except DependencyError as exc:
            raise Failed(f"encrypted PDF (cannot decrypt: {exc})") from exc
        except errors:
            decrypted = False
        if not decrypted:
            raise Failed("encrypted PDF (password required)")
    try:
        _check_page_count(reader, limits.max_pages)
        pages = list(reader.pages)
    except errors as exc:
        raise Failed(f"corrupt PDF ({describe(exc)})") from exc
    if len(pages) > limits.max_pages:  # pypdf disagrees with the walk above; trust the larger count
        raise Failed(over("PDF has", len(pages), "pages", limits.max_pages, PAGES_SETTING))
    return reader, pages


def _page_texts(pages: list[Any], limits: LoadLimits) -> tuple[list[str], list[int], str]:
    """The pages' non-blank texts, the numbers of the pages that failed, and the first failure's type."""
    from pypdf.errors import DependencyError

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
            raise Failed(
                over(
                    "PDF page content inflates to", inflated, "bytes", limits.max_decompressed_bytes,
                    INFLATE_SETTING, more=True,
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
                raise Failed(text_over(chars, limits, more=True))
    return texts, unreadable, first_error


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
        raise Failed(over("PDF has", int(declared), "pages", limit, PAGES_SETTING))
    raise Failed(over("PDF has", leaves, "pages", limit, PAGES_SETTING, more=True))
