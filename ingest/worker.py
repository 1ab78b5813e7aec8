"""The ingestion worker: claims jobs and runs parse → chunk → embed → upsert → publish.

Crash safety: a document's new chunks are written invisible (``live=False``) under point ids that
include its content hash, then published in one step that also removes the previous generation.
A worker killed at any point leaves either the old or the new generation visible, never half of
one; the job's lease runs out (or the embedded service requeues it at start) and the retry
overwrites the same point ids instead of duplicating them.

Resilience: nothing an upload contains stops the worker. An exception while loading or indexing
one document fails that document (its reason in the job's report) and the job goes on; one that
escapes a job fails the job; the poll loop catches whatever escapes ``run_once``. Store, transient
and OS errors stay on the retry path (the infrastructure, not the document). A heartbeat lets the
service report a wedged or dead worker (``/readyz``) and restart a dead one (ingest/supervisor.py).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from ingest.background import BackgroundCompute, Compute, LocalCompute
from rag.chunking import CHUNKER_VERSION, chunk
from rag.embedding import Embedder
from rag.encoder_pool import EncoderPool
from rag.errors import BadRequest, NotFound, RagError, StoreError, TransientError
from rag.index import collection_name, ensure_collection_for
from rag.loaders import LoadFailure, LoadLimits, load
from rag.metrics import Metrics
from rag.tracing import Tracing, span
from rag.quotas import room
from rag.registry import DocumentRecord, DocumentResult, Job, JobItem, JobKind, JobStatus, Registry
from rag.sentence_vectors import embed_chunk_sentences
from rag.settings import Settings
from rag.sparse import SparseEncoder
from rag.store import VectorStore, point_id
from rag.tokens import get_encoding
from rag.types import Chunk, ChunkPayload, Document, PointRecord, embedding_text

log = structlog.get_logger("ingest.worker")

# Documents are embedded in groups of about this many chunks: large enough that the encoder's
# length-sorted batching stays efficient, small enough that progress and cancellation are prompt.
GROUP_CHUNKS = 512
# The lease is renewed at most this often between documents; cancellation is read at every document.
RENEW_EVERY_S = 1.0
# After an unexpected error in the poll loop (e.g. the registry's disk), wait this long before polling again.
LOOP_BACKOFF_S = 1.0
# An idle worker waits for a job in slices this long at most, so that stop() is prompt whatever the poll interval.
IDLE_SLICE_S = 0.5
DELETED_PENDING = "deleted while the upload was pending"
# Infrastructure failures: the job is retried (requeued) instead of its documents being failed.
INFRASTRUCTURE = (StoreError, TransientError, OSError)


class JobCancelled(Exception):
    pass


class JobYielded(Exception):
    """A long job stops after a slice because another tenant's job is waiting; it resumes where it stopped."""


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut short: a reason a job report can carry."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still needs a reason
        text = ""
    message = text.splitlines()[0] if text else ""
    if len(message) > limit:
        message = message[:limit] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _stored_bytes(chunks: list[Chunk]) -> int:
    """What a document's chunks hold in the store: the UTF-8 bytes of their text."""
    return sum(len(c.text.encode("utf-8", "surrogatepass")) for c in chunks)


