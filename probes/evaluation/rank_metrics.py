"""Rank metrics of probe scores (numpy only): AUROC and average precision, one or many at once.

The core that :mod:`probes.evaluation.metrics` re-exports and that the patient bootstrap
(:mod:`probes.evaluation.stats`), DeLong's test (:mod:`probes.evaluation.delong`) and the weighted metric draws
(:mod:`probes.evaluation.score_rows`) build on: label and score checks (:func:`_binary_labels`: 0/1, NaN =
missing, anything else refused; :func:`_finite_scores`), tie groups of sorted scores
(:func:`_tie_bounds`) and the weighted Mann-Whitney sum (:func:`_rank_auroc`). Conventions are those
of :mod:`probes.evaluation.metrics`: an undefined metric is NaN, never an exception.

AUROC is computed from ranks (the Mann-Whitney statistic), tied scores counting one half, so it
equals ``sklearn.metrics.roc_auc_score``. :func:`auroc_rows` evaluates many score vectors at once
(one ``argsort`` per row, the rest vectorised) and accepts per-row sample weights, which is how the
few-shot episodes and the patient bootstrap stay fast. Multi-class AUROC (:func:`auroc_ovr`) is the
one-vs-rest mean over the columns of :func:`one_hot`.

Average precision (:func:`average_precision`, the area under the precision-recall curve as
``sklearn.metrics.average_precision_score`` computes it: ``sum_n (R_n - R_{n-1}) P_n`` over the
distinct score thresholds, no interpolation) is defined whenever a positive is present; it is NaN
without positives.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError

__all__ = [
    "auroc",
    "auroc_ovr",
    "auroc_per_label",
    "auroc_rows",
    "average_precision",
    "average_precision_per_label",
    "average_precision_rows",
    "mean_auroc",
    "mean_average_precision",
    "one_hot",
]


def _binary_labels(y, name: str = "y_true") -> np.ndarray:
    """Labels as float64 with NaN for missing; refuses anything but 0, 1 and NaN."""
    y = np.asarray(y)
    if y.dtype == bool:
        return y.astype(np.float64)
    if not np.issubdtype(y.dtype, np.number):
        raise FeatcacheError(f"{name} must be numeric 0/1 labels (NaN = missing), got dtype {y.dtype}")
    y = y.astype(np.float64)
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        raise FeatcacheError(
            f"{name} must hold 0/1 labels (NaN = missing) but holds {np.unique(y[bad])[:5].tolist()}; "
            "apply an uncertain-label policy (e.g. U-zeros, U-ones or ignore) before computing metrics"
        )
    return y


def _finite_scores(s, name: str = "score") -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if np.isnan(s).any():
        raise ValueError(f"{name} contains NaN: every row with a label needs a score")
    return s


def _tie_bounds(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """First and last position of each position's tie group along the last axis (None: no ties)."""
    n = sorted_scores.shape[-1]
    new = np.ones(sorted_scores.shape, dtype=bool)
    new[..., 1:] = sorted_scores[..., 1:] != sorted_scores[..., :-1]
    if new.all():
        return None, None
    idx = np.arange(n)
    first = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    ends = np.ones(sorted_scores.shape, dtype=bool)
    ends[..., :-1] = new[..., 1:]
    last = np.minimum.accumulate(np.where(ends, idx, n - 1)[..., ::-1], axis=-1)[..., ::-1]
    return first, last


def _rank_auroc(pos: np.ndarray, neg: np.ndarray, first: np.ndarray | None, last: np.ndarray | None):
    """Weighted Mann-Whitney AUROC of rows whose entries are in ascending score order.

    Args:
        pos: float64 [E, n], weight of each row entry as a positive (0 for negatives/missing).
        neg: float64 [E, n], weight as a negative.
        first: int [E, n] or [n] (shared by all rows) tie-group start positions, or None (no ties).
        last: same shape as ``first``, tie-group end positions.

    Returns:
        float64 [E]; NaN where a row has no positive or no negative weight.
    """
    cum_neg = np.cumsum(neg, axis=1)
    below = cum_neg - neg  # negative weight strictly below each position
    if first is None:
        num = np.einsum("ij,ij->i", pos, below)
    else:
        if first.ndim == 1:
            lo, hi = below[:, first], cum_neg[:, last]
        else:
            lo = np.take_along_axis(below, first, axis=1)
            hi = np.take_along_axis(cum_neg, last, axis=1)
        # negatives strictly below the tie group count 1, those inside it 1/2: (lo + hi) / 2
        num = 0.5 * np.einsum("ij,ij->i", pos, lo + hi)
    w_pos = pos.sum(axis=1)
    w_neg = cum_neg[:, -1] if cum_neg.shape[1] else np.zeros(len(cum_neg))
    den = w_pos * w_neg
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den <= 0] = np.nan
    return out


