"""Retrieval evaluation: a BEIR corpus through the real ingest worker, its queries through the real retriever.

In process, the corpus is indexed by :class:`ingest.worker.IngestWorker` into an embedded store in
the evaluation's own data directory (never the service's), keyed by corpus, encoder and chunking,
so a second run with the same inputs reuses the index. With ``url``, a running service is measured
from outside over ``POST /v1/search`` instead. Either way a query's top chunks become a document
ranking (a document scores its best chunk) that :mod:`eval.metrics` scores against the qrels.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from tqdm import tqdm

from eval.datasets import BeirDataset, load_beir
from eval.metrics import DEFAULT_METRICS, MetricSummary, evaluate
from eval.service import service_headers
from rag.chunking import CHUNKER_VERSION
from rag.errors import RagError
from rag.settings import Settings

__all__ = [
    "MODES",
    "EvalOptions",
    "IndexInfo",
    "ModeResult",
    "RetrievalRun",
    "chunks_to_documents",
    "default_data_dir",
    "index_corpus",
    "run_retrieval_eval",
]

MODES = ("dense", "sparse", "hybrid")
TOP_CHUNKS = 100  # chunks asked of the retriever per query (the API's max_top_k)
TOP_DOCS = 100  # documents kept per query after grouping chunks
DEFAULT_TENANT = "eval"
MARKER = "eval-index.json"


class EvalError(RagError):
    code = "eval_failed"


@dataclass(slots=True)
class EvalOptions:
    dataset: Path
    split: str = "test"
    modes: Sequence[str] = ("dense",)
    limit_queries: int = 0
    query_ids: Sequence[str] | None = None  # only these queries of the split (in the split's order)
    data_dir: Path | None = None  # default: .eval-data/<dataset>-<key>
    url: str | None = None
    tenant: str = DEFAULT_TENANT
    upload: bool = True  # with url: upload the corpus first (a no-op when the service already holds it)
    top_chunks: int = TOP_CHUNKS
    top_docs: int = TOP_DOCS
    # BEIR drops a retrieved document whose id equals the query id (ArguAna, Quora); so do we.
    ignore_identical_ids: bool = True
    resamples: int = 1000
    seed: int = 0
    progress: bool = True


@dataclass(slots=True)
class IndexInfo:
    data_dir: str
    collection: str
    reused: bool
    documents: int
    failed_documents: int
    chunks: int
    ingest_s: float
    signature: str
    failures: list[str] = field(default_factory=list)
    new_chunks: int = 0  # chunks this build wrote (fewer than ``chunks`` when it resumed an interrupted one)


@dataclass(slots=True)
class ModeResult:
    mode: str
    summary: MetricSummary
    runs: dict[str, list[tuple[str, float]]]  # query id -> documents best first
    latency_ms: dict[str, float]
    seconds: float


@dataclass(slots=True)
class RetrievalRun:
    dataset: BeirDataset
    options: EvalOptions
    encoder_version: str
    settings: dict[str, Any]
    index: IndexInfo | None
    query_ids: list[str]
    results: dict[str, ModeResult]
    target: str  # "in-process" or the service URL
    started_at: float
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Chunks -> documents
# ---------------------------------------------------------------------------------------------


def chunks_to_documents(
    hits: Sequence[tuple[str, float]], *, top_docs: int = TOP_DOCS, exclude: str | None = None
) -> list[tuple[str, float]]:
    """Group ranked chunk hits ``(document id, score)`` by document: a document takes its best chunk's
    score and its first appearance's position; the first ``top_docs`` documents are kept."""
    best: dict[str, float] = {}
    for doc_id, score in hits:
        if doc_id == exclude:
            continue
        if doc_id not in best:
            if len(best) >= top_docs:
                continue
            best[doc_id] = float(score)
        elif score > best[doc_id]:  # only if the retriever's list was not sorted by score
            best[doc_id] = float(score)
    return list(best.items())


# ---------------------------------------------------------------------------------------------
# The data directory and ingest
# ---------------------------------------------------------------------------------------------


