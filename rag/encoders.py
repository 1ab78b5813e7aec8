"""The encoder registry: every encoder version the service may search with, and which one is active.

Each adapted version is a folder ``<data_dir>/encoders/<version>/`` holding the sentence-transformers
model and ``record.json`` (base model, parent version, training data hash and counts, parameters,
duration, validation scores, drift against the parent). Base encoders get a record too (``path``
pointing at their own folder or hub name) the first time an adaptation starts from them, so a
rollback can name them like any other version.

The active version is not stored here: the vector store's active pointer (a Qdrant alias on a
server, a pointer file in the embedded engine) names the active collection ``chunks-<version>``, and
:func:`resolve_encoder` maps it back to the model (and runtime) to load. So the query side always embeds with
the encoder whose vectors it searches.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import msgspec

from rag.embedding import model_source, model_version, runtime_for, split_version
from rag.errors import BadRequest, NotFound
from rag.index import collection_name

RECORD = "record.json"
COLLECTION_PREFIX = "chunks-"


class EncoderRecord(msgspec.Struct, kw_only=True):
    version: str
    path: str  # model folder (or hub name for a base encoder)
    base_model: str
    parent: str | None = None
    tenant: str | None = None  # the tenant whose documents trained it (it serves only that tenant); None: shared
    kind: str = "adapted"  # adapted | base
    created_at: float = 0.0
    status: str = "candidate"  # candidate | promoted | rejected | base
    training: dict[str, Any] = msgspec.field(default_factory=dict)  # data hash, counts, parameters, duration
    validation: dict[str, Any] = msgspec.field(default_factory=dict)  # candidate vs parent scores, gate verdict
    drift: dict[str, Any] = msgspec.field(default_factory=dict)  # neighbour overlap with the parent
    promoted_at: float | None = None
    note: str = ""


_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def version_of_collection(name: str | None) -> str | None:
    if name and name.startswith(COLLECTION_PREFIX):
        return name[len(COLLECTION_PREFIX):]
    return None


class EncoderRegistry:
    """Encoder versions as folders with a record; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, version: str) -> Path:
        # A version names a folder: bounded (file systems refuse names over 255 bytes) and path-free.
        if not _VERSION_RE.match(version or ""):
            shown = version if len(version or "") <= 64 else version[:64] + "…"
            raise BadRequest(f"bad encoder version {shown!r}: 1-128 of [A-Za-z0-9._-], not starting with '.'",
                             code="invalid_version")
        return self.root / version

    def list(self) -> list[EncoderRecord]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            rec = p / RECORD
            if p.is_dir() and not p.name.startswith(".") and rec.exists():
                out.append(msgspec.json.decode(rec.read_bytes(), type=EncoderRecord))
        return sorted(out, key=lambda r: r.created_at)

    def get(self, version: str) -> EncoderRecord | None:
        rec = self.folder(version) / RECORD
        if not rec.exists():
            return None
        return msgspec.json.decode(rec.read_bytes(), type=EncoderRecord)

    def require(self, version: str) -> EncoderRecord:
        rec = self.get(version)
        if rec is None:
            known = ", ".join(r.version for r in self.list()) or "none"
            raise NotFound(f"encoder version {version!r} is not in the registry (known: {known})")
        return rec

    def save(self, record: EncoderRecord) -> None:
        folder = self.folder(record.version)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{RECORD}.tmp"
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2))
        os.replace(tmp, folder / RECORD)

    def ensure_base(self, version: str, model: str) -> EncoderRecord:
        """Record a base encoder (not trained here) so that it can be promoted back to."""
        rec = self.get(version)
        if rec is None:
            rec = EncoderRecord(version=version, path=model, base_model=model, kind="base", status="base",
                                created_at=time.time())
            self.save(rec)
        return rec

    def model_path(self, version: str) -> str:
        rec = self.require(version)
        if rec.kind == "base":
            return rec.path
        return str(self.folder(version) / "model")

    def remove(self, version: str) -> None:
        shutil.rmtree(self.folder(version), ignore_errors=True)


def encoder_source(settings, version: str) -> tuple[str, str] | None:
    """The model and runtime that compute ``version``'s vectors, None when neither the registry nor the
    configured model gives it.

    A version with a runtime suffix (``<v>-onnx-int8``) is its base version's model on that runtime; a
    version without one is computed by the configured runtime when that gives fp32 vectors (torch or onnx),
    else by onnx fp32 (:func:`rag.embedding.runtime_for`).
    """
    registry = EncoderRegistry(settings.encoders_dir)
    base, _ = split_version(version)
    runtime = runtime_for(version, settings.encoder_runtime)
    for known in dict.fromkeys((version, base)):
        if registry.get(known) is not None:
            return registry.model_path(known), runtime
    if base == model_version(model_source(settings.encoder_model)):
        return settings.encoder_model, runtime
    return None