def auroc_rows(y, scores, sample_weight=None) -> np.ndarray:
    """AUROC of many score vectors at once (e.g. all few-shot episodes of one label).

    Args:
        y: labels 0/1 (NaN = missing), shape [n] shared by all rows or [E, n] per row.
        scores: float [E, n], one score vector per row.
        sample_weight: optional non-negative float [n] or [E, n]; a weight of 2 counts a row twice
            (how a bootstrap resample is expressed without copying rows).

    Returns:
        float64 [E], NaN for a row whose (non-missing, non-zero-weight) labels hold one class only.
    """
    s = _finite_scores(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [E, n], got shape {s.shape}")
    yy = _binary_labels(y)
    if yy.shape not in ((s.shape[1],), s.shape):
        raise ValueError(f"y has shape {yy.shape}, expected ({s.shape[1]},) or {s.shape}")
    order = np.argsort(s, axis=1)
    s_sorted = np.take_along_axis(s, order, axis=1)
    y_sorted = yy[order] if yy.ndim == 1 else np.take_along_axis(yy, order, axis=1)
    if sample_weight is None:
        w_sorted = 1.0
    else:
        w = np.asarray(sample_weight, dtype=np.float64)
        if w.shape not in ((s.shape[1],), s.shape):
            raise ValueError(f"sample_weight has shape {w.shape}, expected ({s.shape[1]},) or {s.shape}")
        w_sorted = w[order] if w.ndim == 1 else np.take_along_axis(w, order, axis=1)
    pos = np.where(y_sorted == 1, w_sorted, 0.0)
    neg = np.where(y_sorted == 0, w_sorted, 0.0)
    first, last = _tie_bounds(s_sorted)
    return _rank_auroc(pos, neg, first, last)


def auroc(y_true, score, sample_weight=None) -> float:
    """Area under the ROC curve of one binary label (equals ``sklearn.metrics.roc_auc_score``).

    Args:
        y_true: labels 0/1 [n] (NaN = missing, left out).
        score: float [n].
        sample_weight: optional non-negative float [n].

    Returns:
        The AUROC, ties counting one half; NaN when positives or negatives are absent.
    """
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"score must be 1-D [n], got shape {s.shape}")
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return float(auroc_rows(y_true, s[None, :], w)[0])


def auroc_per_label(Y, S) -> np.ndarray:
    """AUROC of each label of a multi-label task.

    Args:
        Y: labels 0/1 [n, L], NaN = missing (left out for that label only).
        S: float [n, L], one score column per label.

    Returns:
        float64 [L]; NaN for a label with one class absent among its non-missing rows.
    """
    Y = np.asarray(Y)
    S = np.asarray(S, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"Y and S must both be [n, L], got {Y.shape} and {S.shape}")
    return auroc_rows(Y.T, S.T)


def mean_auroc(Y, S) -> float:
    """Mean AUROC over the labels that have both classes present (the studies' primary outcome).

    Args:
        Y: labels 0/1 [n, L], NaN = missing.
        S: float [n, L].

    Returns:
        The mean over defined labels; NaN when no label is defined.
    """
    return _nanmean(auroc_per_label(Y, S))


def average_precision_rows(y, scores, sample_weight=None) -> np.ndarray:
    """Average precision of many score vectors at once (e.g. every bootstrap draw of one label).

    ``AP = sum_t (R_t - R_{t-1}) P_t`` over the distinct thresholds t (scores, descending), with
    precision P_t and recall R_t of "score >= t": ``sklearn.metrics.average_precision_score``.
    Tied scores form one threshold. A weight of 2 counts a row twice.

    Args:
        y: labels 0/1 (NaN = missing, left out), [n] shared by all rows or [E, n].
        scores: float [E, n], or [n] shared by every row of ``sample_weight`` [E, n] (sorted once:
            the bootstrap's case).
        sample_weight: optional non-negative float [n] or [E, n].

    Returns:
        float64 [E]; NaN for a row without positive weight.
    """
    s = _finite_scores(scores)
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if s.ndim == 1:
        return _ap_shared(_binary_labels(y), s, w)
    E = len(s)
    if s.ndim != 2:
        raise ValueError(f"scores must be [E, n] or [n], got shape {s.shape}")
    n = s.shape[1]
    yy = _binary_labels(y)
    if yy.shape not in ((n,), (E, n)):
        raise ValueError(f"y has shape {yy.shape}, expected ({n},) or {(E, n)}")
    order = np.argsort(-s, axis=1, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=1)
    y_sorted = yy[order] if yy.ndim == 1 else np.take_along_axis(yy, order, axis=1)
    if w is None:
        w_sorted = np.ones((E, n))
    else:
        w_sorted = np.take_along_axis(np.broadcast_to(w, (E, n)), order, axis=1)
    pos = np.where(y_sorted == 1, w_sorted, 0.0)
    neg = np.where(y_sorted == 0, w_sorted, 0.0)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    _, last = _tie_bounds(s_sorted)
    if last is not None:  # precision of a tie group is taken at its end (one threshold)
        tp, fp = np.take_along_axis(tp, last, axis=1), np.take_along_axis(fp, last, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pos > 0, tp / (tp + fp), 0.0)
        out = np.einsum("ij,ij->i", pos, precision) / pos.sum(axis=1)
    out[pos.sum(axis=1) <= 0] = np.nan
    return out


