"""Blue/green switching of the encoder, for one tenant or for the default.

``promote`` re-embeds the points of the tenant (or of every tenant that follows the default) from the
collection it searches now into the chosen version's own collection while the old one keeps serving,
then moves the tenant's pointer (the registry's ``tenant_encoders``) or the default's (the store's
active pointer) in one step; ``rollback`` moves it back to the parent; ``prune`` drops what no longer
serves. A collection only ever holds one encoder's vectors; a tenant's points in a collection it left
stay there (under its tenant filter, invisible to everyone else) so that a rollback only syncs what
changed since.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ingest.background import Compute, compute_for
from ingest.pairs import passage_text
from ingest.progress import Progress
from rag.drift_reference import adopt_at_promotion
from rag.embedding import Embedder, model_source, model_version, runtime_for, split_version
from rag.encoders import EncoderRecord, EncoderRegistry, version_of_collection
from rag.errors import BadRequest, NotFound, RagError
from rag.index import collection_name
from rag.registry import Registry
from rag.sentence_vectors import embed_chunk_sentences
from rag.settings import Settings
from rag.store import VectorStore

log = structlog.get_logger("ingest.promotion")


def active_version(store: VectorStore) -> tuple[str, str]:
    """The active (default) collection and its encoder version; :class:`BadRequest` when nothing was ingested yet."""
    active = store.get_active()
    version = version_of_collection(active)
    if not active or not version:
        raise BadRequest("no active collection: ingest documents before adapting the encoder")
    return active, version


def tenant_version(store: VectorStore, pointers: Registry, tenant: str | None) -> str:
    """The version ``tenant`` searches with now (its own, else the default); the default's for None."""
    own = pointers.get_tenant_encoder(tenant) if tenant is not None else None
    return own or active_version(store)[1]


def check_owner(record: EncoderRecord, tenant: str | None) -> None:
    """A tenant may switch to its own versions and to shared ones; the default only to shared ones.

    A version trained on one tenant's documents serves only that tenant: to anyone else it does not exist.
    """
    if record.tenant is None or record.tenant == tenant:
        return
    if tenant is None:
        raise BadRequest(f"encoder {record.version} was trained on one tenant's documents; it cannot become "
                         "the default for every tenant")
    raise NotFound(f"encoder version {record.version!r} is not in the registry")


def _scope(pointers: Registry, tenant: str | None) -> Callable[[str], bool]:
    """Which points a switch moves: the tenant's, or those of every tenant that follows the default."""
    if tenant is not None:
        return lambda t: t == tenant
    own = set(pointers.tenant_encoders())
    return lambda t: t not in own


