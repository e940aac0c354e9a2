"""Logistic-regression (linear) probe on cached features, with C chosen on the validation split.

Protocol (after ``dinov2/eval/log_regression.py``, adapted to multi-label medical labels):

- Features are z-scored with the train mean and standard deviation (a feature whose standard
  deviation is zero, up to rounding, is only centred, as ``sklearn.preprocessing.StandardScaler``).
- Objective: scikit-learn's ``C * sum(log_loss) + 0.5 * ||w||^2``, intercept unpenalised.
  Multi-label: one binary problem per label (one-vs-rest), each over the rows where that label
  is known (missing = NaN is masked per label); all labels are solved together by one L-BFGS
  whose every step is a matrix-matrix product. Multi-class: one multinomial (softmax) model, as
  scikit-learn's default.
- Without ``C``: every C of ``C_grid`` (ascending, each fit warm-started from the previous one)
  is fitted on the train rows only and scored on the validation rows only, never on test.
  Multi-label picks C per label by validation AUROC; multi-class picks one C by the mean
  one-vs-rest validation AUROC over classes present in validation. Ties go to the smaller C.
  The kept model is the train-only fit at the chosen C (the objective is strictly convex, so
  this is the model a refit at that C would give, up to the solver tolerance).

The default grid, ``10**-6 .. 10**5`` one value per decade, spans the range of the DINOv2
evaluation grid (45 values, ``10**linspace(-6, 5, 45)``) at a quarter of the fits.

Example:
    >>> probe = LogRegProbe(task="multilabel").fit(X_tr, Y_tr, X_val=X_va, Y_val=Y_va)
    >>> probe.C_, probe.predict_scores(X_te).shape   # [L], (n, L)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator

from featcache.errors import FeatcacheError

from ._linalg import (
    auroc_columns,
    check_features,
    check_targets,
    check_task,
    fit_multinomial_lbfgs,
    fit_ovr_lbfgs,
    multinomial_proba,
    ovr_auroc,
)

DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-6, 6))
"""Inverse regularisation strengths tried when no ``C`` is given: 1e-6, 1e-5, ..., 1e5."""

_POLICIES = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}


def apply_uncertain(Y: np.ndarray, policy: str) -> np.ndarray:
    """Map uncertain labels (-1) by a policy, leaving 1, 0 and missing (NaN) as they are.

    Args:
        Y: float [N, L] raw labels: 1 positive, 0 negative, -1 uncertain, NaN missing.
        policy: ``"ignore"`` (uncertain -> missing), ``"zeros"`` (-> negative) or ``"ones"``
            (-> positive), the U-Ignore / U-Zeros / U-Ones policies of CheXpert; a ``"u-"``
            prefix and any case are accepted.

    Returns:
        float32 [N, L] with values 1, 0 and NaN only.

    Raises:
        FeatcacheError: for an unknown policy or a value other than 1, 0, -1 and NaN.
    """
    key = str(policy).lower().removeprefix("u-").removeprefix("u_")
    if key not in _POLICIES:
        raise FeatcacheError(f"unknown uncertain-label policy {policy!r}: use 'ignore', 'zeros' or 'ones'")
    Y = np.array(Y, dtype=np.float32, copy=True)
    bad = ~(np.isnan(Y) | np.isin(Y, (1.0, 0.0, -1.0)))
    if bad.any():
        pos = np.argwhere(bad)[0]
        raise FeatcacheError(
            f"label value {Y[tuple(pos)]:g} at row {pos[0]}, label column {pos[-1]}: labels must be 1, 0, -1 or blank"
        )
    Y[Y == -1] = _POLICIES[key]
    return Y


class LogRegProbe(BaseEstimator):
    """L2-regularised logistic regression on standardised features, C chosen on validation.

    Args:
        C: inverse regularisation strength; None selects it from ``C_grid`` on the
            validation rows passed to ``fit``.
        C_grid: the candidate C values (see ``DEFAULT_C_GRID``).
        task: ``"multilabel"`` (Y float [N, L], 1/0/NaN) or ``"multiclass"`` (y int [N], -1 missing).
        max_iter: L-BFGS iterations at most per fit.
        tol: L-BFGS stops when every entry of the gradient of the mean-scaled objective
            (scikit-learn's scaling) is below this.
        standardize: z-score features with the train statistics first.

    Attributes:
        mean_: float64 [D], scale_: float64 [D]: the standardisation (0 and 1 without it).
        coef_: float64 [L, D] (multi-label) or [C, D] (multi-class), on standardised features.
        intercept_: float64 [L] or [C].
        C_: float64 [L], the C of each label (multi-label), or a float (multi-class).
        val_auroc_: float64 [G, L] validation AUROC per grid C and label (multi-label) or
            float64 [G] mean one-vs-rest AUROC (multi-class); only when C was selected.
        n_labels_: int, L or the number of classes C = max(y) + 1.
    """

    def __init__(
        self,
        C: float | None = None,
        C_grid: Sequence[float] = DEFAULT_C_GRID,
        task: str = "multilabel",
        max_iter: int = 1000,
        tol: float = 1e-6,
        standardize: bool = True,
    ):
        self.C = C
        self.C_grid = C_grid
        self.task = task
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def _transform(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        X_val: np.ndarray | None = None,
        Y_val: np.ndarray | None = None,
    ) -> LogRegProbe:
        """Fit on the train rows, selecting C on the validation rows when ``C`` is None.

        Args:
            X: float [N, D] train features.
            Y: float32 [N, L] multi-label targets (1/0/NaN) or int64 [N] classes (-1 missing).
            X_val: float [M, D] validation features (needed when ``C`` is None, unused otherwise).
            Y_val: validation targets, as ``Y``.

        Returns:
            self.

        Raises:
            FeatcacheError: no C and no validation rows; a label with one class only in the
                train (or validation) rows; a class without train rows.
        """
        check_task(self.task)
        X = check_features(X, "X_train")
        Y = check_targets(Y, self.task, X.shape[0], "Y_train")
        grid = self._grid()
        if self.C is None:
            if X_val is None or Y_val is None:
                raise FeatcacheError(
                    "no C given and no validation rows: pass C=... or X_val and Y_val to fit"
                )
            X_val = check_features(X_val, "X_val")
            Y_val = check_targets(Y_val, self.task, X_val.shape[0], "Y_val")
        if self.standardize:
            X64 = X.astype(np.float64)
            self.mean_ = X64.mean(0)
            std = X64.std(0)
            # Same rule as StandardScaler: a zero (up to rounding) spread is left unscaled.
            self.scale_ = np.where(
                std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(self.mean_), 1.0), 1.0, std
            )
            del X64
        else:
            self.mean_ = np.zeros(X.shape[1])
            self.scale_ = np.ones(X.shape[1])
        Xs = self._transform(X)
        Xv = self._transform(X_val) if self.C is None else None
        if self.task == "multilabel":
            self._fit_multilabel(Xs, Y, Xv, Y_val, grid)
        else:
            self._fit_multiclass(Xs, Y, Xv, Y_val, grid)
        return self

    def _grid(self) -> np.ndarray:
        if self.C is not None:
            if not float(self.C) > 0:
                raise FeatcacheError(f"C must be positive; got {self.C!r}")
            return np.array([float(self.C)])
        grid = np.sort(np.asarray(self.C_grid, dtype=np.float64).ravel())
        if grid.size == 0 or not (grid > 0).all():
            raise FeatcacheError(f"C_grid must hold positive values; got {self.C_grid!r}")
        return grid

    def _fit_multilabel(self, Xs, Y, Xv, Y_val, grid):
        D, L = Xs.shape[1], Y.shape[1]
        for j in range(L):
            n_pos, n_neg = int((Y[:, j] == 1).sum()), int((Y[:, j] == 0).sum())
            if n_pos == 0 or n_neg == 0:
                raise FeatcacheError(
                    f"label column {j} has {n_pos} positive and {n_neg} negative train rows: a linear probe "
                    "needs both; drop the label or change the split"
                )
        self.n_labels_ = L
        W = None
        fits, aucs = [], []
        for c in grid:
            W = fit_ovr_lbfgs(Xs, Y, np.full(L, c), coef0=W, max_iter=self.max_iter, tol=self.tol)
            fits.append(W)
            if Xv is not None:
                aucs.append(auroc_columns(Y_val, Xv @ W[:, :D].T + W[:, D]))
        if Xv is None:
            best = np.zeros(L, dtype=np.int64)
        else:
            self.val_auroc_ = np.array(aucs)
            undefined = np.flatnonzero(np.isnan(self.val_auroc_[0]))
            if undefined.size:
                j = int(undefined[0])
                raise FeatcacheError(
                    f"label column {j} has {int((Y_val[:, j] == 1).sum())} positive and "
                    f"{int((Y_val[:, j] == 0).sum())} negative validation rows: C cannot be selected on "
                    "AUROC; pass C=... or change the split"
                )
            best = np.argmax(self.val_auroc_, axis=0)
        W = np.stack([fits[g][j] for j, g in enumerate(best)])
        self.coef_, self.intercept_ = W[:, :D].copy(), W[:, D].copy()
        self.C_ = grid[best]

    def _fit_multiclass(self, Xs, y, Xv, y_val, grid):
        D = Xs.shape[1]
        n_classes = int(y.max()) + 1
        if n_classes < 2:
            raise FeatcacheError(
                "the train rows hold fewer than two classes: a linear probe needs at least two"
            )
        counts = np.bincount(y[y >= 0], minlength=n_classes)
        if (counts == 0).any():
            c = int(np.flatnonzero(counts == 0)[0])
            raise FeatcacheError(f"class {c} has no labelled train rows: drop the class or change the split")
        self.n_labels_ = n_classes
        W = None
        fits, aucs = [], []
        for c in grid:
            W = fit_multinomial_lbfgs(
                Xs[None], y[None], n_classes, c, coef0=W, max_iter=self.max_iter, tol=self.tol
            )
            fits.append(W[0])
            if Xv is not None:
                aucs.append(ovr_auroc(y_val, Xv @ W[0, :D] + W[0, D]))
        if Xv is None:
            best = 0
        else:
            per_class = np.array(aucs)
            if np.isnan(per_class[0]).all():
                raise FeatcacheError(
                    "no class has both members and non-members among the validation rows: "
                    "C cannot be selected on AUROC; pass C=... or change the split"
                )
            self.val_auroc_ = np.nanmean(per_class, axis=1)
            best = int(np.argmax(self.val_auroc_))
        self.coef_, self.intercept_ = fits[best][:D].T.copy(), fits[best][D].copy()
        self.C_ = float(grid[best])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits.

        Args:
            X: float [n, D] features (raw: the train standardisation is applied here).

        Returns:
            float64 [n, L] (multi-label) or [n, C] (multi-class).
        """
        if not hasattr(self, "coef_"):
            raise FeatcacheError("this LogRegProbe is not fitted yet: call fit first")
        X = check_features(X, "X")
        return self._transform(X) @ self.coef_.T + self.intercept_

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Per-label positive probabilities or class probabilities.

        Args:
            X: float [n, D] features.

        Returns:
            float64 [n, L] sigmoid probabilities (multi-label) or [n, C] softmax probabilities.
        """
        Z = self.decision_function(X)
        return expit(Z) if self.task == "multilabel" else multinomial_proba(Z)
