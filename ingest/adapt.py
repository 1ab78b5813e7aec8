"""Domain adaptation: pairs → contrastive fine-tune → gate (promotion is :mod:`ingest.promotion`).

``adapt`` trains a candidate encoder version from the active one and evaluates both on a validation
set (labelled when given, else held-out documents of the generated pairs); the record keeps both
scores, the verdict and the neighbour-overlap drift between the two. Its steps are the functions
below, in the order it calls them. Where the rooms are:

- ``ingest/pairs.py``: training pairs (titles, inverse cloze, LLM questions, labels) and hard negatives;
- ``ingest/training.py``: the contrastive fine-tune (torch, loaded only when training);
- ``ingest/gate.py``: ranking and scoring on the validation set, the cross-validated choice of epochs;
- ``ingest/promotion.py``: ``promote`` / ``rollback`` / ``prune`` (blue/green switching), re-exported
  here with :class:`Progress` and :class:`AdaptOptions` for the worker and the CLI.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import dataclasses
import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from ingest.background import Compute, compute_for
from ingest.gate import EVAL_K, cross_validate_epochs, document_key, score_encoder, validation_set
from ingest.pairs import (
    Pair, Passage, ict_pairs, labelled_pairs, load_passages, mine_hard_negatives, pairs_hash, passage_text,
    read_labelled, split_validation, title_pairs,
)
from ingest.progress import Progress
from ingest.promotion import promote, prune, rollback
from rag.drift_reference import save_gate_queries
from rag.embedding import Embedder, neighbour_overlap, runtime_for
from rag.encoders import AdaptOptions, EncoderRecord, EncoderRegistry, check_options
from rag.errors import BadRequest
from rag.index import collection_name
from rag.settings import Settings
from rag.sparse import SparseEncoder
from rag.store import VectorStore

__all__ = [
    "AdaptOptions",
    "Progress",
    "adapt",
    "candidate_version",
    "promote",
    "prune",
    "rollback",
    "should_promote",
    "synthetic_questions",
]

log = structlog.get_logger("ingest.adapt")


@dataclass
class AdaptRun:
    """What every step of one adaptation reads: the request, the active encoder, and the corpus under it."""

    settings: Settings
    store: VectorStore
    embedder: Embedder  # the active encoder (its model_name is the folder it was loaded from)
    options: AdaptOptions
    progress: Progress
    registry: EncoderRegistry
    collection: str  # the active collection
    parent: str  # the active encoder's version
    parent_record: EncoderRecord
    passages: list[Passage]
    vectors: np.ndarray  # the passages under the active encoder
    rng: random.Random
    work_key: str
    datasets: Callable[[str], list[tuple[str, str]]] | None = None  # the tenant's uploaded datasets by id
    compute: Compute | None = None  # where training and the candidate's encodes run (None: this thread)

    @property
    def seed(self) -> int:
        return self.settings.adapt_seed


@dataclass(frozen=True)
class TrainingSet:
    train: list[Pair]
    validation: list[Pair]
    validation_kind: str  # "labelled:<file>", "held-out labelled pairs" or "held-out generated pairs"
    hard_negatives_mined: int = 0


@dataclass(frozen=True)
class Candidate:
    version: str
    folder: Path  # the registry folder of the version
    work: Path  # checkpoints, removed once the candidate is gated
    training: dict[str, Any]


def adapt(settings: Settings, store: VectorStore, embedder: Embedder, options: AdaptOptions, *,
          progress: Progress | None = None, work_key: str = "cli", llm_questions=None,
          datasets: Callable[[str], list[tuple[str, str]]] | None = None,
          compute: Compute | None = None) -> EncoderRecord:
    """Train and gate a candidate from ``embedder``: the encoder ``options.tenant`` searches with (the default's
    for None), over that tenant's documents in that encoder's collection. ``datasets`` reads a labelled
    dataset of the tenant by id (``pairs_dataset`` / ``validation_dataset``); ``compute`` runs the training and
    the candidate's encodes (the worker's background process; default: this thread)."""
    check_options(options)
    started = time.perf_counter()
    run = start_run(settings, store, embedder, options, progress or Progress(), work_key)
    run.datasets = datasets
    run.compute = compute_for(settings, compute)
    generated, labelled = collect_pairs(run, llm_questions)
    data = mine_negatives(run, choose_validation(run, generated, labelled))
    candidate = train_candidate(run, data.train)
    return gate_candidate(run, data, candidate, started)


def start_run(settings: Settings, store: VectorStore, embedder: Embedder, options: AdaptOptions,
              progress: Progress, work_key: str) -> AdaptRun:
    """Step 0: the active encoder (recorded as a base version the first time) and the corpus under it."""
    registry = EncoderRegistry(settings.encoders_dir)
    parent = embedder.version
    collection = collection_name(parent)
    if collection not in store.list_collections():
        raise BadRequest(f"no collection for encoder {parent}: ingest documents before adapting the encoder")
    parent_record = registry.get(parent) or registry.ensure_base(parent, embedder.model_name)
    rng = random.Random(settings.adapt_seed)
    progress("reading the corpus", 0.0)
    passages, vectors = load_passages(store, collection, tenant=options.tenant)
    if not passages:
        raise BadRequest("the corpus is empty: nothing to adapt to")
    return AdaptRun(settings=settings, store=store, embedder=embedder, options=options, progress=progress,
                    registry=registry, collection=collection, parent=parent, parent_record=parent_record,
                    passages=passages, vectors=vectors, rng=rng, work_key=work_key)


def collect_pairs(run: AdaptRun, llm_questions=None) -> tuple[list[Pair], list[Pair]]:
    """Step 1: generated pairs (titles, inverse cloze, LLM questions; at most ``max_pairs``) and labelled ones."""
    options = run.options
    generated: list[Pair] = []
    if options.unsupervised:
        generated += title_pairs(run.passages)
        generated += ict_pairs(run.passages, run.rng)
    if options.synthetic_questions:
        generated += synthetic_questions(run.settings, run.passages, run.vectors, run.embedder,
                                         options.synthetic_questions, run.rng, llm=llm_questions)
    labelled: list[Pair] = []
    if options.pairs_file or options.pairs_dataset:
        labelled = _labelled(run, options.pairs_file, options.pairs_split, options.pairs_dataset)
    max_pairs = options.max_pairs or run.settings.adapt_max_pairs
    if len(generated) > max_pairs:
        generated = run.rng.sample(generated, max_pairs)
    if not generated and not labelled:
        raise BadRequest("no training pairs: the corpus has no titles or multi-sentence passages, and no labels were given")
    return generated, labelled


def _labelled(run: AdaptRun, path: str | None, split: str, dataset: str | None = None) -> list[Pair]:
    """Labelled pairs from a file (the in-process CLI) or from one of the tenant's uploaded datasets."""
    if dataset is not None:
        if run.datasets is None:
            raise BadRequest("labelled datasets are read through the registry: run the adaptation as a job")
        labels = run.datasets(dataset)
    else:
        labels = read_labelled(Path(str(path)), split)
    return labelled_pairs(labels, run.passages, run.vectors, run.embedder.embed_queries, tenant=run.options.tenant)


