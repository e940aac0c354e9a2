"""Calibration of probe probabilities: expected calibration error, Brier score, reliability diagrams.

Definitions (one binary label; a multi-class probe is taken one class against the rest, on the
class probability). With scores p_i in [0, 1], labels y_i in {0, 1} and weights w_i (1 unless a
bootstrap draw counts a row several times), rows with a missing label left out:

- **Brier score** ``sum_i w_i (p_i - y_i)^2 / sum_i w_i`` (``sklearn.metrics.brier_score_loss``).
- **ECE** with B equal-width bins (10 by default): row i falls in bin
  ``b_i = min(floor(p_i * B), B - 1)``, so bin b holds ``[b/B, (b+1)/B)`` and the last bin also
  holds p = 1. ``ECE = sum_b (W_b / W) |ybar_b - pbar_b|`` with W_b the weight in bin b, ybar_b
  and pbar_b the weighted means of y and p in it; empty bins add nothing. Equivalently
  ``ECE = sum_b |sum_{i in b} w_i (y_i - p_i)| / W``.

These only mean something for probabilities: logistic-regression sigmoid/softmax outputs, kNN vote
shares and ML-kNN posteriors are; the rows say which (``params.calibration_of``). Scores outside
[0, 1] are refused (:func:`check_probabilities`).

This module does not import torch or matplotlib (the diagram is :mod:`probes.report.reliability`).
"""

from __future__ import annotations

import numpy as np

from featcache.errors import FeatcacheError
from probes.evaluation.rank_metrics import _binary_labels, _finite_scores

__all__ = [
    "DEFAULT_BINS",
    "brier",
    "brier_rows",
    "check_probabilities",
    "ece",
    "ece_rows",
    "reliability_bins",
]

DEFAULT_BINS = 10
_TOL = 1e-9  # sums of softmax weights may exceed 1 by rounding


def check_probabilities(score, name: str = "score") -> np.ndarray:
    """float64 copy of ``score`` clipped to [0, 1]; refuses values outside [-1e-9, 1 + 1e-9].

    Raises:
        FeatcacheError: a score is not a probability.
    """
    p = _finite_scores(score, name)
    if p.size and (p.min() < -_TOL or p.max() > 1 + _TOL):
        raise FeatcacheError(
            f"{name} holds values in [{p.min():.4g}, {p.max():.4g}]: calibration needs probabilities in [0, 1]"
        )
    return np.clip(p, 0.0, 1.0)


def _prep(y, p, sample_weight):
    """Labels [n] with their rows' probabilities [n] and weights [E, n] (missing labels dropped)."""
    yy = _binary_labels(y)
    pp = check_probabilities(p)
    if yy.ndim != 1 or yy.shape != pp.shape:
        raise ValueError(f"y and p must both be [n], got {yy.shape} and {pp.shape}")
    w = np.ones((1, len(yy))) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w = np.atleast_2d(w)
    if w.shape[1] != len(yy):
        raise ValueError(f"sample_weight has {w.shape[1]} columns, expected {len(yy)}")
    ok = ~np.isnan(yy)
    return yy[ok], pp[ok], w[:, ok]


def _bin_of(p: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def ece_rows(y, p, sample_weight, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """ECE under many weightings of the same rows (e.g. every bootstrap draw).

    Args:
        y: 0/1 labels [n] (NaN = missing, left out).
        p: probabilities [n].
        sample_weight: float [E, n] (or [n]) non-negative weights.
        n_bins: equal-width bins on [0, 1].

    Returns:
        float64 [E]; NaN for a weighting with zero total weight.
    """
    yy, pp, w = _prep(y, p, sample_weight)
    onehot = np.eye(n_bins)[_bin_of(pp, n_bins)]  # [n, B]
    gap = np.abs((w * (yy - pp)) @ onehot).sum(axis=1)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / total, np.nan)


def brier_rows(y, p, sample_weight) -> np.ndarray:
    """Brier score under many weightings: float64 [E] for y [n], p [n], weights [E, n]."""
    yy, pp, w = _prep(y, p, sample_weight)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w @ (pp - yy) ** 2) / total, np.nan)


def ece(y_true, p, n_bins: int = DEFAULT_BINS, sample_weight=None) -> float:
    """Expected calibration error of one label (module docstring); NaN on zero rows."""
    return float(ece_rows(y_true, p, sample_weight, n_bins)[0])


def brier(y_true, p, sample_weight=None) -> float:
    """Brier score of one label (equals ``sklearn.metrics.brier_score_loss``); NaN on zero rows."""
    return float(brier_rows(y_true, p, sample_weight)[0])


def reliability_bins(y_true, p, n_bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """What a reliability diagram draws: per equal-width bin, its rows, mean probability and
    fraction of positives.

    Returns:
        ``{"edges": float [B + 1], "count": int [B], "mean_p": float [B], "frac_pos": float [B]}``
        (NaN means in empty bins).
    """
    yy, pp, _ = _prep(y_true, p, None)
    b = _bin_of(pp, n_bins)
    count = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(b, pp, minlength=n_bins) / count
        frac = np.bincount(b, yy, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "mean_p": mean_p, "frac_pos": frac}
