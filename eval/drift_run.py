"""``python -m eval drift``: where the two samples of embeddings come from, and the run that compares them.

A source is one of

- a BEIR corpus (a folder holding ``corpus.jsonl``, or the ``.jsonl`` itself): parsed and chunked exactly
  as ingest does (``rag.loaders.load``, ``rag.chunking.chunk``, ``rag.types.embedding_text``), then
  **one random chunk per document** is embedded, so the rows are independent (chunks of one document
  are alike; keeping them together on one side would make the permutation test too eager);
- an ``.npy`` matrix of embeddings, e.g. a snapshot of a collection (``python -m eval drift export``),
  with its ``.json`` sidecar when there is one (document ids: again one row per document);
- the API's query sample: the URL of a running service (``GET /v1/admin/query-sample``), or a file it
  wrote (``POST /v1/admin/query-sample/export``) or that was saved from that endpoint.

Modes: ``--reference A --current B``; ``--reference A --split-half`` (two random halves of A's
documents); ``--queries Q [--reference A]`` (the earlier half of the sample vs the later half, or
vs A); ``--encoders E1 E2 --dataset D`` (the same chunks under two encoders: neighbour overlap@k).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from tqdm import tqdm

from eval.datasets import DatasetError, file_sha256
from eval.drift import DriftReport, DriftThresholds, SampleInfo, analyse
from rag.errors import RagError
from rag.settings import Settings

__all__ = ["Sample", "export_snapshot", "load_source", "run_drift", "run_export"]

EMBED_BATCH = 128  # texts per encode call (progress granularity; the encoder batches inside)
DEFAULT_CACHE = Path(".eval-data/drift-cache")  # embeddings per (encoder version, text hash)


class DriftUsageError(Exception):
    """Bad combination of options: exit status 2."""


@dataclass(slots=True)
class Sample:
    vectors: np.ndarray
    info: SampleInfo
    seq: np.ndarray | None = None  # arrival order (query samples)


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _corpus_file(path: Path) -> Path | None:
    if path.is_dir():
        return path / "corpus.jsonl" if (path / "corpus.jsonl").is_file() else None
    return path if path.suffix == ".jsonl" and path.name != "queries.jsonl" else None


def corpus_texts(path: Path, settings: Settings, *, seed: int = 0) -> tuple[list[str], list[str], Path]:
    """One randomly chosen chunk per document of a BEIR corpus, as the ingest worker would embed it.

    Returns (texts, document ids, corpus file), in corpus order.
    """
    from rag.types import embedding_text
    from rag.chunking import chunk
    from rag.loaders import load
    from rag.tokens import get_encoding
    from rag.types import Document

    corpus = _corpus_file(path)
    if corpus is None:
        raise DatasetError(path, "not a BEIR corpus (a folder with corpus.jsonl, or a corpus .jsonl file)")
    encoding = get_encoding(settings.tokenizer_encoding)
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    ids: list[str] = []
    for doc in load(corpus.name, corpus.read_bytes()):
        if not isinstance(doc, Document):
            continue  # a line ingest would reject too
        chunks = chunk(doc, settings.chunk_tokens, settings.chunk_overlap, encoding)
        if not chunks:
            continue
        picked = chunks[int(rng.integers(len(chunks)))]
        texts.append(embedding_text(doc.title, picked.heading_path, picked.text))
        ids.append(doc.id)
    if not texts:
        raise DatasetError(corpus, "no documents with text")
    return texts, ids, corpus


def _one_per_document(document_ids: list[str], seed: int) -> np.ndarray:
    """Row indices keeping one random row of each document (rows without an id are kept)."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    keep: list[int] = []
    for i, d in enumerate(document_ids):
        if d:
            groups.setdefault(d, []).append(i)
        else:
            keep.append(i)
    keep += [rows[int(rng.integers(len(rows)))] for rows in groups.values()]
    return np.sort(np.asarray(keep, dtype=np.int64))


