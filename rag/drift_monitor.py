"""Embedding drift watched in production (M4 drift, M5 collapse; F1, F4).

When query sampling is on (``RAG_QUERY_SAMPLE_SIZE`` > 0) every encoder that serves queries keeps a
reservoir sample of their vectors (rows numbered by arrival). Every ``RAG_DRIFT_MONITOR_INTERVAL_S``
the monitor compares, per encoder version, the earlier half of that sample (the reference) with the
later half (the current queries): MMD² with a permutation test, the centroid shift (with its own test)
and the per-dimension variance ratio, under the ``RAG_DRIFT_*`` thresholds of ``python -m eval drift``.
The figures go to ``/metrics``; a change is logged as ``drift_detected`` with its reasons; ``GET
/v1/encoders`` shows the last verdict of the tenant's encoder. It runs in a worker thread off the
request path, on at most ``RAG_DRIFT_MAX_SAMPLES`` rows a side, with ``RAG_DRIFT_MONITOR_PERMUTATIONS``
permutations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import structlog

from rag.drift_stats import centroid_shift, drift_reasons, mmd_permutation_test, subsample, variance_stats
from rag.query_sample import QuerySample

__all__ = ["DriftCheck", "check_sample"]

log = structlog.get_logger("rag.drift_monitor")

MIN_ROWS = 40  # per half: fewer queries tell nothing


@dataclass
class DriftCheck:
    encoder_version: str
    verdict: str  # ok | drift | too_few
    reasons: list[str] = field(default_factory=list)
    reference_rows: int = 0
    current_rows: int = 0
    mmd2: float | None = None
    p_value: float | None = None
    centroid_shift: float | None = None
    variance_ratio_min: float | None = None
    checked_at: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_sample(sample: QuerySample, settings: Any, *, seed: int = 0) -> DriftCheck:
    """Earlier half vs later half of the sample, judged by the ``drift_*`` thresholds."""
    t0 = time.perf_counter()
    vectors, seq, _ = sample.arrays()
    order = np.argsort(seq)
    half = len(order) // 2
    out = DriftCheck(encoder_version=sample.encoder_version, verdict="too_few", reference_rows=half,
                     current_rows=len(order) - half, checked_at=time.time())
    if half < MIN_ROWS:
        return out
    ref, _ = subsample(vectors[order[:half]], settings.drift_max_samples, seed)
    cur, _ = subsample(vectors[order[half:]], settings.drift_max_samples, seed + 1)
    permutations = settings.drift_monitor_permutations
    mmd2, p = mmd_permutation_test(ref, cur, permutations, seed)
    centroid = centroid_shift(ref, cur, permutations, seed)
    variance = variance_stats(ref, cur, settings.drift_min_variance_ratio)
    out.reasons = drift_reasons(mmd2, p, centroid, variance, p_value=settings.drift_p_value,
                                min_mmd2=settings.drift_min_mmd2, max_centroid_shift=settings.drift_max_centroid_shift)
    out.verdict = "drift" if out.reasons else "ok"
    out.mmd2, out.p_value = float(mmd2), float(p)
    out.centroid_shift, out.variance_ratio_min = centroid.cosine, variance.ratio_min
    out.seconds = round(time.perf_counter() - t0, 3)
    if out.verdict == "drift":
        log.warning("drift_detected", encoder_version=out.encoder_version, reasons=out.reasons, mmd2=out.mmd2,
                    p_value=out.p_value, centroid_shift=out.centroid_shift)
    else:
        log.info("drift_checked", encoder_version=out.encoder_version, verdict=out.verdict, seconds=out.seconds)
    return out