def choose_validation(run: AdaptRun, generated: list[Pair], labelled: list[Pair]) -> TrainingSet:
    """Step 2: validation pairs, labelled if given, else held-out documents of the pairs; the rest trains."""
    fraction, seed = run.settings.adapt_validation_fraction, run.seed
    if run.options.validation_file or run.options.validation_dataset:
        val_pairs = _labelled(run, run.options.validation_file, run.options.validation_split,
                              run.options.validation_dataset)
        train_pairs = generated + labelled
        val_kind = f"labelled:{run.options.validation_dataset or run.options.validation_file}"
    else:
        train_gen, val_gen = split_validation(generated, fraction, seed)
        if labelled:
            train_lab, val_lab = split_validation(labelled, fraction, seed)
            train_pairs, val_pairs = train_gen + train_lab, val_lab or val_gen
            val_kind = "held-out labelled pairs" if val_lab else "held-out generated pairs"
        else:
            train_pairs, val_pairs = train_gen, val_gen
            val_kind = "held-out generated pairs"
    if not val_pairs:
        raise BadRequest("no validation pairs: give a validation set or a larger corpus")
    # A held-out split already separates whole documents; a given validation set must at least not be trained on.
    val_queries = {p.query for p in val_pairs}
    train_pairs = [p for p in train_pairs if p.query not in val_queries]
    if not train_pairs:
        raise BadRequest("no training pairs left once the validation queries are set aside")
    return TrainingSet(train=train_pairs, validation=val_pairs, validation_kind=val_kind)


def mine_negatives(run: AdaptRun, data: TrainingSet) -> TrainingSet:
    """Step 3: a hard negative per training pair (current encoder + BM25), or none at all."""
    settings = run.settings
    if not (settings.adapt_hard_negatives or settings.adapt_teacher_model):  # MarginMSE needs a negative per pair
        return data
    run.progress("mining hard negatives", 0.0)
    sparse = SparseEncoder()

    def sparse_search(query: str, tenant: str) -> list[str]:
        hits = run.store.search(run.collection, None, tenant=tenant, top_k=40, mode="sparse",
                                sparse_vector=sparse.encode_query(query))
        return [h.id for h in hits]

    train = data.train
    mined = mine_hard_negatives(train, run.passages, run.vectors, run.embedder.embed_queries, sparse_search,
                                seed=run.seed)
    if mined >= 0.8 * len(train):  # the loss takes a negative for every pair or for none
        train = [p for p in train if p.negative]
    else:
        for p in train:
            p.negative = p.negative_document_id = None
    return dataclasses.replace(data, train=train, hard_negatives_mined=mined)