def index_key(corpus_hash: str, encoder_version: str, settings: Settings, sparse_version: str = "") -> str:
    """What decides the index's content: the corpus bytes, the encoders and the chunking."""
    parts = [corpus_hash, encoder_version, sparse_version, settings.tokenizer_encoding, str(settings.chunk_tokens),
             str(settings.chunk_overlap), CHUNKER_VERSION]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def default_data_dir(
    dataset: BeirDataset, encoder_version: str, settings: Settings, sparse_version: str = "",
    base: Path = Path(".eval-data"),
) -> Path:
    return base / f"{dataset.name}-{index_key(dataset.corpus_hash, encoder_version, settings, sparse_version)}"


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def index_corpus(
    settings: Settings, corpus: Path, store, registry, embedder, sparse, *, tenant: str, corpus_hash: str,
    progress: bool = True,
) -> tuple[IndexInfo, Any]:
    """Index ``corpus`` through the real worker unless the marker says this exact index is complete.

    Returns the index description and the worker (whose ``collection`` the retriever searches).
    Even without the marker, an interrupted or repeated run costs little: the registry finds each
    already-indexed document unchanged by its content hash and the worker skips it.
    """
    from ingest.worker import IngestWorker

    worker = IngestWorker(settings, registry, store, embedder, sparse)
    marker_path = settings.data_dir / MARKER
    expected = {"corpus_sha256": corpus_hash, "signature": worker.signature, "collection": worker.collection,
                "tenant": tenant}
    reused = _reusable_index(settings, store, worker, marker_path, expected)
    if reused is not None:
        return reused, worker
    marker_path.unlink(missing_ok=True)

    before = store.count(worker.collection, tenant=tenant, live=True)
    job = _submit_corpus(settings, registry, corpus, tenant)
    total = _count_lines(corpus)
    started = time.perf_counter()
    _drain_with_progress(worker, registry, job.id, total, progress=progress, corpus=corpus)
    final = registry.get_job(job.id)
    if final is None or final.status not in ("succeeded", "failed"):
        status = final.status if final else "missing"
        raise EvalError(f"ingest job {job.id} ended {status}: {final.error if final else ''}")
    elapsed = time.perf_counter() - started
    failures = [f"{r.document_id}: {r.error}" for r in final.results if r.status == "failed"]
    chunks = store.count(worker.collection, tenant=tenant, live=True)
    info = IndexInfo(data_dir=str(settings.data_dir), collection=worker.collection, reused=False,
                     documents=final.done, failed_documents=final.failed, chunks=chunks,
                     ingest_s=round(elapsed, 2), signature=worker.signature, failures=failures[:50],
                     new_chunks=chunks - before)
    marker_path.write_text(json.dumps({
        **expected, "documents": info.documents, "failed_documents": info.failed_documents,
        "chunks": chunks, "ingest_s": info.ingest_s, "failures": info.failures, "completed_at": time.time(),
    }, indent=2))
    return info, worker


def _reusable_index(settings: Settings, store, worker, marker_path: Path, expected: dict[str, Any]) -> IndexInfo | None:
    """The index the marker describes, if it matches ``expected`` and the store still holds all its chunks."""
    marker: dict[str, Any] = {}
    if marker_path.exists():
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            marker = {}
    if not (marker and all(marker.get(k) == v for k, v in expected.items())):
        return None
    live = store.count(worker.collection, tenant=expected["tenant"], live=True)
    if live != marker.get("chunks"):
        return None
    return IndexInfo(data_dir=str(settings.data_dir), collection=worker.collection, reused=True,
                     documents=marker["documents"], failed_documents=marker["failed_documents"],
                     chunks=live, ingest_s=0.0, signature=worker.signature, failures=marker.get("failures", []))


def _submit_corpus(settings: Settings, registry, corpus: Path, tenant: str):
    """A copy of ``corpus`` in the uploads directory, queued as one ingest job."""
    from rag.registry import JobItem

    # We hold the store's lock, so no other worker runs here: a job a killed run left "running"
    # goes back to the queue and is finished by this worker too.
    registry.requeue_running()
    upload_dir = settings.uploads_dir / uuid.uuid4().hex
    upload_dir.mkdir(parents=True, exist_ok=True)
    upload = upload_dir / "corpus.jsonl"
    shutil.copyfile(corpus, upload)
    return registry.create_job(tenant, [JobItem(filename="corpus.jsonl", path=str(upload))])


