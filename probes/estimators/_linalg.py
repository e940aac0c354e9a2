"""Numerical plumbing shared by the probe estimators (numpy/scipy only, never torch).

Holds the pieces two or more probes use: target validation, L2 normalisation, the
temperature-softmax kNN vote, a rank-based AUROC and the softmax; the batched
logistic-regression solvers live in ``probes.estimators._lbfgs``.

All solvers minimise scikit-learn's objective, ``C * sum(log_loss) + 0.5 * ||W||^2`` with an
unpenalised intercept, so their optimum is the one ``sklearn.linear_model.LogisticRegression``
reaches with the same ``C``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import softmax

from featcache.errors import FeatcacheError
from probes.evaluation.rank_metrics import auroc as _auroc

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


VOTES = ("dinov2", "renormalized")


def knn_vote(
    sims: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int],
    temperature: float,
    task: str,
    n_classes: int = 0,
    softmax_k: int | None = None,
    vote: str = "dinov2",
) -> dict[int, np.ndarray]:
    """Temperature-softmax votes of the nearest neighbours, for every k from one search.

    ``vote="dinov2"`` is the arithmetic of ``KnnModule.forward`` in facebookresearch/dinov2
    ``dinov2/eval/knn.py``: the weights ``w_j = softmax(sims / T)`` are taken ONCE over the first
    ``W = softmax_k`` neighbours (default ``max(ks)``, as dinov2's ``max_k``) and the score at k is
    the sum of the first k weighted votes, not renormalised per k. The score at a small k thus
    depends on the largest k asked in the same call (as in dinov2); its ranking of queries is
    ``renormalized`` times the per-query mass ``m_k = sum_{j<k} w_j``.

    - Multi-class: weighted one-hot sums; they sum to ``m_k`` (1 at k = W).
    - Multi-label: ``sum_{j<k} w_j y_j`` with the 0/1 label vectors in place of the one-hot (what
      dinov2 does with multi-hot labels). A neighbour whose label is missing (NaN) does not vote
      for that label: its weight is handed to the neighbours among the first k that know it, in
      proportion to their weights, i.e. the score is ``m_k * sum_known w_j y_j / sum_known w_j``.
      With no label missing this is exactly dinov2's sum; NaN when none of the first k knows it.

    ``vote="renormalized"`` takes the softmax over each k's own neighbours (``W = k``): multi-class
    probabilities sum to one at every k; multi-label scores are the known-weighted mean of the
    labels. Same arg-max (top-1 accuracy) as dinov2, different ranking across queries for k < W.

    Args:
        sims: float [..., K] similarities sorted in decreasing order along the last axis.
        targets: neighbour targets: float [..., K, L] (multi-label, NaN missing) or
            int [..., K] class indices in [0, C) (multi-class).
        ks: the k values, each at most K (and at most W for ``"dinov2"``).
        temperature: softmax temperature T.
        task: ``"multilabel"`` or ``"multiclass"``.
        n_classes: C, needed for multi-class.
        softmax_k: W, the softmax window of ``"dinov2"`` (None: ``max(ks)``); at most K.
        vote: ``"dinov2"`` or ``"renormalized"``.

    Returns:
        dict k -> float64 [..., L] (multi-label) or [..., C] (multi-class).

    Raises:
        FeatcacheError: for an unknown vote or a k/window outside the searched neighbours.
    """
    if vote not in VOTES:
        raise FeatcacheError(f"unknown vote {vote!r}: use 'dinov2' or 'renormalized'")
    ks = sorted({int(k) for k in ks})
    K = sims.shape[-1]
    window = ks[-1] if softmax_k is None else int(softmax_k)
    if ks[0] < 1 or ks[-1] > K or (vote == "dinov2" and not ks[-1] <= window <= K):
        raise FeatcacheError(
            f"k {ks} and softmax window {window} must satisfy 1 <= k <= window <= {K} searched neighbours"
        )
    lead = sims.shape[:-1]
    kmax = window if vote == "dinov2" else ks[-1]
    s = np.asarray(sims, dtype=np.float64).reshape(-1, K)[:, :kmax] / temperature
    # Shifting by the best similarity keeps exp() finite; the shift cancels in every normalisation.
    e = np.exp(s - s[:, :1])
    n = s.shape[0]
    out = {}
    if task == "multiclass":
        lab = np.asarray(targets).reshape(n, K)[:, :kmax]
        w = e / e.sum(1, keepdims=True) if vote == "dinov2" else e
        # Flat bincount over (query, class): no [n, K, C] one-hot tensor.
        flat = np.arange(n)[:, None] * n_classes + lab
        acc = np.zeros(n * n_classes)
        prev = 0
        for k in ks:
            acc += np.bincount(flat[:, prev:k].ravel(), w[:, prev:k].ravel(), minlength=n * n_classes)
            prev = k
            v = acc.reshape(n, n_classes)
            if vote == "renormalized":
                v = v / w[:, :k].sum(1, keepdims=True)
            out[k] = v.reshape(*lead, n_classes).copy()
        return out
    L = targets.shape[-1]
    tg = np.asarray(targets, dtype=np.float64).reshape(n, K, L)[:, :kmax]
    known = ~np.isnan(tg)
    vals = np.where(known, tg, 0.0)
    w = e / e.sum(1, keepdims=True) if vote == "dinov2" else e
    num = np.zeros((n, L))
    den = np.zeros((n, L))
    count = np.zeros((n, L), dtype=np.int64)
    mass = np.zeros(n)
    prev = 0
    for k in ks:
        seg = w[:, prev:k, None]
        num += (seg * vals[:, prev:k]).sum(1)
        den += (seg * known[:, prev:k]).sum(1)
        count += known[:, prev:k].sum(1)
        mass += w[:, prev:k].sum(1)
        prev = k
        with np.errstate(invalid="ignore", divide="ignore"):
            if vote == "renormalized":
                v = np.where(den > 0, num / den, np.nan)
            else:
                # All k known: dinov2's sum itself, untouched; otherwise redistribute the missing weight.
                v = np.where(count == k, num, np.where(den > 0, num * (mass[:, None] / den), np.nan))
        out[k] = v.reshape(*lead, L)
    return out


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, ties counting one half: :func:`probes.evaluation.metrics.auroc` (the one AUROC
    of the package) on the rows whose label and score are both known.

    Args:
        y_true: float or int [n], 1 positive, 0 negative, NaN ignored.
        scores: float [n], higher means more likely positive.

    Returns:
        AUROC in [0, 1]; NaN when the known labels hold only one class.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    keep = ~np.isnan(y) & ~np.isnan(s)
    if not keep.any():
        return float("nan")
    return _auroc(y[keep], s[keep])


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
