"""Embedding drift: is a current sample of embeddings distributed like a reference sample?

One :class:`DriftReport` struct that holds every figure, :func:`analyse`, which computes them as
named steps, and :func:`verdict`, which compares them with the thresholds in the settings. The
statistics themselves (MMD, classifier test, centroid shift, variance, nearest similarity, neighbour
overlap, histograms) live in :mod:`rag.drift_stats` (the service's drift monitor uses them too) and are re-exported here, so callers import
everything drift from one place.

Large inputs are subsampled (seeded) to ``max_samples`` rows per side, so one comparison costs seconds.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np

from rag.drift_stats import (
    drift_reasons,
    NEAR_ZERO_VARIANCE,
    NOVELTY_QUANTILE,
    CentroidShift,
    ClassifierTest,
    Histogram,
    MmdTest,
    NearestStats,
    OverlapStats,
    VarianceStats,
    as_embeddings,
    centroid_shift,
    classifier_test,
    histogram,
    median_gamma,
    mmd_permutation_test,
    mmd_rbf,
    nearest_similarity,
    neighbour_overlap_at_k,
    overlap_stats,
    subsample,
    variance_stats,
)

__all__ = [
    "NEAR_ZERO_VARIANCE",
    "NOVELTY_QUANTILE",
    "REPORT_SCHEMA",
    "CentroidShift",
    "ClassifierTest",
    "DriftReport",
    "DriftThresholds",
    "Histogram",
    "MmdTest",
    "NearestStats",
    "OverlapStats",
    "SampleInfo",
    "VarianceStats",
    "analyse",
    "centroid_shift",
    "classifier_test",
    "histogram",
    "median_gamma",
    "mmd_permutation_test",
    "mmd_rbf",
    "nearest_similarity",
    "neighbour_overlap_at_k",
    "overlap_stats",
    "subsample",
    "variance_stats",
    "verdict",
]

REPORT_SCHEMA = "rag-eval/drift/1"


# ---------------------------------------------------------------------------------------------
# Report structs
# ---------------------------------------------------------------------------------------------


class DriftThresholds(msgspec.Struct, kw_only=True, frozen=True):
    """What turns figures into a verdict; built from the ``drift_*`` settings."""

    p_value: float = 0.01
    min_mmd2: float = 0.001
    max_centroid_shift: float = 0.02
    min_variance_ratio: float = 0.1
    min_neighbour_overlap: float = 0.5

    @classmethod
    def from_settings(cls, settings: Any) -> DriftThresholds:
        return cls(p_value=settings.drift_p_value, min_mmd2=settings.drift_min_mmd2,
                   max_centroid_shift=settings.drift_max_centroid_shift,
                   min_variance_ratio=settings.drift_min_variance_ratio,
                   min_neighbour_overlap=settings.drift_min_neighbour_overlap)


class SampleInfo(msgspec.Struct, kw_only=True):
    label: str  # "reference" / "current" (or the encoder's name)
    source: str  # path or URL it came from
    kind: str  # corpus | corpus-half | npy | query-sample | encoder
    count_available: int  # vectors (or chunks) the source held
    count_used: int  # after subsampling
    dimension: int
    encoder_version: str | None = None
    dataset_hash: str | None = None  # sha256 of the corpus file (corpus sources)
    detail: dict[str, Any] = msgspec.field(default_factory=dict)


class DriftReport(msgspec.Struct, kw_only=True):
    schema: str = REPORT_SCHEMA
    created_at: str = ""
    kind: str = "samples"  # samples | split-half | encoders | queries
    verdict: str = "ok"  # ok | drift
    reasons: list[str] = msgspec.field(default_factory=list)
    reference: SampleInfo
    current: SampleInfo
    encoder_version: str | None = None
    mmd: MmdTest | None = None
    classifier: ClassifierTest | None = None
    centroid: CentroidShift | None = None
    variance: VarianceStats | None = None
    nearest: NearestStats | None = None
    overlap: OverlapStats | None = None
    thresholds: DriftThresholds = msgspec.field(default_factory=DriftThresholds)
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    git: dict[str, Any] = msgspec.field(default_factory=dict)
    histograms: list[Histogram] = msgspec.field(default_factory=list)
    timings_s: dict[str, float] = msgspec.field(default_factory=dict)
    notes: list[str] = msgspec.field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Verdict and the whole analysis
# ---------------------------------------------------------------------------------------------


def verdict(report: DriftReport, thresholds: DriftThresholds) -> tuple[str, list[str]]:
    """``("ok" | "drift", reasons)``: drift when any figure crosses its threshold.

    - distribution: the MMD permutation test rejects (p < ``p_value``) *and* MMD² is at least
      ``min_mmd2``, so a large sample does not alarm on a statistically real but negligible change;
    - centroid: the cosine distance between the mean vectors exceeds ``max_centroid_shift`` and its
      permutation test rejects too (p < ``p_value``);
    - collapse: a dimension's variance fell below ``min_variance_ratio`` of the reference's;
    - encoders: mean neighbour overlap@k is below ``min_neighbour_overlap``.

    Two encoders (a paired report) are judged on the overlap alone: their vectors live in two spaces,
    so a distribution test between them rejects for any real change of encoder; it is reported only.
    """
    reasons: list[str] = []
    t = thresholds
    if report.overlap is not None:
        if report.overlap.mean < t.min_neighbour_overlap:
            reasons.append(f"neighbours: mean overlap@{report.overlap.k} {report.overlap.mean:.3f} < "
                           f"{t.min_neighbour_overlap:g}")
        return ("drift" if reasons else "ok"), reasons
    mmd = report.mmd
    reasons += drift_reasons(mmd.mmd2 if mmd else None, mmd.p_value if mmd else None, report.centroid,
                             report.variance, p_value=t.p_value, min_mmd2=t.min_mmd2,
                             max_centroid_shift=t.max_centroid_shift)
    return ("drift" if reasons else "ok"), reasons


def analyse(
    reference: np.ndarray, current: np.ndarray, *, reference_info: SampleInfo, current_info: SampleInfo,
    thresholds: DriftThresholds, kind: str = "samples", paired: bool = False, permutations: int = 200,
    max_samples: int = 1000, seed: int = 0, k: int = 10, classifier: bool = True, bar: Any = None,
) -> DriftReport:
    """Every statistic of reference vs current, with the verdict.

    ``paired``: row i of both matrices embeds the same text (two encoders): neighbour overlap@k is
    computed, and subsampling keeps the pairs together. Distribution statistics need both sides in
    one space (the same dimension); for two encoders of different dimensions only the overlap remains.
    ``bar`` (a tqdm bar, optional) is advanced once per finished step.
    """
    ref, cur = _subsampled(reference, current, paired=paired, max_samples=max_samples, seed=seed)
    reference_info.count_used, current_info.count_used = len(ref), len(cur)
    report = DriftReport(kind=kind, reference=reference_info, current=current_info, thresholds=thresholds,
                         options={"max_samples": max_samples, "permutations": permutations, "seed": seed,
                                  "k": k, "paired": paired, "classifier": classifier})
    report.created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    steps = _Steps(bar)
    if ref.shape[1] == cur.shape[1]:
        with steps("mmd"):
            _add_mmd(report, ref, cur, permutations, seed)
        # Paired rows are the same texts, not independent samples: a held-out twin would mislead the classifier.
        if classifier and not paired and min(len(ref), len(cur)) >= 8:
            with steps("classifier"):
                report.classifier = classifier_test(ref, cur, seed)
        with steps("centroid_variance"):
            _add_centroid_and_variance(report, ref, cur, permutations, seed)
        with steps("nearest"):
            _add_nearest(report, ref, cur)
    else:
        report.notes.append(f"reference and current have different dimensions ({ref.shape[1]} vs {cur.shape[1]}): "
                            "distribution statistics need one space; only neighbour overlap is computed")
    if paired:
        report.notes.append("two encoders on the same texts: the verdict rests on neighbour overlap; the "
                            "distribution figures compare two vector spaces and are for information")
        with steps("overlap"):
            _add_overlap(report, ref, cur, k)
    report.timings_s = steps.timings
    report.verdict, report.reasons = verdict(report, thresholds)
    return report


class _Steps:
    """Times each step of :func:`analyse` and advances the progress bar once it has finished.

    A step that raises records nothing: the exception ends the analysis anyway.
    """

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(1)


def _subsampled(reference: np.ndarray, current: np.ndarray, *, paired: bool, max_samples: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as float32 matrices of at most ``max_samples`` rows; paired rows stay paired."""
    ref, cur = as_embeddings(reference), as_embeddings(current)
    if len(ref) < 2 or len(cur) < 2:
        raise ValueError(f"need at least 2 vectors on each side (reference {len(ref)}, current {len(cur)})")
    if paired:
        if len(ref) != len(cur):
            raise ValueError("paired samples must have the same number of rows")
        ref, idx = subsample(ref, max_samples, seed)
        return ref, cur[idx]
    ref, _ = subsample(ref, max_samples, seed)
    cur, _ = subsample(cur, max_samples, seed + 1)
    return ref, cur