def train_candidate(run: AdaptRun, train_pairs: list[Pair]) -> Candidate:
    """Step 4: train the candidate (the epochs given, or chosen by cross-validation on the labelled training pairs)."""
    settings, options = run.settings, run.options
    max_seq_length = options.max_seq_length or settings.adapt_max_seq_length
    epochs = options.epochs or settings.adapt_epochs
    selection = None
    data_hash = pairs_hash(train_pairs)
    folds = cv_folds(settings, options)
    if folds:
        cv_work = settings.encoders_dir / ".work" / f"cv-{data_hash}-{run.work_key}"
        selection = cross_validate_epochs(train_pairs, run.passages, run.registry.model_path(run.parent), cv_work,
                                          settings, folds=folds, grid=options.epoch_grid,
                                          max_seq_length=max_seq_length, seed=run.seed, progress=run.progress,
                                          teacher=settings.adapt_teacher_model, compute=run.compute)
        epochs = selection["chosen_epochs"]
        shutil.rmtree(cv_work, ignore_errors=True)
    version = candidate_version(run.parent, data_hash, settings, epochs=epochs, max_seq_length=max_seq_length,
                                tenant=options.tenant)
    folder = run.registry.folder(version)
    work = settings.encoders_dir / ".work" / f"{version}-{run.work_key}"
    work.mkdir(parents=True, exist_ok=True)
    run.progress("training", 0.0)
    training = compute_for(settings, run.compute).train(
        train_pairs, run.registry.model_path(run.parent), folder / "model", work, settings, epochs=epochs,
        max_seq_length=max_seq_length, seed=run.seed, progress=run.progress, teacher=settings.adapt_teacher_model)
    if selection is not None:
        training["epoch_selection"] = selection
    (folder / "model" / "rag_version.txt").write_text(version + "\n")
    return Candidate(version=version, folder=folder, work=work, training=training)


def gate_candidate(run: AdaptRun, data: TrainingSet, cand: Candidate, started: float) -> EncoderRecord:
    """Step 5: both encoders on the validation set over the whole corpus; the record keeps both scores and the verdict."""
    settings = run.settings
    run.progress("evaluating", 0.0)
    # On the runtime that will serve the version (an fp32 one: onnx exports it here, and promotion reuses the export).
    candidate = compute_for(settings, run.compute).encoder(str(cand.folder / "model"),
                                                           runtime=runtime_for(cand.version, settings.encoder_runtime))
    cand_vectors, embed_seconds = embed_corpus(run, candidate, cand.folder)
    queries, relevant = validation_set(data.validation)
    docs = [document_key(p.tenant, p.document_id) for p in run.passages]
    before = score_encoder(run.embedder, run.vectors, docs, queries, relevant)
    cand_queries = np.asarray(candidate.embed_queries(list(queries)), np.float32)
    after = score_encoder(candidate, cand_vectors, docs, queries, relevant, query_vectors=cand_queries)
    # A labelled validation set is real queries: promoted, this version's drift monitor starts from them.
    save_gate_queries(cand.folder, cand_queries, validation=data.validation_kind,
                      labelled=not data.validation_kind.endswith("generated pairs"))
    metric = settings.adapt_gate_metric
    gain = after[metric] - before[metric]
    passed = gain >= settings.adapt_gate_margin
    n = len(run.passages)
    sample = np.random.default_rng(run.seed).choice(n, size=min(1000, n), replace=False)
    overlap = float(neighbour_overlap(run.vectors, cand_vectors, EVAL_K, sample).mean()) if n > EVAL_K else 1.0
    record = EncoderRecord(
        version=cand.version, path=str(cand.folder / "model"), base_model=run.parent_record.base_model,
        parent=run.parent, tenant=run.options.tenant, created_at=time.time(), status="candidate" if passed else "rejected",
        training={**cand.training, "pairs": len(data.train),
                  "pairs_by_source": dict(collections.Counter(p.source for p in data.train)),
                  "hard_negatives_mined": data.hard_negatives_mined, "data_hash": pairs_hash(data.train),
                  "corpus_passages": n, "corpus_documents": len(set(docs)), "labelled_file": run.options.pairs_file,
                  "labelled_dataset": run.options.pairs_dataset,
                  "duration_seconds": round(time.perf_counter() - started, 1),
                  "corpus_embed_seconds": round(embed_seconds, 1)},
        validation={"set": data.validation_kind, "labelled": not data.validation_kind.endswith("generated pairs"),
                    "queries": len(queries), "metric": metric, "margin": settings.adapt_gate_margin,
                    "active": {k: round(v, 4) for k, v in before.items()},
                    "candidate": {k: round(v, 4) for k, v in after.items()},
                    "gain": round(gain, 4), "passed": passed},
        drift={"neighbour_overlap@10": round(overlap, 4), "against": run.parent},
    )
    run.registry.save(record)
    shutil.rmtree(cand.work, ignore_errors=True)
    log.info("adapt_gated", version=cand.version, parent=run.parent, metric=metric, active=round(before[metric], 4),
             candidate=round(after[metric], 4), passed=passed, overlap=round(overlap, 4))
    return record


