"""The statistics of embedding drift: plain numpy functions over two matrices (rows are embeddings),
each returning its own small result struct. :mod:`eval.drift` assembles them into one report;
:mod:`rag.drift_monitor` runs some of them on the live query sample.

- **MMD** (maximum mean discrepancy, RBF kernel, median-heuristic bandwidth, the unbiased MMD²)
  with a permutation test: the p-value of "both samples come from one distribution".
- a **classifier two-sample test** (logistic regression, held-out accuracy vs chance): the same
  question, with an effect size anyone can read ("a linear model tells them apart 97 % of the time").
- **centroid shift** (cosine distance and L2 between the mean vectors).
- **per-dimension variance**: current/reference ratio per dimension; a dimension whose variance
  fell below ``min_variance_ratio`` of the reference's has collapsed.
- **nearest-reference similarity**: each current vector's best cosine to the reference sample, next
  to each reference vector's best cosine to the rest of the reference (novelty).
- **neighbour overlap@k** for the same texts under two encoders: how many of an item's k nearest
  neighbours survive the change of encoder.
- **histograms** of any of these, over shared bin edges, for the HTML report.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import numpy as np

from rag.embedding import neighbour_overlap

__all__ = [
    "NEAR_ZERO_VARIANCE",
    "NOVELTY_QUANTILE",
    "CentroidShift",
    "ClassifierTest",
    "Histogram",
    "MmdTest",
    "NearestStats",
    "OverlapStats",
    "VarianceStats",
    "as_embeddings",
    "centroid_shift",
    "classifier_test",
    "drift_reasons",
    "histogram",
    "median_gamma",
    "mmd_permutation_test",
    "mmd_rbf",
    "nearest_similarity",
    "neighbour_overlap_at_k",
    "overlap_stats",
    "subsample",
    "variance_stats",
]

NEAR_ZERO_VARIANCE = 1e-8  # a dimension this flat carries no information at all (absolute, for unit vectors)
NOVELTY_QUANTILE = 0.05  # a current vector is "novel" below this quantile of the reference's own nearest sims


# ---------------------------------------------------------------------------------------------
# Result structs, one per statistic
# ---------------------------------------------------------------------------------------------


class MmdTest(msgspec.Struct, kw_only=True):
    mmd2: float  # unbiased MMD², RBF kernel
    p_value: float  # permutation test, (1 + #null >= observed) / (1 + permutations)
    gamma: float  # k(x, y) = exp(-gamma * |x - y|²)
    bandwidth: float  # sigma = sqrt(1 / (2 gamma)): the median pairwise distance of the pooled sample
    permutations: int
    null_mean: float
    null_p95: float
    null_p99: float


class ClassifierTest(msgspec.Struct, kw_only=True):
    accuracy: float  # held-out accuracy of reference-vs-current logistic regression (chance: 0.5)
    p_value: float  # one-sided binomial test of the accuracy against 0.5
    n_train: int
    n_test: int
    auc: float


class CentroidShift(msgspec.Struct, kw_only=True):
    cosine: float  # 1 - cos(mean_ref, mean_cur)
    # Permutation p-value of the cosine distance: with near-isotropic vectors two random halves have
    # nearly orthogonal means, so the distance alone would alarm on noise.
    p_value: float | None = None
    l2: float  # |mean_ref - mean_cur|
    reference_norm: float
    current_norm: float
    relative: float  # l2 / mean distance of reference vectors to their own mean


class VarianceStats(msgspec.Struct, kw_only=True):
    dimension: int
    reference_median: float
    current_median: float
    current_min: float
    ratio_min: float  # min over dims of var_cur / var_ref
    ratio_p05: float
    ratio_median: float
    ratio_max: float
    collapsed_dims: int  # dims with var_cur < min_variance_ratio * var_ref (among dims not flat in the reference)
    collapsed_share: float
    near_zero_reference: int  # dims with variance below NEAR_ZERO_VARIANCE
    near_zero_current: int
    min_variance_ratio: float


class NearestStats(msgspec.Struct, kw_only=True):
    reference_median: float  # reference vectors' best cosine to the rest of the reference
    current_median: float  # current vectors' best cosine to the reference
    novelty_cut: float  # the NOVELTY_QUANTILE of the reference's own best cosines
    novel_share: float  # current vectors below that cut (about NOVELTY_QUANTILE without drift)


class OverlapStats(msgspec.Struct, kw_only=True):
    k: int
    mean: float  # mean over items of |top-k(ref space) ∩ top-k(cur space)| / k
    median: float
    p10: float
    zero_share: float  # items that kept none of their neighbours
    paired_cosine: float | None = None  # mean cos(ref_i, cur_i) when both spaces share a dimension


class Histogram(msgspec.Struct, kw_only=True):
    title: str
    xlabel: str
    edges: list[float]
    series: dict[str, list[int]]  # name -> counts per bin
    marker: float | None = None  # e.g. the observed MMD² on its null distribution
    marker_label: str = ""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def as_embeddings(x: np.ndarray) -> np.ndarray:
    """``x`` as a float32 matrix of embeddings (one per row); anything else is a ``ValueError``."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def subsample(x: np.ndarray, max_n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_n`` rows of ``x`` (seeded, without replacement) and their indices; all rows if 0."""
    n = len(x)
    if not max_n or n <= max_n:
        return x, np.arange(n)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))
    return x[idx], idx


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def median_gamma(z: np.ndarray, *, max_points: int = 1000, seed: int = 0) -> float:
    """RBF ``gamma`` by the median heuristic: sigma = median pairwise distance, gamma = 1 / (2 sigma²)."""
    z = as_embeddings(z)
    sub, _ = subsample(z, max_points, seed)
    d = _sq_dists(sub, sub)
    upper = d[np.triu_indices(len(sub), k=1)]
    upper = upper[upper > 0]
    med = float(np.median(upper)) if len(upper) else 1.0
    return 1.0 / (2.0 * med)


