"""The worker's background compute process: same vectors, lower priority, restarts, training, clean stop."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from ingest.background import BackgroundCompute, BackgroundEmbedder
from ingest.pairs import Pair
from ingest.worker import IngestWorker
from rag.embedding import OnnxEmbedder, SentenceTransformerEmbedder
from rag.registry import JobItem, JobKind, SqliteRegistry
from rag.settings import Settings
from rag.store import open_store
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

N_DOCS = 36


def _settings(root: Path) -> Settings:
    # Tiny training (as tests/test_adapt.py): a run takes seconds on 2 CPU cores.
    return Settings(data_dir=root / "data", worker_poll_s=0.05, log_format="json", llm_local="no",
                    adapt_batch_size=8, adapt_mini_batch_size=8, adapt_max_seq_length=64, adapt_max_pairs=48,
                    adapt_validation_fraction=0.25, adapt_learning_rate=1e-4, background_threads=1,
                    background_nice=10)


@pytest.fixture(scope="module")
def compute(tmp_path_factory) -> BackgroundCompute:
    """One child for the module (spawning one loads torch: seconds); the last test stops it."""
    bg = BackgroundCompute(_settings(tmp_path_factory.mktemp("background")))
    bg.start()
    yield bg
    bg.close()


@pytest.fixture(scope="module")
def corpus(shared_data: Path) -> list[dict]:
    docs = []
    with (shared_data / "scifact" / "corpus.jsonl").open() as fh:
        for line in fh:
            row = json.loads(line)
            if row["title"] and len(row["text"]) > 400:
                docs.append(row)
            if len(docs) == N_DOCS:
                break
    return docs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_childs_vectors_equal_the_in_process_ones(compute, embedder, corpus):
    proxy = compute.wrap(embedder)
    assert isinstance(proxy, BackgroundEmbedder)
    assert (proxy.version, proxy.dimension) == (embedder.version, embedder.dimension)
    texts = [f"{d['title']}\n{d['text']}" for d in corpus[:12]] + ["short", ""]
    # The stored vectors: bit for bit what the API's own encoder makes of the same texts.
    assert np.array_equal(proxy.embed_documents(texts), embedder.embed_documents(texts))
    # A single query is reduced in another order by 1 thread than by 2: equal to float32 rounding.
    queries = [d["title"] for d in corpus[:5]]
    np.testing.assert_allclose(proxy.embed_queries(queries), embedder.embed_queries(queries), atol=1e-6)
    assert proxy.embed_documents([]).shape == (0, embedder.dimension)
    # A folder the child loads itself reports the version this process computes for it.
    described = compute.encoder(embedder.model_name)
    assert (described.version, described.dimension) == (embedder.version, embedder.dimension)


def test_the_child_encodes_on_the_runtime_of_the_encoder_it_stands_for(compute, embedder, corpus):
    """An ONNX encoder's work goes to the child as ONNX (the same export, from the data dir's cache), so the
    stored vectors are that runtime's and carry its version; int8 keeps its own version there too."""
    onnx = OnnxEmbedder(embedder.model_name, runtime="onnx", cache=compute.settings.onnx_dir)
    texts = [f"{d['title']}\n{d['text']}" for d in corpus[:8]]
    # onnx fp32 is computed as torch in the child by default (the same vectors and version, faster on documents)
    proxy = compute.wrap(onnx)
    assert isinstance(proxy, BackgroundEmbedder) and proxy.runtime == "torch" and proxy.version == onnx.version
    np.testing.assert_allclose(proxy.embed_documents(texts), onnx.embed_documents(texts), atol=1e-5)
    same = BackgroundCompute(msgspec.structs.replace(compute.settings, background_fp32_runtime="same"))
    try:
        proxy = same.wrap(onnx)
        assert proxy.runtime == "onnx"
        np.testing.assert_allclose(proxy.embed_documents(texts), onnx.embed_documents(texts), atol=1e-5)
    finally:
        same.close()
    assert compute.wrap(embedder).runtime == "torch"
    int8 = compute.encoder(embedder.model_name, runtime="onnx-int8")
    assert int8.version == f"{embedder.version}-onnx-int8" and int8.runtime == "onnx-int8"
    # Not the torch vectors under another name: the child really ran the quantized graph.
    assert not np.allclose(int8.embed_documents(texts[:2]), embedder.embed_documents(texts[:2]), atol=1e-4)


def test_the_child_runs_at_a_lower_priority_than_the_worker(compute):
    pid = compute.pid
    assert pid is not None and pid != os.getpid()
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, mine + compute.nice) > mine


