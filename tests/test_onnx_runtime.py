"""The ONNX Runtime encoder against the torch one: same vectors (fp32), close ones (int8), versions that keep
the two apart, the export cache, and the runtime chosen through settings, the encoder pool and the CLI.

The real MiniLM is exported once per module (some seconds) into a data dir the tests share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rag import onnx_export
from rag.embedding import OnnxEmbedder, load_embedder, runtime_for, runtime_version, split_version
from rag.errors import NotFound, SettingsError
from rag.index import collection_name
from rag.settings import Settings, load_settings
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "What causes the common cold?",
    "0-dimensional biomaterials lack inductive properties.",
    "Vitamin D deficiency is associated with an increased risk of multiple sclerosis in adults.",
    "Refunds are paid within 14 days; see section 4.2 (\"Returns\") for exceptions.",
    "Ünïcödé – “quotes”, 日本語 and an emoji 🙂",
    "",  # [CLS] [SEP] alone
    "   ",
    "a",
    # Longer than 256 tokens: truncated exactly as sentence-transformers truncates.
    "Mitochondrial dysfunction in neurons " * 80,
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-data")


@pytest.fixture(scope="module")
def fp32(data_dir) -> OnnxEmbedder:
    return OnnxEmbedder(runtime="onnx", cache=data_dir / "onnx", batch_size=4)


@pytest.fixture(scope="module")
def int8(data_dir, fp32) -> OnnxEmbedder:
    return OnnxEmbedder(runtime="onnx-int8", cache=data_dir / "onnx", batch_size=4)


def _settings(data_dir: Path, **kw) -> Settings:
    return Settings(data_dir=data_dir, onnx_cache_dir=data_dir / "onnx", log_format="json", llm_local="no", **kw)


def test_fp32_tokenizes_exactly_as_sentence_transformers(fp32, embedder):
    ours = fp32.tokenize(TEXTS)
    theirs = embedder.model.preprocess(TEXTS)
    assert set(ours) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, ids in ours.items():
        np.testing.assert_array_equal(ids, theirs[name].numpy(), err_msg=name)
    assert ours["input_ids"].shape[1] == fp32.max_seq_length == embedder.max_seq_length == 256


def test_fp32_vectors_are_torch_vectors_and_keep_its_version(fp32, embedder):
    for method in ("embed_documents", "embed_queries"):
        ours, theirs = getattr(fp32, method)(TEXTS), getattr(embedder, method)(TEXTS)
        assert ours.shape == theirs.shape == (len(TEXTS), 384) and ours.dtype == np.float32
        cosine = (ours * theirs).sum(1)
        assert cosine.min() >= 0.9999, cosine
        # Within 1e-5 of torch (2e-7 measured): the same vectors, so the same version and collection.
        assert np.abs(ours - theirs).max() < 1e-5
    one = fp32.embed_queries([TEXTS[2]])[0]
    assert abs(float(np.linalg.norm(one)) - 1) < 1e-5
    assert np.abs(one - fp32.embed_documents(TEXTS)[2]).max() < 1e-5  # batch padding does not move a vector
    assert fp32.version == embedder.version
    assert fp32.dimension == embedder.dimension and fp32.runtime == "onnx"
    assert fp32.embed_documents([]).shape == (0, 384)


def test_int8_vectors_stay_close_to_fp32_and_carry_their_own_version(int8, embedder):
    ours, theirs = int8.embed_documents(TEXTS), embedder.embed_documents(TEXTS)
    cosine = (ours * theirs).sum(1)
    # Measured: 0.996 mean / 0.990 min over 400 SciFact queries and chunks, 0.979 for an empty string.
    assert cosine.mean() >= 0.99, cosine
    assert cosine.min() >= 0.97, cosine
    assert cosine.mean() < 0.99999  # it is quantized: not the fp32 graph by mistake
    assert int8.version == f"{embedder.version}-onnx-int8"
    assert collection_name(int8.version) != collection_name(embedder.version)
    assert split_version(int8.version) == (embedder.version, "onnx-int8")


def test_int8_keeps_the_feed_forward_output_projections_in_fp32(fp32, int8):
    import onnx

    excluded = onnx_export.int8_exclusions(onnx.load(str(fp32.folder / onnx_export.MODEL_FILE)))
    assert len(excluded) == 6 and all(n.endswith("/output/dense/MatMul") and "attention" not in n for n in excluded)
    meta = json.loads((int8.folder / onnx_export.META).read_text())
    assert meta["int8"]["fp32_nodes"] == excluded and meta["runtime"] == "onnx-int8"
    assert (int8.folder / onnx_export.MODEL_FILE).stat().st_size < (fp32.folder / onnx_export.MODEL_FILE).stat().st_size


def test_version_naming_rules():
    assert runtime_version("m-1234567890", "torch") == runtime_version("m-1234567890", "onnx") == "m-1234567890"
    assert runtime_version("m-1234567890", "onnx-int8") == "m-1234567890-onnx-int8"
    assert split_version("m-1234567890-ftabc") == ("m-1234567890-ftabc", None)
    # A version's name decides the runtime when it names one; fp32 versions take the configured fp32 runtime.
    assert runtime_for("m-onnx-int8", "torch") == "onnx-int8"
    assert runtime_for("m", "torch") == "torch" and runtime_for("m", "onnx") == "onnx"
    assert runtime_for("m", "onnx-int8") == "onnx"  # an fp32 version (an adapted encoder) served in fp32
    import re

    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", runtime_version("all-minilm-l6-v2-bcfe46d679", "onnx-int8"))


def test_export_is_cached_and_shared(data_dir, fp32, int8, monkeypatch):
    model = fp32.folder / onnx_export.MODEL_FILE
    before = (model.stat().st_mtime_ns, (int8.folder / onnx_export.MODEL_FILE).stat().st_mtime_ns)

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "_export_fp32", no_export)
    monkeypatch.setattr(onnx_export, "_quantize_int8", no_export)
    again = OnnxEmbedder(runtime="onnx-int8", cache=data_dir / "onnx")
    again_fp32 = OnnxEmbedder(runtime="onnx", cache=data_dir / "onnx")
    assert again.folder == int8.folder and again_fp32.folder == fp32.folder
    assert (model.stat().st_mtime_ns, (int8.folder / onnx_export.MODEL_FILE).stat().st_mtime_ns) == before
    recipe = f"-r{onnx_export.EXPORT_RECIPE}"
    assert fp32.folder.name.endswith(f"-onnx{recipe}") and int8.folder.name.endswith(f"-onnx-int8{recipe}")
    meta = onnx_export.read_meta(int8.folder)
    assert meta["built_with"] == onnx_export.library_versions() and meta["built_with"]["onnxruntime"]
    assert not [p for p in (data_dir / "onnx").iterdir() if p.name.startswith((".tmp-", ".stale-"))]


def test_partial_exports_are_never_picked_up(tmp_path, fp32, monkeypatch):
    """A crashed export leaves a temporary folder, or a final folder without (or with a wrong) meta.json:
    neither is loaded; the export runs again and replaces it."""
    cache = tmp_path / "onnx"
    digest = fp32.folder.name.removesuffix(f"-onnx-r{onnx_export.EXPORT_RECIPE}")
    final = onnx_export.export_dir(cache, digest, "onnx")
    calls = []

    def copy_export(source, out):  # the real export's files, without spending seconds re-tracing
        calls.append(source)
        for p in fp32.folder.iterdir():
            if p.name != onnx_export.META:
                shutil.copy2(p, out / p.name)
        meta = json.loads((fp32.folder / onnx_export.META).read_text())
        return {k: v for k, v in meta.items() if k not in ("recipe", "runtime", "model_bytes", "created_at")}

    monkeypatch.setattr(onnx_export, "_export_fp32", copy_export)
    # 1. an interrupted export under its temporary name, complete but never renamed
    tmp = cache / f".tmp-{final.name}-999-deadbeef"
    shutil.copytree(fp32.folder, tmp)
    # 2. a final folder whose model.onnx was cut short
    shutil.copytree(fp32.folder, final)
    with (final / onnx_export.MODEL_FILE).open("r+b") as fh:
        fh.truncate(1000)
    assert onnx_export.read_meta(final) is None
    embedder = OnnxEmbedder(runtime="onnx", cache=cache)
    assert calls == [embedder.model_name]
    assert embedder.folder == final and onnx_export.read_meta(final) is not None
    np.testing.assert_allclose(embedder.embed_queries(TEXTS[:3]), fp32.embed_queries(TEXTS[:3]), atol=1e-6)
    # 3. a final folder without meta.json (killed before the last write) is rebuilt too
    (final / onnx_export.META).unlink()
    OnnxEmbedder(runtime="onnx", cache=cache)
    assert len(calls) == 2
    # 4. an export of an older recipe is rebuilt
    meta = json.loads((final / onnx_export.META).read_text())
    (final / onnx_export.META).write_text(json.dumps(meta | {"recipe": onnx_export.EXPORT_RECIPE - 1}))
    OnnxEmbedder(runtime="onnx", cache=cache)
    assert len(calls) == 3
    assert tmp.exists()  # someone else's temporary folder is left alone, and was never read


def test_two_exporters_at_once_export_once(tmp_path, fp32, monkeypatch):
    """The second caller waits on the lock and then finds the first one's export (threads here; the lock is
    an flock on its own open file, so processes behave the same)."""
    import time

    calls = []

    def slow_export(source, out):
        calls.append(source)
        time.sleep(0.5)
        for p in fp32.folder.iterdir():
            if p.name != onnx_export.META:
                shutil.copy2(p, out / p.name)
        meta = json.loads((fp32.folder / onnx_export.META).read_text())
        return {k: v for k, v in meta.items() if k not in ("recipe", "runtime", "model_bytes", "created_at")}

    monkeypatch.setattr(onnx_export, "_export_fp32", slow_export)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(
        onnx_export.ensure_export(fp32.model_name, "f" * 64, "onnx", tmp_path / "onnx"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(folders)) == 1 and onnx_export.read_meta(folders[0]) is not None


EXPORT_WITHOUT_TORCH = """
import json, sys
from pathlib import Path
from rag import onnx_export
from rag.embedding import bundled_model_path, weights_digest
source = str(bundled_model_path())
folder = onnx_export.ensure_export(source, weights_digest(source), "onnx", Path(sys.argv[1]))
print(json.dumps({"torch_loaded": "torch" in sys.modules, "complete": onnx_export.read_meta(folder) is not None}))
"""


@pytest.mark.slow
def test_a_process_without_torch_exports_in_a_child_and_never_loads_torch(tmp_path):
    """An ONNX-serving API process exporting at its first start: torch (~400 MiB) is imported by a spawned
    child only, so the API process stays lean for its whole life."""
    out = subprocess.run([sys.executable, "-c", EXPORT_WITHOUT_TORCH, str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if not k.startswith("RAG_")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch_loaded": False, "complete": True}


def test_the_export_cache_is_one_per_user_not_per_data_dir(tmp_path, monkeypatch):
    """Every data dir (each test's, each deployment's) finds the exports in one cache, a setting only."""
    monkeypatch.delenv("RAG_ONNX_CACHE_DIR", raising=False)  # the session's (tests/conftest.py)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a, b = Settings(data_dir=tmp_path / "a"), load_settings({"RAG_DATA_DIR": str(tmp_path / "b")})
    assert a.onnx_dir == b.onnx_dir == tmp_path / "xdg" / "rag" / "onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only an absolute path counts
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings().onnx_dir == tmp_path / "home" / ".cache" / "rag" / "onnx"
    assert load_settings({"RAG_ONNX_CACHE_DIR": str(tmp_path / "c")}).onnx_dir == tmp_path / "c"
    monkeypatch.setenv("RAG_ONNX_CACHE_DIR", str(tmp_path / "d"))  # wins for settings built in code too
    assert Settings(data_dir=tmp_path / "a").onnx_dir == tmp_path / "d"


def test_runtime_switch_through_settings(data_dir, fp32, int8, embedder):
    versions = {rt: load_embedder(_settings(data_dir, encoder_runtime=rt)).version for rt in ("onnx", "onnx-int8")}
    assert versions == {"onnx": embedder.version, "onnx-int8": int8.version}
    assert collection_name(versions["onnx-int8"]) != collection_name(embedder.version)
    assert load_settings({"RAG_ENCODER_RUNTIME": "onnx-int8"}).encoder_runtime == "onnx-int8"
    with pytest.raises(SettingsError, match="RAG_ENCODER_RUNTIME"):
        load_settings({"RAG_ENCODER_RUNTIME": "tensorrt"})
    with pytest.raises(SettingsError, match="run on the CPU"):
        load_settings({"RAG_ENCODER_RUNTIME": "onnx", "RAG_ENCODER_DEVICE": "cuda"})
    # The default is onnx fp32 (torch's vectors, same version); a GPU device without a runtime keeps torch.
    assert Settings().encoder_runtime == load_settings({}).encoder_runtime == "onnx"
    assert load_settings({"RAG_ENCODER_DEVICE": "cuda"}).encoder_runtime == "torch"


def test_pool_and_active_collection_load_a_version_with_its_runtime(data_dir, int8, embedder):
    from rag.encoder_pool import EncoderPool
    from rag.encoders import resolve_encoder
    from rag.registry import SqliteRegistry
    from rag.store import open_store

    settings = _settings(data_dir, encoder_runtime="torch")
    store = open_store(settings)
    registry = SqliteRegistry(settings.registry_path)
    try:
        pool = EncoderPool(settings, store, registry, embedder)
        loaded = pool.embedder(int8.version)
        assert loaded.version == int8.version and loaded.runtime == "onnx-int8"
        with pytest.raises(NotFound):
            pool.embedder("unknown-1234567890-onnx-int8")
        # The active collection holds int8 vectors: the query side loads int8 whatever the configured runtime.
        store.ensure_collection(collection_name(int8.version), int8.dimension)
        store.set_active(collection_name(int8.version))
        assert resolve_encoder(settings, store) == ("", "onnx-int8")
        store.ensure_collection(collection_name(embedder.version), embedder.dimension)
        store.set_active(collection_name(embedder.version))
        assert resolve_encoder(settings, store) == ("", "torch")
        assert resolve_encoder(_settings(data_dir, encoder_runtime="onnx-int8"), store) == ("", "onnx")
    finally:
        registry.close()
        store.close()


def test_concurrent_calls_get_their_own_vectors(fp32):
    expected = fp32.embed_documents(TEXTS)
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        got[i] = fp32.embed_queries([TEXTS[i]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, vector in got.items():
        assert np.abs(vector - expected[i]).max() < 1e-5


def test_a_waiting_query_goes_before_the_rest_of_a_long_document_encode(fp32, monkeypatch):
    """The torch encoder's priority lock (rag/priority.py) guards ONNX runs too: a document encode takes it per
    slice, and a query that waits goes before the next slice instead of after the whole call."""
    runs: list[int] = []
    session = fp32._session

    class Recording:  # the real session, noting how many rows each run computes
        def run(self, outputs, feed):
            runs.append(len(feed["input_ids"]))
            return session.run(outputs, feed)

    monkeypatch.setattr(fp32, "_session", Recording())
    lock = fp32._lock
    documents = [f"{TEXTS[i % 5]} (copy {i})" for i in range(40)]  # three slices of at most 16
    got: dict[str, np.ndarray] = {}
    bulk = threading.Thread(target=lambda: got.setdefault("documents", fp32.embed_documents(documents)))
    query = threading.Thread(target=lambda: got.setdefault("query", fp32.embed_queries([TEXTS[0]])))
    with lock.hold():  # the encoder busy: first the document encode queues, then the query
        bulk.start()
        wait_for(lambda: len(lock._cond._waiters) == 1)
        query.start()
        wait_for(lambda: lock._urgent_waiting == 1 and len(lock._cond._waiters) == 2)
    bulk.join(60)
    query.join(60)
    order = list(runs)
    assert order[0] == 1  # the query first, although the document encode was waiting before it
    assert sum(order[1:]) == len(documents) and max(order[1:]) <= fp32.batch_size  # then the documents
    assert np.abs(got["query"][0] - fp32.embed_documents([TEXTS[0]])[0]).max() < 1e-5
    assert np.abs(got["documents"] - fp32.embed_documents(documents)).max() < 1e-5


def test_cli_export(data_dir, int8):
    mtime = (int8.folder / onnx_export.MODEL_FILE).stat().st_mtime_ns
    # Another data dir, the same cache: the export is found, not rebuilt.
    env = dict(os.environ, RAG_DATA_DIR=str(data_dir / "another"), RAG_ONNX_CACHE_DIR=str(data_dir / "onnx"),
               RAG_LOG_FORMAT="json")
    proc = subprocess.run([sys.executable, "-m", "rag", "encoder", "export", "--runtime", "onnx-int8"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runtime, version, folder, _ = proc.stdout.strip().splitlines()[-1].split("\t")
    assert (runtime, version, folder) == ("onnx-int8", int8.version, str(int8.folder))
    assert (int8.folder / onnx_export.MODEL_FILE).stat().st_mtime_ns == mtime  # another process found the export
    bad = subprocess.run([sys.executable, "-m", "rag", "encoder", "export", "--model", str(data_dir / "nope")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "error:" in bad.stderr


def test_an_int8_setting_over_fp32_vectors_keeps_fp32_until_they_are_re_embedded(tmp_path, data_dir, fp32, int8):
    """RAG_ENCODER_RUNTIME=onnx-int8 on a store embedded in fp32: the service keeps embedding queries in fp32
    (the stored vectors' runtime) and says how to move; promoting ``<v>-onnx-int8`` re-embeds blue/green, and
    from then on the service starts in int8."""
    import msgspec
    from structlog.testing import capture_logs

    from ingest.promotion import promote
    from ingest.worker import IngestWorker
    from rag.registry import JobItem
    from rag.services import Services
    from rag.sparse import SparseEncoder

    fp = _settings(tmp_path / "data", encoder_runtime="onnx")
    services = Services.build(fp)
    try:
        worker = IngestWorker(fp, services.registry, services.store, services.embedder, SparseEncoder())
        upload = tmp_path / "docs.jsonl"
        upload.write_text("".join(json.dumps({"_id": f"d{i}", "title": f"Doc {i}", "text": t}) + "\n"
                                  for i, t in enumerate(TEXTS[:4])))
        services.registry.create_job("default", [JobItem(filename="docs.jsonl", path=str(upload))])
        assert worker.run_once()
        points = services.store.count(collection_name(fp32.version), tenant="default")
        assert points >= 4
    finally:
        services.close()

    q8 = msgspec.structs.replace(fp, encoder_runtime="onnx-int8")
    with capture_logs() as logs:
        services = Services.build(q8)
    try:
        assert (services.embedder.version, services.embedder.runtime) == (fp32.version, "onnx")
        (kept,) = [e for e in logs if e["event"] == "encoder_runtime_kept"]
        assert kept["serving"] == fp32.version and f"promote --version {int8.version}" in kept["hint"]
        out = promote(q8, services.store, int8.version, pointers=services.registry)
        assert out["switched"] and services.store.get_active() == collection_name(int8.version)
        assert services.store.count(collection_name(int8.version), tenant="default") == points
        # The new default's collection carries sentence vectors by the new encoder (extractive answers use them).
        ids = [p.id for b in services.store.iter_points(collection_name(int8.version)) for p in b]
        moved = services.store.sentence_vectors(collection_name(int8.version), ids, tenant="default")
        assert set(moved) == set(ids) and {version for version, _ in moved.values()} == {int8.version}
    finally:
        services.close()
    services = Services.build(q8)
    try:
        assert (services.embedder.version, services.embedder.runtime) == (int8.version, "onnx-int8")
    finally:
        services.close()