def content_hash(doc: Document, signature: str) -> str:
    """Hash of what decides a document's vectors: its text, title, metadata and the chunking/encoder signature."""
    h = hashlib.sha256()
    for part in (signature, doc.title, doc.text, json.dumps(doc.metadata, sort_keys=True, default=str)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class WriteTarget:
    """The encoder a tenant's documents are embedded with, its collection, and the content-hash signature."""

    embedder: Embedder
    collection: str
    signature: str
    # Store each chunk's sentence vectors (RAG_SENTENCE_VECTORS): only on the default encoder, the one extractive
    # answers rank sentences with (rag/sentence_vectors.py).
    sentences: bool = False


class IngestWorker:
    """Runs ingest jobs from the registry against one store, one dense encoder and one sparse (BM25) encoder."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        store: VectorStore,
        embedder: Embedder,
        sparse: SparseEncoder | None = None,
        encoders: EncoderPool | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        background: bool | None = None,
    ) -> None:
        """``background``: embed and train in a low-priority child process (``ingest/background.py``) instead of
        this thread; None: as ``RAG_BACKGROUND_PROCESS`` says for a worker of its own process (``yes`` only)."""
        self.settings = settings
        self.registry = registry
        self.store = store
        self.embedder = embedder  # the default encoder; a tenant with its own writes with that (``_target``)
        # The default encoder is the one the query side builds too (rag.search.Retriever).
        self.sparse = sparse if sparse is not None else SparseEncoder()
        self.encoders = encoders if encoders is not None else EncoderPool(settings, store, registry, embedder,
                                                                          self.sparse)
        self._ensured: set[str] = set()
        self.metrics = metrics
        self.tracing = tracing or Tracing()
        self.encoding = get_encoding(settings.tokenizer_encoding)
        self.limits = LoadLimits.from_settings(settings)
        # The sparse configuration is part of what a document's stored vectors depend on: changing
        # it re-indexes documents on their next upload instead of calling them unchanged.
        self.signature = self._signature(embedder)
        self.collection = ensure_collection_for(store, embedder)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Monotonic time of the last sign of life (each loop turn, document and group); see ``alive``.
        self.heartbeat = time.monotonic()
        self.current_job: str | None = None  # the job this worker holds, for a supervisor to requeue
        self._renewed = 0.0
        if background is None:
            background = settings.background_compute(beside_api=False)
        # Ingest embedding, training, the gate's and promotion's encodes run here; the query side keeps its own.
        self.compute: Compute = BackgroundCompute(settings) if background else LocalCompute(settings)

    def _target(self, tenant: str) -> WriteTarget:
        """Where the tenant's chunks go: its encoder (own or default, read fresh) and that encoder's collection."""
        embedder = self.encoders.for_tenant(tenant, fresh=True)
        collection = collection_name(embedder.version)
        if collection not in self._ensured:
            self.store.ensure_collection(collection, embedder.dimension)
            self._ensured.add(collection)
        sentences = self.settings.sentence_vectors and self.encoders.own_version(tenant, fresh=True) is None
        return WriteTarget(self.compute.wrap(embedder), collection, self._signature(embedder), sentences)

    def _signature(self, embedder: Embedder) -> str:
        s = self.settings
        return (f"{embedder.version}|{s.tokenizer_encoding}|{s.chunk_tokens}|{s.chunk_overlap}|{self.sparse.version}"
                f"|{CHUNKER_VERSION}")

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the poll loop in a background thread (the embedded service's mode)."""
        self.beat()
        self._thread = threading.Thread(target=self.run_forever, name="ingest-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.compute.close()  # the background process, if any, goes with the worker

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def alive(self, stale_s: float) -> bool:
        """The thread runs and has shown a sign of life within ``stale_s`` seconds."""
        thread = self._thread
        return thread is not None and thread.is_alive() and time.monotonic() - self.heartbeat <= stale_s

    def run_forever(self) -> None:
        log.info("worker_started", encoder_version=self.embedder.version, collection=self.collection,
                 background_process=isinstance(self.compute, BackgroundCompute))
        try:
            while not self._stop.is_set():
                self.beat()
                try:
                    busy = self.run_once()
                except Exception:  # noqa: BLE001 - nothing may end the loop; the job, if any, is already failed
                    log.exception("worker_loop_error")
                    self._stop.wait(LOOP_BACKOFF_S)
                    continue
                if not busy:
                    self._idle()
        except BaseException as exc:
            # SystemExit, KeyboardInterrupt and the like end the thread; the supervisor restarts it.
            log.error("worker_died", error=describe(exc), job_id=self.current_job, exc_info=True)
            raise
        log.info("worker_stopped")

    def _idle(self) -> None:
        """Until a job may be there: at once when the registry says so (NOTIFY on PostgreSQL, a job created in this
        process on SQLite), else after the poll interval; sooner when the worker is stopped."""
        deadline = time.monotonic() + self.settings.worker_poll_s
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.registry.wait_for_job(min(left, IDLE_SLICE_S)):
                return

    def run_once(self) -> bool:
        """Claim and run one job; returns False when the queue was empty."""
        job = self.registry.claim_job(self.settings.job_lease_s, max_attempts=self.settings.job_max_attempts)
        if job is None:
            return False
        self.current_job = job.id
        self._renewed = time.monotonic()
        try:
            self.run_job(job)
        except Exception as exc:  # noqa: BLE001 - a bug, or an upload nobody foresaw, fails the job, not the worker
            log.exception("job_crashed", job_id=job.id, tenant=job.tenant)
            self.current_job = None
            self.registry.finish_job(job.id, "failed", f"internal error: {describe(exc)}")
        # Not cleared when a BaseException ends the thread: the supervisor requeues the job it held.
        self.current_job = None
        return True

    # ---- one job ----------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        """Run one job of any kind under the one policy for how a job ends (:meth:`_finish_guarded`)."""
        bound = log.bind(job_id=job.id, tenant=job.tenant, kind=str(job.kind), attempt=job.attempts)
        body = self._run_ingest_job if job.kind == JobKind.INGEST else self._run_encoder_job
        with self.tracing.root(f"job {job.kind}", job_id=job.id, tenant=job.tenant, attempt=job.attempts):
            self._finish_guarded(job, bound, body)

    def _finish_guarded(self, job: Job, bound, body: Callable[[Job, object], tuple[JobStatus, str | None]]) -> None:
        outcome = self._end_job(job, bound, body)
        if self.metrics is not None:
            self.metrics.jobs.labels(kind=str(job.kind), outcome=outcome).inc()

    def _end_job(self, job: Job, bound, body: Callable[[Job, object], tuple[JobStatus, str | None]]) -> str:
        """How every job ends, whatever its kind: cancelled on request; infrastructure failures (store, transient,
        OS) back to the queue until the attempts run out; a refused request (bad options, unknown version) failed
        with its reason; anything else failed as an internal error, the worker living on. Returns the outcome."""
        try:
            status, error = body(job, bound)
        except JobCancelled:
            self.registry.finish_job(job.id, "cancelled", "cancelled on request")
            bound.info("job_cancelled")
            return "cancelled"
        except JobYielded:
            self.registry.yield_job(job.id)
            bound.info("job_yielded", reason="another tenant's job is waiting")
            return "yielded"
        except INFRASTRUCTURE as exc:
            self._retry_or_fail(job, exc, bound)
            return "retried"
        except (RagError, ValueError, msgspec.ValidationError) as exc:
            message = exc.message if isinstance(exc, RagError) else str(exc)
            self.registry.finish_job(job.id, "failed", message)
            bound.warning("job_failed", error=message)
            return "failed"
        except Exception as exc:  # noqa: BLE001 - a bug, or an upload nobody foresaw, fails the job, not the worker
            bound.exception("job_crashed")
            self.registry.finish_job(job.id, "failed", f"internal error: {describe(exc)}")
            return "failed"
        self.registry.finish_job(job.id, status, error)  # also removes an ingest job's uploaded files
        bound.info("job_finished", status=status)
        return status

    def _run_ingest_job(self, job: Job, bound) -> tuple[JobStatus, str | None]:
        bound.info("job_started", files=len(job.items))
        started = time.perf_counter()
        total, failed = self._run_items(job)
        bound.info("job_documents_done", documents=total, failed=failed, s=round(time.perf_counter() - started, 3))
        return ("failed", f"{failed} of {total} documents failed") if failed else ("succeeded", None)

    def _retry_or_fail(self, job: Job, exc: Exception, bound) -> None:
        """Transient: the job goes back to the queue until its attempts run out."""
        if job.attempts < self.settings.job_max_attempts:
            self.registry.requeue_job(job.id, f"attempt {job.attempts} failed: {describe(exc)}")
            bound.warning("job_retry", error=describe(exc))
        else:
            self.registry.finish_job(job.id, "failed", f"gave up after {job.attempts} attempts: {describe(exc)}")
            bound.error("job_failed", error=describe(exc))

    def _checkpoint(self, job: Job, *, renew: bool = False) -> None:
        """Between two steps of a job: beat, and stop if the job was cancelled (renewing the lease now and then)."""
        self.beat()
        now = time.monotonic()
        if renew or now - self._renewed >= RENEW_EVERY_S:
            self._renewed = now
            cancelled = self.registry.renew_lease(job.id, self.settings.job_lease_s)
        else:
            cancelled = self.registry.cancel_requested(job.id)
        if cancelled:
            raise JobCancelled

    # ---- encoder jobs (adapt, promote, rollback, prune) -------------------------------------------
    def _run_encoder_job(self, job: Job, bound) -> tuple[JobStatus, str | None]:
        from ingest import adapt as ad

        bound.info("job_started", params=job.params)
        last = [0.0]

        def on_progress(stage: str, fraction: float) -> None:
            if time.monotonic() - last[0] < 2.0 and fraction < 1.0:
                self.beat()
                return
            last[0] = time.monotonic()
            self.registry.set_stage(job.id, f"{stage} {fraction:.0%}")
            self._checkpoint(job, renew=True)

        progress = ad.Progress(on_progress)
        outcome: dict = {}
        params = dict(job.params)
        tenant = params.get("tenant")  # None: the default encoder, for every tenant without its own
        try:
            if job.kind == JobKind.ADAPT:
                owner = params.pop("dataset_tenant", None) or tenant
                options = msgspec.convert(params, ad.AdaptOptions)
                record = ad.adapt(self.settings, self.store, self.compute.wrap(self._encoder_of(tenant)), options,
                                  progress=progress, work_key=job.id, datasets=lambda ds: self._dataset(owner, ds),
                                  compute=self.compute)
                outcome["record"] = msgspec.to_builtins(record)
                self.registry.set_stage(job.id, "gated", outcome)
                if ad.should_promote(self.settings, record, options):
                    outcome["promotion"] = ad.promote(self.settings, self.store, record.version, pointers=self.registry,
                                                      tenant=tenant, force=options.force, progress=progress,
                                                      compute=self.compute)
            elif job.kind == JobKind.PROMOTE:
                outcome["promotion"] = ad.promote(self.settings, self.store, str(params["version"]),
                                                  pointers=self.registry, tenant=tenant,
                                                  force=bool(params.get("force")), progress=progress,
                                                  compute=self.compute)
            elif job.kind == JobKind.ROLLBACK:
                outcome["promotion"] = ad.rollback(self.settings, self.store, params.get("version"),
                                                   pointers=self.registry, tenant=tenant, progress=progress,
                                                   compute=self.compute)
            elif job.kind == JobKind.PRUNE:
                outcome["pruned"] = ad.prune(self.settings, self.store, keep=list(params.get("keep") or []),
                                             pointers=self.registry, tenant=tenant)
            else:
                raise BadRequest(f"unknown job kind {job.kind!r}")
        except BaseException:
            self.registry.set_stage(job.id, "failed", outcome)  # what it produced before failing stays readable
            raise
        finally:
            if outcome.get("promotion", {}).get("switched"):
                self.encoders.forget()
                if tenant is None:
                    self.reload_encoder()
        self.registry.set_stage(job.id, "done", outcome)
        return "succeeded", None

    def _encoder_of(self, tenant: str | None) -> Embedder:
        """The encoder an adaptation starts from: the tenant's (own or default), or the default's for None."""
        if tenant is None:
            return self.encoders.embedder(self.encoders.default_version(fresh=True))
        return self.encoders.for_tenant(tenant, fresh=True)

    def _dataset(self, tenant: str | None, dataset_id: str) -> list[tuple[str, str]]:
        pairs = self.registry.dataset_pairs(tenant or "", dataset_id) if tenant else None
        if pairs is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return pairs

    def reload_encoder(self) -> None:
        """Write with the encoder of the active collection (after a promotion or rollback)."""
        version = self.encoders.default_version(fresh=True)
        if version == self.embedder.version:
            return
        embedder = self.encoders.embedder(version)
        self.embedder = embedder
        self.signature = self._signature(embedder)
        self.collection = ensure_collection_for(self.store, embedder)
        log.info("worker_encoder_switched", encoder_version=embedder.version, collection=self.collection)

    def _run_items(self, job: Job) -> tuple[int, int]:
        total = 0
        # A job resumed after yielding its turn: what it already reported stands; skip those documents.
        skip = job.done + job.failed if job.resumed else 0
        failed = job.failed if job.resumed else 0
        group: list[Document] = []
        group_chunks = 0
        pending: list[DocumentResult] = []

        def flush_group() -> None:
            nonlocal group, group_chunks, pending, failed
            self._checkpoint(job, renew=True)  # a cancelled job embeds nothing more
            results = pending + (self._index_group(job, group) if group else [])
            failed += sum(r.status == "failed" for r in results)
            self.registry.record_results(job.id, results, total=total)
            if self.metrics is not None:
                for r in results:
                    self.metrics.documents.labels(outcome=r.status).inc()
                    self.metrics.chunks.inc(r.chunks if r.status == "indexed" else 0)
            group, group_chunks, pending = [], 0, []

        for item in job.items:
            self._checkpoint(job)
            try:
                data = Path(item.path).read_bytes()
            except FileNotFoundError:
                total += 1
                if total <= skip:
                    continue
                pending.append(DocumentResult(document_id=item.document_id, status="failed", source=item.filename,
                                              error="uploaded file is missing from the data directory"))
                continue
            for parsed in self._load(item, data):
                total += 1
                if total <= skip:
                    continue  # reported before this job yielded (the loader's order is deterministic)
                if isinstance(parsed, LoadFailure):
                    pending.append(DocumentResult(document_id=parsed.document_id, status="failed",
                                                  source=parsed.source, error=parsed.reason))
                    continue
                self._checkpoint(job)
                group.append(parsed)
                # A rough size estimate (4 chars a token) is enough to bound the group.
                group_chunks += 1 + len(parsed.text) // (4 * self.settings.chunk_tokens)
                if group_chunks >= GROUP_CHUNKS:
                    flush_group()
                    # Fair scheduling: between slices, a bulk import gives way to another tenant's waiting job.
                    if self.registry.others_waiting(job.tenant):
                        raise JobYielded
        flush_group()
        return total, failed

    def _load(self, item: JobItem, data: bytes) -> Iterator[Document | LoadFailure]:
        """The loader's documents; an exception from it (even mid-way through a JSONL) becomes one failure
        for the rest of that file, never the job's end."""
        documents = load(item.filename, data, document_id=item.document_id, title=item.title,
                         metadata=item.metadata, limits=self.limits)
        while True:
            try:
                parsed = next(documents)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - whatever a parser raises on hostile bytes fails the file
                log.warning("document_load_crashed", source=item.filename, error=describe(exc), exc_info=True)
                yield LoadFailure(item.document_id, item.filename, f"could not load: {describe(exc)}")
                return
            yield parsed

    def _index_group(self, job: Job, docs: list[Document]) -> list[DocumentResult]:
        """Index a group of parsed documents; unchanged ones are skipped, each failure stays its own."""
        tenant = job.tenant
        # The last upload of an id in one job wins (a JSONL file may repeat an _id).
        by_id: dict[str, Document] = {}
        for d in docs:
            by_id[d.id] = d
        known = self.registry.get_documents(tenant, list(by_id))
        deleted = self.registry.deleted_since(tenant, list(by_id), job.created_at)
        target = self._target(tenant)
        results: list[DocumentResult] = []
        todo: list[tuple[Document, str, list[Chunk]]] = []
        for doc in by_id.values():
            if doc.id in deleted:
                results.append(DocumentResult(document_id=doc.id, status="failed", source=doc.source,
                                              error=DELETED_PENDING))
                continue
            try:
                digest = content_hash(doc, target.signature)
                old = known.get(doc.id)
                if old is not None and old.status == "indexed" and old.content_hash == digest:
                    results.append(DocumentResult(document_id=doc.id, status="unchanged", chunks=old.chunk_count,
                                                  source=doc.source))
                    continue
                chunks = chunk(doc, self.settings.chunk_tokens, self.settings.chunk_overlap, self.encoding)
            except Exception as exc:  # noqa: BLE001 - one document's text must not fail its group
                log.warning("document_index_crashed", tenant=tenant, document_id=doc.id, error=describe(exc),
                            exc_info=True)
                results.append(DocumentResult(document_id=doc.id, status="failed", source=doc.source,
                                              error=f"could not index: {describe(exc)}"))
                continue
            if not chunks:
                results.append(DocumentResult(document_id=doc.id, status="failed", source=doc.source, error="empty document"))
                continue
            todo.append((doc, digest, chunks))
        todo = self._within_quotas(tenant, todo, known, results)
        if not todo:
            return results
        try:
            results += self._write(job, todo, known, target)
        except INFRASTRUCTURE:
            raise
        except Exception as exc:  # noqa: BLE001 - find the documents that cause it: each alone
            if len(todo) == 1:
                results.append(self._index_failure(tenant, todo[0][0], exc))
                return results
            log.warning("group_failed_retrying_alone", tenant=tenant, documents=len(todo), error=describe(exc))
            for one in todo:
                self._checkpoint(job)
                try:
                    results += self._write(job, [one], known, target)
                except INFRASTRUCTURE:
                    raise
                except Exception as exc_one:  # noqa: BLE001 - this document, and only it, fails
                    results.append(self._index_failure(tenant, one[0], exc_one))
        return results

    def _index_failure(self, tenant: str, doc: Document, exc: Exception) -> DocumentResult:
        log.warning("document_index_crashed", tenant=tenant, document_id=doc.id, error=describe(exc), exc_info=True)
        return DocumentResult(document_id=doc.id, status="failed", source=doc.source,
                              error=f"could not index: {describe(exc)}")

    def _write(self, job: Job, todo: list[tuple[Document, str, list[Chunk]]],
               known: dict[str, DocumentRecord], target: WriteTarget) -> list[DocumentResult]:
        """Embed, upsert (invisible), publish and register ``todo``; a document deleted meanwhile is not published."""
        tenant = job.tenant
        texts = [embedding_text(doc.title, c.heading_path, c.text) for doc, _, chunks in todo for c in chunks]
        self.beat()
        t0 = time.perf_counter()
        with span("embed", chunks=len(texts), encoder_version=target.embedder.version):
            vectors = target.embedder.embed_documents(texts)
        embed_s = time.perf_counter() - t0
        self.beat()
        t0 = time.perf_counter()
        sentences: list[list[list[float]]] | None = None
        if target.sentences:
            with span("embed_sentences", chunks=len(texts), encoder_version=target.embedder.version):
                sentences = embed_chunk_sentences(target.embedder, [c.text for _, _, chunks in todo for c in chunks])
            self.beat()
        sentences_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sparse = self.sparse.encode_documents(texts)
        sparse_s = time.perf_counter() - t0
        points: list[PointRecord] = []
        row = 0
        for doc, digest, chunks in todo:
            for c in chunks:
                points.append(PointRecord(id=point_id(tenant, doc.id, digest, c.index), vector=vectors[row].tolist(),
                                          sparse=sparse[row], sentences=None if sentences is None else sentences[row],
                                          payload=ChunkPayload(
                    tenant=tenant, document_id=doc.id, content_hash=digest, live=False, chunk_index=c.index,
                    text=c.text, title=doc.title, source=doc.source, start=c.start, end=c.end,
                    heading_path=c.heading_path, metadata=doc.metadata, encoder_version=target.embedder.version,
                    token_count=c.token_count,
                ).to_payload()))
                row += 1
        with span("upsert", points=len(points), collection=target.collection):
            self._with_retries(lambda: self.store.upsert(target.collection, points))
        self.beat()
        # A delete of one of these documents since the job was created wins: it is not published.
        deleted = self.registry.deleted_since(tenant, [d.id for d, _, _ in todo], job.created_at)
        publish = [(d, h, cs) for d, h, cs in todo if d.id not in deleted]
        if publish:
            self._with_retries(lambda: self.store.publish_many(target.collection, tenant,
                                                               [(d.id, h) for d, h, _ in publish]))
        records = []
        for doc, digest, chunks in publish:
            old = known.get(doc.id)
            records.append(DocumentRecord(
                tenant=tenant, id=doc.id, title=doc.title, source=doc.source, content_hash=digest,
                chunk_count=len(chunks), encoder_version=target.embedder.version, status="indexed",
                bytes=_stored_bytes(chunks),
                metadata=doc.metadata, created_at=old.created_at if old else 0.0,
            ))
        # The registry row is written in one transaction with the deletion check: a delete that came
        # between the check above and here still wins, and the chunks just published go again.
        deleted |= self.registry.upsert_documents_unless_deleted(records, job.created_at)
        for doc_id in sorted(deleted):
            self._with_retries(lambda doc_id=doc_id: self.store.delete_document(target.collection, tenant, doc_id))
        results = []
        for doc, digest, chunks in todo:
            if doc.id in deleted:
                results.append(DocumentResult(document_id=doc.id, status="failed", source=doc.source,
                                              error=DELETED_PENDING))
            else:
                results.append(DocumentResult(document_id=doc.id, status="indexed", chunks=len(chunks),
                                              source=doc.source))
        log.info("group_indexed", tenant=tenant, documents=len(publish), chunks=len(points), deleted=len(deleted),
                 embed_s=round(embed_s, 3), sentences_s=round(sentences_s, 3), sparse_s=round(sparse_s, 4))
        return results

    def _within_quotas(self, tenant: str, todo: list[tuple[Document, str, list[Chunk]]],
                       known: dict[str, DocumentRecord], results: list[DocumentResult]) -> list:
        """The documents of a group that fit the tenant's chunks and stored-bytes quotas; the others fail with
        the quota's name (a replaced document frees what it held). Nothing stored is touched for a document
        that does not fit."""
        rooms = {name: room(self.registry, self.settings, tenant, name) for name in ("chunks", "stored_bytes")}
        if all(r is None for r in rooms.values()):
            return todo
        kept = []
        for doc, digest, chunks in todo:
            old = known.get(doc.id)
            held = old is not None and old.status == "indexed"
            wants = {"chunks": len(chunks), "stored_bytes": _stored_bytes(chunks)}
            needs = {"chunks": wants["chunks"] - (old.chunk_count if held else 0),
                     "stored_bytes": wants["stored_bytes"] - (old.bytes if held else 0)}
            over = [name for name, left in rooms.items() if left is not None and needs[name] > left]
            if over:
                name = over[0]
                results.append(DocumentResult(
                    document_id=doc.id, status="failed", source=doc.source,
                    error=f"the tenant's {name} quota would be exceeded: {wants[name]} {name.replace('_', ' ')}, "
                          f"{rooms[name]} left (RAG_QUOTA_{name.upper()}, or PUT /v1/quotas/{{tenant}})"))
                continue
            for name, left in rooms.items():
                if left is not None:
                    rooms[name] = left - needs[name]
            kept.append((doc, digest, chunks))
        return kept

    def _with_retries(self, op: Callable[[], object], attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            try:
                op()
                return
            except StoreError as exc:
                if attempt == attempts:
                    raise
                log.warning("store_retry", attempt=attempt, error=str(exc))
                time.sleep(0.2 * 2**attempt)


def iter_paths(paths: list[Path], suffixes: frozenset[str]) -> Iterator[Path]:
    """Files under the given paths (folders walked in sorted order) with a supported suffix."""
    for p in paths:
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in suffixes)
        else:
            yield p


