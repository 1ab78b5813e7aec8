"""The resources every entry point needs, built by the core and never borrowed from the HTTP app.

``Services`` bundles settings, registry, store and the serving encoder (with the retriever that pairs
it with its collection) and, once :func:`running` has started them, the LLM and the answer pipeline.
The API, the worker and the command-line tools all start from here; none of them imports Litestar
to get at it (ARCHITECTURE.md, "Packages").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

from rag.answer import AnswerPipeline
from rag.auth import bootstrap_key
from rag.drift_monitor import DriftCheck, check_sample
from rag.embedding import Embedder, load_embedder, model_source, model_version, runtime_version
from rag.encoder_pool import EncoderPool
from rag.encoders import resolve_encoder
from rag.errors import RagError
from rag.index import collection_name, ensure_collection_for
from rag.llm import LLM, OpenAICompatibleLLM
from rag.metrics import Metrics
from rag.local_llm import MODEL_NAME, LocalLLMServer, local_llm_paths
from rag.prompts import load_prompts
from rag.reconcile import ReconcileReport, reconcile
from rag.registry import JobKind, Registry
from rag.registry_factory import open_registry
from rag.tracing import Tracing
from rag.rerank import load_reranker
from rag.search import QueryEncoder, Retriever
from rag.settings import Settings
from rag.sparse import SparseEncoder
from rag.store import VectorStore, open_store

__all__ = ["Background", "Services", "prompts_dir", "running", "start_llm"]

log = structlog.get_logger("rag.services")


def _runtime_kept(settings: Settings, store, serving: str) -> None:
    """The active collection holds another runtime's vectors than ``RAG_ENCODER_RUNTIME`` gives (an int8 setting
    over a store embedded in fp32, or the reverse): its queries keep that runtime, since a query embedded by one
    version is never searched against another's vectors. Say so, and how to move the vectors over."""
    from rag.embedding import split_version

    target = runtime_version(split_version(serving)[0], settings.encoder_runtime)
    log.warning("encoder_runtime_kept", configured=settings.encoder_runtime, serving=serving,
                collection=store.get_active(),
                hint=f"the stored vectors are {serving}'s; to serve {target}, re-embed them blue/green with "
                     f"`python -m ingest encoders promote --version {target}`")