def _kernel(z: np.ndarray, gamma: float) -> np.ndarray:
    k = _sq_dists(z, z)
    np.multiply(k, -gamma, out=k)
    np.exp(k, out=k)
    np.fill_diagonal(k, 0.0)  # the unbiased estimator never pairs a point with itself
    return k


def _mmd2_from_labels(k: np.ndarray, labels: np.ndarray, n: int, m: int, row_sums: np.ndarray,
                      total: float) -> np.ndarray:
    """Unbiased MMD² for each column of ``labels`` (1: in X, 0: in Y), with the diagonal of ``k`` zeroed.

    With z the indicator of X: sum_XX = zᵀKz, sum_XY = zᵀK1 - zᵀKz, sum_YY = 1ᵀK1 - 2 zᵀK1 + zᵀKz,
    so many permutations cost one matrix product ``K @ labels``.
    """
    kz = k @ labels
    s_xx = (labels * kz).sum(0, dtype=np.float64)
    s_x1 = row_sums @ labels.astype(np.float64)
    s_xy = s_x1 - s_xx
    s_yy = total - 2.0 * s_x1 + s_xx
    return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def mmd_rbf(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """The unbiased MMD² between samples ``x`` and ``y`` with an RBF kernel (median heuristic if no gamma)."""
    x, y = as_embeddings(x), as_embeddings(y)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("MMD needs at least 2 vectors on each side")
    z = np.vstack([x, y])
    gamma = median_gamma(z) if gamma is None else gamma
    k = _kernel(z, gamma).astype(np.float64)
    labels = np.zeros((len(z), 1))
    labels[: len(x)] = 1.0
    return float(_mmd2_from_labels(k, labels, len(x), len(y), k.sum(1), float(k.sum()))[0])


def mmd_permutation_test(
    x: np.ndarray, y: np.ndarray, n_permutations: int = 200, seed: int = 0, *, gamma: float | None = None,
    progress: Callable[[int], None] | None = None, return_null: bool = False,
) -> tuple[float, float] | tuple[float, float, float, np.ndarray]:
    """``(mmd2, p_value)``: the unbiased MMD² and its permutation p-value (``(1 + #null >= obs) / (1 + P)``).

    With ``return_null`` also the gamma used and the null distribution. The kernel matrix of the
    pooled sample is computed once (float32, (n + m)² entries: 64 MB at 2 × 2000 rows); the
    permutations are evaluated in batches as matrix products.
    """
    x, y = as_embeddings(x), as_embeddings(y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 vectors on each side")
    if n_permutations < 1:
        raise ValueError("n_permutations must be at least 1")
    z = np.vstack([x, y])
    gamma = median_gamma(z, seed=seed) if gamma is None else float(gamma)
    k = _kernel(z, gamma)
    row_sums = k.sum(1, dtype=np.float64)
    total = float(row_sums.sum())
    observed_labels = np.zeros((n + m, 1), dtype=np.float32)
    observed_labels[:n] = 1.0
    observed = float(_mmd2_from_labels(k, observed_labels, n, m, row_sums, total)[0])
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    batch = 64
    done = 0
    while done < n_permutations:
        b = min(batch, n_permutations - done)
        labels = np.zeros((n + m, b), dtype=np.float32)
        for j in range(b):
            labels[rng.permutation(n + m)[:n], j] = 1.0
        null[done: done + b] = _mmd2_from_labels(k, labels, n, m, row_sums, total)
        done += b
        if progress is not None:
            progress(b)
    # A tiny tolerance: float32 sums of an identical split may differ in the last bits.
    p = (1 + int(np.sum(null >= observed - 1e-9 * max(1.0, abs(observed))))) / (1 + n_permutations)
    if return_null:
        return observed, p, gamma, null
    return observed, p


def _binomial_sf(k: int, n: int, p: float = 0.5) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact, no scipy)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
            + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def classifier_test(x: np.ndarray, y: np.ndarray, seed: int = 0) -> ClassifierTest:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): train logistic regression to tell reference
    from current on half of a balanced sample, test on the other half; under no drift accuracy is 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y = as_embeddings(x), as_embeddings(y)
    size = min(len(x), len(y))
    if size < 8:
        raise ValueError("the classifier test needs at least 8 vectors on each side")
    rng = np.random.default_rng(seed)
    xs, ys = x[rng.permutation(len(x))[:size]], y[rng.permutation(len(y))[:size]]
    half = size // 2
    train_x = np.vstack([xs[:half], ys[:half]])
    train_y = np.r_[np.zeros(half), np.ones(half)]
    test_x = np.vstack([xs[half:], ys[half:]])
    test_y = np.r_[np.zeros(size - half), np.ones(size - half)]
    model = LogisticRegression(C=1.0, max_iter=2000)
    model.fit(train_x, train_y)
    correct = int((model.predict(test_x) == test_y).sum())
    auc = float(roc_auc_score(test_y, model.decision_function(test_x)))
    return ClassifierTest(accuracy=correct / len(test_y), p_value=_binomial_sf(correct, len(test_y)),
                          n_train=len(train_y), n_test=len(test_y), auc=auc)


