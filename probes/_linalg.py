"""Numerical plumbing shared by the probe estimators (numpy/scipy only, never torch).

Holds the pieces two or more probes use: target validation, L2 normalisation, the
temperature-softmax kNN vote, a rank-based AUROC and the softmax; the batched
logistic-regression solvers live in ``probes._lbfgs`` and are re-exported here.

All solvers minimise scikit-learn's objective, ``C * sum(log_loss) + 0.5 * ||W||^2`` with an
unpenalised intercept, so their optimum is the one ``sklearn.linear_model.LogisticRegression``
reaches with the same ``C``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import softmax
from scipy.stats import rankdata

from featcache.errors import FeatcacheError

from ._lbfgs import (  # noqa: F401  (re-exported: the probes import the solvers from here)
    batched_lbfgs,
    fit_binary_newton_dual,
    fit_multinomial_lbfgs,
    fit_ovr_lbfgs,
)

TASKS = ("multilabel", "multiclass")


def check_task(task: str) -> str:
    """Return ``task`` if it is a known task name.

    Raises:
        FeatcacheError: for anything but ``"multilabel"`` or ``"multiclass"``.
    """
    if task not in TASKS:
        raise FeatcacheError(f"unknown task {task!r}: use 'multilabel' or 'multiclass'")
    return task


def check_features(X: np.ndarray, name: str = "X") -> np.ndarray:
    """Validate a feature matrix.

    Args:
        X: float [N, D], finite.
        name: how the matrix is named in error messages.

    Returns:
        float32 [N, D] (a view when ``X`` already is C-contiguous float32).

    Raises:
        FeatcacheError: for a wrong rank, no rows, or NaN/inf values.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise FeatcacheError(f"{name} must be a 2-D feature matrix [N, D]; got shape {X.shape}")
    if X.shape[0] == 0:
        raise FeatcacheError(f"{name} has no rows: check the split selection")
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise FeatcacheError(
            f"{name} has non-finite values in {bad.size} rows (first: {bad[:5].tolist()}); "
            "re-extract those rows or drop them before probing"
        )
    return X