def test_training_in_the_child_reports_progress_stops_on_request_and_resumes(compute, embedder, corpus, tmp_path):
    pairs = [Pair(query=d["title"], positive=d["text"][:300], document_id=d["_id"], source="title")
             for d in corpus[:32]]
    work, out = tmp_path / "work", tmp_path / "model"
    small = msgspec.structs.replace(compute.settings, adapt_batch_size=8)

    class Cancelled(Exception):
        pass

    seen: list[tuple[str, float]] = []

    def cancel_at_step_3(stage: str, fraction: float) -> None:
        seen.append((stage, fraction))
        if stage == "training" and fraction >= 3 / 4:
            raise Cancelled  # as the worker's callback does for a cancelled job or a lost lease

    with pytest.raises(Cancelled):
        compute.train(pairs, embedder.model_name, out, work, small, epochs=1, max_seq_length=32, seed=1,
                      progress=cancel_at_step_3, save_steps=2)
    assert ("training", 0.25) in seen and ("training", 0.5) in seen  # each step came back to this process
    assert (work / "checkpoints" / "checkpoint-2").exists() and not out.exists()
    # The child is still serving, and the next run resumes from the checkpoint.
    stats = compute.train(pairs, embedder.model_name, out, work, small, epochs=1, max_seq_length=32, seed=1,
                          progress=lambda *a: None, save_steps=2)
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps"] == 4
    trained = SentenceTransformerEmbedder(str(out))
    vec = trained.embed_queries(["a question"])
    assert vec.shape == (1, embedder.dimension) and np.isfinite(vec).all()
    assert compute.encoder(str(out)).version == trained.version


def test_a_killed_child_is_restarted_and_the_jobs_still_succeed(embedder, corpus, tmp_path):
    """Ingest and adaptation through a worker's own child; the child is killed mid-request once."""
    settings = _settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    worker = IngestWorker(settings, registry, store, embedder, background=True)
    assert isinstance(worker.compute, BackgroundCompute)
    try:
        upload = settings.data_dir / "corpus.jsonl"
        upload.write_text("\n".join(json.dumps(d) for d in corpus))
        job = registry.create_job("default", [JobItem(filename="corpus.jsonl", path=str(upload))])
        worker.start()
        # The first embed starts the child; kill it while that request is in flight.
        first = wait_for(lambda: worker.compute.pid, timeout=120, interval=0.01)
        os.kill(first, 9)
        done = wait_for(lambda: (j := registry.get_job(job.id)).status in ("succeeded", "failed") and j, timeout=300)
        assert done.status == "succeeded", done.error
        assert worker.compute.restarts == 1 and worker.compute.pid not in (None, first)
        collection = worker.collection
        assert store.count(collection, tenant="default") == done.chunks > N_DOCS
        # The stored vectors are the in-process encoder's.
        point = next(p for b in store.iter_points(collection, tenant="default") for p in b)
        assert point.payload["encoder_version"] == embedder.version

        adapt = registry.create_job("default", [], kind=JobKind.ADAPT,
                                    params={"epochs": 1, "promote": False, "tenant": "default"})
        done = wait_for(lambda: (j := registry.get_job(adapt.id)).status in ("succeeded", "failed") and j,
                        timeout=300, interval=0.2)
        assert done.status == "succeeded", done.error
        record = done.outcome["record"]
        assert record["training"]["steps"] >= 1 and record["validation"]["queries"] > 0
        assert SentenceTransformerEmbedder(record["path"]).version == record["version"]
        child = worker.compute.pid
    finally:
        worker.stop()
        registry.close()
        store.close()
    assert child is not None and not _alive(child) and worker.compute.pid is None


def test_stopping_the_worker_stops_its_child(compute, embedder, tmp_path):
    """Last in the module: it stops the module's child."""
    settings = compute.settings
    store = open_store(msgspec.structs.replace(settings, data_dir=tmp_path))
    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    worker = IngestWorker(settings, registry, store, embedder, background=False)
    worker.compute = compute  # the running child, as the worker's own
    pid = compute.pid
    assert pid is not None and _alive(pid)
    worker.start()
    worker.stop()
    registry.close()
    store.close()
    assert not _alive(pid) and compute.pid is None
    with pytest.raises(Exception, match="shutting down"):
        compute.wrap(embedder).embed_documents(["no child is started again after a stop"])
    shutil.rmtree(tmp_path, ignore_errors=True)
