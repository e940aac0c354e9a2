"""Classification metrics on probe scores (numpy only): the one place to import them from.

Conventions shared by every function here:

- Binary labels are 0/1 (bool, int or float); NaN marks a missing label and that row is left out.
  Any other value (such as the raw ``-1`` "uncertain" of a manifest) is refused: apply an
  uncertain-label policy first.
- Scores are real numbers, larger meaning "more positive"; a prediction is positive when
  ``score >= threshold``.
- A metric that is undefined on its input (AUROC with one class absent, F1 with no positive label
  and no positive prediction, anything on zero rows) is NaN, never an exception, so that means over
  labels, seeds and bootstrap draws can skip it.

This module holds the thresholded metrics (accuracy, balanced accuracy, F1, sensitivity and
specificity, Youden's threshold, :func:`binary_metrics`) and re-exports the rank metrics of
:mod:`probes.evaluation.rank_metrics` (AUROC from ranks, equal to ``sklearn.metrics.roc_auc_score``; average
precision, equal to ``sklearn.metrics.average_precision_score``; their many-rows-at-once forms and
the multi-class one-vs-rest AUROC), so ``metrics.auroc`` and friends keep one home. Calibration
metrics (ECE, Brier) are in :mod:`probes.evaluation.calibration`.
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError
from probes.evaluation.rank_metrics import (
    _binary_labels,
    _finite_scores,
    auroc,
    auroc_ovr,
    auroc_per_label,
    auroc_rows,
    average_precision,
    average_precision_per_label,
    average_precision_rows,
    mean_auroc,
    mean_average_precision,
    one_hot,
)

__all__ = [
    "accuracy",
    "auroc",
    "auroc_ovr",
    "auroc_per_label",
    "auroc_rows",
    "average_precision",
    "average_precision_per_label",
    "average_precision_rows",
    "balanced_accuracy",
    "binary_metrics",
    "f1",
    "mean_auroc",
    "mean_average_precision",
    "one_hot",
    "sensitivity_specificity",
    "youden_threshold",
]


def _present(y_true) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    if np.issubdtype(y.dtype, np.floating):
        return y, ~np.isnan(y)
    return y, np.ones(y.shape, dtype=bool)


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions (binary or multi-class; equals ``accuracy_score``).

    Args:
        y_true: [n] true labels (float NaN = missing, left out).
        y_pred: [n] predicted labels of the same kind.

    Returns:
        Accuracy in [0, 1]; NaN on zero rows.
    """
    y, ok = _present(y_true)
    p = np.asarray(y_pred)
    if p.shape != y.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y.shape} vs {p.shape}")
    return float(np.mean(y[ok] == p[ok])) if ok.any() else float("nan")


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (equals ``balanced_accuracy_score``).

    Args:
        y_true: [n] true labels (float NaN = missing, left out).
        y_pred: [n] predicted labels.

    Returns:
        Balanced accuracy in [0, 1]; NaN on zero rows.
    """
    y, ok = _present(y_true)
    p = np.asarray(y_pred)
    if p.shape != y.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y.shape} vs {p.shape}")
    y, p = y[ok], p[ok]
    if not len(y):
        return float("nan")
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def f1(y_true, y_pred) -> float:
    """F1 score of the positive class (1) of a binary task (equals ``f1_score`` where defined).

    Args:
        y_true: 0/1 [n] (NaN = missing, left out).
        y_pred: 0/1 or bool [n].

    Returns:
        ``2 TP / (2 TP + FP + FN)``; NaN when there is no positive label and no positive
        prediction (scikit-learn returns 0 there, with a warning).
    """
    y = _binary_labels(y_true)
    p = np.asarray(y_pred).astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {y.shape} vs {p.shape}")
    ok = ~np.isnan(y)
    t, p = y[ok] == 1, p[ok]
    tp = np.sum(t & p)
    den = 2 * tp + np.sum(~t & p) + np.sum(t & ~p)
    return float(2 * tp / den) if den else float("nan")


def sensitivity_specificity(y_true, score, threshold: float) -> tuple[float, float]:
    """Sensitivity (true-positive rate) and specificity (true-negative rate) at a threshold.

    Args:
        y_true: 0/1 [n] (NaN = missing, left out).
        score: float [n]; predicted positive when ``score >= threshold``.
        threshold: decision threshold, e.g. from :func:`youden_threshold` on the validation split.

    Returns:
        ``(sensitivity, specificity)``, each NaN when its class is absent.
    """
    y = _binary_labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    ok = ~np.isnan(y)
    y, pred = y[ok], s[ok] >= threshold
    pos, neg = y == 1, y == 0
    sens = float(np.mean(pred[pos])) if pos.any() else float("nan")
    spec = float(np.mean(~pred[neg])) if neg.any() else float("nan")
    return sens, spec


def youden_threshold(y_val, s_val) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1, chosen on validation data.

    Candidates are the distinct validation scores (predict positive when ``score >= t``), the same
    set as the thresholds of ``sklearn.metrics.roc_curve``; among equally good thresholds the
    highest is returned. Choose it on the validation split and apply it unchanged to test.

    Args:
        y_val: 0/1 [n] validation labels (NaN = missing, left out).
        s_val: float [n] validation scores.

    Returns:
        The threshold (one of the validation scores).

    Raises:
        FeatcacheError: the validation labels lack positives or negatives.
    """
    y = _binary_labels(y_val, "y_val")
    s = _finite_scores(s_val, "s_val")
    ok = ~np.isnan(y)
    y, s = y[ok], s[ok]
    s_pos, s_neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    if not len(s_pos) or not len(s_neg):
        raise FeatcacheError(
            "youden_threshold needs positives and negatives in the validation labels; "
            f"got {len(s_pos)} positives and {len(s_neg)} negatives"
        )
    cand = np.unique(s)
    tp = len(s_pos) - np.searchsorted(s_pos, cand, side="left")
    fp = len(s_neg) - np.searchsorted(s_neg, cand, side="left")
    # J scaled by n_pos * n_neg stays an exact integer, so ties between thresholds are exact
    j = tp * len(s_neg) - fp * len(s_pos)
    best = np.flatnonzero(j == j.max())[-1]
    return float(cand[best])


def binary_metrics(y, score, threshold: float) -> dict[str, float]:
    """All binary metrics of one label at once.

    Args:
        y: 0/1 [n] (NaN = missing, left out).
        score: float [n].
        threshold: decision threshold for the thresholded metrics (``score >= threshold``).

    Returns:
        ``{"auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "threshold",
        "n", "n_pos"}`` (floats; ``n`` and ``n_pos`` count the non-missing rows and positives).
    """
    yy = _binary_labels(y)
    s = _finite_scores(score)
    ok = ~np.isnan(yy)
    yy, s = yy[ok], s[ok]
    pred = (s >= threshold).astype(np.float64)
    sens, spec = sensitivity_specificity(yy, s, threshold)
    return {
        "auroc": auroc(yy, s),
        "accuracy": accuracy(yy, pred),
        "balanced_accuracy": balanced_accuracy(yy, pred),
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1(yy, pred),
        "threshold": float(threshold),
        "n": float(len(yy)),
        "n_pos": float(np.sum(yy == 1)),
    }
