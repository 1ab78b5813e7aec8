"""Document routes: upload (multipart files or a JSON text, one job per file), list, get and delete."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Request, delete, get, post
from litestar.datastructures import UploadFile
from litestar.params import Parameter

from rag.api.deps import Caller, access, shown
from rag.api.schemas import JobRef, TextDocumentIn, UploadOut
from rag.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.loaders import default_document_id
from rag.quotas import check_upload
from rag.registry import JobItem
from rag.services import Services
from rag.settings import Settings

log = structlog.get_logger("rag.api")

# SQLite offsets are 64-bit; a larger one must be a 400, not an overflow deep in the driver.
MAX_OFFSET = 2**31 - 1


def _save_upload(directory: Path, index: int, filename: str, data: bytes) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:04d}-{default_document_id(filename)}"
    path.write_bytes(data)
    return str(path)


@post("/v1/documents", status_code=202, summary="Upload documents (multipart files or JSON text)", **access("write", 413, 415))
async def upload_documents(request: Request, svc: Services, caller: Caller) -> UploadOut:
    """Multipart: one or more ``file`` parts (optional ``document_id`` with a single file, ``title``,
    ``metadata`` as a JSON object). JSON: ``{id?, title?, text, metadata?}``. One job per file."""
    # Media types are case-insensitive (RFC 9110): APPLICATION/JSON is JSON.
    content_type = request.headers.get("content-type", "").lower()
    batch = svc.settings.uploads_dir / uuid.uuid4().hex
    try:
        if content_type.startswith("multipart/form-data"):
            items = await _multipart_items(request, svc.settings, batch)
        elif content_type.startswith("application/json"):
            items = await _json_items(request, svc.settings, batch)
        else:
            raise UnsupportedMediaType("send multipart/form-data files or an application/json document")
        await anyio.to_thread.run_sync(check_upload, svc.registry, svc.settings, caller.tenant, len(items))
    except BaseException:
        # A rejected upload (413 on its third file, say) leaves none of its files behind.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(batch, ignore_errors=True))
        raise
    jobs = [await anyio.to_thread.run_sync(svc.registry.create_job, caller.tenant, [item]) for item in items]
    refs = [JobRef(job_id=j.id, filename=i.filename, document_id=i.document_id) for j, i in zip(jobs, items, strict=True)]
    log.info("upload_accepted", tenant=caller.tenant, files=len(items), jobs=[j.id for j in jobs])
    return UploadOut(jobs=refs, job_ids=[r.job_id for r in refs], document_ids=[r.document_id for r in refs])


async def _multipart_items(request: Request, settings: Settings, batch: Path) -> list[JobItem]:
    try:
        form = await request.form()
    except UnicodeDecodeError as exc:  # Litestar decodes text fields strictly, as their charset says
        raise BadRequest("a multipart text field is not valid text in its charset (UTF-8 by default)",
                         code="invalid_utf8") from exc
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise BadRequest("multipart upload has no file part", code="no_files")
    if len(files) > settings.max_files_per_upload:
        raise PayloadTooLarge(f"at most {settings.max_files_per_upload} files per upload (RAG_MAX_FILES_PER_UPLOAD)")
    fields = _form_fields(form)
    metadata = _parse_metadata(fields.get("metadata"), settings)
    title = _check_title(fields.get("title") or None, settings)
    document_id = fields.get("document_id") or None
    if document_id is not None and len(files) > 1:
        raise BadRequest("document_id can only be given with a single file", code="bad_request")
    if document_id is not None:
        _check_document_id(document_id)
    items: list[JobItem] = []
    for index, upload in enumerate(files):
        name = upload.filename or f"upload-{index}"
        data = await upload.read()
        if len(data) > settings.max_upload_bytes:
            raise PayloadTooLarge(f"{shown(name)} is {len(data)} bytes; the limit is {settings.max_upload_bytes} "
                                  "(RAG_MAX_UPLOAD_BYTES)")
        bulk = Path(name).suffix.lower() == ".jsonl"
        path = await anyio.to_thread.run_sync(_save_upload, batch, index, name, data)
        items.append(JobItem(filename=name, path=path, title=title, metadata=metadata,
                             document_id=None if bulk else (document_id or default_document_id(name))))
    return items


async def _json_items(request: Request, settings: Settings, batch: Path) -> list[JobItem]:
    try:
        doc = msgspec.json.decode(await request.body(), type=TextDocumentIn)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid document: {exc}", code="validation_error") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    if len(doc.text) > settings.max_text_chars:
        raise PayloadTooLarge(f"text is {len(doc.text)} characters; the limit is {settings.max_text_chars} "
                              "(RAG_MAX_TEXT_CHARS)")
    title = _check_title(doc.title, settings)
    metadata = _check_metadata(doc.metadata or {}, settings)
    document_id = doc.id or uuid.uuid4().hex
    # NUL and other control characters are removed from every text (README); a JSON string may carry them.
    text = doc.text.replace("\x00", "")
    data = text.encode("utf-8", "surrogatepass")
    path = await anyio.to_thread.run_sync(_save_upload, batch, 0, "text.txt", data)
    return [JobItem(filename=f"{document_id}.txt", path=path, document_id=document_id, title=title,
                    metadata=metadata)]


_FORM_FIELDS = ("document_id", "title", "metadata")


def _form_fields(form: Any) -> dict[str, str]:
    """The text fields of a multipart upload: known names only, each at most once, valid UTF-8."""
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            continue
        if key not in _FORM_FIELDS:
            raise BadRequest(f"unknown form field {shown(key)}; known: {', '.join(_FORM_FIELDS)}", code="unknown_field")
        if key in fields:
            raise BadRequest(f"form field {key} was sent more than once", code="duplicate_field")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"form field {key} is not valid UTF-8", code="invalid_utf8") from exc
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            # Undecodable bytes surface as lone surrogates when the form parser decodes leniently.
            raise BadRequest(f"form field {key} is not valid UTF-8", code="invalid_utf8")
        fields[key] = value
    return fields


def _check_document_id(document_id: str) -> None:
    try:
        msgspec.convert({"text": "x", "id": document_id}, TextDocumentIn)  # same id rules as JSON
    except msgspec.ValidationError as exc:
        raise BadRequest(f"document_id {shown(document_id)}: 1-256 characters, no '/' and no control characters",
                         code="invalid_document_id") from exc


def _check_title(title: str | None, settings: Settings) -> str | None:
    if title is not None and len(title) > settings.max_title_chars:
        raise PayloadTooLarge(f"title is {len(title)} characters; the limit is {settings.max_title_chars} "
                              "(RAG_MAX_TITLE_CHARS)", code="title_too_long")
    return title


def _check_metadata(metadata: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Metadata is copied into every chunk's payload: bound its size so one request cannot multiply it."""
    size = len(msgspec.json.encode(metadata))
    if size > settings.max_metadata_bytes:
        raise PayloadTooLarge(f"metadata is {size} bytes as JSON; the limit is {settings.max_metadata_bytes} "
                              "(RAG_MAX_METADATA_BYTES)", code="metadata_too_large")
    return metadata


