"""The Litestar application: ``create_app(settings, services=None)``."""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import msgspec
import structlog
from litestar import Litestar, Request, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Parameter
from litestar.types import ASGIApp, Receive, Scope, Send

from rag.answer import AnswerPipeline
from rag.api.admin import export_query_sample, query_sample
from rag.api.answers import answer, chat_completions
from rag.api.openapi import add_links, describe_upload
from rag.api.errors import EXCEPTION_HANDLERS, error_response, error_responses
from rag.api.encoders import adapt_encoder, list_encoders, promote_encoder, prune_encoders, rollback_encoder
from rag.api.schemas import JobRef, SearchHitOut, SearchIn, SearchOut, TextDocumentIn, UploadOut
from rag.embedding import Embedder, load_embedder, model_version
from rag.encoders import resolve_encoder_model
from rag.errors import BadRequest, NotFound, PayloadTooLarge, RagError, UnsupportedMediaType
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.index import collection_name, ensure_collection_for
from rag.loaders import SUPPORTED_SUFFIXES, default_document_id
from rag.llm import LLM, OpenAICompatibleLLM
from rag.local_llm import MODEL_NAME, LocalLLMServer, local_llm_paths
from rag.prompts import load_prompts
from rag.registry import Job, JobItem, SqliteRegistry
from rag.rerank import load_reranker
from rag.search import QueryEncoder, Retriever
from rag.sparse import SparseEncoder
from rag.settings import Settings
from rag.store import VectorStore, open_store, parse_filter

log = structlog.get_logger("rag.api")
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_OFFSET = 2**31 - 1


@dataclass
class Services:
    """Everything the handlers need; built in the lifespan unless a caller passes its own."""

    settings: Settings
    registry: SqliteRegistry
    store: VectorStore
    embedder: Embedder
    collection: str = ""
    query_encoder: QueryEncoder | None = None
    retriever: Retriever | None = None
    answers: AnswerPipeline | None = None
    ready: bool = False
    unfollowed: str = ""  # an active collection whose encoder is unknown here, checked once
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Set by whatever runs the ingest worker in this process (ingest.service): False once its thread
    # died or its heartbeat went stale. None when no worker runs here.
    worker_alive: Callable[[], bool] | None = None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings)
        try:
            registry = SqliteRegistry(settings.registry_path)
            # The encoder of the active collection (an adapted version once one was promoted).
            embedder = load_embedder(settings, resolve_encoder_model(settings, store))
        except BaseException:
            store.close()
            raise
        services = cls(settings=settings, registry=registry, store=store, embedder=embedder)
        services.closers += [registry.close, store.close]
        return services

    def close(self) -> None:
        for close in self.closers:
            close()

    def use_encoder(self, embedder: Embedder) -> None:
        """Serve with ``embedder`` and its own collection; the retriever pairs the two, so no query is
        embedded by one version and searched against another's vectors."""
        retriever = Retriever(self.store, collection_name(embedder.version), embedder, SparseEncoder(), self.settings)
        self.retriever = retriever
        self.query_encoder = retriever.query_encoder
        self.embedder = embedder
        self.collection = retriever.collection
        if self.answers is not None:
            self.answers.retriever = retriever
            self.answers.embedder = embedder
        log.info("encoder_switched", encoder_version=embedder.version, collection=self.collection)

    def follow_active(self) -> bool:
        """Load the active collection's encoder when a promotion or rollback moved the pointer; True if switched."""
        active = self.store.get_active()
        if not active or active in (self.collection, self.unfollowed):
            return False
        self.unfollowed = active
        model = resolve_encoder_model(self.settings, self.store)
        if collection_name(model_version(model)) != active:
            return False  # the active collection's encoder is unknown here: keep serving what we have
        self.use_encoder(load_embedder(self.settings, model))
        return True


# A component that runs beside the API for the app's lifetime (e.g. the embedded ingest worker).
Background = Callable[[Services], AbstractContextManager[Any]]


class RequestContextMiddleware(ASGIMiddleware):
    """Binds a request id to every log line of the request and returns it as ``X-Request-ID``."""

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope["type"] != "http":
            await next_app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await next_app(scope, receive, send_with_id)
        finally:
            log.info("request", method=scope["method"], path=scope["path"], status=status,
                     ms=round((time.perf_counter() - started) * 1000, 2))
            structlog.contextvars.unbind_contextvars("request_id")