def _add_mmd(report: DriftReport, ref: np.ndarray, cur: np.ndarray, permutations: int, seed: int) -> None:
    mmd2, p, gamma, null = mmd_permutation_test(ref, cur, permutations, seed, return_null=True)
    report.mmd = MmdTest(mmd2=mmd2, p_value=p, gamma=gamma, bandwidth=math.sqrt(1 / (2 * gamma)),
                         permutations=permutations, null_mean=float(null.mean()),
                         null_p95=float(np.quantile(null, 0.95)), null_p99=float(np.quantile(null, 0.99)))
    report.histograms.append(histogram(
        {"permutation null": null}, title=f"MMD² null distribution ({permutations} permutations)",
        xlabel="MMD²", marker=mmd2, marker_label=f"observed {mmd2:.4g} (p={p:.3g})"))


def _add_centroid_and_variance(report: DriftReport, ref: np.ndarray, cur: np.ndarray, permutations: int,
                               seed: int) -> None:
    report.centroid = centroid_shift(ref, cur, permutations, seed)
    report.variance = variance_stats(ref, cur, report.thresholds.min_variance_ratio)
    projection = _centroid_projection_histogram(ref, cur)
    if projection is not None:
        report.histograms.append(projection)
    report.histograms.append(_variance_ratio_histogram(ref, cur, report.variance))