def _query_sample_meta(data: dict[str, Any], source: str) -> tuple[np.ndarray, dict[str, Any]]:
    vectors = np.asarray(data.pop("vectors", []), dtype=np.float32)
    if vectors.size == 0:
        vectors = vectors.reshape(0, int(data.get("dimension") or 0))
    if vectors.ndim != 2:
        raise DatasetError(source, "'vectors' must be a list of equal-length lists")
    return vectors, data


def fetch_query_sample(url: str, timeout: float = 60.0) -> tuple[np.ndarray, dict[str, Any]]:
    """The sample of a running service: ``GET <url>/v1/admin/query-sample``."""
    import httpx

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/v1/admin/query-sample"):
        endpoint += "/v1/admin/query-sample"
    try:
        from eval.service import service_headers

        resp = httpx.get(endpoint, timeout=timeout, headers=service_headers())
    except httpx.HTTPError as exc:
        raise RagError(f"GET {endpoint} failed: {exc}") from exc
    if resp.status_code != 200:
        raise RagError(f"GET {endpoint} returned {resp.status_code}: {resp.text[:300]}")
    return _query_sample_meta(resp.json(), endpoint)


def load_vectors_file(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """An ``.npy`` matrix (with its ``.json`` sidecar if present) or a query-sample ``.json``."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    if path.suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(path, f"not a numpy .npy matrix ({exc})") from exc
        if vectors.ndim != 2:
            raise DatasetError(path, f"expected a 2-d matrix of embeddings, got shape {vectors.shape}")
        side = path.with_suffix(".json")
        meta = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        return np.asarray(vectors, dtype=np.float32), meta
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(path, f"not a JSON query sample ({exc})") from exc
        if not isinstance(data, dict) or "vectors" not in data:
            raise DatasetError(path, "expected a query sample object with 'vectors'")
        return _query_sample_meta(data, str(path))
    raise DatasetError(path, "expected a corpus folder or .jsonl, an .npy matrix, or a query-sample .json")


def _cache_path(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', version)[:120]}.npz"


def embed_texts(embedder, texts: list[str], *, desc: str, progress: bool, cache_dir: Path | None = None) -> np.ndarray:
    """Embed ``texts`` as documents; with ``cache_dir``, vectors are kept per (encoder version, text hash)
    so a second run over the same texts costs nothing (encoding is most of a run on a small CPU)."""
    keys = [hashlib.sha256(t.encode("utf-8")).hexdigest()[:32] for t in texts]
    cached: dict[str, np.ndarray] = {}
    path = _cache_path(cache_dir, embedder.version) if cache_dir is not None else None
    old_keys: np.ndarray | None = None
    old_vecs: np.ndarray | None = None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                old_keys, old_vecs = data["keys"], data["vectors"]
            index = {str(k): i for i, k in enumerate(old_keys)}
            cached = {k: old_vecs[index[k]] for k in set(keys) if k in index}
        except (OSError, ValueError, KeyError):
            old_keys = old_vecs = None  # a damaged cache is rebuilt
    todo = list(dict.fromkeys(k_t for k_t in zip(keys, texts, strict=True) if k_t[0] not in cached))
    fresh: list[np.ndarray] = []
    with tqdm(total=len(todo), desc=desc, unit="chunk", disable=not progress or not todo, dynamic_ncols=True) as bar:
        for start in range(0, len(todo), EMBED_BATCH):
            batch = [t for _, t in todo[start: start + EMBED_BATCH]]
            fresh.append(embedder.embed_documents(batch))
            bar.update(len(batch))
    if fresh:
        new_vecs = np.vstack(fresh).astype(np.float32)
        cached.update({k: v for (k, _), v in zip(todo, new_vecs, strict=True)})
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            new_keys = np.array([k for k, _ in todo])
            if old_keys is not None and old_vecs is not None and old_vecs.shape[1] == new_vecs.shape[1]:
                new_keys, new_vecs = np.concatenate([old_keys, new_keys]), np.vstack([old_vecs, new_vecs])
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, keys=new_keys, vectors=new_vecs)
            os.replace(tmp, path)
    if not texts:
        return np.zeros((0, embedder.dimension), np.float32)
    return np.vstack([cached[k] for k in keys]).astype(np.float32)


def _pick(n: int, max_samples: int, seed: int) -> np.ndarray:
    if not max_samples or n <= max_samples:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def load_source(
    spec: str, label: str, settings: Settings, *, get_embedder, max_samples: int, seed: int, progress: bool,
    cache_dir: Path | None = None,
) -> Sample:
    """One side of the comparison from a corpus, a vectors file or a service URL (see the module doc)."""
    if _is_url(spec):
        vectors, meta = fetch_query_sample(spec)
        return _query_sample(vectors, meta, label, spec)
    path = Path(spec)
    if not path.exists():
        raise DatasetError(path, "not found")
    corpus = _corpus_file(path)
    if corpus is not None:
        texts, ids, corpus = corpus_texts(path, settings, seed=seed)
        pick = _pick(len(texts), max_samples, seed)
        embedder = get_embedder()
        vectors = embed_texts(embedder, [texts[i] for i in pick], desc=f"embed {label}", progress=progress,
                              cache_dir=cache_dir)
        info = SampleInfo(label=label, source=str(path), kind="corpus", count_available=len(texts),
                          count_used=len(vectors), dimension=int(vectors.shape[1]),
                          encoder_version=embedder.version, dataset_hash=file_sha256(corpus),
                          detail={"corpus": str(corpus), "unit": "one random chunk per document",
                                  "chunk_tokens": settings.chunk_tokens, "chunk_overlap": settings.chunk_overlap})
        return Sample(vectors, info)
    vectors, meta = load_vectors_file(path)
    if meta.get("format", "").startswith("rag-query-sample") or "seq" in meta:
        return _query_sample(vectors, meta, label, str(path))
    detail = {k: v for k, v in meta.items() if k != "document_ids"}
    rows = np.arange(len(vectors))
    doc_ids = meta.get("document_ids")
    if isinstance(doc_ids, list) and len(doc_ids) == len(vectors):
        rows = _one_per_document([str(d) for d in doc_ids], seed)
        detail["unit"] = "one random vector per document"
    info = SampleInfo(label=label, source=str(path), kind="npy", count_available=len(rows), count_used=len(rows),
                      dimension=int(vectors.shape[1]), encoder_version=meta.get("encoder_version"),
                      dataset_hash=file_sha256(path), detail=detail)
    return Sample(vectors[rows], info)


def _query_sample(vectors: np.ndarray, meta: dict[str, Any], label: str, source: str) -> Sample:
    seq = np.asarray(meta.get("seq") or range(len(vectors)), dtype=np.int64)
    if len(seq) != len(vectors):
        raise DatasetError(source, f"{len(seq)} seq numbers for {len(vectors)} vectors")
    order = np.argsort(seq, kind="stable")
    detail = {k: meta[k] for k in ("capacity", "seen", "saved_at") if k in meta}
    ts = meta.get("timestamps") or []
    if len(ts) == len(vectors) and len(ts):
        detail["first_seen"], detail["last_seen"] = int(min(ts)), int(max(ts))
    info = SampleInfo(label=label, source=source, kind="query-sample", count_available=len(vectors),
                      count_used=len(vectors), dimension=int(vectors.shape[1]) if vectors.ndim == 2 else 0,
                      encoder_version=meta.get("encoder_version"), detail=detail)
    return Sample(vectors[order], info, seq[order])


def split_half(sample: Sample, seed: int) -> tuple[Sample, Sample]:
    """Two random halves of a sample's rows (each row is already one document)."""
    perm = np.random.default_rng(seed).permutation(len(sample.vectors))
    half = len(perm) // 2
    out = []
    for name, rows in (("half A", np.sort(perm[:half])), ("half B", np.sort(perm[half:]))):
        info = msgspec.structs.replace(sample.info, label=name, kind=f"{sample.info.kind} (random half)",
                                       count_available=len(rows), count_used=len(rows),
                                       detail={**sample.info.detail, "split": f"{name} of a seeded permutation"})
        out.append(Sample(sample.vectors[rows], info))
    return out[0], out[1]


def split_by_time(sample: Sample) -> tuple[Sample, Sample]:
    """The earlier half (by arrival) of a query sample as reference, the later half as current."""
    half = len(sample.vectors) // 2
    out = []
    for name, rows in (("earlier half", slice(0, half)), ("later half", slice(half, None))):
        seq = sample.seq[rows] if sample.seq is not None else np.arange(len(sample.vectors))[rows]
        info = msgspec.structs.replace(
            sample.info, label=f"queries ({name})", count_available=len(seq), count_used=len(seq),
            detail={**sample.info.detail, "seq_range": [int(seq.min()), int(seq.max())] if len(seq) else []})
        out.append(Sample(sample.vectors[rows], info, seq))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def _encoder_model(name: str | None, settings: Settings) -> str:
    if name in (None, "", "default"):
        return settings.encoder_model
    return name


def _embedder_factory(settings: Settings):
    from rag.embedding import SentenceTransformerEmbedder

    cache: dict[str, Any] = {}

    def get(model: str | None = None):
        key = _encoder_model(model, settings)
        if key not in cache:
            cache[key] = SentenceTransformerEmbedder(key, batch_size=settings.encoder_batch_size,
                                                     device=settings.encoder_device, threads=settings.torch_threads)
        return cache[key]

    return get


def _public_settings(settings: Settings) -> dict[str, Any]:
    out = msgspec.to_builtins(settings, enc_hook=str)
    return {k: ("<redacted>" if "api_key" in k and v else v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _mode(args) -> str:
    if args.encoders:
        if not args.dataset or args.current or args.queries or args.split_half:
            raise DriftUsageError("--encoders A B needs --dataset DIR (and no --current, --queries, --split-half)")
        return "encoders"
    if args.queries:
        if args.current or args.split_half:
            raise DriftUsageError("--queries is the current side: give --reference (optional), not --current")
        return "queries"
    if args.split_half:
        if not args.reference or args.current:
            raise DriftUsageError("--split-half compares two halves of --reference (no --current)")
        return "split-half"
    if args.reference and args.current:
        return "samples"
    raise DriftUsageError("give --reference and --current, --reference with --split-half, --queries, "
                          "or --encoders A B with --dataset")


def build_drift_report(args, settings: Settings, *, embedder=None) -> DriftReport:
    """Load both sides per ``args`` and analyse them; ``embedder`` (tests share one) serves corpus sources."""
    started = time.perf_counter()
    mode = _mode(args)
    max_samples = _checked_max_samples(args, settings)
    progress = not args.no_progress
    cache_dir = None if args.no_cache else Path(args.cache_dir or DEFAULT_CACHE)
    common = {"get_embedder": _embedder_getter(args, settings, embedder), "max_samples": max_samples,
              "seed": args.seed, "progress": progress, "cache_dir": cache_dir}
    notes: list[str] = []
    ref, cur, paired = _load_sides(mode, args, settings, common, embedder, notes)
    load_s = time.perf_counter() - started
    _check_sides(ref, cur, paired, notes)
    thresholds = DriftThresholds.from_settings(settings)
    steps = 4 + int(paired) + int(not args.no_classifier and not paired)
    with tqdm(total=steps, desc="drift", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        report = analyse(ref.vectors, cur.vectors, reference_info=ref.info, current_info=cur.info,
                         thresholds=thresholds, kind=mode, paired=paired, permutations=args.permutations,
                         max_samples=max_samples, seed=args.seed, k=args.k, classifier=not args.no_classifier,
                         bar=bar)
    _add_context(report, ref, cur, settings, notes)
    report.timings_s = {"load_and_embed": round(load_s, 2), **report.timings_s,
                        "total": round(time.perf_counter() - started, 2)}
    return report


def _checked_max_samples(args, settings: Settings) -> int:
    """Rows per side; refuses options under which the analysis could never say anything."""
    max_samples = args.max_samples if args.max_samples is not None else settings.drift_max_samples
    if max_samples < 10:
        raise DriftUsageError("--max-samples must be at least 10")
    if (args.permutations + 1) * settings.drift_p_value < 1:
        raise DriftUsageError(f"with {args.permutations} permutations the smallest p-value is "
                              f"1/{args.permutations + 1}, so p < RAG_DRIFT_P_VALUE={settings.drift_p_value:g} could "
                              f"never happen; use at least {math.ceil(1 / settings.drift_p_value)} permutations")
    return max_samples


def _embedder_getter(args, settings: Settings, embedder):
    """``get_embedder(model=None)``: the shared ``embedder`` for the default model when one is given."""
    factory = _embedder_factory(settings)
    if embedder is not None and not args.encoder:
        def get_embedder(model: str | None = None):
            return embedder if model is None else factory(model)
    else:
        def get_embedder(model: str | None = None):
            return factory(model if model is not None else args.encoder)
    return get_embedder


def _load_sides(mode: str, args, settings: Settings, common: dict[str, Any], embedder,
                notes: list[str]) -> tuple[Sample, Sample, bool]:
    """The reference and current samples of ``mode``, and whether row i of both embeds the same text."""
    if mode == "samples":
        return (load_source(args.reference, "reference", settings, **common),
                load_source(args.current, "current", settings, **common), False)
    if mode == "split-half":
        # Both halves come from one source: load all of it (each half is subsampled later).
        whole = load_source(args.reference, "reference", settings,
                            **{**common, "max_samples": 2 * common["max_samples"]})
        return (*split_half(whole, args.seed), False)
    if mode == "queries":
        return (*_load_queries(args, settings, common, notes), False)
    return (*_load_encoder_pair(args, settings, common, embedder), True)


def _load_queries(args, settings: Settings, common: dict[str, Any], notes: list[str]) -> tuple[Sample, Sample]:
    """The query sample against ``--reference``, or its earlier half against its later half."""
    cur = load_source(args.queries, "current", settings, **common)
    if cur.info.kind != "query-sample":
        notes.append(f"{args.queries} is not a query sample; used as it is")
    if args.reference:
        ref = load_source(args.reference, "reference", settings, **common)
        cur.info.label = "queries"
        return ref, cur
    if len(cur.vectors) < 4:
        raise RagError(f"the query sample holds {len(cur.vectors)} vectors; need at least 4 to split")
    return split_by_time(cur)


def _load_encoder_pair(args, settings: Settings, common: dict[str, Any], embedder) -> tuple[Sample, Sample]:
    """The same chunks of ``--dataset`` embedded by each of the two ``--encoders``."""
    texts, ids, corpus = corpus_texts(Path(args.dataset), settings, seed=args.seed)
    pick = _pick(len(texts), common["max_samples"], args.seed)
    chosen = [texts[i] for i in pick]
    sides = []
    for label, name in zip(("reference", "current"), args.encoders, strict=True):
        enc = common["get_embedder"](name) if not (embedder is not None and name in ("default", "")) else embedder
        vectors = embed_texts(enc, chosen, desc=f"embed {label}", progress=common["progress"],
                              cache_dir=common["cache_dir"])
        sides.append(Sample(vectors, SampleInfo(
            label=f"{label}: {enc.version}", source=name, kind="encoder", count_available=len(texts),
            count_used=len(chosen), dimension=int(vectors.shape[1]), encoder_version=enc.version,
            dataset_hash=file_sha256(corpus), detail={"corpus": str(corpus), "unit": "one random chunk per document",
                                                      "texts": len(chosen)})))
    ref, cur = sides
    return ref, cur


def _check_sides(ref: Sample, cur: Sample, paired: bool, notes: list[str]) -> None:
    for s in (ref, cur):
        if len(s.vectors) < 2:
            raise RagError(f"{s.info.label} ({s.info.source}) holds {len(s.vectors)} vectors; need at least 2")
    versions = {v for v in (ref.info.encoder_version, cur.info.encoder_version) if v}
    if len(versions) > 1 and not paired:
        notes.append(f"the two sides come from different encoders ({', '.join(sorted(versions))}): their vectors "
                     "live in different spaces, so they differ by construction")


def _add_context(report: DriftReport, ref: Sample, cur: Sample, settings: Settings, notes: list[str]) -> None:
    """What a reader of the report needs to reproduce it: encoders, settings, commit, loading notes."""
    from eval.report import git_info

    report.encoder_version = " vs ".join(dict.fromkeys(
        v for v in (ref.info.encoder_version, cur.info.encoder_version) if v)) or None
    report.settings = _public_settings(settings)
    report.git = git_info()
    report.notes += notes


def run_drift(args) -> int:
    """The ``drift`` command: exit 0 (1 on drift with ``--fail-on-drift``; 2 on usage or data errors)."""
    from eval.drift_report import format_summary, write_drift_report
    from rag.settings import settings_for_cli

    overrides: dict[str, object] = {"log_format": "json", "log_level": "warning"}
    settings = settings_for_cli(**overrides)
    if settings is None:
        return 2
    if not args.out:
        print("error: --out DIR is required", file=sys.stderr)
        return 2
    try:
        report = build_drift_report(args, settings)
    except (DriftUsageError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    paths = write_drift_report(report, Path(args.out))
    print(format_summary(report))
    for p in paths.values():
        print(f"wrote {p}")
    return 1 if (args.fail_on_drift and report.verdict == "drift") else 0


# ---------------------------------------------------------------------------------------------
# export: a snapshot of a collection's dense vectors
# ---------------------------------------------------------------------------------------------


def export_snapshot(settings: Settings, out: Path, *, collection: str | None = None, tenant: str | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Write the live dense vectors of ``collection`` (default: the one ``tenant`` searches, its own encoder's
    once it adapted one, else the active one) to ``out`` (.npy) and the collection, encoder, time and each
    row's document id to ``out.with_suffix('.json')``."""
    from rag.index import collection_name
    from rag.registry_factory import open_registry
    from rag.store import open_store

    store = open_store(settings)
    try:
        own = None
        if tenant is not None and collection is None:
            registry = open_registry(settings)
            try:
                own = registry.get_tenant_encoder(tenant)
            finally:
                registry.close()
        name = collection or (collection_name(own) if own else None) or store.get_active()
        if not name:
            raise RagError(f"the store at {settings.data_dir} has no active collection; pass --collection")
        total = store.count(name, tenant=tenant, live=True)
        vectors: list[list[float]] = []
        doc_ids: list[str] = []
        with tqdm(total=total, desc=f"export {name}", unit="vec", disable=not progress, dynamic_ncols=True) as bar:
            for ids, batch in store.iter_dense(name, tenant=tenant, live=True):
                doc_ids += ids
                vectors += batch
                bar.update(len(batch))
    finally:
        store.close()
    matrix = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, matrix)
    version = name.removeprefix("chunks-") if name.startswith("chunks-") else None
    meta = {"format": "rag-vector-snapshot/1", "collection": name, "encoder_version": version, "tenant": tenant,
            "count": len(matrix), "dimension": int(matrix.shape[1]) if matrix.size else 0,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data_dir": str(settings.data_dir), "qdrant_url": settings.qdrant_url or None, "document_ids": doc_ids}
    out.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
    return {k: v for k, v in meta.items() if k != "document_ids"} | {"path": str(out)}


def run_export(args) -> int:
    from rag.settings import settings_for_cli

    if not args.out or Path(args.out).suffix != ".npy":
        print("error: drift export needs --out FILE.npy", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {"log_format": "json", "log_level": "warning"}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    settings = settings_for_cli(**overrides)
    if settings is None:
        return 2
    try:
        meta = export_snapshot(settings, Path(args.out), collection=args.collection, tenant=args.tenant,
                               progress=not args.no_progress)
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {meta['path']}: {meta['count']} vectors of {meta['collection']} "
          f"(dimension {meta['dimension']}) and {Path(meta['path']).with_suffix('.json')}")
    return 0