def _parse_metadata(raw: str | None, settings: Settings) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > settings.max_metadata_bytes:
        raise PayloadTooLarge(f"metadata is {len(raw.encode('utf-8', 'surrogatepass'))} bytes; the limit is "
                              f"{settings.max_metadata_bytes} (RAG_MAX_METADATA_BYTES)", code="metadata_too_large")
    try:
        check_json_depth(raw, settings.max_json_depth)
        value = msgspec.json.decode(raw)
    except JsonTooDeep as exc:
        raise BadRequest(f"metadata: {exc} (RAG_MAX_JSON_DEPTH)", code="json_too_deep") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest("metadata must be a JSON object", code="invalid_metadata") from exc
    if not isinstance(value, dict):
        raise BadRequest("metadata must be a JSON object", code="invalid_metadata")
    return _check_metadata(value, settings)


def _doc_out(rec) -> dict[str, Any]:
    return msgspec.to_builtins(rec)


@get("/v1/documents", sync_to_thread=True, summary="List the tenant's documents", **access("read"))
def list_documents(
    svc: Services,
    caller: Caller,
    limit: int = Parameter(default=50, ge=1, le=500),
    offset: int = Parameter(default=0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    docs, total = svc.registry.list_documents(caller.tenant, limit=limit, offset=offset)
    next_offset = offset + len(docs) if offset + len(docs) < total else None
    return {"documents": [_doc_out(d) for d in docs], "total": total, "limit": limit, "offset": offset,
            "next_offset": next_offset}


@get("/v1/documents/{document_id:str}", sync_to_thread=True, summary="One document's record", **access("read", 404))
def get_document(svc: Services, caller: Caller, document_id: str) -> dict[str, Any]:
    rec = svc.registry.get_document(caller.tenant, document_id)
    if rec is None:
        raise NotFound(f"no document {document_id}")
    return _doc_out(rec)


@delete("/v1/documents/{document_id:str}", sync_to_thread=True, status_code=200, summary="Delete a document and every chunk", **access("write", 404))
def delete_document(svc: Services, caller: Caller, document_id: str) -> dict[str, Any]:
    tenant = caller.tenant
    rec = svc.registry.get_document(tenant, document_id)
    # The delete wins over uploads of this id still pending: the mark goes first, so a worker that
    # publishes after it removes what it published (ingest.worker), and their jobs are cancelled.
    cancelled = svc.registry.mark_deleted(tenant, document_id)
    # Chunks go next: a crash in between leaves a registry row whose delete can be repeated,
    # never searchable chunks without a row.
    removed = sum(svc.store.delete_document(c, tenant, document_id) for c in svc.store.list_collections())
    existed = svc.registry.delete_document(tenant, document_id)
    if rec is None and not existed and not removed and not cancelled:
        raise NotFound(f"no document {document_id}")
    log.info("document_deleted", tenant=tenant, document_id=document_id, chunks=removed, jobs_cancelled=cancelled)
    return {"deleted": document_id, "chunks_removed": removed}


ROUTES = [upload_documents, list_documents, get_document, delete_document]
