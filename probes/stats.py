"""Uncertainty and comparisons: patient-level bootstrap, DeLong's test, Holm correction.

Patient-level bootstrap. Images of one patient are correlated, so a draw resamples *patients* with
replacement, never images: all images of a drawn patient come along, counted as many times as the
patient was drawn. The draws are reproducible from the seed alone (see :func:`bootstrap_draws`):
``rng = np.random.default_rng(seed)``, ``rng.integers(0, P, size=(n_boot, P))`` over the sorted
distinct patient ids. The interval is the percentile interval of the metric over the draws
(``np.percentile``'s default linear interpolation). A draw on which the metric is undefined (NaN,
e.g. AUROC of a resample that holds one class only) is skipped: the percentiles use the remaining
draws and the number skipped is reported in ``n_skipped`` of the result, so a reader can tell an
interval resting on 1000 draws from one resting on 600.

Fast path: for :func:`probes.metrics.auroc`, :func:`~probes.metrics.auroc_per_label` and
:func:`~probes.metrics.mean_auroc` a resample is expressed as integer weights (how often each image
was drawn) and all draws are scored together by the weighted rank AUROC, sorting the scores once per
label; the result equals materialising every resample. Any other ``metric_fn(y, score)`` is called
once per draw on the resampled rows.

DeLong's test (fast midrank algorithm of Sun & Xu, 2014) treats images as independent; with several
images per patient prefer :func:`paired_bootstrap`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from probes import metrics
from probes.metrics import _binary_labels, _finite_scores, _rank_auroc, _tie_bounds

__all__ = [
    "CI",
    "DeLongResult",
    "PairedResult",
    "bootstrap_ci",
    "bootstrap_draws",
    "bootstrap_values",
    "delong",
    "delong_var",
    "holm",
    "paired_bootstrap",
]

# float64 entries per working block of the fast path (about 16 MB per array)
_BLOCK = 2_000_000


class CI(tuple):
    """A percentile interval ``(low, high)``; unpacks as a 2-tuple.

    Attributes:
        low: lower bound (float, or float64 [L] for a per-label metric).
        high: upper bound, same shape as ``low``.
        n_boot: number of draws made.
        n_skipped: draws on which the metric was undefined and that were left out (int, or int [L]).
    """

    def __new__(cls, low, high, n_boot: int, n_skipped):
        self = super().__new__(cls, (low, high))
        self.n_boot = n_boot
        self.n_skipped = n_skipped
        return self

    def __getnewargs__(self):  # so results survive pickling (e.g. from joblib workers)
        return (*self, self.n_boot, self.n_skipped)

    low = property(lambda self: self[0])
    high = property(lambda self: self[1])


class PairedResult(tuple):
    """Outcome of :func:`paired_bootstrap`; unpacks as ``(diff, low, high, p)``.

    Attributes:
        diff: metric(score_a) - metric(score_b) on all rows (float, or float64 [L]).
        low: lower bound of the percentile interval of the difference.
        high: upper bound.
        p: two-sided bootstrap p-value for "no difference".
        n_boot: number of draws made.
        n_skipped: draws left out because the metric was undefined on them.
    """

    def __new__(cls, diff, low, high, p, n_boot: int, n_skipped):
        self = super().__new__(cls, (diff, low, high, p))
        self.n_boot = n_boot
        self.n_skipped = n_skipped
        return self

    def __getnewargs__(self):
        return (*self, self.n_boot, self.n_skipped)

    diff = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])
    p = property(lambda self: self[3])


class DeLongResult(NamedTuple):
    """Outcome of :func:`delong` (all floats)."""

    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    var: float  # variance of diff
    z: float
    p: float  # two-sided


def bootstrap_draws(patient_ids, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The patient draws of the bootstrap, reproducible from the seed.

    Args:
        patient_ids: [n] patient id of each image (any sortable values, e.g. str).
        n_boot: number of draws B.
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``(patients, draws)``: the sorted distinct ids [P], and int64 [B, P] whose row b lists the
        indices into ``patients`` drawn (with replacement) in draw b.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    patients = np.unique(np.asarray(patient_ids))
    rng = np.random.default_rng(seed)
    return patients, rng.integers(0, len(patients), size=(n_boot, len(patients)))


def _image_counts(patient_ids, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each patient is drawn, int64 [B, P], and each image's patient index, int [n]."""
    pid = np.asarray(patient_ids)
    if pid.ndim != 1 or not len(pid):
        raise ValueError(f"patient_ids must be a non-empty 1-D array, got shape {pid.shape}")
    patients, draws = bootstrap_draws(pid, n_boot, seed)
    inverse = np.searchsorted(patients, pid)
    n_pat = len(patients)
    offsets = np.arange(n_boot)[:, None] * n_pat
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * n_pat).reshape(n_boot, n_pat)
    return counts, inverse


