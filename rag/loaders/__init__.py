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

Rooms: ``core`` (``load``, ``load_document``, dispatch by suffix, ``default_document_id``),
``base`` (``LoadLimits``, ``LoadFailure`` and the wording of refusals), ``normalize`` (text
normalisation and decoding), and one module per format: ``plain`` (.txt, .md), ``html``, ``pdf``,
``docx``, ``jsonl``; and ``zipcheck``, the zip inspector that .docx parsing and labelled datasets
(``rag.datasets``) share, which fails with ``Failed``. Import from the package, not from those modules.
"""

from __future__ import annotations

from rag.loaders.base import Failed, LoadFailure, LoadLimits
from rag.loaders.core import SUPPORTED_SUFFIXES, default_document_id, load, load_document
from rag.loaders.normalize import normalize_text
from rag.loaders.zipcheck import check_zip_member, zip_members

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Failed",
    "LoadFailure",
    "LoadLimits",
    "default_document_id",
    "load",
    "load_document",
    "check_zip_member",
    "normalize_text",
    "zip_members",
]
