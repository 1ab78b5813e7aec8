"""Re-ingest and chunk ids: the same document gives the same chunks and point ids; a new chunker
version re-chunks it (new ids, the old generation replaced), through the real worker, store and
registry."""

from __future__ import annotations

from pathlib import Path

import msgspec

import ingest.worker as worker_module
from ingest.worker import IngestWorker
from rag.chunking import CHUNKER_VERSION
from rag.registry import JobItem, SqliteRegistry
from rag.sentences import split_sentences
from rag.settings import Settings
from rag.sparse import SparseEncoder
from rag.store import open_store

TEXT = " ".join(
    f"Finding {i}: the cohort of {100 + i} adults had 0.{i}% higher 25-hydroxyvitamin D levels, e.g. in winter."
    for i in range(12)
)


def _ingest(worker: IngestWorker, registry: SqliteRegistry, upload: Path) -> str:
    # an upload is consumed by its job: each ingest uploads the same bytes afresh
    upload.write_text(msgspec.json.encode({"_id": "long", "title": "Cohort", "text": TEXT}).decode() + "\n")
    job = registry.create_job("default", [JobItem(filename="docs.jsonl", path=str(upload))])
    assert worker.run_once()
    done = registry.get_job(job.id)
    assert done is not None and done.status == "succeeded", done
    (result,) = done.results
    return result.status


def _points(store, collection: str) -> dict[str, tuple[int, int, int, str, bool]]:
    return {p.id: (p.payload["chunk_index"], p.payload["start"], p.payload["end"], p.payload["text"],
                   p.payload["live"])
            for batch in store.iter_points(collection, tenant="default") for p in batch}


def test_reingest_keeps_ids_and_a_new_chunker_version_rechunks(tmp_path: Path, embedder, monkeypatch) -> None:
    settings = Settings(data_dir=tmp_path, chunk_tokens=64, chunk_overlap=16)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    try:
        upload = tmp_path / "docs.jsonl"
        worker = IngestWorker(settings, registry, store, embedder, SparseEncoder())
        assert worker.signature.endswith(f"|{CHUNKER_VERSION}")

        assert _ingest(worker, registry, upload) == "indexed"
        first = _points(store, worker.collection)
        assert len(first) > 3
        starts = {s for s, _ in split_sentences(TEXT)}
        for index, start, end, text, live in first.values():
            assert live and text == TEXT[start:end] and start in starts

        # the same document again: unchanged, the same points
        assert _ingest(worker, registry, upload) == "unchanged"
        assert _points(store, worker.collection) == first

        # after an upgrade of the chunker (a restarted worker with a new version) the same
        # document is re-chunked under new point ids and the old generation goes
        monkeypatch.setattr(worker_module, "CHUNKER_VERSION", CHUNKER_VERSION + "-next")
        upgraded = IngestWorker(settings, registry, store, embedder, SparseEncoder())
        assert upgraded.signature != worker.signature
        assert _ingest(upgraded, registry, upload) == "indexed"
        second = _points(store, upgraded.collection)
        assert not set(second) & set(first)
        assert sorted(v[:4] for v in second.values()) == sorted(v[:4] for v in first.values())
        assert store.count(upgraded.collection, tenant="default", document_id="long", live=True) == len(first)
    finally:
        store.close()
        registry.close()