def _weighted_auroc_draws(y: np.ndarray, score: np.ndarray, counts: np.ndarray, inverse: np.ndarray):
    """AUROC of every draw and label from patient counts: float64 [B, L] for y, score [n, L]."""
    n_boot = len(counts)
    out = np.full((n_boot, y.shape[1]), np.nan)
    for j in range(y.shape[1]):
        keep = ~np.isnan(y[:, j])
        order = np.argsort(score[keep, j])
        first, last = _tie_bounds(score[keep, j][order])
        y_sorted = y[keep, j][order]
        pat_sorted = inverse[keep][order]
        is_pos, is_neg = y_sorted == 1, y_sorted == 0
        step = max(1, _BLOCK // max(1, len(order)))
        for b in range(0, n_boot, step):
            w = counts[b : b + step][:, pat_sorted].astype(np.float64)
            out[b : b + step, j] = _rank_auroc(w * is_pos, w * is_neg, first, last)
    return out


def _fast_values(metric_fn, y, score, counts, inverse):
    """Draw values by the weighted rank AUROC, or None when ``metric_fn`` has no fast path."""
    if metric_fn is metrics.auroc:
        yy, ss = _binary_labels(y), _finite_scores(score)
        if yy.ndim != 1 or yy.shape != ss.shape:
            raise ValueError(f"auroc needs y and score of shape [n], got {yy.shape} and {ss.shape}")
        return _weighted_auroc_draws(yy[:, None], ss[:, None], counts, inverse)[:, 0]
    if metric_fn is metrics.auroc_per_label or metric_fn is metrics.mean_auroc:
        yy, ss = _binary_labels(y), _finite_scores(score)
        if yy.ndim != 2 or yy.shape != ss.shape:
            raise ValueError(
                f"{metric_fn.__name__} needs Y and S of shape [n, L], got {yy.shape} and {ss.shape}"
            )
        per_label = _weighted_auroc_draws(yy, ss, counts, inverse)
        if metric_fn is metrics.auroc_per_label:
            return per_label
        ok = ~np.isnan(per_label)
        with np.errstate(invalid="ignore"):
            return np.where(ok.any(axis=1), np.where(ok, per_label, 0).sum(axis=1) / ok.sum(axis=1), np.nan)
    return None


def _draw_values(metric_fn: Callable, y, score, counts: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Metric value of every draw: float64 [B] or [B, ...] (NaN where undefined)."""
    fast = _fast_values(metric_fn, y, score, counts, inverse)
    if fast is not None:
        return fast
    y, score = np.asarray(y), np.asarray(score)
    rows = np.arange(len(inverse))
    values = []
    for c in counts:
        idx = np.repeat(rows, c[inverse])
        values.append(np.asarray(metric_fn(y[idx], score[idx]), dtype=np.float64))
    return np.stack(values)


def _check_lengths(patient_ids, **arrays) -> None:
    n = len(patient_ids)
    for name, a in arrays.items():
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} rows but patient_ids has {n}")


def _percentiles(values: np.ndarray, alpha: float):
    """Percentile interval over the non-NaN draws along axis 0, and the count of NaN draws."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    ok = ~np.isnan(values)
    n_skipped = (~ok).sum(axis=0)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    flat = values.reshape(len(values), -1)
    bounds = np.full((2, flat.shape[1]), np.nan)
    for j in range(flat.shape[1]):
        col = flat[:, j][~np.isnan(flat[:, j])]
        if len(col):
            bounds[:, j] = np.percentile(col, q)
    low, high = bounds.reshape((2, *values.shape[1:]))
    if values.ndim == 1:
        return float(low), float(high), int(n_skipped)
    return low, high, n_skipped


def bootstrap_values(
    metric_fn: Callable, y, score, patient_ids, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """The metric on every patient-level bootstrap draw (for custom intervals or plots).

    Args:
        metric_fn: ``metric_fn(y, score) -> float`` (or float [L]), e.g. ``metrics.auroc``.
        y: labels [n] or [n, L] in the form ``metric_fn`` expects.
        score: scores [n] or [n, L].
        patient_ids: [n] patient id of each row.
        n_boot: number of draws.
        seed: seed of the draws (see :func:`bootstrap_draws`).

    Returns:
        float64 [n_boot] (or [n_boot, L]); NaN on draws where the metric is undefined.
    """
    _check_lengths(patient_ids, y=y, score=score)
    counts, inverse = _image_counts(patient_ids, n_boot, seed)
    return _draw_values(metric_fn, y, score, counts, inverse)


def bootstrap_ci(
    metric_fn: Callable, y, score, patient_ids, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> CI:
    """Patient-level bootstrap percentile interval of a metric.

    Args:
        metric_fn: ``metric_fn(y, score) -> float`` or float [L]; ``metrics.auroc``,
            ``metrics.auroc_per_label`` and ``metrics.mean_auroc`` take the vectorised fast path.
        y: labels [n] (or [n, L] for per-label metrics), NaN = missing.
        score: scores [n] (or [n, L]).
        patient_ids: [n] patient id of each row; patients, not rows, are resampled.
        n_boot: number of draws.
        seed: seed of the draws (see :func:`bootstrap_draws`).
        alpha: 1 - coverage (0.05 gives a 95% interval).

    Returns:
        :class:`CI` ``(low, high)`` with ``n_boot`` and ``n_skipped`` (draws where the metric was
        undefined, left out of the percentiles); bounds are NaN when every draw was undefined.
    """
    values = bootstrap_values(metric_fn, y, score, patient_ids, n_boot, seed)
    low, high, n_skipped = _percentiles(values, alpha)
    return CI(low, high, n_boot, n_skipped)


def paired_bootstrap(
    metric_fn: Callable,
    y,
    score_a,
    score_b,
    patient_ids,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Paired patient-level bootstrap of the difference of a metric between two score sets.

    Both score sets (e.g. two backbones' probes on the same test images) are evaluated on the same
    draws, so the interval reflects the correlation between them. The p-value is two-sided:
    ``p = min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (m + 1))`` over the m defined draws d, so it
    agrees with the percentile interval (p < alpha about when the interval excludes 0) and is never
    exactly 0 (the smallest value is about 2 / n_boot).

    Args:
        metric_fn: as in :func:`bootstrap_ci`.
        y: labels [n] or [n, L].
        score_a: scores of the first feature set, [n] or [n, L].
        score_b: scores of the second feature set, same shape.
        patient_ids: [n] patient ids.
        n_boot: number of draws.
        seed: seed of the draws.
        alpha: 1 - coverage of the interval.

    Returns:
        :class:`PairedResult` ``(diff, low, high, p)`` for metric(a) - metric(b), with ``n_boot`` and
        ``n_skipped`` (draws where either metric was undefined).
    """
    _check_lengths(patient_ids, y=y, score_a=score_a, score_b=score_b)
    counts, inverse = _image_counts(patient_ids, n_boot, seed)
    d = _draw_values(metric_fn, y, score_a, counts, inverse) - _draw_values(
        metric_fn, y, score_b, counts, inverse
    )
    diff = np.asarray(metric_fn(y, score_a), dtype=np.float64) - np.asarray(
        metric_fn(y, score_b), dtype=np.float64
    )
    low, high, n_skipped = _percentiles(d, alpha)
    ok = ~np.isnan(d)
    m = ok.sum(axis=0)
    below = (ok & (np.nan_to_num(d, nan=1.0) <= 0)).sum(axis=0)
    above = (ok & (np.nan_to_num(d, nan=-1.0) >= 0)).sum(axis=0)
    p = np.where(m > 0, np.minimum(1.0, 2.0 * (np.minimum(below, above) + 1) / (m + 1)), np.nan)
    if d.ndim == 1:
        return PairedResult(float(diff), low, high, float(p), n_boot, n_skipped)
    return PairedResult(diff, low, high, p, n_boot, n_skipped)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their mean rank: float64, same shape."""
    order = np.argsort(x, axis=-1)
    xs = np.take_along_axis(x, order, axis=-1)
    first, last = _tie_bounds(xs)
    idx = np.broadcast_to(np.arange(x.shape[-1], dtype=np.float64), x.shape)
    sorted_ranks = idx + 1 if first is None else (first + last) / 2 + 1
    ranks = np.empty(x.shape)
    np.put_along_axis(ranks, order, sorted_ranks, axis=-1)
    return ranks


def _delong_components(y, scores: np.ndarray):
    """AUROCs [K] and DeLong covariance [K, K] of K score vectors [K, n] on one binary label."""
    yy = _binary_labels(y)
    s = _finite_scores(scores)
    ok = ~np.isnan(yy)
    yy, s = yy[ok], s[:, ok]
    x, z = s[:, yy == 1], s[:, yy == 0]
    m, n = x.shape[1], z.shape[1]
    k = len(s)
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    tx, tz_ = _midranks(x), _midranks(z)
    t = _midranks(np.concatenate([x, z], axis=1))
    auc = (t[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    # placement values: V10 = share of negatives below each positive, V01 = share of positives above each negative
    v10 = (t[:, :m] - tx) / n
    v01 = 1.0 - (t[:, m:] - tz_) / m
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def delong_var(y, score) -> tuple[float, float]:
    """AUROC of one score vector and its DeLong variance.

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score: float [n].

    Returns:
        ``(auc, var)``; var is NaN with fewer than 2 positives or 2 negatives.
    """
    auc, cov = _delong_components(y, np.asarray(score, dtype=np.float64)[None, :])
    return float(auc[0]), float(cov[0, 0])


def delong(y, score_a, score_b) -> DeLongResult:
    """DeLong's test for two correlated ROC curves (same images, two score vectors).

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score_a: float [n], first model's scores.
        score_b: float [n], second model's scores.

    Returns:
        :class:`DeLongResult` ``(auc_a, auc_b, diff, var, z, p)`` with ``diff = auc_a - auc_b``,
        ``var`` its variance, ``z = diff / sqrt(var)`` and the two-sided normal p-value. Identical
        curves give ``z = 0, p = 1``; too few positives/negatives give NaN.
    """
    a = np.asarray(score_a, dtype=np.float64)
    b = np.asarray(score_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"score_a and score_b must both be [n], got {a.shape} and {b.shape}")
    auc, cov = _delong_components(y, np.stack([a, b]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var < 0:  # rounding when the two curves are (nearly) identical
        var = 0.0
    if math.isnan(var) or math.isnan(diff):
        z = p = float("nan")
    elif var <= 1e-15:
        z, p = (0.0, 1.0) if abs(diff) < 1e-12 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / math.sqrt(var)
        p = math.erfc(abs(z) / math.sqrt(2))
    return DeLongResult(float(auc[0]), float(auc[1]), diff, var, z, p)


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, family-wise error control).

    The i-th smallest of m p-values becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``. NaN entries
    (e.g. labels without positives) are passed through and do not count towards m.

    Args:
        pvalues: float [m] (any shape; adjusted over all entries).

    Returns:
        float64 array of the same shape.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    flat = p.ravel()
    out = np.full(flat.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(flat))
    if len(idx):
        order = idx[np.argsort(flat[idx], kind="stable")]
        m = len(order)
        adj = np.minimum(1.0, (m - np.arange(m)) * flat[order])
        out[order] = np.maximum.accumulate(adj)
    return out.reshape(p.shape)