def check_targets(Y: np.ndarray, task: str, n_rows: int, name: str = "Y") -> np.ndarray:
    """Validate targets for a task.

    Args:
        Y: multi-label float [N, L] with 1 positive, 0 negative, NaN missing; or multi-class
            int [N] class indices with -1 missing.
        task: ``"multilabel"`` or ``"multiclass"``.
        n_rows: the number of feature rows ``Y`` must match.
        name: how the targets are named in error messages.

    Returns:
        float32 [N, L] (multi-label) or int64 [N] (multi-class).

    Raises:
        FeatcacheError: for a shape mismatch, an unmapped uncertain label (-1) or any value
            outside the convention, naming the first offending row and column.
    """
    check_task(task)
    if task == "multilabel":
        Y = np.asarray(Y, dtype=np.float32)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[0] != n_rows:
            raise FeatcacheError(
                f"{name} must be float [N={n_rows}, L] multi-label targets; got shape {Y.shape}"
            )
        bad = ~(np.isnan(Y) | (Y == 0) | (Y == 1))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            hint = (
                "map uncertain labels first (apply_uncertain with 'ignore', 'zeros' or 'ones')"
                if Y[row, col] == -1
                else "labels must be 1, 0 or missing"
            )
            raise FeatcacheError(
                f"{name} row {row}, label column {col} holds {Y[row, col]:g}: {hint} ({int(bad.sum())} such values)"
            )
        return Y
    y = np.asarray(Y)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise FeatcacheError(f"{name} must be int [N={n_rows}] class indices; got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isnan(y) | (y == np.round(y))):
            raise FeatcacheError(f"{name} must hold integer class indices (-1 missing)")
        y = np.where(np.isnan(y), -1, y)
    elif y.dtype.kind not in "iub":
        raise FeatcacheError(f"{name} must hold integer class indices (-1 missing); got dtype {y.dtype}")
    y = y.astype(np.int64)
    if (y < -1).any():
        row = int(np.flatnonzero(y < -1)[0])
        raise FeatcacheError(f"{name} row {row} holds class {y[row]}: classes are 0..C-1, -1 missing")
    return y


def l2_normalize(X: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Optionally centre, then scale rows to unit L2 norm (all-zero rows stay zero).

    Args:
        X: float [N, D].
        center: float [D] subtracted before normalising, or None.

    Returns:
        float32 [N, D].
    """
    X = np.asarray(X, dtype=np.float32)
    if center is not None:
        X = X - np.asarray(center, dtype=np.float32)
    # einsum avoids the [N, D] temporary of X * X; one multiply writes the result.
    norm = np.sqrt(np.einsum("ij,ij->i", X, X))
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    return X * inv[:, None]


def knn_vote(
    sims: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int],
    temperature: float,
    task: str,
    n_classes: int = 0,
) -> dict[int, np.ndarray]:
    """Temperature-softmax votes of the nearest neighbours, for every k from one search.

    Neighbour ``j`` of a query gets weight ``exp(sim_j / T)`` normalised over the query's top k.
    Multi-class: probabilities are the weighted one-hot sums. Multi-label: the score of a label
    is the weighted mean of the neighbours' labels, neighbours whose label is missing (NaN)
    left out; NaN when all k are missing.

    Args:
        sims: float [..., K] similarities sorted in decreasing order along the last axis.
        targets: neighbour targets: float [..., K, L] (multi-label, NaN missing) or
            int [..., K] class indices (multi-class).
        ks: the k values, each at most K.
        temperature: softmax temperature T.
        task: ``"multilabel"`` or ``"multiclass"``.
        n_classes: C, needed for multi-class.

    Returns:
        dict k -> float64 [..., L] (multi-label) or [..., C] (multi-class).
    """
    s = np.asarray(sims, dtype=np.float64) / temperature
    # Shifting by the best similarity keeps exp() finite; the shift cancels in every normalisation.
    w = np.exp(s - s[..., :1])
    out = {}
    if task == "multiclass":
        onehot = np.zeros((*targets.shape, n_classes), dtype=np.float64)
        np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
        for k in ks:
            wk = w[..., :k]
            out[k] = np.einsum("...j,...jc->...c", wk, onehot[..., :k, :]) / wk.sum(-1, keepdims=True)
        return out
    known = ~np.isnan(targets)
    vals = np.where(known, targets, 0.0)
    for k in ks:
        wk = w[..., :k, None]
        den = (wk * known[..., :k, :]).sum(-2)
        num = (wk * vals[..., :k, :]).sum(-2)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = np.where(den > 0, num / den, np.nan)
    return out


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve from ranks (ties count one half).

    Args:
        y_true: float or int [n], 1 positive, 0 negative, NaN ignored.
        scores: float [n], higher means more likely positive.

    Returns:
        AUROC in [0, 1]; NaN when the known labels hold only one class.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(s)
    y, s = y[keep], s[keep]
    n_pos = int((y == 1).sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_columns(Y: np.ndarray, S: np.ndarray) -> np.ndarray:
    """Per-column AUROC.

    Args:
        Y: float [n, L] binary targets, NaN ignored.
        S: float [n, L] scores.

    Returns:
        float64 [L], NaN for a column with a single class.
    """
    return np.array([auroc(Y[:, j], S[:, j]) for j in range(Y.shape[1])])


def ovr_auroc(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of every class.

    Args:
        y: int [n] class indices, -1 ignored.
        proba: float [n, C] class scores.

    Returns:
        float64 [C], NaN for a class absent from (or alone in) ``y``.
    """
    keep = y >= 0
    onehot = (y[keep, None] == np.arange(proba.shape[1])).astype(np.float64)
    return auroc_columns(onehot, proba[keep])


def multinomial_proba(Z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis. Z: float [..., C] logits -> float64 [..., C]."""
    return softmax(np.asarray(Z, dtype=np.float64), axis=-1)