def _drain_with_progress(worker, registry, job_id: str, total: int, *, progress: bool, corpus: Path) -> None:
    """Run the worker until the queue is empty, in a thread, while this one shows the job's progress."""
    error: list[BaseException] = []

    def work() -> None:
        try:
            while worker.run_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            error.append(exc)

    thread = threading.Thread(target=work, name="eval-ingest", daemon=True)
    thread.start()
    with tqdm(total=total, desc="ingest", unit="doc", disable=not progress, dynamic_ncols=True) as bar:
        while thread.is_alive():
            thread.join(0.5)
            current = registry.get_job(job_id)
            if current is not None:
                bar.n = min(total, current.done + current.failed)
                bar.set_postfix(chunks=current.chunks, failed=current.failed, refresh=False)
                bar.refresh()
    if error:
        raise EvalError(f"ingest of {corpus} failed: {error[0]}") from error[0]


# ---------------------------------------------------------------------------------------------
# Searching
# ---------------------------------------------------------------------------------------------

SearchFn = Callable[[str, str], list[tuple[str, float]]]  # (query, mode) -> [(document id, chunk score)]


def _in_process_search(retriever, *, tenant: str, top_chunks: int) -> SearchFn:
    def search(query: str, mode: str) -> list[tuple[str, float]]:
        hits = retriever.search(query, tenant=tenant, top_k=top_chunks, mode=mode)
        return [(h.payload["document_id"], float(h.score)) for h in hits]

    return search


def _http_search(client, *, top_chunks: int) -> SearchFn:
    def search(query: str, mode: str) -> list[tuple[str, float]]:
        resp = client.post("/v1/search", json={"query": query, "top_k": top_chunks, "mode": mode})
        if resp.status_code != 200:
            raise EvalError(f"POST /v1/search (mode={mode}) returned {resp.status_code}: {resp.text[:300]}")
        return [(r["document_id"], float(r["score"])) for r in resp.json()["results"]]

    return search


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_mode(
    search: SearchFn, dataset: BeirDataset, query_ids: list[str], mode: str, options: EvalOptions,
) -> ModeResult:
    """Every query of the split through ``search`` in one mode, then scored."""
    runs: dict[str, list[tuple[str, float]]] = {}
    latencies: list[float] = []
    started = time.perf_counter()
    for qid in tqdm(query_ids, desc=f"queries [{mode}]", unit="q", disable=not options.progress, dynamic_ncols=True):
        t0 = time.perf_counter()
        hits = search(dataset.queries[qid], mode)
        latencies.append((time.perf_counter() - t0) * 1000)
        runs[qid] = chunks_to_documents(
            hits, top_docs=options.top_docs, exclude=qid if options.ignore_identical_ids else None
        )
    seconds = time.perf_counter() - started
    summary = evaluate(runs, dataset.qrels, metrics=DEFAULT_METRICS, resamples=options.resamples, seed=options.seed)
    latency = {"p50_ms": round(statistics.median(latencies), 2), "p95_ms": round(_percentile(latencies, 95), 2),
               "mean_ms": round(statistics.fmean(latencies), 2)} if latencies else {}
    return ModeResult(mode=mode, summary=summary, runs=runs, latency_ms=latency, seconds=round(seconds, 2))


def _public_settings(settings: Settings) -> dict[str, Any]:
    out = msgspec.to_builtins(settings, enc_hook=str)
    for key in list(out):
        if "api_key" in key and out[key]:
            out[key] = "<redacted>"
    return out


def _select_queries(dataset: BeirDataset, limit: int) -> list[str]:
    ids = dataset.split_query_ids
    return ids[:limit] if limit and limit > 0 else ids