async def reject_deep_json(request: Request) -> None:
    """Before any handler decodes a JSON body: refuse nesting deep enough to exhaust the parser's recursion."""
    if request.method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return
    content_type = request.headers.get("content-type", "").lower()
    if "json" not in content_type:
        return
    svc = getattr(request.app.state, "services", None)
    limit = svc.settings.max_json_depth if svc is not None else Settings().max_json_depth
    try:
        check_json_depth(await request.body(), limit)
    except JsonTooDeep as exc:
        raise BadRequest(f"body: {exc} (RAG_MAX_JSON_DEPTH)", code="json_too_deep") from exc


def tenant_of(request: Request) -> str:
    # Repeated headers arrive either as several raw headers or joined with "," by a proxy or client.
    values = [v.decode("latin-1") for k, v in request.scope["headers"] if k.lower() == b"x-tenant"]
    if len(values) > 1 or any("," in v for v in values):
        # Proxies and clients disagree on which of several copies wins; refuse instead of guessing.
        raise BadRequest("X-Tenant was sent more than once", code="duplicate_tenant_header")
    tenant = values[0] if values else "default"
    if not TENANT_RE.match(tenant):
        raise BadRequest("X-Tenant must be 1-64 characters of [A-Za-z0-9_-]", code="invalid_tenant")
    return tenant


def services_of(request: Request) -> Services:
    return request.app.state.services


def _job_out(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "status": job.status, "tenant": job.tenant,
        "files": [i.filename for i in job.items],
        "progress": {"documents_total": job.total, "documents_done": job.done, "documents_failed": job.failed,
                     "chunks": job.chunks},
        "attempts": job.attempts, "error": job.error,
        "documents": [msgspec.to_builtins(r) for r in job.results],
        "errors": [{"document_id": r.document_id, "source": r.source, "error": r.error}
                   for r in job.results if r.status == "failed"],
        "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
        "kind": job.kind, "stage": job.stage, "params": job.params, "outcome": job.outcome,
    }


def _save_upload(directory: Path, index: int, filename: str, data: bytes) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{index:04d}-{default_document_id(filename)}"
    path.write_bytes(data)
    return str(path)


@post("/v1/documents", status_code=202, summary="Upload documents (multipart files or JSON text)",
      responses=error_responses(413, 415))
