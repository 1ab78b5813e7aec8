"""The Litestar application: ``create_app(settings, services=None)``."""

from __future__ import annotations

import re
import time
import traceback
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
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import Parameter
from litestar.types import ASGIApp, Receive, Scope, Send

from rag.answer import AnswerPipeline
from rag.api.admin import export_query_sample, query_sample
from rag.api.answers import answer, chat_completions
from rag.api.encoders import adapt_encoder, list_encoders, promote_encoder, prune_encoders, rollback_encoder
from rag.api.schemas import JobRef, SearchHitOut, SearchIn, SearchOut, TextDocumentIn, UploadOut
from rag.embedding import Embedder, load_embedder, model_version
from rag.encoders import resolve_encoder_model
from rag.errors import BadRequest, NotFound, PayloadTooLarge, RagError
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


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response[dict]:
    return Response({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _rag_error(request: Request, exc: RagError) -> Response[dict]:
    if exc.status_code >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    return _error(exc.status_code, exc.code, exc.message)


def _http_error(request: Request, exc: HTTPException) -> Response[dict]:
    codes = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
             413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests"}
    message = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        problems = [f"{e.get('key') or ''}: {e.get('message')}".lstrip(": ") for e in exc.extra if isinstance(e, dict)]
        message = f"{exc.detail}: {'; '.join(problems)}" if problems else exc.detail
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), message, exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response[dict]:
    log.error("unhandled_error", error=repr(exc), traceback=traceback.format_exc())
    return _error(500, "internal_error", "internal server error")


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


def tenant_of(request: Request) -> str:
    tenant = request.headers.get("x-tenant", "default")
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


@post("/v1/documents", status_code=202, summary="Upload documents (multipart files or JSON text)")
async def upload_documents(request: Request) -> UploadOut:
    """Multipart: one or more ``file`` parts (optional ``document_id`` with a single file, ``title``,
    ``metadata`` as a JSON object). JSON: ``{id?, title?, text, metadata?}``. One job per file."""
    svc = services_of(request)
    tenant = tenant_of(request)
    settings = svc.settings
    content_type = request.headers.get("content-type", "")
    batch = svc.settings.uploads_dir / uuid.uuid4().hex
    items: list[JobItem] = []
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest("multipart upload has no file part", code="no_files")
        if len(files) > settings.max_files_per_upload:
            raise PayloadTooLarge(f"at most {settings.max_files_per_upload} files per upload")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        unknown = set(fields) - {"document_id", "title", "metadata"}
        if unknown:
            raise BadRequest(f"unknown form fields: {', '.join(sorted(unknown))}", code="unknown_field")
        metadata = _parse_metadata(fields.get("metadata"))
        document_id = fields.get("document_id") or None
        if document_id is not None and len(files) > 1:
            raise BadRequest("document_id can only be given with a single file", code="bad_request")
        if document_id is not None:
            msgspec.convert({"text": "x", "id": document_id}, TextDocumentIn)  # same id rules as JSON
        for index, upload in enumerate(files):
            name = upload.filename or f"upload-{index}"
            data = await upload.read()
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(f"{name} is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
            suffix = Path(name).suffix.lower()
            bulk = suffix == ".jsonl"
            items.append(JobItem(
                filename=name, path=_save_upload(batch, index, name, data),
                document_id=None if bulk else (document_id or default_document_id(name)),
                title=fields.get("title") or None, metadata=metadata,
            ))
    elif content_type.startswith("application/json"):
        body = await request.body()
        try:
            doc = msgspec.json.decode(body, type=TextDocumentIn)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid document: {exc}", code="validation_error") from exc
        except msgspec.DecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
        if len(doc.text) > settings.max_text_chars:
            raise PayloadTooLarge(f"text is {len(doc.text)} characters; the limit is {settings.max_text_chars}")
        document_id = doc.id or uuid.uuid4().hex
        items.append(JobItem(
            filename=f"{document_id}.txt", path=_save_upload(batch, 0, "text.txt", doc.text.encode("utf-8")),
            document_id=document_id, title=doc.title, metadata=doc.metadata or {},
        ))
    else:
        raise HTTPException(status_code=415, detail="send multipart/form-data files or an application/json document")
    jobs = [await anyio.to_thread.run_sync(svc.registry.create_job, tenant, [item]) for item in items]
    refs = [JobRef(job_id=j.id, filename=i.filename, document_id=i.document_id) for j, i in zip(jobs, items, strict=True)]
    log.info("upload_accepted", tenant=tenant, files=len(items), jobs=[j.id for j in jobs])
    return UploadOut(jobs=refs, job_ids=[r.job_id for r in refs], document_ids=[r.document_id for r in refs])


def _parse_metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest("metadata must be a JSON object", code="invalid_metadata") from exc
    if not isinstance(value, dict):
        raise BadRequest("metadata must be a JSON object", code="invalid_metadata")
    return value


@get("/v1/jobs/{job_id:str}", sync_to_thread=True, summary="Job status, progress and per-document errors")
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    svc = services_of(request)
    job = svc.registry.get_job(job_id)
    # Encoder jobs (adapt, promote, rollback) act on the whole service, not on one tenant's documents.
    if job is None or (job.kind == "ingest" and job.tenant != tenant_of(request)):
        raise NotFound(f"no job {job_id}")
    return _job_out(job)


@post("/v1/jobs/{job_id:str}/cancel", sync_to_thread=True, status_code=200, summary="Cancel a queued or running job")
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


@get("/v1/documents", sync_to_thread=True, summary="List the tenant's documents")
def list_documents(
    request: Request,
    limit: int = Parameter(default=50, ge=1, le=500),
    offset: int = Parameter(default=0, ge=0),
) -> dict[str, Any]:
    svc = services_of(request)
    docs, total = svc.registry.list_documents(tenant_of(request), limit=limit, offset=offset)
    next_offset = offset + len(docs) if offset + len(docs) < total else None
    return {"documents": [_doc_out(d) for d in docs], "total": total, "limit": limit, "offset": offset,
            "next_offset": next_offset}


@get("/v1/documents/{document_id:str}", sync_to_thread=True, summary="One document's record")
def get_document(request: Request, document_id: str) -> dict[str, Any]:
    svc = services_of(request)
    rec = svc.registry.get_document(tenant_of(request), document_id)
    if rec is None:
        raise NotFound(f"no document {document_id}")
    return _doc_out(rec)


@delete("/v1/documents/{document_id:str}", sync_to_thread=True, status_code=200, summary="Delete a document and every chunk")
def delete_document(request: Request, document_id: str) -> dict[str, Any]:
    svc = services_of(request)
    tenant = tenant_of(request)
    rec = svc.registry.get_document(tenant, document_id)
    # Chunks go first: a crash in between leaves a registry row whose delete can be repeated,
    # never searchable chunks without a row.
    removed = sum(svc.store.delete_document(c, tenant, document_id) for c in svc.store.list_collections())
    existed = svc.registry.delete_document(tenant, document_id)
    if rec is None and not existed and not removed:
        raise NotFound(f"no document {document_id}")
    log.info("document_deleted", tenant=tenant, document_id=document_id, chunks=removed)
    return {"deleted": document_id, "chunks_removed": removed}


@post("/v1/search", status_code=200, summary="Dense, sparse (BM25) or hybrid retrieval over the tenant's chunks")
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


@get("/readyz", summary="Readiness: models loaded, store open")
async def readyz(request: Request) -> Response[dict]:
    svc: Services | None = getattr(request.app.state, "services", None)
    if svc is None or not svc.ready:
        return _error(503, "not_ready", "service is starting")
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

    return Litestar(
        route_handlers=[upload_documents, get_job, cancel_job, list_documents, get_document, delete_document,
                        search, answer, chat_completions, healthz, readyz, list_encoders, adapt_encoder,
                        promote_encoder, rollback_encoder, prune_encoders, query_sample, export_query_sample],
        lifespan=[lifespan],
        middleware=[RequestContextMiddleware()],
        exception_handlers={RagError: _rag_error, HTTPException: _http_error, Exception: _internal_error},
        openapi_config=OpenAPIConfig(title="rag", version="0.1.0", path="/docs",
                                     render_plugins=[SwaggerRenderPlugin()]),
        request_max_body_size=settings.max_upload_bytes * 2 + 1_000_000,
        debug=False,
    )


__all__ = ["Services", "create_app", "SUPPORTED_SUFFIXES"]