def embed_corpus(run: AdaptRun, candidate: Embedder, folder: Path) -> tuple[np.ndarray, float]:
    """The corpus under the candidate (and the seconds it took), saved in its folder for a promotion to reuse."""
    texts = [passage_text(p) for p in run.passages]
    t0 = time.perf_counter()
    parts = []
    for start in range(0, len(texts), 512):  # in parts, so progress (and the job's lease) keeps moving
        parts.append(candidate.embed_documents(texts[start:start + 512]))
        run.progress("embedding the corpus with the candidate", min(1.0, (start + 512) / len(texts)))
    vectors = np.concatenate(parts) if parts else np.zeros((0, candidate.dimension), np.float32)
    seconds = time.perf_counter() - t0
    np.save(folder / "corpus-vectors.npy", vectors)
    (folder / "corpus-ids.json").write_text(json.dumps([p.id for p in run.passages]))
    return vectors, seconds


def synthetic_questions(settings: Settings, passages, vectors, embedder, n: int, rng, *, llm=None) -> list[Pair]:
    """Questions written by the configured LLM (RAG_LLM_BASE_URL, else the bundled llama-server)."""
    from ingest.pairs import synthetic_question_pairs
    from rag.llm import OpenAICompatibleLLM

    server = None
    if llm is None:
        if settings.llm_base_url:
            llm = OpenAICompatibleLLM.from_settings(settings)
        else:
            from rag.local_llm import MODEL_NAME, LocalLLMServer, local_llm_paths

            if local_llm_paths() is None:
                raise BadRequest("synthetic questions need an LLM: set RAG_LLM_BASE_URL or install the local one")
            server = LocalLLMServer(log_path=settings.data_dir / "llama-server-adapt.log")
            server.start()
            llm = OpenAICompatibleLLM(server.base_url, MODEL_NAME, max_tokens=64, temperature=0.0)
    try:
        return synthetic_question_pairs(llm, passages, vectors, embedder.embed_queries, n, rng=rng)
    finally:
        if server is not None:
            server.stop()


def should_promote(settings: Settings, record: EncoderRecord, options: AdaptOptions) -> bool:
    """Promote after training when asked (or by default) and the gate passed on a set that resembles real queries.

    Held-out generated pairs (titles, inverse cloze) are not such a set: on SciFact an unsupervised
    candidate won on them (nDCG@10 0.904 → 0.933) while losing 0.034 on the benchmark's real queries,
    so without labelled validation a passing candidate waits for an explicit promote unless
    RAG_ADAPT_PROMOTE_UNLABELLED says otherwise.
    """
    wanted = settings.adapt_auto_promote if options.promote is None else options.promote
    if not wanted:
        return False
    if options.force:
        return True
    passed = bool(record.validation.get("passed"))
    return passed and (record.validation.get("labelled", False) or settings.adapt_promote_unlabelled
                       or options.promote is True)


def cv_folds(settings: Settings, options: AdaptOptions) -> int:
    """How many folds choose the epochs: as asked; by default RAG_ADAPT_CV_FOLDS when labelled pairs are given
    and no epoch count is (validation chose 2 epochs over the 1 a fixed default ran, on SciFact), else none."""
    if options.cv_folds is not None:
        return options.cv_folds
    labelled = bool(options.pairs_file or options.pairs_dataset)
    return settings.adapt_cv_folds if labelled and options.epochs is None else 0


def candidate_version(parent: str, data_hash: str, settings: Settings, *, epochs: int, max_seq_length: int,
                      tenant: str | None = None) -> str:
    """A readable, deterministic name: same parent, tenant, pairs and parameters → same version (so a retry resumes)."""
    base = parent.split("-ft")[0][:40]
    owner = "" if tenant is None else f"{tenant}|"
    h = hashlib.sha256(f"{owner}{parent}|{data_hash}|{epochs}|{settings.adapt_batch_size}|"
                       f"{settings.adapt_learning_rate}|{max_seq_length}|{settings.adapt_seed}|"
                       f"{settings.adapt_teacher_model}".encode()).hexdigest()[:10]
    return f"{base}-ft{h}"