@dataclass
class Services:
    """Everything the handlers and the worker need; :meth:`build` opens it from settings."""

    settings: Settings
    registry: Registry
    store: VectorStore
    embedder: Embedder  # the default encoder (tenants without one of their own search with it)
    encoders: EncoderPool | None = None  # each tenant's encoder; built with the services
    collection: str = ""
    query_encoder: QueryEncoder | None = None
    retriever: Retriever | None = None
    answers: AnswerPipeline | None = None
    ready: bool = False
    unfollowed: str = ""  # an active collection whose encoder is unknown here, checked once
    closers: list[Callable[[], None]] = field(default_factory=list)
    _watching: bool = False
    drift: dict[str, DriftCheck] = field(default_factory=dict)  # the last drift check per encoder version
    proposals: dict[str, dict[str, Any]] = field(default_factory=dict)  # tenant → the adaptation proposed for it
    # Set by whatever runs the ingest worker in this process: False once its thread died or its
    # heartbeat went stale. None when no worker runs here.
    worker_alive: Callable[[], bool] | None = None
    metrics: Metrics = field(default_factory=Metrics)  # this process's Prometheus metrics (GET /metrics)
    tracing: Tracing = field(default_factory=Tracing)  # OpenTelemetry; off until running() reads the settings

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """Open the store, the registry and the encoder of the active collection (an adapted one once promoted)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings)
        try:
            registry = open_registry(settings)
            model, runtime = resolve_encoder(settings, store)
            embedder = load_embedder(settings, model, runtime=runtime)
            if runtime != settings.encoder_runtime:
                _runtime_kept(settings, store, embedder.version)
        except BaseException:
            store.close()
            raise
        services = cls(settings=settings, registry=registry, store=store, embedder=embedder,
                       encoders=EncoderPool(settings, store, registry, embedder))
        services.closers += [registry.close, store.close]
        return services

    def close(self) -> None:
        for close in self.closers:
            close()

    def use_encoder(self, embedder: Embedder) -> None:
        """Serve with ``embedder`` and its own collection; the retriever pairs the two, so no query is
        embedded by one version and searched against another's vectors."""
        retriever = Retriever(self.store, collection_name(embedder.version), embedder, SparseEncoder(), self.settings)
        retriever.observe = self.metrics.stage
        self.retriever = retriever
        self.query_encoder = retriever.query_encoder
        self.embedder = embedder
        self.collection = retriever.collection
        self.pool().set_default(embedder, retriever)
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
        model, runtime = resolve_encoder(self.settings, self.store)
        if collection_name(runtime_version(model_version(model_source(model)), runtime)) != active:
            return False  # the active collection's encoder is unknown here: keep serving what we have
        self.use_encoder(load_embedder(self.settings, model, runtime=runtime))
        return True

    def prepare_retrieval(self) -> None:
        """Make sure the serving encoder's collection exists and pair it with a retriever."""
        self.collection = ensure_collection_for(self.store, self.embedder)
        self.retriever = Retriever(self.store, self.collection, self.embedder, SparseEncoder(), self.settings)
        self.query_encoder = self.retriever.query_encoder
        self.pool().set_default(self.embedder, self.retriever)
        self.pool().observe = self.metrics.stage
        self.retriever.observe = self.metrics.stage
        if not self._watching:
            self._watching = True
            self.metrics.watch_registry(self.registry, lambda: self.pool().default_version())

    def pool(self) -> EncoderPool:
        """Each tenant's encoder (built on first use for services assembled by hand, as tests do)."""
        if self.encoders is None:
            self.encoders = EncoderPool(self.settings, self.store, self.registry, self.embedder)
        return self.encoders

    def reconcile(self, *, repair: bool = False, tenants: list[str] | None = None) -> ReconcileReport:
        """Compare registry and store per tenant (and repair); the counts go to /metrics (blocking)."""
        pool = self.pool()
        report = reconcile(self.registry, self.store, version_for=lambda t: pool.version_for(t, fresh=True),
                           embedder_for=pool.embedder, tenants=tenants, repair=repair)
        self.metrics.reconciled(report.counts())
        return report

    def check_drift(self) -> dict[str, DriftCheck]:
        """Run the drift check on every loaded encoder's query sample (blocking; off the request path)."""
        retrievers = {id(r): r for r in [self.retriever, *self.pool().retrievers()] if r is not None}
        for retriever in retrievers.values():
            sample = retriever.query_sample
            if sample is None:
                continue
            check = check_sample(sample, self.settings)
            self.drift[check.encoder_version] = check
            self.metrics.drift(check)
            if check.verdict == "drift":
                self.propose_adaptations(check)
        return dict(self.drift)

    def propose_adaptations(self, check: DriftCheck) -> list[str]:
        """Drift on an encoder: each tenant searching with it that holds enough feedback pairs gets an adaptation
        proposed (an event and a field of GET /v1/encoders), or queued with RAG_ADAPT_ON_DRIFT."""
        pool, proposed = self.pool(), []
        for tenant in self.registry.tenants_usage(1 << 30):
            if tenant == "_other" or pool.version_for(tenant, fresh=True) != check.encoder_version:
                continue
            feedback = next((d for d in self.registry.list_datasets(tenant) if d.format == "feedback"), None)
            if feedback is None or feedback.pairs < self.settings.adapt_propose_min_pairs:
                continue
            proposal: dict[str, Any] = {"encoder_version": check.encoder_version, "reasons": check.reasons,
                                        "pairs_dataset": feedback.id, "pairs": feedback.pairs,
                                        "proposed_at": check.checked_at, "job_id": None}
            if self.settings.adapt_on_drift:
                job = self.registry.create_job(tenant, [], kind=JobKind.ADAPT, params={
                    "pairs_dataset": feedback.id, "dataset_tenant": tenant, "tenant": tenant})
                proposal["job_id"] = job.id
            self.proposals[tenant] = proposal
            proposed.append(tenant)
            log.warning("adaptation_proposed", tenant=tenant, encoder_version=check.encoder_version,
                        pairs=feedback.pairs, job_id=proposal["job_id"])
        return proposed

    def retriever_for(self, tenant: str) -> Retriever:
        """The retriever of the tenant's encoder: its own once it promoted one, else the default (blocking: may load)."""
        return self.pool().retriever_for(tenant)


# A component that runs beside the API for the app's lifetime (e.g. the embedded ingest worker).
Background = Callable[[Services], AbstractContextManager[Any]]


