"""What every format loader shares: the limits, the failure value, and the wording of refusals.

Internal to ``rag.loaders`` (import the public names from the package). The names here have no
leading underscore only because the format modules beside this one use them.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from rag.errors import DocumentError
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.logs import get_logger

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
TEXT_SETTING = "RAG_MAX_TEXT_CHARS"
INFLATE_SETTING = "RAG_MAX_DECOMPRESSED_BYTES"
PAGES_SETTING = "RAG_MAX_PDF_PAGES"
DEPTH_SETTING = "RAG_MAX_JSON_DEPTH"
METADATA_SETTING = "RAG_MAX_METADATA_BYTES"
TITLE_SETTING = "RAG_MAX_TITLE_CHARS"


def over(subject: str, size: int, unit: str, limit: int, setting: str, *, more: bool = False) -> str:
    """``text is 6,000,000 characters; the limit is 5,000,000 (RAG_MAX_TEXT_CHARS)``."""
    amount = f"more than {limit:,}" if more else f"{size:,}"
    return f"{subject} {amount} {unit}; the limit is {limit:,} ({setting})"


def text_over(chars: int, limits: LoadLimits, *, more: bool = False) -> str:
    """The reason for text over ``max_chars`` (``more``: counting stopped once past the limit)."""
    return over("text is", chars, "characters", limits.max_chars, TEXT_SETTING, more=more)


class Failed(Exception):
    """A parser gives up with this reason (caught by ``load``, never escapes it; ``rag.datasets`` turns the
    zip inspector's into a 400)."""


Parsed = tuple[str, str | None, dict[str, Any]]  # text, own title, extra metadata
Parser = Callable[[bytes, LoadLimits], Parsed]


def check_title(clean_title: str, limits: LoadLimits) -> str | None:
    """Why a given title (already cleaned) may not be stored, or None."""
    if len(clean_title) > limits.max_title_chars:
        return over("title is", len(clean_title), "characters", limits.max_title_chars, TITLE_SETTING)
    return None


def check_metadata(meta: dict[str, Any], limits: LoadLimits) -> str | None:
    """Why ``meta`` may not be stored (too big or too deep as JSON), or None."""
    if not meta:
        return None
    try:
        encoded = msgspec.json.encode(meta)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        return f"metadata cannot be stored as JSON ({type(exc).__name__})"
    if len(encoded) > limits.max_metadata_bytes:
        return over(
            "metadata is", len(encoded), "bytes as JSON", limits.max_metadata_bytes, METADATA_SETTING
        )
    try:
        check_json_depth(encoded, limits.max_json_depth)
    except JsonTooDeep as exc:
        return f"metadata: {exc} ({DEPTH_SETTING})"
    return None


def log_crash(exc: BaseException, **context: Any) -> None:
    """Log a parser crash that ``load`` turned into a failure."""
    # Type and code location only: an exception's message may quote the document's text.
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
    log.warning("document_parse_crashed", error=type(exc).__name__, where=where, **context)


def describe(exc: BaseException) -> str:
    """``KeyError: '/Root'``: a library error's type and the start of its message, for a reason."""
    message = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {message[:200]}" if message else name
