"""The frozen reference each encoder version's live queries are compared with (the drift monitor's baseline).

One file per encoder version, ``<encoders_dir>/<version>/drift-reference.npz`` (beside the version's
model, so backups and restores carry it), holding the reference query vectors and what they are:

- ``promotion``: saved when the version was promoted, from the query vectors its gate computed with the
  version itself on the validation queries. Only a labelled validation set gives one (real queries: a
  dataset, feedback); generated pairs (titles, sentences of the corpus) do not look like what users ask,
  and a set smaller than the monitor's minimum (:data:`MIN_ROWS`) tells nothing. A promotion reference
  replaces any earlier one of that version.
- ``live``: otherwise the first ``RAG_DRIFT_REFERENCE_ROWS`` queries the version served (the query
  sample keeps them apart from its reservoir), saved once by the monitor and never changed afterwards.

Writes are atomic (temporary file, then rename); a live reference is linked into place only when no
reference exists, so two processes never replace each other's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from rag.encoders import EncoderRegistry
from rag.query_sample import QuerySample

__all__ = ["GATE_FILE", "MIN_ROWS", "REFERENCE_FILE", "Reference", "adopt_at_promotion", "freeze_live",
           "load_reference", "reference_path", "save_gate_queries", "save_reference"]

log = structlog.get_logger("rag.drift_reference")

REFERENCE_FILE = "drift-reference.npz"
GATE_FILE = "drift-gate-queries.npz"  # the gate's query vectors, waiting for a promotion
FORMAT = "rag-drift-reference/1"
MIN_ROWS = 40  # per side: fewer queries tell nothing


@dataclass
class Reference:
    encoder_version: str
    source: str  # promotion | live
    vectors: np.ndarray
    created_at: float = 0.0
    sample_id: str = ""  # live: the query sample it was frozen from (its later rows are the recent queries)
    last_seq: int = -1  # live: the arrival number of its last row in that sample
    detail: dict[str, Any] = field(default_factory=dict)  # promotion: the validation set it came from

    @property
    def rows(self) -> int:
        return len(self.vectors)

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "encoder_version": self.encoder_version, "source": self.source, "rows": self.rows,
                "created_at": self.created_at, "sample_id": self.sample_id, "last_seq": self.last_seq,
                "detail": self.detail}


def reference_path(encoders_dir: Path, version: str) -> Path:
    return EncoderRegistry(encoders_dir).folder(version) / REFERENCE_FILE


def _write(path: Path, vectors: np.ndarray, meta: dict[str, Any], *, replace: bool) -> bool:
    """Write ``path`` atomically; with ``replace`` False only if it does not exist yet (True when written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, vectors=np.asarray(vectors, np.float32), meta=np.array(json.dumps(meta)))
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if a reference is there: the first one stays
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: a narrower race, same rule
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        return data["vectors"].astype(np.float32), json.loads(str(data["meta"]))


def save_reference(encoders_dir: Path, ref: Reference, *, replace: bool) -> bool:
    written = _write(reference_path(encoders_dir, ref.encoder_version), ref.vectors, ref.meta(), replace=replace)
    if written:
        log.info("drift_reference_saved", encoder_version=ref.encoder_version, source=ref.source, rows=ref.rows)
    return written


def load_reference(encoders_dir: Path, version: str) -> Reference | None:
    """The version's reference, None when it has none yet."""
    got = _read(reference_path(encoders_dir, version))
    if got is None:
        return None
    vectors, meta = got
    return Reference(encoder_version=version, source=meta["source"], vectors=vectors,
                     created_at=float(meta.get("created_at", 0.0)), sample_id=meta.get("sample_id", ""),
                     last_seq=int(meta.get("last_seq", -1)), detail=meta.get("detail", {}))


def freeze_live(encoders_dir: Path, sample: QuerySample, rows: int) -> Reference | None:
    """The version's reference: the one on disk, else the sample's first ``rows`` queries saved as it (once
    that many were seen), else None."""
    ref = load_reference(encoders_dir, sample.encoder_version)
    if ref is not None:
        return ref
    first = sample.first()
    if len(first) < rows:
        return None
    ref = Reference(encoder_version=sample.encoder_version, source="live", vectors=first[:rows],
                    created_at=time.time(), sample_id=sample.id, last_seq=rows - 1)
    save_reference(encoders_dir, ref, replace=False)
    return load_reference(encoders_dir, sample.encoder_version)  # this one, or one another process saved first


def save_gate_queries(folder: Path, vectors: np.ndarray, *, validation: str, labelled: bool) -> bool:
    """At the gate: keep the candidate's validation query vectors in its folder for :func:`adopt_at_promotion`.
    Only a labelled set of at least :data:`MIN_ROWS` queries is kept (True when kept)."""
    vectors = np.asarray(vectors, np.float32)
    if not labelled or len(vectors) < MIN_ROWS:
        return False
    _write(Path(folder) / GATE_FILE, vectors, {"validation": validation, "rows": len(vectors)}, replace=True)
    return True


def adopt_at_promotion(encoders_dir: Path, version: str) -> Reference | None:
    """At promotion: the gate's query vectors become ``version``'s reference (replacing a live one); None when
    its gate kept none."""
    got = _read(EncoderRegistry(encoders_dir).folder(version) / GATE_FILE)
    if got is None:
        return None
    vectors, meta = got
    ref = Reference(encoder_version=version, source="promotion", vectors=vectors, created_at=time.time(),
                    detail={"validation": meta.get("validation", "")})
    save_reference(encoders_dir, ref, replace=True)
    return ref