def _ap_shared(yy: np.ndarray, s: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Average precision of one score vector s [n] under weightings w [E, n] (or [n] / None):
    sorted once, weights summed per tie group (one threshold each), then cumulated."""
    if yy.shape != s.shape:
        raise ValueError(f"y has shape {yy.shape}, expected {s.shape}")
    w = np.ones((1, len(s))) if w is None else np.atleast_2d(w)
    if w.shape[1] != len(s):
        raise ValueError(f"sample_weight has {w.shape[1]} columns, expected {len(s)}")
    known = ~np.isnan(yy)
    order = np.flatnonzero(known)[np.argsort(-s[known], kind="stable")]
    if not len(order):
        return np.full(len(w), np.nan)
    ss, is_pos = s[order], (yy[order] == 1).astype(np.float64)
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    wo = w[:, order]
    posw = np.add.reduceat(wo * is_pos, starts, axis=1)
    allw = np.add.reduceat(wo, starts, axis=1)
    tp, seen = np.cumsum(posw, axis=1), np.cumsum(allw, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.einsum("ij,ij->i", posw, np.where(posw > 0, tp / seen, 0.0)) / tp[:, -1]
    out[tp[:, -1] <= 0] = np.nan
    return out


def average_precision(y_true, score, sample_weight=None) -> float:
    """Average precision of one binary label (equals ``sklearn.metrics.average_precision_score``).

    Args:
        y_true: labels 0/1 [n] (NaN = missing, left out).
        score: float [n].
        sample_weight: optional non-negative float [n].

    Returns:
        AP in [0, 1]; NaN when no positive is present (scikit-learn warns and returns 0 there).
    """
    s = np.asarray(score, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"score must be 1-D [n], got shape {s.shape}")
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return float(average_precision_rows(y_true, s, w)[0])


def average_precision_per_label(Y, S) -> np.ndarray:
    """Average precision of each label: float64 [L] for Y 0/1 (NaN missing) and S float [n, L]."""
    Y = np.asarray(Y)
    S = np.asarray(S, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"Y and S must both be [n, L], got {Y.shape} and {S.shape}")
    return np.array([average_precision(Y[:, j], S[:, j]) for j in range(Y.shape[1])])


def mean_average_precision(Y, S) -> float:
    """Mean average precision over the labels with a positive (Y [n, L], S [n, L]); NaN if none."""
    return _nanmean(average_precision_per_label(Y, S))


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    ok = ~np.isnan(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


def one_hot(y, n_classes: int) -> np.ndarray:
    """One-vs-rest label matrix of a multi-class task.

    Args:
        y: int [n] class indices in ``0..n_classes-1``; a negative index marks a missing label.
        n_classes: number of classes C.

    Returns:
        float64 [n, C], 1 at the true class, 0 elsewhere, rows of missing labels all NaN.
    """
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise FeatcacheError(
            f"class labels must be integer indices (negative = missing), got dtype {y.dtype}"
        )
    if (y >= n_classes).any():
        raise FeatcacheError(f"class index {int(y.max())} is out of range for {n_classes} classes")
    out = (y[:, None] == np.arange(n_classes)[None, :]).astype(np.float64)
    out[y < 0] = np.nan
    return out


def auroc_ovr(y, score) -> float:
    """Macro one-vs-rest AUROC of a multi-class task.

    Equals ``roc_auc_score(y, score, multi_class="ovr", average="macro")`` when every class occurs
    in ``y``; a class absent from ``y`` is left out of the mean instead of raising.

    Args:
        y: int [n] class indices (negative = missing).
        score: float [n, C] class scores (probabilities or logits).

    Returns:
        Unweighted mean over classes of the AUROC of "this class vs the rest".
    """
    score = np.asarray(score, dtype=np.float64)
    if score.ndim != 2:
        raise ValueError(f"score must be [n, C], got shape {score.shape}")
    return mean_auroc(one_hot(y, score.shape[1]), score)