def run_retrieval_eval(settings: Settings, options: EvalOptions, *, embedder=None, http_client=None) -> RetrievalRun:
    """Evaluate each of ``options.modes`` on one split.

    ``embedder`` may be passed in (tests share one); ``http_client`` (an ``httpx.Client`` whose base
    URL is the service) replaces the client built from ``options.url``.
    """
    bad = [m for m in options.modes if m not in MODES]
    if bad:
        raise EvalError(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    dataset = load_beir(options.dataset, options.split)
    query_ids = _select_queries(dataset, options.limit_queries)
    if options.query_ids is not None:
        wanted = set(options.query_ids)
        query_ids = [q for q in query_ids if q in wanted]
    started_at = time.time()
    if options.url or http_client is not None:
        return _run_http(options, dataset, query_ids, started_at, http_client)

    from rag.embedding import load_embedder
    from rag.registry import SqliteRegistry
    from rag.search import Retriever
    from rag.sparse import SparseEncoder
    from rag.store import open_store

    if embedder is None:
        embedder = load_embedder(settings)
    # One sparse encoder for both sides: the query terms must hash as the stored ones did.
    sparse = SparseEncoder()
    # The runtime keys the index too: onnx fp32 shares torch's version (the same vectors to 2e-7), but an
    # evaluation of a runtime must embed the corpus with it.
    runtime = getattr(embedder, "runtime", "torch")
    key_version = embedder.version if runtime == "torch" else f"{embedder.version}|{runtime}"
    data_dir = options.data_dir or default_data_dir(dataset, key_version, settings, sparse.version)
    # Always an embedded store of our own, whatever RAG_QDRANT_URL / RAG_DATA_DIR say.
    run_settings = msgspec.structs.replace(settings, data_dir=Path(data_dir), qdrant_url="")
    run_settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(run_settings)
    registry = SqliteRegistry(run_settings.registry_path)
    try:
        index, worker = index_corpus(run_settings, dataset.corpus_path, store, registry, embedder, sparse,
                                     tenant=options.tenant, corpus_hash=dataset.corpus_hash, progress=options.progress)
        retriever = Retriever(store, worker.collection, embedder, sparse, run_settings)
        search = _in_process_search(retriever, tenant=options.tenant, top_chunks=options.top_chunks)
        search(dataset.queries[query_ids[0]], options.modes[0])  # warm up (first-call costs)
        results = {m: run_mode(search, dataset, query_ids, m, options) for m in options.modes}
    finally:
        registry.close()
        store.close()
    return RetrievalRun(
        dataset=dataset, options=options, encoder_version=embedder.version, settings=_public_settings(run_settings),
        index=index, query_ids=query_ids, results=results, target="in-process", started_at=started_at,
        extra={"sparse_encoder": sparse.version, "fusion": retriever.fusion, "rrf_k": run_settings.rrf_k,
               "weights": list(retriever.weights), "prefetch_k": run_settings.prefetch_k},
    )


def _run_http(options: EvalOptions, dataset: BeirDataset, query_ids: list[str], started_at: float,
              client=None) -> RetrievalRun:
    import httpx

    url = (options.url or str(client.base_url)).rstrip("/")
    if options.upload and client is None:
        from ingest.cli import add_via_api

        print(f"uploading {dataset.corpus_path} to {url} as tenant {options.tenant!r} "
              "(a no-op for documents it already holds) …", flush=True)
        summary = add_via_api(url, [dataset.corpus_path], tenant=options.tenant, headers=service_headers())
        print("\n".join(summary.lines()), flush=True)
    own = client is None
    if own:
        client = httpx.Client(base_url=url, timeout=120.0)
    client.headers.update(service_headers(options.tenant))
    try:
        search = _http_search(client, top_chunks=options.top_chunks)
        probe = client.post("/v1/search", json={"query": dataset.queries[query_ids[0]], "top_k": 1,
                                                "mode": options.modes[0]})
        if probe.status_code != 200:
            raise EvalError(f"POST {url}/v1/search returned {probe.status_code}: {probe.text[:300]}")
        encoder_version = probe.json().get("encoder_version", "unknown")
        results = {m: run_mode(search, dataset, query_ids, m, options) for m in options.modes}
    finally:
        if own:
            client.close()
    return RetrievalRun(
        dataset=dataset, options=options, encoder_version=encoder_version, settings={"url": url},
        index=None, query_ids=query_ids, results=results, target=url, started_at=started_at,
    )
