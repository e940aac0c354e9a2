"""The patient-level bootstrap (draws, percentile intervals, the paired bootstrap); re-exported by
:mod:`probes.evaluation.stats`.

Patient-level bootstrap. Images of one patient are correlated, so a draw resamples *patients* with
replacement, never images: all images of a drawn patient come along, counted as many times as the
patient was drawn. The draws are reproducible from the seed alone (see :func:`bootstrap_draws`):
``rng = np.random.default_rng(seed)``, ``rng.integers(0, P, size=(n_boot, P))`` over the sorted
distinct patient ids; every interval and paired test of a run uses these same draws. The interval
is the percentile interval of the metric over the draws (``np.percentile``'s default linear
interpolation). A draw on which the metric is undefined (NaN, e.g. AUROC of a resample that holds
one class only) is skipped: the percentiles use the remaining draws and the number skipped is
reported in ``n_skipped`` of the result, so a reader can tell an interval resting on 1000 draws
from one resting on 600.

The mean AUROC over labels (:func:`probes.evaluation.metrics.mean_auroc`) averages, in every draw, exactly the
labels defined in the point estimate (both classes present on all rows): a draw in which any of
them lacks a class is rejected (counted in ``n_skipped``), never averaged over fewer labels. Averaging
whichever labels a draw happens to keep would mix different label sets and pull the draws away from
the point estimate (rare labels, often the hard ones, drop out of some draws). Rejection was chosen
over a stratified patient bootstrap because no stratification of patients keeps both classes of
every label of a multi-label task at once, while rejection keeps the one documented draw stream.

No interval from too few patients. An AUROC interval (or paired p-value) needs at least
:data:`MIN_PATIENTS` (2) patients with a positive and 2 with a negative row, per label; other
metrics need 2 patients. Otherwise the bounds (and p) are NaN and ``reason`` says why, e.g.
``"1 positive patient"``: with one positive patient every draw either repeats that patient or loses
the label, and the interval would look far tighter than it is (zero width with one patient).

Fast path: for :func:`probes.evaluation.metrics.auroc`, :func:`~probes.evaluation.metrics.auroc_per_label` and
:func:`~probes.evaluation.metrics.mean_auroc` a resample is expressed as integer weights (how often each image
was drawn) and all draws are scored together by the weighted rank AUROC, sorting the scores once per
label; the result equals materialising every resample. Any other ``metric_fn(y, score)`` is called
once per draw on the resampled rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from featcache.progress import probe_progress
from probes.evaluation import metrics
from probes.evaluation.delong import MIN_PATIENTS, _count_reason, _patients_per_class
from probes.evaluation.rank_metrics import _binary_labels, _finite_scores, _rank_auroc, _tie_bounds

__all__ = ["CI", "PairedResult", "bootstrap_ci", "bootstrap_draws", "bootstrap_values", "paired_bootstrap"]

# float64 entries per working block of the fast path (about 16 MB per array)
_BLOCK = 2_000_000


class CI(tuple):
    """A percentile interval ``(low, high)``; unpacks as a 2-tuple.

    Attributes:
        low: lower bound (float, or float64 [L] for a per-label metric).
        high: upper bound, same shape as ``low``.
        n_boot: number of draws made.
        n_skipped: draws on which the metric was undefined and that were left out (int, or int [L]);
            ``n_boot`` where no interval was computed.
        reason: None, or why the bounds are NaN (e.g. ``"1 positive patient"``); for a per-label
            metric a list [L] of str or None.
    """

    def __new__(cls, low, high, n_boot: int, n_skipped, reason=None):
        self = super().__new__(cls, (low, high))
        self.n_boot = n_boot
        self.n_skipped = n_skipped
        self.reason = reason
        return self

    def __getnewargs__(self):  # so results survive pickling (e.g. from joblib workers)
        return (*self, self.n_boot, self.n_skipped, self.reason)

    low = property(lambda self: self[0])
    high = property(lambda self: self[1])


class PairedResult(tuple):
    """Outcome of :func:`paired_bootstrap`; unpacks as ``(diff, low, high, p)``.

    Attributes:
        diff: metric(score_a) - metric(score_b) on all rows (float, or float64 [L]).
        low: lower bound of the percentile interval of the difference.
        high: upper bound.
        p: two-sided bootstrap p-value for "no difference" (definition in :func:`paired_bootstrap`).
        n_boot: number of draws made.
        n_skipped: draws left out because the metric was undefined on them.
        reason: None, or why low, high and p are NaN (str, or list [L] of str or None).
    """

    def __new__(cls, diff, low, high, p, n_boot: int, n_skipped, reason=None):
        self = super().__new__(cls, (diff, low, high, p))
        self.n_boot = n_boot
        self.n_skipped = n_skipped
        self.reason = reason
        return self

    def __getnewargs__(self):
        return (*self, self.n_boot, self.n_skipped, self.reason)

    diff = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])
    p = property(lambda self: self[3])


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
    bar = probe_progress(n_boot * y.shape[1], "bootstrap AUROC", unit="draws")  # stderr, off in library calls
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
            bar.update(len(w))
    bar.close()
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
        if metric_fn is metrics.auroc_per_label:
            return _weighted_auroc_draws(yy, ss, counts, inverse)
        # the mean averages the labels of the point estimate in every draw; a draw where one of
        # them lacks a class is NaN (rejected), never a mean over fewer labels
        in_mean = _both_classes(yy)
        if not in_mean.any():
            return np.full(len(counts), np.nan)
        return _weighted_auroc_draws(yy[:, in_mean], ss[:, in_mean], counts, inverse).mean(axis=1)
    return None


def _both_classes(yy: np.ndarray) -> np.ndarray:
    """bool [L]: labels of yy [n, L] with a positive and a negative row."""
    return (yy == 1).any(axis=0) & (yy == 0).any(axis=0)


def _ci_reason(metric_fn: Callable, y, patient_ids):
    """Why no interval may be computed: None / str, or a list [L] for ``auroc_per_label``.

    AUROC metrics need :data:`MIN_PATIENTS` positive and negative patients per label (the mean:
    at least one label with both classes); any other metric needs :data:`MIN_PATIENTS` patients.
    """
    pid = np.asarray(patient_ids)
    if metric_fn is metrics.auroc or metric_fn is metrics.auroc_per_label:
        yy = _binary_labels(y)
        pos, neg = _patients_per_class(yy.reshape(len(yy), -1), pid)
        reasons = [_count_reason(int(a), int(b)) for a, b in zip(pos, neg)]
        return reasons[0] if metric_fn is metrics.auroc else reasons
    if metric_fn is metrics.mean_auroc:
        yy = _binary_labels(y)
        return None if yy.ndim == 2 and _both_classes(yy).any() else "no label with both classes"
    n_pat = len(np.unique(pid))
    return None if n_pat >= MIN_PATIENTS else f"{n_pat} patient{'' if n_pat == 1 else 's'}"


def _blank_one(a, n_boot: int):
    """One value (or array of per-structure values) blanked: counts become n_boot, the rest NaN."""
    if isinstance(a, np.ndarray):
        return (
            np.full_like(a, n_boot)
            if np.issubdtype(a.dtype, np.integer)
            else np.full_like(a, np.nan, dtype=float)
        )
    return n_boot if isinstance(a, (int, np.integer)) else float("nan")


def _blank(reason, n_boot: int, *arrays):
    """NaN the entries of ``arrays`` (and set n_skipped = n_boot) where ``reason`` is not None."""
    if reason is None or (isinstance(reason, list) and not any(reason)):
        return arrays
    if not isinstance(reason, list):
        return tuple(_blank_one(a, n_boot) for a in arrays)
    bad = np.array([r is not None for r in reason])
    out = []
    for a in arrays:
        a = np.array(a, copy=True)
        a[bad] = n_boot if np.issubdtype(a.dtype, np.integer) else np.nan
        out.append(a)
    return tuple(out)


def _draw_values(metric_fn: Callable, y, score, counts: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Metric value of every draw: float64 [B] or [B, ...] (NaN where undefined)."""
    fast = _fast_values(metric_fn, y, score, counts, inverse)
    if fast is not None:
        return fast
    y, score = np.asarray(y), np.asarray(score)
    rows = np.arange(len(inverse))
    values = []
    with probe_progress(len(counts), "bootstrap", unit="draws") as bar:
        for c in counts:
            idx = np.repeat(rows, c[inverse])
            values.append(np.asarray(metric_fn(y[idx], score[idx]), dtype=np.float64))
            bar.update(1)
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
        :class:`CI` ``(low, high)`` with ``n_boot``, ``n_skipped`` (draws where the metric was
        undefined, left out of the percentiles; for ``mean_auroc`` the draws where a label of the
        point estimate lacked a class) and ``reason``. Bounds are NaN, with ``reason`` set, when
        the patients are too few (see the module docstring); NaN without a reason when every draw
        was undefined.
    """
    values = bootstrap_values(metric_fn, y, score, patient_ids, n_boot, seed)
    low, high, n_skipped = _percentiles(values, alpha)
    reason = _ci_reason(metric_fn, y, patient_ids)
    low, high, n_skipped = _blank(reason, n_boot, low, high, n_skipped)
    return CI(low, high, n_boot, n_skipped, reason)


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
    draws, so the interval reflects the correlation between them. With d_b = metric_b(a) -
    metric_b(b) on draw b and m the number of draws where d_b is defined, the p-value is two-sided:

        ``p = min(1, 2 * (min(#{d_b <= 0}, #{d_b >= 0}) + 1) / (m + 1))``

    (the +1 counts the observed data as one more draw, so p is never exactly 0: the smallest value
    is about 2 / n_boot; identical score sets give p = 1). p < alpha about when the percentile
    interval excludes 0. A draw is left out when the metric is undefined on it for *either* set;
    for the AUROC metrics that depends on the labels of the draw only (scores are finite), so the
    same draws are left out on both sides, and for ``mean_auroc`` both sides average the labels of
    the point estimate in every draw.

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
        :class:`PairedResult` ``(diff, low, high, p)`` for metric(a) - metric(b), with ``n_boot``,
        ``n_skipped`` (draws where either metric was undefined) and ``reason`` (low, high and p are
        NaN when the patients are too few, as in :func:`bootstrap_ci`; diff is still given).
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
    reason = _ci_reason(metric_fn, y, patient_ids)
    if d.ndim == 1:
        low, high, p, n_skipped = _blank(reason, n_boot, low, high, float(p), n_skipped)
        return PairedResult(float(diff), low, high, p, n_boot, n_skipped, reason)
    low, high, p, n_skipped = _blank(reason, n_boot, low, high, p, n_skipped)
    return PairedResult(diff, low, high, p, n_boot, n_skipped, reason)
