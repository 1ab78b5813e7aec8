"""Embedding drift watched in production (M4 drift, M5 collapse; F1, F4).

When query sampling is on (``RAG_QUERY_SAMPLE_SIZE`` > 0) every encoder that serves queries keeps a
reservoir sample of their vectors (rows numbered by arrival). Every ``RAG_DRIFT_MONITOR_INTERVAL_S``
the monitor compares, per encoder version, that version's frozen reference (:mod:`rag.drift_reference`:
the validation queries saved at its promotion, else its first ``RAG_DRIFT_REFERENCE_ROWS`` live
queries, saved once) with the recent queries: the sample's rows that arrived after the reference was
taken, the newest ``RAG_DRIFT_MAX_SAMPLES`` of them. Since the reference never moves, slow drift adds
up until it shows. The statistics are those of ``python -m eval drift``: MMD² with a permutation test,
the centroid shift (with its own test) and the per-dimension variance ratio, under the ``RAG_DRIFT_*``
thresholds. The figures go to ``/metrics``; a change is logged as ``drift_detected`` with its reasons;
``GET /v1/encoders`` shows the last verdict of the tenant's encoder with the reference's source and
rows. It runs in a worker thread off the request path, on at most ``RAG_DRIFT_MAX_SAMPLES`` rows a
side, with ``RAG_DRIFT_MONITOR_PERMUTATIONS`` permutations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog

from rag.drift_reference import MIN_ROWS, Reference, freeze_live
from rag.drift_stats import centroid_shift, drift_reasons, mmd_permutation_test, subsample, variance_stats
from rag.query_sample import QuerySample

__all__ = ["DriftCheck", "MIN_ROWS", "check_against", "check_sample", "recent_rows"]

log = structlog.get_logger("rag.drift_monitor")


@dataclass
class DriftCheck:
    encoder_version: str
    verdict: str  # ok | drift | too_few (no reference yet, or fewer than MIN_ROWS recent queries)
    reasons: list[str] = field(default_factory=list)
    reference_source: str = ""  # promotion | live; "" while the version has no reference
    reference_rows: int = 0
    reference_created_at: float | None = None
    current_rows: int = 0
    mmd2: float | None = None
    p_value: float | None = None
    centroid_shift: float | None = None
    variance_ratio_min: float | None = None
    checked_at: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recent_rows(sample: QuerySample, reference: Reference, max_rows: int) -> np.ndarray:
    """The sample's rows that arrived after ``reference`` was taken (all of them when it was taken from another
    sample or at a promotion), the newest ``max_rows`` of them (all if 0)."""
    vectors, seq, _ = sample.arrays()  # in arrival order
    if reference.sample_id == sample.id:
        vectors = vectors[seq > reference.last_seq]
    return vectors[-max_rows:] if max_rows else vectors


def check_sample(sample: QuerySample, settings: Any, *, seed: int = 0) -> DriftCheck:
    """The version's reference (frozen from the sample's first queries if it has none yet) against its recent
    queries, judged by the ``drift_*`` thresholds."""
    reference = freeze_live(settings.encoders_dir, sample, settings.drift_reference_rows)
    return check_against(reference, sample, settings, seed=seed)


def check_against(reference: Reference | None, sample: QuerySample, settings: Any, *, seed: int = 0) -> DriftCheck:
    t0 = time.perf_counter()
    out = DriftCheck(encoder_version=sample.encoder_version, verdict="too_few", checked_at=time.time())
    if reference is None:
        out.current_rows = len(sample)
        return out
    current = recent_rows(sample, reference, settings.drift_max_samples)
    out.reference_source, out.reference_rows = reference.source, reference.rows
    out.reference_created_at, out.current_rows = reference.created_at, len(current)
    if reference.rows < MIN_ROWS or len(current) < MIN_ROWS:
        return out
    ref, _ = subsample(reference.vectors, settings.drift_max_samples, seed)
    permutations = settings.drift_monitor_permutations
    mmd2, p = mmd_permutation_test(ref, current, permutations, seed)
    centroid = centroid_shift(ref, current, permutations, seed)
    variance = variance_stats(ref, current, settings.drift_min_variance_ratio)
    out.reasons = drift_reasons(mmd2, p, centroid, variance, p_value=settings.drift_p_value,
                                min_mmd2=settings.drift_min_mmd2, max_centroid_shift=settings.drift_max_centroid_shift)
    out.verdict = "drift" if out.reasons else "ok"
    out.mmd2, out.p_value = float(mmd2), float(p)
    out.centroid_shift, out.variance_ratio_min = centroid.cosine, variance.ratio_min
    out.seconds = round(time.perf_counter() - t0, 3)
    if out.verdict == "drift":
        log.warning("drift_detected", encoder_version=out.encoder_version, reasons=out.reasons, mmd2=out.mmd2,
                    p_value=out.p_value, centroid_shift=out.centroid_shift, reference_source=out.reference_source,
                    reference_rows=out.reference_rows, current_rows=out.current_rows)
    else:
        log.info("drift_checked", encoder_version=out.encoder_version, verdict=out.verdict, seconds=out.seconds,
                 reference_source=out.reference_source)
    return out
