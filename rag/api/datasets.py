"""Dataset routes: a tenant admin uploads labelled (query, document id) pairs, lists, reads and deletes them.

Every route acts on the caller's tenant only; another tenant's dataset id is answered exactly like an
unknown one. Creating and deleting (and every refusal of either, and every unknown id) is an audit event.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Request, delete, get, post
from litestar.datastructures import UploadFile

from rag.api.deps import Caller, access, shown
from rag.datasets import (
    DatasetLimits,
    DatasetRecord,
    ParsedDataset,
    check_name,
    check_split,
    default_name,
    parse_json_body,
    parse_upload,
)
from rag.errors import BadRequest, NotFound, PayloadTooLarge, RagError, UnsupportedMediaType
from rag.quotas import check_datasets
from rag.services import Services

audit = structlog.get_logger("rag.audit")

_FORM_FIELDS = ("name", "split")
_MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the text fields around the file


class DatasetList(msgspec.Struct):
    datasets: list[DatasetRecord]


class DatasetDeleted(msgspec.Struct):
    deleted: str


def _audit(caller: Caller, action: str, route: str, outcome: str, **data: Any) -> None:
    audit.info("audit", action=action, key_id=caller.key_id, tenant=caller.tenant, route=route, outcome=outcome,
               **data)


@post("/v1/datasets", status_code=201, summary="Upload a labelled dataset (JSONL, a BEIR zip or tar, or JSON pairs)",
      **access("admin", 413, 415))
async def create_dataset(request: Request, svc: Services, caller: Caller) -> DatasetRecord:
    """Multipart: one ``file`` part (JSONL ``{query, document_id}`` lines, or a BEIR folder as a zip or tar),
    optional ``name`` and ``split`` (the qrels split, default ``train``). JSON: ``{name, split?, pairs}``."""
    route = request.url.path
    try:
        record = await _create(request, svc, caller)
    except RagError as exc:
        _audit(caller, "dataset_create", route, exc.code, reason=exc.message)
        raise
    _audit(caller, "dataset_create", route, "ok", dataset_id=record.id, pairs=record.pairs, format=record.format)
    return record


async def _create(request: Request, svc: Services, caller: Caller) -> DatasetRecord:
    settings = svc.settings
    limits = DatasetLimits.from_settings(settings)
    # Refused before the body is read: over the quota, or a declared length past the limit.
    await anyio.to_thread.run_sync(check_datasets, svc.registry, settings, caller.tenant)
    content_type = request.headers.get("content-type", "").lower()  # media types are case-insensitive
    _check_declared_length(request, limits)
    if content_type.startswith("multipart/form-data"):
        name, parsed = await _from_multipart(request, limits)
    elif content_type.startswith("application/json"):
        body = await request.body()
        name, parsed = await anyio.to_thread.run_sync(parse_json_body, body, limits)
    else:
        raise UnsupportedMediaType("send a multipart/form-data file or an application/json body of pairs")

    def store() -> DatasetRecord:
        check_datasets(svc.registry, settings, caller.tenant)
        return svc.registry.create_dataset(caller.tenant, name, parsed.pairs, split=parsed.split,
                                           format=parsed.format, size=parsed.size, sha256=parsed.sha256)

    return await anyio.to_thread.run_sync(store)


def _check_declared_length(request: Request, limits: DatasetLimits) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes + _MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"the request is {int(declared):,} bytes; a dataset may have at most "
                              f"{limits.max_bytes:,} (RAG_DATASET_MAX_BYTES)")


async def _from_multipart(request: Request, limits: DatasetLimits) -> tuple[str, ParsedDataset]:
    try:
        form = await request.form()
    except UnicodeDecodeError as exc:  # Litestar decodes text fields strictly, as their charset says
        raise BadRequest("a multipart text field is not valid text in its charset (UTF-8 by default)",
                         code="invalid_utf8") from exc
    upload = _the_file(form)
    fields = _text_fields(form)
    split = check_split(fields.get("split") or "train")
    name = check_name(fields["name"]) if fields.get("name") else default_name(upload.filename)
    data = await upload.read()
    parse = partial(parse_upload, data, filename=upload.filename or "upload", split=split, limits=limits)
    return name, await anyio.to_thread.run_sync(parse)


def _the_file(form: Any) -> UploadFile:
    files = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        sent_as_text = " (`file` came as a text field: send it as a file, with a filename)" if "file" in form else ""
        raise BadRequest(f"multipart upload has no file part (send the dataset as `file`){sent_as_text}",
                         code="no_files")
    if len(files) > 1 or files[0][0] != "file":
        raise BadRequest("send exactly one file part, named `file`", code="bad_request")
    return files[0][1]


def _text_fields(form: Any) -> dict[str, str]:
    """The text fields of the upload: known names only, each at most once, valid UTF-8."""
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            continue
        if key not in _FORM_FIELDS:
            raise BadRequest(f"unknown form field {shown(key)}; known: file, {', '.join(_FORM_FIELDS)}",
                             code="unknown_field")
        if key in fields:
            raise BadRequest(f"form field {key} was sent more than once", code="duplicate_field")
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(f"form field {key} is not valid UTF-8", code="invalid_utf8") from exc
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):  # undecodable bytes, decoded leniently
            raise BadRequest(f"form field {key} is not valid UTF-8", code="invalid_utf8")
        fields[key] = value
    return fields


@get("/v1/datasets", sync_to_thread=True, summary="The tenant's labelled datasets", **access("admin"))
def list_datasets(svc: Services, caller: Caller) -> DatasetList:
    return DatasetList(datasets=svc.registry.list_datasets(caller.tenant))


@get("/v1/datasets/{dataset_id:str}", sync_to_thread=True, summary="One labelled dataset's record",
     **access("admin", 404))
def get_dataset(request: Request, svc: Services, caller: Caller, dataset_id: str) -> DatasetRecord:
    record = svc.registry.get_dataset(caller.tenant, dataset_id)
    if record is None:
        _audit(caller, "dataset_read", request.url.path, "not_found", dataset_id=dataset_id[:100])
        raise NotFound(f"no dataset {shown(dataset_id)}")
    return record


@delete("/v1/datasets/{dataset_id:str}", sync_to_thread=True, status_code=200,
        summary="Delete a labelled dataset and its pairs", **access("admin", 404))
def delete_dataset(request: Request, svc: Services, caller: Caller, dataset_id: str) -> DatasetDeleted:
    if not svc.registry.delete_dataset(caller.tenant, dataset_id):
        _audit(caller, "dataset_delete", request.url.path, "not_found", dataset_id=dataset_id[:100])
        raise NotFound(f"no dataset {shown(dataset_id)}")
    _audit(caller, "dataset_delete", request.url.path, "ok", dataset_id=dataset_id)
    return DatasetDeleted(deleted=dataset_id)


ROUTES = [create_dataset, list_datasets, get_dataset, delete_dataset]