def promote(settings: Settings, store: VectorStore, version: str, *, pointers: Registry, tenant: str | None = None,
            force: bool = False, progress: Progress | None = None, compute: Compute | None = None) -> dict[str, Any]:
    """Bring ``version``'s collection up to date for ``tenant`` (None: every tenant on the default), then switch to it.

    The old collection serves until the pointer moves; a crash before that leaves it serving, and a
    retry continues the copy (point ids carry the content hash, so a point already there is current).
    A second pass after the switch copies what was written to the old collection meanwhile. ``compute`` runs
    the re-embedding (the worker's background process; default: this thread).
    """
    progress = progress or Progress()
    registry = EncoderRegistry(settings.encoders_dir)
    configured = model_source(settings.encoder_model)
    if registry.get(version) is None and split_version(version)[0] == model_version(configured):
        # The configured model on another runtime (``<v>-onnx-int8``, or its fp32 version back): recorded as a
        # base, as the configured model itself is, so that it can be switched to. Never an adapted version's
        # variant: that one belongs to the adapted version's tenant.
        registry.ensure_base(version, configured)
    rec = registry.require(version)
    check_owner(rec, tenant)
    if rec.status == "rejected" and not force:
        raise BadRequest(f"encoder {version} failed its gate ({rec.validation.get('metric')} gain "
                         f"{rec.validation.get('gain')}); pass force to promote it anyway")
    current = tenant_version(store, pointers, tenant) if tenant is not None else version_of_collection(store.get_active())
    source = collection_name(current) if current else None
    target = collection_name(version)
    who = tenant if tenant is not None else "default"
    if source == target:
        return {"version": version, "collection": target, "tenant": who, "copied": 0, "switched": False}
    t0 = time.perf_counter()
    # A version names its runtime (an int8 base version is re-embedded in int8); fp32 ones use the configured one.
    encoder = compute_for(settings, compute).encoder(registry.model_path(version),
                                                     runtime=runtime_for(version, settings.encoder_runtime))
    if encoder.version != version:
        raise RagError(f"the folder of {version} holds encoder {encoder.version}")
    scope = _scope(pointers, tenant)
    # Sentence vectors (rag/sentence_vectors.py) for the collection of the default encoder, which ranks sentences.
    sentences = settings.sentence_vectors and tenant is None
    stats = sync_collection(store, source, target, encoder, registry.folder(version), progress, scope=scope,
                            tenant=tenant, sentences=sentences)
    store.optimize(target)
    # Before the switch, so the monitor never freezes live queries as the reference of a version that has one.
    adopt_at_promotion(settings.encoders_dir, version)
    if tenant is None:
        store.set_active(target)
    else:
        default = version_of_collection(store.get_active())
        pointers.set_tenant_encoder(tenant, None if version == default else version)
    if source is not None:  # written to the old collection while the first pass ran
        late = sync_collection(store, source, target, encoder, registry.folder(version), Progress(), scope=scope,
                               tenant=tenant, sentences=sentences)
        stats["copied"] += late["copied"]
    if rec.kind != "base" and rec.tenant == tenant:
        rec.status = "promoted"
        rec.promoted_at = time.time()
        registry.save(rec)
    seconds = time.perf_counter() - t0
    log.info("encoder_switched", version=version, tenant=who, collection=target, previous=source,
             seconds=round(seconds, 1), **stats)
    return {"version": version, "collection": target, "tenant": who, "previous": source, **stats,
            "seconds": round(seconds, 1), "switched": True}


def sync_collection(store: VectorStore, source: str | None, target: str, encoder: Embedder,
                    folder: Path, progress: Progress, *, scope: Callable[[str], bool] = lambda t: True,
                    tenant: str | None = None, sentences: bool = False) -> dict[str, int]:
    """Make ``target`` hold exactly ``source``'s points of the tenants in ``scope`` (``tenant`` alone when given),
    embedded by ``encoder`` (vectors cached at gating are reused); other tenants' points are left alone.
    ``sentences``: each point also gets its sentence vectors by ``encoder`` (:mod:`rag.sentence_vectors`)."""
    store.ensure_collection(target, encoder.dimension)
    have = {p.id: p.payload.get("live") for b in store.iter_points(target, tenant=tenant) for p in b
            if scope(str(p.payload.get("tenant", "")))}
    cached: dict[str, np.ndarray] = {}
    if (folder / "corpus-vectors.npy").exists():
        ids = json.loads((folder / "corpus-ids.json").read_text())
        cached = dict(zip(ids, np.load(folder / "corpus-vectors.npy")))
    total = store.count(source, tenant=tenant) if source else 0
    seen: set[str] = set()
    copied = reused = embedded = done = 0
    for batch in (store.iter_points(source, tenant=tenant) if source else []):
        done += len(batch)
        batch = [p for p in batch if scope(str(p.payload.get("tenant", "")))]
        seen.update(p.id for p in batch)
        todo = [p for p in batch if have.get(p.id, "missing") != p.payload.get("live")]
        fresh = [p for p in todo if p.id not in cached]
        if fresh:
            for p, v in zip(fresh, encoder.embed_documents([passage_text(p.payload) for p in fresh])):
                p.vector = v.tolist()
            embedded += len(fresh)
        if sentences and todo:
            for p, v in zip(todo, embed_chunk_sentences(encoder, [str(p.payload.get("text", "")) for p in todo])):
                p.sentences = v
        for p in todo:
            if p.id in cached:
                p.vector = cached[p.id].tolist()
                reused += 1
            p.payload = {**p.payload, "encoder_version": encoder.version}
        if todo:
            store.upsert(target, todo)
            copied += len(todo)
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