def resolve_encoder(settings, store) -> tuple[str, str]:
    """The model and runtime to load so the query side matches the active collection.

    The active collection's version wins when it is known (promoted on purpose, or the configured model
    on another runtime: its vectors are what the collection holds); otherwise the configured
    ``RAG_ENCODER_MODEL`` on ``RAG_ENCODER_RUNTIME`` (its collection becomes active when none is).
    """
    version = version_of_collection(store.get_active())
    if version:
        source = encoder_source(settings, version)
        if source is not None:
            return source
    return settings.encoder_model, settings.encoder_runtime


def describe(record: EncoderRecord, active_version: str | None) -> dict[str, Any]:
    out = msgspec.to_builtins(record)
    out["active"] = record.version == active_version
    out["collection"] = collection_name(record.version)
    return out


class AdaptOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What one adaptation run does (the CLI's flags; the worker's job); settings give the defaults.

    ``pairs_file``/``validation_file`` are paths on the machine running it: only the in-process CLI sets
    them. Over HTTP labelled sets are the tenant's uploaded datasets, named by id (``pairs_dataset``,
    ``validation_dataset``); the API's body (:class:`rag.api.encoders.AdaptIn`) has no path fields.
    """

    pairs_file: str | None = None  # labelled pairs: JSONL {query, document_id} or a BEIR folder
    pairs_split: str = "train"  # qrels split of a BEIR folder
    pairs_dataset: str | None = None  # labelled pairs: an uploaded dataset of the tenant
    validation_file: str | None = None  # labelled validation set (same formats); else held-out generated pairs
    validation_split: str = "dev"
    validation_dataset: str | None = None
    unsupervised: bool = True  # generate title/ICT pairs from the corpus (mixed with labelled ones if any)
    synthetic_questions: int = 0  # passages to write LLM questions for (needs an LLM)
    epochs: int | None = None
    # ≥ 2: choose the epochs from epoch_grid by K-fold cross-validation on the training pairs; 0: off;
    # None: RAG_ADAPT_CV_FOLDS when labelled pairs are given and epochs is not, else off.
    cv_folds: int | None = None
    epoch_grid: list[int] = msgspec.field(default_factory=lambda: [1, 2, 3, 4])
    max_pairs: int | None = None
    max_seq_length: int | None = None
    tenant: str | None = None  # train on (and switch) one tenant; None: every tenant's documents, the default
    promote: bool | None = None  # promote when the gate passes (default: settings.adapt_auto_promote)
    force: bool = False  # promote even when the gate fails (recorded as such)

    @property
    def labelled(self) -> bool:
        return bool(self.pairs_file or self.pairs_dataset)


def check_options(options: AdaptOptions) -> None:
    """Reject a request that cannot run, before any work (the API answers 400, the CLI exits 2)."""
    if options.epochs is not None and not 1 <= options.epochs <= 20:
        raise BadRequest("epochs must be between 1 and 20")
    if options.max_pairs is not None and options.max_pairs < 10:
        raise BadRequest("max_pairs must be at least 10")
    if options.pairs_file and options.pairs_dataset:
        raise BadRequest("give pairs_file or pairs_dataset, not both")
    if options.validation_file and options.validation_dataset:
        raise BadRequest("give validation_file or validation_dataset, not both")
    if not options.unsupervised and not options.labelled and not options.synthetic_questions:
        raise BadRequest("nothing to train on: set unsupervised, pairs_dataset (pairs_file) or synthetic_questions")
    if options.cv_folds:
        if not 2 <= options.cv_folds <= 10:
            raise BadRequest("cv_folds must be 0 (off) or between 2 and 10")
        if not options.labelled:
            raise BadRequest("cv_folds chooses epochs on labelled pairs: give pairs_dataset (or pairs_file)")
        if options.epochs is not None:
            raise BadRequest("give either epochs or cv_folds (which chooses the epochs), not both")
    if options.cv_folds != 0 and (not options.epoch_grid or any(not 1 <= e <= 20 for e in options.epoch_grid)):
        raise BadRequest("epoch_grid must list epoch counts between 1 and 20")