def _centroid_projection_histogram(ref: np.ndarray, cur: np.ndarray) -> Histogram | None:
    """Both samples projected on the direction between their means; None when there is no direction."""
    # The direction comes from the even rows and the odd rows are projected: fitted and shown on the
    # same rows, two halves of one distribution would look apart.
    if len(ref) < 4 or len(cur) < 4:
        return None
    direction = cur[0::2].mean(0) - ref[0::2].mean(0)
    norm = float(np.linalg.norm(direction))
    if norm <= 0:
        return None
    direction /= norm
    return histogram(
        {"reference": ref[1::2] @ direction, "current": cur[1::2] @ direction},
        title="Projection on the centroid-shift direction (held-out rows)",
        xlabel="⟨x, (μ_cur − μ_ref)/|μ_cur − μ_ref|⟩, direction from the other rows")


def _variance_ratio_histogram(ref: np.ndarray, cur: np.ndarray, variance: VarianceStats) -> Histogram:
    vx, vy = ref.astype(np.float64).var(0, ddof=1), cur.astype(np.float64).var(0, ddof=1)
    live = vx >= NEAR_ZERO_VARIANCE
    return histogram(
        {"dimensions": np.log2(np.maximum(vy[live], 1e-30) / vx[live])},
        title="Per-dimension variance ratio", xlabel="log2(var_current / var_reference)",
        lo=min(-3.0, float(np.log2(max(variance.ratio_min, 1e-30)))),
        hi=max(3.0, float(np.log2(max(variance.ratio_max, 1e-30)))))


def _add_nearest(report: DriftReport, ref: np.ndarray, cur: np.ndarray) -> None:
    report.nearest, ref_best, cur_best = nearest_similarity(ref, cur)
    report.histograms.append(histogram(
        {"reference (to the rest of the reference)": ref_best, "current (to the reference)": cur_best},
        title="Best cosine similarity to the reference sample", xlabel="max cosine"))


def _add_overlap(report: DriftReport, ref: np.ndarray, cur: np.ndarray, k: int) -> None:
    report.overlap, per_item = overlap_stats(ref, cur, k)
    report.histograms.append(histogram({"items": per_item}, title=f"Neighbour overlap@{k} per item",
                                       xlabel=f"shared neighbours / {k}", bins=k + 1, lo=-0.5 / k,
                                       hi=1 + 0.5 / k))
