"""The encoder pool: which encoder a tenant uses, and the bounded cache of loaded encoders (real models)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from rag.embedding import bundled_model_path
from rag.encoder_pool import EncoderPool
from rag.encoders import EncoderRecord, EncoderRegistry
from rag.index import collection_name, ensure_collection_for
from rag.registry import SqliteRegistry
from rag.settings import Settings
from rag.store import open_store


def _version_folder(settings: Settings, version: str, tenant: str | None) -> None:
    """An encoder version on disk as adaptation leaves it: the model folder (here the base weights) named by
    ``rag_version.txt``, and its record."""
    registry = EncoderRegistry(settings.encoders_dir)
    model = registry.folder(version) / "model"
    shutil.copytree(bundled_model_path(), model)
    (model / "rag_version.txt").write_text(version + "\n")
    registry.save(EncoderRecord(version=version, path=str(model), base_model="all-MiniLM-L6-v2", tenant=tenant,
                                created_at=time.time()))


@pytest.fixture
def world(tmp_path: Path, embedder):
    settings = Settings(data_dir=tmp_path / "data", log_format="json", llm_local="no", encoder_cache_size=1,
                        encoder_poll_s=60.0)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    ensure_collection_for(store, embedder)
    for version, tenant in (("v-acme", "acme"), ("v-globex", "globex")):
        _version_folder(settings, version, tenant)
    try:
        yield settings, store, registry, EncoderPool(settings, store, registry, embedder)
    finally:
        registry.close()
        store.close()


def test_a_tenant_uses_the_default_until_it_has_its_own(world, embedder) -> None:
    settings, store, registry, pool = world
    assert pool.version_for("acme") == embedder.version
    assert pool.for_tenant("acme") is embedder
    registry.set_tenant_encoder("acme", "v-acme")
    assert pool.version_for("acme") == embedder.version  # read again only after RAG_ENCODER_POLL_S
    assert pool.version_for("acme", fresh=True) == "v-acme"
    retriever = pool.retriever_for("acme")
    assert retriever.embedder.version == "v-acme" and retriever.collection == collection_name("v-acme")
    assert pool.version_for("globex") == embedder.version  # the other tenant is untouched


def test_the_cache_keeps_at_most_its_size_and_never_evicts_the_default(world, embedder) -> None:
    settings, store, registry, pool = world
    a = pool.embedder("v-acme")
    assert pool.embedder("v-acme") is a  # a hit, not a second load
    assert pool.loaded() == [embedder.version, "v-acme"]
    g = pool.embedder("v-globex")  # size 1: the least recently used goes
    assert g.version == "v-globex" and pool.loaded() == [embedder.version, "v-globex"]
    assert pool.embedder(embedder.version) is embedder  # pinned
    again = pool.embedder("v-acme")
    assert again is not a and again.version == "v-acme"  # reloaded after eviction
    assert pool.loaded() == [embedder.version, "v-acme"]
    # Both loads of one version embed alike: an eviction changes nothing a tenant sees.
    assert (again.embed_queries(["heart"]) == a.embed_queries(["heart"])).all()


def test_a_version_the_registry_does_not_hold_is_not_found(world) -> None:
    from rag.errors import NotFound

    _, _, _, pool = world
    with pytest.raises(NotFound):
        pool.embedder("v-missing")


def test_a_new_default_is_pinned_and_the_old_one_joins_the_cache(world, embedder) -> None:
    settings, store, registry, pool = world
    adapted = pool.embedder("v-acme")
    pool.set_default(adapted)
    assert pool.loaded() == ["v-acme", embedder.version]
    pool.embedder("v-globex")  # size 1: the old default is the one evicted now
    assert pool.loaded() == ["v-acme", "v-globex"]