def _cosine_distance_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos between matching columns of ``a`` and ``b`` (d x P)."""
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    dot = (a * b).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dot / (na * nb), 0.0)
    return 1.0 - cos


def centroid_shift(x: np.ndarray, y: np.ndarray, n_permutations: int = 0, seed: int = 0) -> CentroidShift:
    """Cosine distance and L2 between the mean vectors of ``x`` (reference) and ``y`` (current); with
    ``n_permutations``, also the permutation p-value of the cosine distance."""
    x, y = as_embeddings(x).astype(np.float64), as_embeddings(y).astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    nx, ny = float(np.linalg.norm(mx)), float(np.linalg.norm(my))
    cosine = float(_cosine_distance_rows(mx[:, None], my[:, None])[0])
    l2 = float(np.linalg.norm(mx - my))
    spread = float(np.linalg.norm(x - mx, axis=1).mean()) or 1.0
    p = None
    if n_permutations:
        z = np.vstack([x, y])
        n, total = len(x), z.sum(0)
        rng = np.random.default_rng(seed)
        null = np.empty(n_permutations)
        for start in range(0, n_permutations, 64):
            b = min(64, n_permutations - start)
            labels = np.zeros((len(z), b))
            for j in range(b):
                labels[rng.permutation(len(z))[:n], j] = 1.0
            sx = z.T @ labels  # d x b sums of the permuted "reference"
            null[start: start + b] = _cosine_distance_rows(sx / n, (total[:, None] - sx) / len(y))
        p = (1 + int(np.sum(null >= cosine - 1e-12))) / (1 + n_permutations)
    return CentroidShift(cosine=cosine, p_value=p, l2=l2, reference_norm=nx, current_norm=ny, relative=l2 / spread)


def variance_stats(x: np.ndarray, y: np.ndarray, min_variance_ratio: float = 0.1) -> VarianceStats:
    """Per-dimension variance of reference ``x`` and current ``y``; dims whose variance fell below
    ``min_variance_ratio`` times the reference's are counted as collapsed."""
    x, y = as_embeddings(x).astype(np.float64), as_embeddings(y).astype(np.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    vx, vy = x.var(0, ddof=1), y.var(0, ddof=1)
    # A dimension already flat in the reference (some encoders have constant ones) has no ratio to speak of.
    live = vx >= NEAR_ZERO_VARIANCE
    if not live.any():
        raise ValueError("every dimension of the reference sample has (near) zero variance")
    ratio = vy[live] / vx[live]
    collapsed = int(np.sum(vy[live] < min_variance_ratio * vx[live]))
    return VarianceStats(
        dimension=int(x.shape[1]), reference_median=float(np.median(vx)), current_median=float(np.median(vy)),
        current_min=float(vy.min()), ratio_min=float(ratio.min()), ratio_p05=float(np.quantile(ratio, 0.05)),
        ratio_median=float(np.median(ratio)), ratio_max=float(ratio.max()), collapsed_dims=collapsed,
        collapsed_share=collapsed / x.shape[1], near_zero_reference=int(np.sum(vx < NEAR_ZERO_VARIANCE)),
        near_zero_current=int(np.sum(vy < NEAR_ZERO_VARIANCE)), min_variance_ratio=min_variance_ratio,
    )


def drift_reasons(mmd2: float | None, mmd_p: float | None, centroid: CentroidShift | None,
                  variance: VarianceStats | None, *, p_value: float, min_mmd2: float,
                  max_centroid_shift: float) -> list[str]:
    """Why two samples of one encoder differ, or nothing: the rules of a drift verdict.

    - distribution: the MMD permutation test rejects (p < ``p_value``) *and* MMD² is at least
      ``min_mmd2``, so a large sample does not alarm on a statistically real but negligible change;
    - centroid: the cosine distance between the mean vectors exceeds ``max_centroid_shift`` and its
      permutation test rejects too (p < ``p_value``);
    - collapse: a dimension's variance fell below the ratio ``variance`` was computed with.
    """
    reasons: list[str] = []
    if mmd2 is not None and mmd_p is not None and mmd_p < p_value and mmd2 >= min_mmd2:
        reasons.append(f"distribution: MMD² {mmd2:.4g} >= {min_mmd2:g} and permutation p {mmd_p:.3g} < {p_value:g}")
    c = centroid
    if c is not None and c.cosine > max_centroid_shift and (c.p_value is None or c.p_value < p_value):
        reasons.append(f"centroid: cosine shift {c.cosine:.4f} > {max_centroid_shift:g}"
                       + (f" (permutation p {c.p_value:.3g})" if c.p_value is not None else ""))
    if variance is not None and variance.collapsed_dims > 0:
        v = variance
        reasons.append(f"collapse: {v.collapsed_dims} of {v.dimension} dimensions kept less than "
                       f"{v.min_variance_ratio:g} of their reference variance (min ratio {v.ratio_min:.3g})")
    return reasons


def _best_cosines(q: np.ndarray, ref: np.ndarray, *, exclude_self: bool, block: int = 1024) -> np.ndarray:
    out = np.empty(len(q), dtype=np.float32)
    for start in range(0, len(q), block):
        s = q[start: start + block] @ ref.T
        if exclude_self:
            rows = np.arange(len(s))
            s[rows, start + rows] = -np.inf
        out[start: start + block] = s.max(1)
    return out


def nearest_similarity(x: np.ndarray, y: np.ndarray) -> tuple[NearestStats, np.ndarray, np.ndarray]:
    """Each reference vector's best cosine to the rest of the reference and each current vector's best
    cosine to the reference; returns the summary and both arrays (for the histogram)."""
    ux, uy = _unit(as_embeddings(x)), _unit(as_embeddings(y))
    ref_best = _best_cosines(ux, ux, exclude_self=True)
    cur_best = _best_cosines(uy, ux, exclude_self=False)
    cut = float(np.quantile(ref_best, NOVELTY_QUANTILE))
    return (NearestStats(reference_median=float(np.median(ref_best)), current_median=float(np.median(cur_best)),
                         novelty_cut=cut, novel_share=float(np.mean(cur_best < cut))), ref_best, cur_best)


def neighbour_overlap_at_k(ref_emb: np.ndarray, cur_emb: np.ndarray, k: int = 10) -> np.ndarray:
    """Per item, the share of its ``k`` nearest neighbours (cosine, within its own space) that the
    reference and the current encoder agree on. Row i of both matrices must embed the same text."""
    ref_emb, cur_emb = as_embeddings(ref_emb), as_embeddings(cur_emb)
    if len(ref_emb) != len(cur_emb):
        raise ValueError(f"neighbour overlap needs the same items in both spaces ({len(ref_emb)} vs {len(cur_emb)})")
    if len(ref_emb) <= k:
        raise ValueError(f"neighbour overlap@{k} needs more than {k} items, got {len(ref_emb)}")
    return neighbour_overlap(ref_emb, cur_emb, k)


def overlap_stats(ref_emb: np.ndarray, cur_emb: np.ndarray, k: int = 10) -> tuple[OverlapStats, np.ndarray]:
    per_item = neighbour_overlap_at_k(ref_emb, cur_emb, k)
    paired = None
    if ref_emb.shape[1] == cur_emb.shape[1]:
        paired = float(np.mean(np.sum(_unit(as_embeddings(ref_emb)) * _unit(as_embeddings(cur_emb)), axis=1)))
    return OverlapStats(k=k, mean=float(per_item.mean()), median=float(np.median(per_item)),
                        p10=float(np.quantile(per_item, 0.1)), zero_share=float(np.mean(per_item == 0)),
                        paired_cosine=paired), per_item


def histogram(series: dict[str, np.ndarray], *, title: str, xlabel: str, bins: int = 30,
              lo: float | None = None, hi: float | None = None, marker: float | None = None,
              marker_label: str = "") -> Histogram:
    """Counts of each series over shared bin edges (the pooled range unless ``lo``/``hi`` are given).

    A marker far outside the data (an observed MMD² way beyond its null) does not stretch the axis:
    the range reaches at most the data's own width past it, and the plot marks it off scale.
    """
    values = [np.asarray(v, dtype=np.float64) for v in series.values()]
    pooled = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if marker is not None and len(pooled):
        width = float(pooled.max() - pooled.min()) or abs(marker) or 1.0
        pooled = np.append(pooled, np.clip(marker, pooled.min() - width, pooled.max() + width))
    lo = float(pooled.min()) if lo is None and len(pooled) else (0.0 if lo is None else lo)
    hi = float(pooled.max()) if hi is None and len(pooled) else (1.0 if hi is None else hi)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    counts = {name: np.histogram(np.clip(v, lo, hi), bins=edges)[0].astype(int).tolist()
              for name, v in zip(series, values, strict=True)}
    return Histogram(title=title, xlabel=xlabel, edges=[round(float(e), 6) for e in edges], series=counts,
                     marker=marker, marker_label=marker_label)