async def upload_documents(request: Request) -> UploadOut:
    """Multipart: one or more ``file`` parts (optional ``document_id`` with a single file, ``title``,
    ``metadata`` as a JSON object). JSON: ``{id?, title?, text, metadata?}``. One job per file."""
    svc = services_of(request)
    tenant = tenant_of(request)
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
    except BaseException:
        # A rejected upload (413 on its third file, say) leaves none of its files behind.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(batch, ignore_errors=True))
        raise
    jobs = [await anyio.to_thread.run_sync(svc.registry.create_job, tenant, [item]) for item in items]
    refs = [JobRef(job_id=j.id, filename=i.filename, document_id=i.document_id) for j, i in zip(jobs, items, strict=True)]
    log.info("upload_accepted", tenant=tenant, files=len(items), jobs=[j.id for j in jobs])
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
            raise PayloadTooLarge(f"{_shown(name)} is {len(data)} bytes; the limit is {settings.max_upload_bytes} "
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
            raise BadRequest(f"unknown form field {_shown(key)}; known: {', '.join(_FORM_FIELDS)}", code="unknown_field")
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


def _shown(value: str, limit: int = 64) -> str:
    """A caller's string, quoted and cut short, for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _check_document_id(document_id: str) -> None:
    try:
        msgspec.convert({"text": "x", "id": document_id}, TextDocumentIn)  # same id rules as JSON
    except msgspec.ValidationError as exc:
        raise BadRequest(f"document_id {_shown(document_id)}: 1-256 characters, no '/' and no control characters",
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


@get("/v1/jobs/{job_id:str}", sync_to_thread=True, summary="Job status, progress and per-document errors",
     responses=error_responses(404))
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    svc = services_of(request)
    job = svc.registry.get_job(job_id)
    # Encoder jobs (adapt, promote, rollback) act on the whole service, not on one tenant's documents.
    if job is None or (job.kind == "ingest" and job.tenant != tenant_of(request)):
        raise NotFound(f"no job {job_id}")
    return _job_out(job)


@post("/v1/jobs/{job_id:str}/cancel", sync_to_thread=True, status_code=200, summary="Cancel a queued or running job",
      responses=error_responses(404))
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    svc = services_of(request)
    job = svc.registry.get_job(job_id)
    # Encoder jobs (adapt, promote, rollback) act on the whole service, not on one tenant's documents.
    if job is None or (job.kind == "ingest" and job.tenant != tenant_of(request)):
        raise NotFound(f"no job {job_id}")
    job = svc.registry.request_cancel(job_id)
    return _job_out(job)


def _doc_out(rec) -> dict[str, Any]:
    return msgspec.to_builtins(rec)


@get("/v1/documents", sync_to_thread=True, summary="List the tenant's documents", responses=error_responses())
def list_documents(
    request: Request,
    limit: int = Parameter(default=50, ge=1, le=500),
    # SQLite offsets are 64-bit; a larger one is a 400, not an overflow deep in the driver.
    offset: int = Parameter(default=0, ge=0, le=MAX_OFFSET),
) -> dict[str, Any]:
    svc = services_of(request)
    docs, total = svc.registry.list_documents(tenant_of(request), limit=limit, offset=offset)
    next_offset = offset + len(docs) if offset + len(docs) < total else None
    return {"documents": [_doc_out(d) for d in docs], "total": total, "limit": limit, "offset": offset,
            "next_offset": next_offset}


@get("/v1/documents/{document_id:str}", sync_to_thread=True, summary="One document's record",
     responses=error_responses(404))
def get_document(request: Request, document_id: str) -> dict[str, Any]:
    svc = services_of(request)
    rec = svc.registry.get_document(tenant_of(request), document_id)
    if rec is None:
        raise NotFound(f"no document {document_id}")
    return _doc_out(rec)


@delete("/v1/documents/{document_id:str}", sync_to_thread=True, status_code=200, summary="Delete a document and every chunk",
        responses=error_responses(404))
def delete_document(request: Request, document_id: str) -> dict[str, Any]:
    svc = services_of(request)
    tenant = tenant_of(request)
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


@post("/v1/search", status_code=200, summary="Dense, sparse (BM25) or hybrid retrieval over the tenant's chunks",
      responses=error_responses(415))
async def search(request: Request, data: SearchIn) -> SearchOut:
    """``mode``: ``dense``, ``sparse`` or ``hybrid`` (RRF of both in one store query); default RAG_SEARCH_MODE."""
    svc = services_of(request)
    tenant = tenant_of(request)
    settings = svc.settings
    query = data.query.strip()
    if not query:
        raise BadRequest("query must not be empty", code="empty_query")
    if len(data.query) > settings.max_query_chars:
        raise BadRequest(f"query is {len(data.query)} characters; the limit is {settings.max_query_chars}", code="query_too_long")
    if not 1 <= data.top_k <= settings.max_top_k:
        raise BadRequest(f"top_k must be between 1 and {settings.max_top_k}", code="invalid_top_k")
    parse_filter(data.filter)  # reject a bad filter before paying for the query encode
    retriever = svc.retriever  # one retriever for the whole request: its encoder and collection belong together
    mode = retriever.mode_of(data.mode)
    started = time.perf_counter()
    hits = await retriever.asearch(query, tenant=tenant, top_k=data.top_k, mode=mode, filter=data.filter)
    results = [
        SearchHitOut(
            chunk_id=h.id, document_id=h.payload["document_id"], chunk_index=h.payload["chunk_index"], score=h.score,
            text=h.payload["text"], title=h.payload.get("title", ""), source=h.payload.get("source", ""),
            offsets=(h.payload["start"], h.payload["end"]), heading_path=h.payload.get("heading_path", []),
            metadata=h.payload.get("metadata", {}),
        )
        for h in hits
    ]
    return SearchOut(results=results, encoder_version=retriever.embedder.version,
                     took_ms=round((time.perf_counter() - started) * 1000, 2), mode=mode)


@get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: models loaded, store open, worker alive", responses=error_responses())
async def readyz(request: Request) -> Response[dict]:
    svc: Services | None = getattr(request.app.state, "services", None)
    if svc is None or not svc.ready:
        return error_response(503, "not_ready", "service is starting")
    if svc.settings.worker_in_process and svc.worker_alive is not None and not svc.worker_alive():
        return error_response(503, "worker_not_alive",
                              f"the ingest worker is not running or has shown no sign of life for "
                              f"{svc.settings.worker_stale_s:g} s (RAG_WORKER_STALE_S)")
    return Response({"status": "ready", "encoder_version": svc.embedder.version, "collection": svc.collection,
                     "store": "embedded" if svc.settings.embedded else "server",
                     "worker": "in-process" if svc.settings.worker_in_process else "external"})


def prompts_dir(settings: Settings) -> Path:
    """RAG_PROMPTS_DIR, resolved against the working directory, else the checkout's own prompts/."""
    if settings.prompts_dir.is_absolute() or settings.prompts_dir.exists():
        return settings.prompts_dir
    return Path(__file__).resolve().parents[2] / "prompts"


def start_llm(settings: Settings, stack: AsyncExitStack) -> LLM | None:
    """The configured endpoint; else the bundled llama-server when installed (``RAG_LLM_LOCAL``); else None."""
    if settings.llm_base_url:
        return OpenAICompatibleLLM.from_settings(settings)
    if settings.llm_local == "no" or (settings.llm_local == "auto" and local_llm_paths() is None):
        log.info("llm_not_configured", answers="extractive")
        return None
    server = LocalLLMServer(port=settings.llm_local_port, log_path=settings.data_dir / "llama-server.log")
    try:
        server.start()
    except RagError as exc:
        if settings.llm_local == "yes":
            raise
        log.warning("local_llm_unavailable", error=exc.message, answers="extractive")
        return None
    stack.callback(server.stop)
    return OpenAICompatibleLLM(
        server.base_url, MODEL_NAME, connect_timeout_s=settings.llm_connect_timeout_s, timeout_s=settings.llm_timeout_s,
        max_tokens=settings.llm_max_tokens, max_retries=settings.llm_max_retries, temperature=settings.llm_temperature,
    )


async def _follow_active_encoder(svc: Services) -> None:
    """Poll the active pointer: a promotion by a worker (this process or another) switches the query side."""
    while True:
        await anyio.sleep(svc.settings.encoder_poll_s)
        try:
            await anyio.to_thread.run_sync(svc.follow_active)
        except RagError as exc:
            log.warning("encoder_follow_failed", error=exc.message)


def create_app(settings: Settings, services: Services | None = None, background: tuple[Background, ...] = ()) -> Litestar:
    """Build the app. ``services`` lets tests share models; ``background`` runs beside the API (the worker)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        owned = services is None
        svc = await anyio.to_thread.run_sync(Services.build, settings) if owned else services
        try:
            svc.collection = ensure_collection_for(svc.store, svc.embedder)
            svc.retriever = Retriever(svc.store, svc.collection, svc.embedder, SparseEncoder(), svc.settings)
            svc.query_encoder = svc.retriever.query_encoder
            # Warm the encoder so the first request doesn't pay for lazy initialisation.
            await anyio.to_thread.run_sync(svc.embedder.embed_queries, ["warm up"])
            app.state.services = svc
            async with AsyncExitStack() as stack:
                llm = await anyio.to_thread.run_sync(start_llm, settings, stack)
                if llm is not None:
                    stack.push_async_callback(llm.aclose)
                reranker = await anyio.to_thread.run_sync(load_reranker, settings)
                svc.answers = AnswerPipeline(retriever=svc.retriever, reranker=reranker, embedder=svc.embedder,
                                             prompts=load_prompts(prompts_dir(settings)), llm=llm, settings=settings)
                for component in background:
                    stack.enter_context(component(svc))
                tg = await stack.enter_async_context(anyio.create_task_group())
                tg.start_soon(_follow_active_encoder, svc)
                stack.callback(tg.cancel_scope.cancel)
                svc.ready = True
                log.info("service_ready", encoder_version=svc.embedder.version, collection=svc.collection,
                         embedded=settings.embedded, llm=getattr(llm, "base_url", None),
                         prompt=svc.answers.prompt_version, reranker=reranker.name)
                yield
                svc.ready = False
        finally:
            if owned:
                svc.close()

    app = Litestar(
        route_handlers=[upload_documents, get_job, cancel_job, list_documents, get_document, delete_document,
                        search, answer, chat_completions, healthz, readyz, list_encoders, adapt_encoder,
                        promote_encoder, rollback_encoder, prune_encoders, query_sample, export_query_sample],
        lifespan=[lifespan],
        middleware=[RequestContextMiddleware()],
        before_request=reject_deep_json,
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title="rag", version="0.1.0", path="/docs",
                                     render_plugins=[SwaggerRenderPlugin()]),
        request_max_body_size=settings.max_upload_bytes * 2 + 1_000_000,
        debug=False,
    )
    # Generated once and cached: the served document carries these additions.
    add_links(describe_upload(app.openapi_schema))
    return app


__all__ = ["Services", "create_app", "SUPPORTED_SUFFIXES"]
