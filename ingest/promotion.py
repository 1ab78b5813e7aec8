"""Blue/green switching of the encoder: ``promote`` re-embeds every point of the active collection
into the chosen version's own collection while the old one keeps serving, then moves the active
pointer in one step; ``rollback`` moves it back to the parent; ``prune`` drops collections that no
longer serve. A collection only ever holds one encoder's vectors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ingest.pairs import passage_text
from ingest.progress import Progress
from rag.embedding import SentenceTransformerEmbedder
from rag.encoders import EncoderRegistry, version_of_collection
from rag.errors import BadRequest, RagError
from rag.index import collection_name
from rag.settings import Settings
from rag.store import VectorStore

log = structlog.get_logger("ingest.promotion")


def active_version(store: VectorStore) -> tuple[str, str]:
    """The active collection and its encoder version; :class:`BadRequest` when nothing was ingested yet."""
    active = store.get_active()
    version = version_of_collection(active)
    if not active or not version:
        raise BadRequest("no active collection: ingest documents before adapting the encoder")
    return active, version




def promote(settings: Settings, store: VectorStore, version: str, *, force: bool = False,
            progress: Progress | None = None) -> dict[str, Any]:
    """Bring ``version``'s collection up to date with the active one (re-embedding what it lacks), then switch to it.

    The old collection serves until the pointer moves; a crash before that leaves it active, and a
    retry continues the copy (point ids carry the content hash, so a point already there is current).
    """
    progress = progress or Progress()
    registry = EncoderRegistry(settings.encoders_dir)
    rec = registry.require(version)
    if rec.status == "rejected" and not force:
        raise BadRequest(f"encoder {version} failed its gate ({rec.validation.get('metric')} gain "
                         f"{rec.validation.get('gain')}); pass force to promote it anyway")
    source = store.get_active()
    target = collection_name(version)
    if source == target:
        return {"version": version, "collection": target, "copied": 0, "switched": False}
    t0 = time.perf_counter()
    encoder = SentenceTransformerEmbedder(registry.model_path(version), batch_size=settings.encoder_batch_size,
                                          device=settings.encoder_device)
    if encoder.version != version:
        raise RagError(f"the folder of {version} holds encoder {encoder.version}")
    stats = sync_collection(store, source, target, encoder, registry.folder(version), progress)
    store.optimize(target)
    store.set_active(target)
    if rec.kind != "base":
        rec.status = "promoted"
    rec.promoted_at = time.time()
    registry.save(rec)
    seconds = time.perf_counter() - t0
    log.info("encoder_switched", version=version, collection=target, previous=source, seconds=round(seconds, 1), **stats)
    return {"version": version, "collection": target, "previous": source, **stats, "seconds": round(seconds, 1),
            "switched": True}


def sync_collection(store: VectorStore, source: str | None, target: str, encoder: SentenceTransformerEmbedder,
                    folder: Path, progress: Progress) -> dict[str, int]:
    """Make ``target`` hold exactly ``source``'s points, embedded by ``encoder`` (vectors cached at gating are reused)."""
    store.ensure_collection(target, encoder.dimension)
    have = {p.id: p.payload.get("live") for b in store.iter_points(target) for p in b}
    cached: dict[str, np.ndarray] = {}
    if (folder / "corpus-vectors.npy").exists():
        ids = json.loads((folder / "corpus-ids.json").read_text())
        cached = dict(zip(ids, np.load(folder / "corpus-vectors.npy")))
    total = store.count(source) if source else 0
    seen: set[str] = set()
    copied = reused = embedded = done = 0
    for batch in (store.iter_points(source) if source else []):
        seen.update(p.id for p in batch)
        todo = [p for p in batch if have.get(p.id, "missing") != p.payload.get("live")]
        fresh = [p for p in todo if p.id not in cached]
        if fresh:
            for p, v in zip(fresh, encoder.embed_documents([passage_text(p.payload) for p in fresh])):
                p.vector = v.tolist()
            embedded += len(fresh)
        for p in todo:
            if p.id in cached:
                p.vector = cached[p.id].tolist()
                reused += 1
            p.payload = {**p.payload, "encoder_version": encoder.version}
        if todo:
            store.upsert(target, todo)
            copied += len(todo)
        done += len(batch)
        progress("re-embedding", done / max(total, 1))
    stale = set(have) - seen
    if stale:
        _delete_ids(store, target, stale)
    return {"copied": copied, "embedded": embedded, "reused_vectors": reused, "removed": len(stale),
            "points": len(seen)}


def _delete_ids(store: VectorStore, collection: str, ids: set[str]) -> None:
    """Remove points by id: whole documents whose points are all stale, else re-publish keeps the rest."""
    docs: set[tuple[str, str]] = set()
    for b in store.iter_points(collection):
        for p in b:
            if p.id in ids:
                docs.add((p.payload.get("tenant", ""), p.payload.get("document_id", "")))
    keep: list = []
    for b in store.iter_points(collection):
        keep += [p for p in b if (p.payload.get("tenant", ""), p.payload.get("document_id", "")) in docs
                 and p.id not in ids]
    for tenant, doc in docs:
        store.delete_document(collection, tenant, doc)
    if keep:
        store.upsert(collection, keep)


def rollback(settings: Settings, store: VectorStore, to: str | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """Switch back to the parent of the active version (or ``to``), syncing its collection with what changed since."""
    registry = EncoderRegistry(settings.encoders_dir)
    active = version_of_collection(store.get_active())
    if to is None:
        rec = registry.get(active) if active else None
        if rec is None or not rec.parent:
            raise BadRequest(f"the active encoder {active} has no parent to roll back to")
        to = rec.parent
    registry.require(to)
    result = promote(settings, store, to, force=True, progress=progress)
    log.info("encoder_rolled_back", version=to, previous=active)
    return {**result, "rolled_back_from": active}


def prune(settings: Settings, store: VectorStore, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Drop the collections of encoder versions that no longer serve.

    The active version's collection stays, and so does its parent's, which a rollback switches to
    (any version in ``keep`` too). A pruned version can still be promoted or rolled back to later: its
    collection is then rebuilt from the active one, re-embedding every point instead of syncing.
    Models and records stay in the registry.
    """
    registry = EncoderRegistry(settings.encoders_dir)
    _, active = active_version(store)
    rec = registry.get(active)
    protect = {active, *keep}
    if rec is not None and rec.parent:
        protect.add(rec.parent)
    dropped: list[str] = []
    points = 0
    for name in store.list_collections():
        version = version_of_collection(name)
        if not version or version in protect:
            continue
        points += store.count(name)
        store.drop_collection(name)
        dropped.append(name)
    log.info("encoder_collections_pruned", dropped=dropped, kept=sorted(protect), points=points)
    return {"dropped": dropped, "points_dropped": points, "kept_versions": sorted(protect)}
