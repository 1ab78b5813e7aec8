"""The ingestion worker: claims jobs and runs parse → chunk → embed → upsert → publish.

Crash safety: a document's new chunks are written invisible (``live=False``) under point ids that
include its content hash, then published in one step that also removes the previous generation.
A worker killed at any point leaves either the old or the new generation visible, never half of
one; the job's lease runs out (or the embedded service requeues it at start) and the retry
overwrites the same point ids instead of duplicating them.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from rag.chunking import chunk
import msgspec

from rag.embedding import Embedder, SentenceTransformerEmbedder, model_version
from rag.encoders import resolve_encoder_model
from rag.errors import BadRequest, RagError, StoreError, TransientError
from rag.index import ensure_collection_for
from rag.loaders import LoadFailure, load
from rag.registry import DocumentRecord, DocumentResult, Job, SqliteRegistry, remove_upload
from rag.settings import Settings
from rag.sparse import SparseEncoder
from rag.store import VectorStore, point_id
from rag.tokens import get_encoding
from rag.types import Chunk, Document, PointRecord

log = structlog.get_logger("ingest.worker")

# Documents are embedded in groups of about this many chunks: large enough that the encoder's
# length-sorted batching stays efficient, small enough that progress and cancellation are prompt.
GROUP_CHUNKS = 512


class JobCancelled(Exception):
    pass


def content_hash(doc: Document, signature: str) -> str:
    """Hash of what decides a document's vectors: its text, title, metadata and the chunking/encoder signature."""
    h = hashlib.sha256()
    for part in (signature, doc.title, doc.text, json.dumps(doc.metadata, sort_keys=True, default=str)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def embedding_text(doc: Document, c: Chunk) -> str:
    """What the encoders (dense and sparse) see for a chunk: the document title and heading path give it context."""
    head = " > ".join([p for p in [doc.title, *c.heading_path] if p])
    return f"{head}\n{c.text}" if head else c.text


class IngestWorker:
    """Runs ingest jobs from the registry against one store, one dense encoder and one sparse (BM25) encoder."""

    def __init__(
        self,
        settings: Settings,
        registry: SqliteRegistry,
        store: VectorStore,
        embedder: Embedder,
        sparse: SparseEncoder | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.embedder = embedder
        # The default encoder is the one the query side builds too (rag.search.Retriever).
        self.sparse = sparse if sparse is not None else SparseEncoder()
        self.encoding = get_encoding(settings.tokenizer_encoding)
        # The sparse configuration is part of what a document's stored vectors depend on: changing
        # it re-indexes documents on their next upload instead of calling them unchanged.
        self.signature = self._signature(embedder)
        self.collection = ensure_collection_for(store, embedder)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _signature(self, embedder: Embedder) -> str:
        s = self.settings
        return f"{embedder.version}|{s.tokenizer_encoding}|{s.chunk_tokens}|{s.chunk_overlap}|{self.sparse.version}"

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the poll loop in a background thread (the embedded service's mode)."""
        self._thread = threading.Thread(target=self.run_forever, name="ingest-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_forever(self) -> None:
        log.info("worker_started", encoder_version=self.embedder.version, collection=self.collection)
        while not self._stop.is_set():
            if not self.run_once():
                self._stop.wait(self.settings.worker_poll_s)
        log.info("worker_stopped")

    def run_once(self) -> bool:
        """Claim and run one job; returns False when the queue was empty."""
        job = self.registry.claim_job(self.settings.job_lease_s)
        if job is None:
            return False
        self.run_job(job)
        return True

    # ---- one job ----------------------------------------------------------------------------
    def run_job(self, job: Job) -> None:
        if job.kind != "ingest":
            self._run_encoder_job(job)
            return
        bound = log.bind(job_id=job.id, tenant=job.tenant, attempt=job.attempts)
        bound.info("job_started", files=len(job.items))
        started = time.perf_counter()
        try:
            total, failed = self._run_items(job)
        except JobCancelled:
            self.registry.finish_job(job.id, "cancelled", "cancelled on request")
            bound.info("job_cancelled")
            return
        except (StoreError, TransientError, OSError) as exc:
            self._retry_or_fail(job, exc, bound)
            return
        status = "failed" if failed else "succeeded"
        error = f"{failed} of {total} documents failed" if failed else None
        self.registry.finish_job(job.id, status, error)
        for item in job.items:
            remove_upload(item)
        bound.info("job_finished", status=status, documents=total, failed=failed, s=round(time.perf_counter() - started, 3))

    def _retry_or_fail(self, job: Job, exc: Exception, bound) -> None:
        """Transient: the job goes back to the queue until its attempts run out."""
        if job.attempts < self.settings.job_max_attempts:
            self.registry.requeue_job(job.id, f"attempt {job.attempts} failed: {exc}")
            bound.warning("job_retry", error=str(exc))
        else:
            self.registry.finish_job(job.id, "failed", f"gave up after {job.attempts} attempts: {exc}")
            bound.error("job_failed", error=str(exc))

    # ---- encoder jobs (adapt, promote, rollback, prune) -------------------------------------------
    def _run_encoder_job(self, job: Job) -> None:
        from ingest import adapt as ad

        bound = log.bind(job_id=job.id, kind=job.kind, attempt=job.attempts)
        bound.info("job_started", params=job.params)
        last = [0.0]

        def on_progress(stage: str, fraction: float) -> None:
            now = time.monotonic()
            if now - last[0] < 2.0 and fraction < 1.0:
                return
            last[0] = now
            self.registry.set_stage(job.id, f"{stage} {fraction:.0%}")
            if self.registry.renew_lease(job.id, self.settings.job_lease_s):
                raise JobCancelled

        progress = ad.Progress(on_progress)
        outcome: dict = {}
        try:
            if job.kind == "adapt":
                options = msgspec.convert(job.params, ad.AdaptOptions)
                record = ad.adapt(self.settings, self.store, self.embedder, options, progress=progress,
                                  work_key=job.id)
                outcome["record"] = msgspec.to_builtins(record)
                self.registry.set_stage(job.id, "gated", outcome)
                if ad.should_promote(self.settings, record, options):
                    outcome["promotion"] = ad.promote(self.settings, self.store, record.version, force=options.force,
                                                      progress=progress)
            elif job.kind == "promote":
                outcome["promotion"] = ad.promote(self.settings, self.store, str(job.params["version"]),
                                                  force=bool(job.params.get("force")), progress=progress)
            elif job.kind == "rollback":
                outcome["promotion"] = ad.rollback(self.settings, self.store, job.params.get("version"),
                                                   progress=progress)
            elif job.kind == "prune":
                outcome["pruned"] = ad.prune(self.settings, self.store, keep=list(job.params.get("keep") or []))
            else:
                raise BadRequest(f"unknown job kind {job.kind!r}")
        except JobCancelled:
            self.registry.finish_job(job.id, "cancelled", "cancelled on request")
            bound.info("job_cancelled")
            return
        except (StoreError, TransientError, OSError) as exc:
            self._retry_or_fail(job, exc, bound)
            return
        except (RagError, ValueError, msgspec.ValidationError) as exc:
            message = exc.message if isinstance(exc, RagError) else str(exc)
            self.registry.set_stage(job.id, "failed", outcome)
            self.registry.finish_job(job.id, "failed", message)
            bound.warning("job_failed", error=message)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not kill the worker thread
            bound.exception("job_crashed")
            self.registry.finish_job(job.id, "failed", f"internal error: {type(exc).__name__}: {exc}")
            return
        finally:
            if outcome.get("promotion", {}).get("switched"):
                self.reload_encoder()
        self.registry.set_stage(job.id, "done", outcome)
        self.registry.finish_job(job.id, "succeeded", None)
        bound.info("job_finished", status="succeeded")

    def reload_encoder(self) -> None:
        """Write with the encoder of the active collection (after a promotion or rollback)."""
        model = resolve_encoder_model(self.settings, self.store)
        if model_version(model) == self.embedder.version:
            return
        embedder = SentenceTransformerEmbedder(model, batch_size=self.settings.encoder_batch_size,
                                               device=self.settings.encoder_device)
        self.embedder = embedder
        self.signature = self._signature(embedder)
        self.collection = ensure_collection_for(self.store, embedder)
        log.info("worker_encoder_switched", encoder_version=embedder.version, collection=self.collection)

    def _run_items(self, job: Job) -> tuple[int, int]:
        total = failed = 0
        group: list[Document] = []
        group_chunks = 0
        pending: list[DocumentResult] = []

        def flush_group() -> None:
            nonlocal group, group_chunks, pending, failed
            results = pending + (self._index_group(job.tenant, group) if group else [])
            failed += sum(r.status == "failed" for r in results)
            self.registry.record_results(job.id, results, total=total)
            group, group_chunks, pending = [], 0, []
            if self.registry.renew_lease(job.id, self.settings.job_lease_s):
                raise JobCancelled

        for item in job.items:
            try:
                data = Path(item.path).read_bytes()
            except FileNotFoundError:
                total += 1
                pending.append(DocumentResult(document_id=item.document_id, status="failed", source=item.filename,
                                              error="uploaded file is missing from the data directory"))
                continue
            for parsed in load(item.filename, data, document_id=item.document_id, title=item.title, metadata=item.metadata):
                total += 1
                if isinstance(parsed, LoadFailure):
                    pending.append(DocumentResult(document_id=parsed.document_id, status="failed",
                                                  source=parsed.source, error=parsed.reason))
                    continue
                group.append(parsed)
                # A rough size estimate (4 chars a token) is enough to bound the group.
                group_chunks += 1 + len(parsed.text) // (4 * self.settings.chunk_tokens)
                if group_chunks >= GROUP_CHUNKS:
                    flush_group()
        flush_group()
        return total, failed

    def _index_group(self, tenant: str, docs: list[Document]) -> list[DocumentResult]:
        """Index a group of parsed documents; unchanged ones are skipped, each failure stays its own."""
        # The last upload of an id in one job wins (a JSONL file may repeat an _id).
        by_id: dict[str, Document] = {}
        for d in docs:
            by_id[d.id] = d
        known = self.registry.get_documents(tenant, list(by_id))
        results: list[DocumentResult] = []
        todo: list[tuple[Document, str, list[Chunk]]] = []
        for doc in by_id.values():
            digest = content_hash(doc, self.signature)
            old = known.get(doc.id)
            if old is not None and old.status == "indexed" and old.content_hash == digest:
                results.append(DocumentResult(document_id=doc.id, status="unchanged", chunks=old.chunk_count, source=doc.source))
                continue
            chunks = chunk(doc, self.settings.chunk_tokens, self.settings.chunk_overlap, self.encoding)
            if not chunks:
                results.append(DocumentResult(document_id=doc.id, status="failed", source=doc.source, error="empty document"))
                continue
            todo.append((doc, digest, chunks))
        if not todo:
            return results
        texts = [embedding_text(doc, c) for doc, _, chunks in todo for c in chunks]
        t0 = time.perf_counter()
        vectors = self.embedder.embed_documents(texts)
        embed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sparse = self.sparse.encode_documents(texts)
        sparse_s = time.perf_counter() - t0
        points: list[PointRecord] = []
        row = 0
        for doc, digest, chunks in todo:
            for c in chunks:
                points.append(PointRecord(id=point_id(tenant, doc.id, digest, c.index), vector=vectors[row].tolist(),
                                          sparse=sparse[row], payload={
                    "tenant": tenant, "document_id": doc.id, "content_hash": digest, "live": False,
                    "chunk_index": c.index, "text": c.text, "title": doc.title, "source": doc.source,
                    "start": c.start, "end": c.end, "heading_path": c.heading_path, "metadata": doc.metadata,
                    "encoder_version": self.embedder.version, "token_count": c.token_count,
                }))
                row += 1
        self._with_retries(lambda: self.store.upsert(self.collection, points))
        self._with_retries(lambda: self.store.publish_many(self.collection, tenant, [(d.id, h) for d, h, _ in todo]))
        records = []
        for doc, digest, chunks in todo:
            old = known.get(doc.id)
            records.append(DocumentRecord(
                tenant=tenant, id=doc.id, title=doc.title, source=doc.source, content_hash=digest,
                chunk_count=len(chunks), encoder_version=self.embedder.version, status="indexed",
                metadata=doc.metadata, created_at=old.created_at if old else 0.0,
            ))
            results.append(DocumentResult(document_id=doc.id, status="indexed", chunks=len(chunks), source=doc.source))
        self.registry.upsert_documents(records)
        log.info("group_indexed", tenant=tenant, documents=len(todo), chunks=len(points), embed_s=round(embed_s, 3),
                 sparse_s=round(sparse_s, 4))
        return results

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