def rollback(settings: Settings, store: VectorStore, to: str | None = None, *, pointers: Registry,
             tenant: str | None = None, progress: Progress | None = None,
             compute: Compute | None = None) -> dict[str, Any]:
    """Switch the tenant (None: the default) back to the parent of its version (or to ``to``), syncing that
    collection with what changed since. A tenant without an encoder of its own has nothing to roll back."""
    registry = EncoderRegistry(settings.encoders_dir)
    if tenant is not None:
        active = pointers.get_tenant_encoder(tenant)
        if active is None and to is None:
            raise BadRequest(f"tenant {tenant!r} searches with the default encoder: it has no encoder of its own "
                             "to roll back", code="nothing_to_roll_back")
    else:
        active = version_of_collection(store.get_active())
    if to is None:
        rec = registry.get(active) if active else None
        if rec is None or not rec.parent:
            raise BadRequest(f"the active encoder {active} has no parent to roll back to", code="nothing_to_roll_back")
        to = rec.parent
    registry.require(to)
    result = promote(settings, store, to, pointers=pointers, tenant=tenant, force=True, progress=progress,
                     compute=compute)
    log.info("encoder_rolled_back", version=to, previous=active, tenant=tenant or "default")
    return {**result, "rolled_back_from": active}


def _with_parent(registry: EncoderRegistry, version: str | None) -> set[str]:
    if not version:
        return set()
    rec = registry.get(version)
    return {version, rec.parent} if rec is not None and rec.parent else {version}


def prune(settings: Settings, store: VectorStore, keep: Sequence[str] = (), *, pointers: Registry,
          tenant: str | None = None) -> dict[str, Any]:
    """Drop what no longer serves: for a tenant, its points in collections other than its version's and
    that version's parent's; for the operator (None), the collections no tenant and not the default use.

    The versions in ``keep`` stay too. A pruned version can still be promoted or rolled back to later: its
    collection is then rebuilt from the serving one, re-embedding every point instead of syncing.
    Models and records stay in the registry.
    """
    registry = EncoderRegistry(settings.encoders_dir)
    _, default = active_version(store)
    if tenant is not None:
        protect = _with_parent(registry, tenant_version(store, pointers, tenant)) | set(keep)
        removed: dict[str, int] = {}
        dropped: list[str] = []
        for name in store.list_collections():
            version = version_of_collection(name)
            if not version or version in protect:
                continue
            n = store.delete_tenant(name, tenant)
            if n:
                removed[name] = n
            rec = registry.get(version)
            if rec is not None and rec.tenant == tenant and store.count(name) == 0:
                store.drop_collection(name)  # the tenant's own version: nobody else has points there
                dropped.append(name)
        log.info("encoder_tenant_pruned", tenant=tenant, removed=removed, dropped=dropped, kept=sorted(protect))
        return {"tenant": tenant, "dropped": dropped, "points_dropped": sum(removed.values()),
                "removed_from": sorted(removed), "kept_versions": sorted(protect)}
    protect = _with_parent(registry, default) | set(keep)
    for version in pointers.tenant_encoders().values():
        protect |= _with_parent(registry, version)
    dropped = []
    points = 0
    for name in store.list_collections():
        version = version_of_collection(name)
        if not version or version in protect:
            continue
        points += store.count(name)
        store.drop_collection(name)
        dropped.append(name)
    log.info("encoder_collections_pruned", dropped=dropped, kept=sorted(protect), points=points)
    return {"tenant": "default", "dropped": dropped, "points_dropped": points, "kept_versions": sorted(protect)}