def prompts_dir(settings: Settings) -> Path:
    """RAG_PROMPTS_DIR, resolved against the working directory, else the checkout's own prompts/."""
    if settings.prompts_dir.is_absolute() or settings.prompts_dir.exists():
        return settings.prompts_dir
    return Path(__file__).resolve().parents[1] / "prompts"


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


async def reconcile_on_schedule(svc: Services) -> None:
    """Every RAG_RECONCILE_INTERVAL_S: compare registry and store (report only; repair is on demand)."""
    while True:
        await anyio.sleep(svc.settings.reconcile_interval_s)
        try:
            report = await anyio.to_thread.run_sync(svc.reconcile)
        except RagError as exc:
            log.warning("reconcile_failed", error=exc.message)
            continue
        if report.findings:
            log.warning("index_inconsistent", **report.counts())


async def watch_drift(svc: Services) -> None:
    """Every RAG_DRIFT_MONITOR_INTERVAL_S, with query sampling on: the drift check, in a worker thread."""
    while True:
        await anyio.sleep(svc.settings.drift_monitor_interval_s)
        try:
            await anyio.to_thread.run_sync(svc.check_drift)
        except (RagError, ValueError) as exc:
            log.warning("drift_check_failed", error=str(exc))


async def follow_active_encoder(svc: Services) -> None:
    """Poll the active pointer: a promotion by a worker (this process or another) switches the query side."""
    while True:
        await anyio.sleep(svc.settings.encoder_poll_s)
        try:
            await anyio.to_thread.run_sync(svc.follow_active)
        except RagError as exc:
            log.warning("encoder_follow_failed", error=exc.message)


@asynccontextmanager
async def running(settings: Settings, services: Services | None = None,
                  background: tuple[Background, ...] = ()) -> AsyncIterator[Services]:
    """Open (or adopt) the services, start the LLM, the answer pipeline, the background components and
    the encoder follower; yield them ready; stop everything in reverse on the way out.

    A caller that passes its own ``services`` keeps ownership: they are not closed here (tests share models).
    """
    owned = services is None
    svc = await anyio.to_thread.run_sync(Services.build, settings) if owned else services
    try:
        if settings.bootstrap_key:
            # The operator key from the environment: registered (or re-registered) at every start, so rotating
            # the secret is a restart; its hash is all that is stored.
            await anyio.to_thread.run_sync(svc.registry.create_key, bootstrap_key(settings.bootstrap_key))
        log.info("auth_mode", mode=settings.auth_mode, bootstrap_key=bool(settings.bootstrap_key))
        if settings.otel_endpoint and not svc.tracing.enabled:
            svc.tracing = Tracing(settings.otel_endpoint, settings.otel_service_name)
            svc.closers.append(svc.tracing.shutdown)
        svc.prepare_retrieval()
        # Warm the encoder so the first request doesn't pay for lazy initialisation.
        await anyio.to_thread.run_sync(svc.embedder.embed_queries, ["warm up"])
        async with AsyncExitStack() as stack:
            llm = await anyio.to_thread.run_sync(start_llm, settings, stack)
            if llm is not None:
                stack.push_async_callback(llm.aclose)
            reranker = await anyio.to_thread.run_sync(load_reranker, settings)
            svc.answers = AnswerPipeline(retriever=svc.retriever, reranker=reranker, embedder=svc.embedder,
                                         prompts=load_prompts(prompts_dir(settings)), llm=llm, settings=settings,
                                         retriever_for=svc.retriever_for)
            for component in background:
                stack.enter_context(component(svc))
            tg = await stack.enter_async_context(anyio.create_task_group())
            tg.start_soon(follow_active_encoder, svc)
            if settings.reconcile_interval_s > 0:
                tg.start_soon(reconcile_on_schedule, svc)
            if settings.query_sample_size > 0 and settings.drift_monitor_interval_s > 0:
                tg.start_soon(watch_drift, svc)
            stack.callback(tg.cancel_scope.cancel)
            svc.ready = True
            log.info("service_ready", encoder_version=svc.embedder.version, collection=svc.collection,
                     embedded=settings.embedded, llm=getattr(llm, "base_url", None),
                     prompt=svc.answers.prompt_version, reranker=reranker.name)
            try:
                yield svc
            finally:
                svc.ready = False
    finally:
        if owned:
            svc.close()
