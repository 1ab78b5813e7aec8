"""The entry points: ``load`` and ``load_document``, the dispatch by suffix, and document ids."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from typing import Any

from rag.errors import DocumentError
from rag.loaders.base import (
    Failed,
    LoadFailure,
    LoadLimits,
    Parser,
    check_metadata,
    check_title,
    log_crash,
    text_over,
)
from rag.loaders.docx import parse_docx
from rag.loaders.html import parse_html
from rag.loaders.jsonl import load_jsonl
from rag.loaders.normalize import clean_title, normalize_text
from rag.loaders.pdf import parse_pdf
from rag.loaders.plain import parse_markdown, parse_txt
from rag.types import Document

_PARSERS: dict[str, Parser] = {
    ".txt": parse_txt,
    ".md": parse_markdown,
    ".markdown": parse_markdown,
    ".html": parse_html,
    ".htm": parse_html,
    ".pdf": parse_pdf,
    ".docx": parse_docx,
}

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({*_PARSERS, ".jsonl"})

_MAX_ID_LEN = 200
_ID_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


def default_document_id(filename: str) -> str:
    """A deterministic, readable id for a file name: its base name sanitized to ``[A-Za-z0-9._-]``.

    Accents are folded (``résumé.txt`` -> ``resume...``). When sanitizing or truncating to 200
    characters loses information, 8 hex digits of the name's sha1 are added before the suffix
    (``my report.txt`` -> ``my_report-<hash>.txt``) so that distinct names (``報告.pdf``,
    ``計画.pdf``) do not collapse onto the same id and overwrite each other.
    """
    base = _base_name(filename)
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
        log_crash(exc, source=filename, suffix=suffix, document_id=doc_id)
        yield LoadFailure(doc_id, filename, f"could not parse {suffix or 'file'} ({type(exc).__name__})")


def load_document(filename: str, data: bytes, **options: Any) -> Document:
    """Load exactly one Document, raising ``DocumentError`` on failure (for single-file uploads).

    ``options`` are the keywords of ``load`` (``document_id``, ``title``, ``metadata``, ``limits``),
    passed on as they are: ``load``'s signature is their one home.
    """
    results = list(load(filename, data, **options))
    for result in results:
        if isinstance(result, LoadFailure):
            raise result.to_error()
    if len(results) != 1:
        raise DocumentError(f"{filename}: holds {len(results)} documents, expected one")
    result = results[0]
    assert isinstance(result, Document)
    return result


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
    problem = check_metadata(base_meta, limits) or (
        None if suffix == ".jsonl" else check_title(clean_title(title), limits)
    )
    if problem:
        yield LoadFailure(doc_id, filename, problem)
        return
    if suffix in (".jsonl",):
        yield from load_jsonl(filename, data, base_meta, limits)
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
    except Failed as exc:
        yield LoadFailure(doc_id, filename, str(exc))
        return
    text = normalize_text(raw_text)
    del raw_text
    if not text:
        yield LoadFailure(doc_id, filename, "empty document")
        return
    if len(text) > limits.max_chars:
        yield LoadFailure(doc_id, filename, text_over(len(text), limits))
        return
    yield Document(
        id=doc_id,
        text=text,
        title=_final_title(title, own_title, filename, limits),
        source=filename,
        metadata={**extra, **base_meta},
    )


def _final_title(title: str | None, own_title: str | None, filename: str, limits: LoadLimits) -> str:
    """The given title, else the document's own, else the file's base name."""
    return (
        clean_title(title)
        # The document's own title is cut rather than refused: the uploader did not choose it.
        or clean_title(own_title)[: limits.max_title_chars].rstrip()
        or _base_name(filename)[: limits.max_title_chars]
    )


def _suffix(filename: str) -> str:
    base = _base_name(filename)
    dot = base.rfind(".")
    return base[dot:].lower() if dot > 0 else ""


def _base_name(filename: str) -> str:
    return re.split(r"[/\\]", filename)[-1]
