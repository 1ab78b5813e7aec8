"""Index consistency (M7, F6): compare the registry with the store, tenant by tenant, and repair.

For each tenant the registry's documents are compared with the points of the collection the tenant
searches (its own encoder's, or the default's). What can differ, and what ``repair`` does about it:

``missing_points``       indexed in the registry, no live point in the store: the registry row goes
                         (the text is gone; the document must be uploaded again — the report says so)
``incomplete``           live points with gaps in their chunk indexes: the document is removed from
                         both (a half-written document must not answer questions)
``chunk_count``          a complete live generation whose size differs from the registry's count:
                         the registry is corrected from the store
``content_hash``         the live generation is complete but not the one the registry names: the
                         registry is corrected from the store
``several_generations``  more than one live generation, or leftover unpublished ones while no job of
                         the tenant is pending: the registry's generation is published again (which
                         deletes the others)
``wrong_encoder``        points embedded by another encoder than the collection's: re-embedded from
                         their stored text with the collection's encoder
``orphan_points``        points of a document the registry does not know (or deleted): deleted

Rollback copies in collections the tenant no longer searches are left alone (a rollback syncs them).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from rag.embedding import Embedder
from rag.index import collection_name
from rag.registry import DocumentRecord, Registry
from rag.store import VectorStore
from rag.types import PointRecord, embedding_text

__all__ = ["PROBLEMS", "Finding", "ReconcileReport", "reconcile"]

log = structlog.get_logger("rag.reconcile")

PROBLEMS = ("missing_points", "incomplete", "chunk_count", "content_hash", "several_generations", "wrong_encoder",
            "orphan_points")
_PAGE = 1000


@dataclass
class Finding:
    tenant: str
    document_id: str
    problem: str
    detail: str
    repaired: bool = False


@dataclass
class ReconcileReport:
    tenants: int = 0
    documents: int = 0
    points: int = 0
    findings: list[Finding] = field(default_factory=list)
    repaired: bool = False

    def counts(self) -> dict[str, int]:
        c = collections.Counter(f.problem for f in self.findings)
        return {p: c.get(p, 0) for p in PROBLEMS}

    def to_dict(self) -> dict[str, Any]:
        return {"tenants": self.tenants, "documents": self.documents, "points": self.points,
                "repair": self.repaired, "counts": self.counts(), "findings": [asdict(f) for f in self.findings]}


@dataclass
class _Generation:
    points: list[PointRecord] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return any(p.payload.get("live") for p in self.points)

    def complete(self) -> bool:
        indexes = sorted(int(p.payload.get("chunk_index", -1)) for p in self.points)
        return indexes == list(range(len(indexes)))


def reconcile(registry: Registry, store: VectorStore, *, version_for: Callable[[str], str],
              embedder_for: Callable[[str], Embedder], tenants: Iterable[str] | None = None,
              repair: bool = False) -> ReconcileReport:
    """Compare registry and store for ``tenants`` (default: every tenant either of them knows); fix with ``repair``."""
    report = ReconcileReport(repaired=repair)
    names = sorted(set(tenants) if tenants is not None else _all_tenants(registry, store))
    for tenant in names:
        version = version_for(tenant)
        collection = collection_name(version)
        if collection not in store.list_collections():
            continue
        report.tenants += 1
        _tenant(report, registry, store, tenant, collection, version, embedder_for, repair)
    log.info("reconciled", tenants=report.tenants, documents=report.documents, points=report.points,
             repair=repair, **report.counts())
    return report


def _all_tenants(registry: Registry, store: VectorStore) -> set[str]:
    names = {t for t in registry.tenants_usage(1 << 30)}
    for collection in store.list_collections():
        for batch in store.iter_points(collection, batch_size=1024):
            names.update(str(p.payload.get("tenant", "")) for p in batch)
    return {n for n in names if n and n != "_other"}


def _records(registry: Registry, tenant: str) -> dict[str, DocumentRecord]:
    out: dict[str, DocumentRecord] = {}
    offset = 0
    while True:
        page, total = registry.list_documents(tenant, limit=_PAGE, offset=offset)
        out.update((r.id, r) for r in page)
        offset += len(page)
        if not page or offset >= total:
            return out


def _pending_jobs(registry: Registry, tenant: str) -> bool:
    return any(j.tenant == tenant and j.status in ("queued", "running") for j in registry.list_jobs(limit=1000))


def _tenant(report: ReconcileReport, registry: Registry, store: VectorStore, tenant: str, collection: str,
            version: str, embedder_for: Callable[[str], Embedder], repair: bool) -> None:
    records = _records(registry, tenant)
    docs: dict[str, dict[str, _Generation]] = collections.defaultdict(lambda: collections.defaultdict(_Generation))
    for batch in store.iter_points(collection, tenant=tenant, batch_size=512):
        for p in batch:
            docs[str(p.payload.get("document_id", ""))][str(p.payload.get("content_hash", ""))].points.append(p)
            report.points += 1
    report.documents += len(records)
    pending = _pending_jobs(registry, tenant)

    def found(doc_id: str, problem: str, detail: str, fix: Callable[[], None] | None) -> None:
        f = Finding(tenant=tenant, document_id=doc_id, problem=problem, detail=detail)
        if repair and fix is not None:
            fix()
            f.repaired = True
        report.findings.append(f)

    for doc_id in sorted(set(docs) - set(records)):
        if pending:
            continue  # an upload in flight writes its points before its registry row
        n = sum(len(g.points) for g in docs[doc_id].values())
        found(doc_id, "orphan_points", f"{n} points of a document the registry does not hold",
              lambda d=doc_id: store.delete_document(collection, tenant, d))
    for doc_id, record in sorted(records.items()):
        if record.status != "indexed":
            continue
        _document(found, registry, store, tenant, collection, version, embedder_for, record,
                  docs.get(doc_id, {}), pending)


def _document(found, registry: Registry, store: VectorStore, tenant: str, collection: str, version: str,
              embedder_for: Callable[[str], Embedder], record: DocumentRecord, generations: dict[str, _Generation],
              pending: bool) -> None:
    doc_id = record.id
    live = {h: g for h, g in generations.items() if g.live}
    if not live:
        found(doc_id, "missing_points", "indexed in the registry, no live point in the store; upload it again",
              lambda: registry.delete_document(tenant, doc_id))
        return
    if len(live) > 1 or (not pending and len(generations) > len(live)):
        keep = record.content_hash if record.content_hash in generations else next(iter(live))
        found(doc_id, "several_generations",
              f"{len(live)} live and {len(generations) - len(live)} unpublished generations",
              lambda: store.publish(collection, tenant, doc_id, keep))
        live = {keep: generations[keep]}
    content_hash, generation = next(iter(live.items()))
    if not generation.complete():
        found(doc_id, "incomplete", f"{len(generation.points)} live chunks with gaps in their indexes; upload it again",
              lambda: (store.delete_document(collection, tenant, doc_id), registry.delete_document(tenant, doc_id)))
        return
    wrong = [p for p in generation.points if p.payload.get("encoder_version") != version]
    if wrong:
        found(doc_id, "wrong_encoder", f"{len(wrong)} points embedded by "
              f"{sorted({str(p.payload.get('encoder_version')) for p in wrong})}, not {version}",
              lambda: _reembed(store, collection, wrong, embedder_for(version)))
    size = len(generation.points)
    if content_hash != record.content_hash or size != record.chunk_count:
        problem = "content_hash" if content_hash != record.content_hash else "chunk_count"
        found(doc_id, problem, f"store: {size} chunks of {content_hash[:12]}; registry: {record.chunk_count} "
              f"chunks of {record.content_hash[:12]}",
              lambda: registry.upsert_documents([_corrected(record, content_hash, generation)]))


def _corrected(record: DocumentRecord, content_hash: str, generation: _Generation) -> DocumentRecord:
    import msgspec

    size = sum(len(str(p.payload.get("text", "")).encode("utf-8", "surrogatepass")) for p in generation.points)
    return msgspec.structs.replace(record, content_hash=content_hash, chunk_count=len(generation.points), bytes=size)


def _reembed(store: VectorStore, collection: str, points: list[PointRecord], embedder: Embedder) -> None:
    texts = [embedding_text(str(p.payload.get("title", "")), list(p.payload.get("heading_path") or []),
                            str(p.payload.get("text", ""))) for p in points]
    vectors = embedder.embed_documents(texts)
    for p, v in zip(points, vectors, strict=True):
        p.vector = v.tolist()
        p.payload = {**p.payload, "encoder_version": embedder.version}
    store.upsert(collection, points)
