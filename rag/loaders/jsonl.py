"""JSONL (.jsonl): a BEIR corpus, one Document per line; a bad line fails alone, the others load."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import Any

import msgspec

from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.loaders.base import (
    DEPTH_SETTING,
    LoadFailure,
    LoadLimits,
    check_metadata,
    check_title,
    log_crash,
    text_over,
)
from rag.loaders.normalize import clean_title, normalize_text
from rag.types import Document


def load_jsonl(
    filename: str, data: bytes, base_meta: dict[str, Any], limits: LoadLimits
) -> Iterator[Document | LoadFailure]:
    """One Document per non-blank line (``_id``, ``title``, ``text``, ``metadata``), or its failure."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    seen: set[str] = set()
    loaded = 0
    failed = 0
    # Looked up at each call, not imported by name: tests inject a crashing decoder here.
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
            log_crash(exc, source=filename, suffix=".jsonl", line=number)
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
    record = _decode_line(decoder, line, limits)
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
    clean = clean_title(title)
    problem = check_title(clean, limits)
    if problem:
        raise _LineError(problem, doc_id)
    clean_text = normalize_text(text or "")
    if len(clean_text) > limits.max_chars:
        raise _LineError(text_over(len(clean_text), limits), doc_id)
    if not clean_text and not clean:
        raise _LineError("no text and no title", doc_id)
    metadata = {**base_meta, **(meta or {})}
    problem = check_metadata(metadata, limits)
    if problem:
        raise _LineError(problem, doc_id)
    return Document(
        id=doc_id,
        # A title-only record is still searchable by its title.
        text=clean_text or clean,
        title=clean,
        source=filename,
        metadata=metadata,
    )


def _decode_line(decoder: msgspec.json.Decoder, line: bytes, limits: LoadLimits) -> dict[str, Any]:
    try:
        # Checked here, not left to msgspec, whose message for it changes between versions.
        line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _LineError("not valid UTF-8 text") from exc
    try:
        # Before decoding: msgspec recurses once per level and would hit RecursionError.
        check_json_depth(line, limits.max_json_depth)
    except JsonTooDeep as exc:
        raise _LineError(f"{exc} ({DEPTH_SETTING})") from exc
    try:
        record = decoder.decode(line)
    except msgspec.DecodeError as exc:
        raise _LineError(f"invalid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise _LineError(f"expected a JSON object, got {type(record).__name__}")
    return record
