"""Logistic-regression (linear) probe on cached features: scikit-learn's fit, dinov2's protocol.

Model (equal to ``sklearn.linear_model.LogisticRegression(C=C, solver="lbfgs")`` fitted on the
same transformed features, to the gradient tolerance):

- Objective ``C * sum(log_loss) + 0.5 * ||w||^2``, intercept unpenalised, solved in float64.
- Multi-label (Y float [N, L]): one binary problem per label (one-vs-rest) over the rows where that
  label is known (NaN missing is masked per label); all labels are solved together by one batched
  L-BFGS whose every step is a matrix-matrix product.
- Multi-class (y int [N], -1 missing) with K >= 3 classes: one multinomial (softmax) model, all K
  weight rows penalised, as scikit-learn. With K = 2 classes: one binary model at C (a 2-row
  softmax with both rows penalised would be binary logistic regression at 2C); ``coef_`` is then
  [1, D] and ``decision_function`` [n], as scikit-learn.
- Convergence: L-BFGS runs until every entry of the gradient of scikit-learn's mean-scaled
  objective is at most ``tol`` (default 1e-10), without scipy's objective-change stop that ends
  scikit-learn early at weak regularisation. One-vs-rest fits are solved in the scaled principal
  axes of the features (an exact change of variables, see ``fit_ovr_lbfgs``), which keeps weak
  regularisation on correlated features to hundreds of iterations. A fit that hits ``max_iter``
  is kept, flagged in ``converged_`` / ``n_iter_`` and warned about once.
- Features: with ``standardize=True`` (default) z-scored with the mean and population standard
  deviation of the rows fitted (``sklearn.preprocessing.StandardScaler``: a feature whose spread is
  zero up to rounding is only centred); with ``standardize=False`` used as given.

Protocol (``dinov2/eval/log_regression.py``): with ``C=None`` every C of ``C_grid`` (ascending, each
fit warm-started from the previous one) is fitted on the train rows only and scored on the
validation rows only, never on test. Multi-label picks C per label by validation AUROC;
multi-class picks one C by validation top-1 accuracy as dinov2 does (``select="auroc"``: mean
one-vs-rest AUROC over the classes present in validation). Ties go to the smaller C. Then, with
``refit=True`` (default), the final model is refitted on train + validation at the chosen C (the
standardisation recomputed on those rows), as dinov2 retrains on train + its selection split.
``dinov2_preset()`` gives dinov2's settings: its 45-value grid and its raw features.

Example:
    >>> probe = LogRegProbe(task="multilabel").fit(X_tr, Y_tr, X_val=X_va, Y_val=Y_va)
    >>> probe.C_, probe.predict_proba(X_te).shape   # [L], (n, L)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning

from featcache.errors import FeatcacheError
from probes.estimators._lbfgs import fit_multinomial_lbfgs, fit_ovr_lbfgs
from probes.estimators._linalg import (
    auroc_columns,
    check_features,
    check_targets,
    check_task,
    multinomial_proba,
    ovr_auroc,
)
from probes.labels import apply_uncertain  # noqa: F401  (re-exported: probes.estimators.logreg.apply_uncertain)

DEFAULT_C_GRID: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.arange(-6, 6))
"""Inverse regularisation strengths tried when no ``C`` is given: 1e-6, 1e-5, ..., 1e5."""

DINOV2_C_GRID: tuple[float, ...] = tuple(float(c) for c in 10.0 ** np.linspace(-6, 5, 45))
"""The DINOv2 evaluation grid, ``10**linspace(-6, 5, 45)`` (four values per decade)."""

SELECT = ("auto", "auroc", "accuracy")


def dinov2_preset(**overrides) -> dict:
    """Keyword arguments of ``LogRegProbe`` for the ``dinov2/eval/log_regression.py`` protocol.

    dinov2 feeds the backbone output (the class token after the final norm) to the solver as is,
    cast to float64: no L2 normalisation (that is its kNN's step) and no standardisation; it
    sweeps ``C`` over ``10**linspace(-6, 5, 45)``, selects on the selection split by top-1
    accuracy, then retrains on train + selection split at the chosen C. Here: ``C_grid =
    DINOV2_C_GRID``, ``standardize=False``, ``select="auto"`` (top-1 accuracy for multi-class,
    per-label AUROC for multi-label, which dinov2 does not cover), ``refit=True``. dinov2 caps
    cuML at 1000 iterations with ``tol=1e-12``; this probe instead runs to its gradient
    tolerance and records any fit that reaches ``max_iter``.

    Args:
        **overrides: keyword arguments replacing or adding to the preset (``task=...``).

    Returns:
        dict of ``LogRegProbe`` keyword arguments.
    """
    return {
        "C": None,
        "C_grid": DINOV2_C_GRID,
        "standardize": False,
        "select": "auto",
        "refit": True,
        **overrides,
    }


def _standardizer(X: np.ndarray, on: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean float64 [D], scale float64 [D]) of StandardScaler on float32 [N, D]; (0, 1) when off."""
    if not on:
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    X64 = X.astype(np.float64)
    mean, std = X64.mean(0), X64.std(0)
    # Same rule as StandardScaler: a zero (up to rounding) spread is left unscaled.
    tiny = std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)
    return mean, np.where(tiny, 1.0, std)


def _rebase(W: np.ndarray, old: tuple, new: tuple) -> np.ndarray:
    """Rewrite binary weights [L, D + 1] fitted on ``(X - m0) / s0`` for ``(X - m1) / s1`` (same logits)."""
    (m0, s0), (m1, s1) = old, new
    w_raw = W[:, :-1] / s0
    b_raw = W[:, -1] - w_raw @ m0
    return np.concatenate([w_raw * s1, (b_raw + w_raw @ m1)[:, None]], axis=1)


class LogRegProbe(ClassifierMixin, BaseEstimator):
    """L2-regularised logistic regression, C chosen on validation, final fit on train + validation.

    Args:
        C: inverse regularisation strength; None selects it from ``C_grid`` on the validation
            rows passed to ``fit``.
        C_grid: the candidate C values (``DEFAULT_C_GRID``; ``DINOV2_C_GRID`` for dinov2's 45).
        task: ``"multilabel"`` (Y float [N, L], 1/0/NaN) or ``"multiclass"`` (y int [N], -1 missing).
        max_iter: L-BFGS iterations at most per fit (a fit that reaches it is flagged).
        tol: a fit has converged when every entry of the gradient of the mean-scaled objective
            (scikit-learn's scaling, so scikit-learn's ``tol`` meaning) is at most this.
        standardize: z-score features with the statistics of the rows fitted first.
        refit: after selecting C, refit on train + validation at the chosen C (dinov2); False
            keeps the train-only fit at the chosen C.
        select: selection metric: ``"auto"`` (multi-label: per-label AUROC; multi-class: top-1
            accuracy, as dinov2), ``"auroc"`` (multi-class: mean one-vs-rest AUROC) or
            ``"accuracy"`` (multi-class only).

    Attributes:
        mean_, scale_: float64 [D], the standardisation of the final fit (0 and 1 without it).
        coef_: float64 [L, D] (multi-label), [K, D] (multi-class) or [1, D] (two classes), on
            standardised features. intercept_: float64 [L], [K] or [1].
        classes_: int64 [K] (multi-class) or the label indices [L] (multi-label).
        n_labels_: int, L or K.
        C_: float64 [L], the C of each label (multi-label), or a float (multi-class).
        n_iter_: int64 [L] (multi-label) or [1] (multi-class): iterations of the final fit.
        converged_: bool, shaped as ``n_iter_``: whether the final fit met ``tol``.
        refit_: whether the final model was refitted on train + validation.
        fitted_on_: ``"train"`` or ``"train+val"``: the rows of the final fit.
        n_fit_rows_: int64 [L] (multi-label) or [1]: labelled rows in the final fit.
        Only when C was selected (``C=None``):
        val_auroc_: float64 [G, L] validation AUROC per grid C and label (multi-label) or
            [G, K] one-vs-rest AUROC per grid C and class (multi-class; NaN for a class absent
            from validation).
        val_accuracy_: float64 [G] validation top-1 accuracy per grid C (multi-class).
        val_score_: the selection criterion, [G, L] (multi-label) or [G] (multi-class).
        val_proba_: validation probabilities (as ``predict_proba``) of the train-only fit at the
            chosen C: held-out scores even after the refit has seen the validation rows.
        grid_converged_: bool [G, L] or [G, 1], whether each grid fit met ``tol``.
    """

    def __init__(
        self,
        C: float | None = None,
        C_grid: Sequence[float] = DEFAULT_C_GRID,
        task: str = "multilabel",
        max_iter: int = 5000,
        tol: float = 1e-10,
        standardize: bool = True,
        refit: bool = True,
        select: str = "auto",
    ):
        self.C = C
        self.C_grid = C_grid
        self.task = task
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.refit = refit
        self.select = select

    # ---- fitting ----

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        X_val: np.ndarray | None = None,
        Y_val: np.ndarray | None = None,
    ) -> LogRegProbe:
        """Fit; with ``C=None`` select C on the validation rows, then refit on train + validation.

        Args:
            X: float [N, D] train features.
            Y: float [N, L] multi-label targets (1/0/NaN) or int [N] classes (-1 missing).
            X_val: float [M, D] validation features (required when ``C`` is None; with a fixed
                ``C`` pass none: a fixed C fits exactly the rows of ``X``).
            Y_val: validation targets, as ``Y``.

        Returns:
            self.

        Raises:
            FeatcacheError: no C and no validation rows; validation rows with a fixed C; a label
                with one class only in the train (or validation) rows; a class without train rows.
        """
        check_task(self.task)
        select = self._select()
        X = check_features(X, "X_train")
        Y = check_targets(Y, self.task, X.shape[0], "Y_train")
        if self.C is None:
            if X_val is None or Y_val is None:
                raise FeatcacheError(
                    "no C given and no validation rows: pass C=... or X_val and Y_val to fit"
                )
            X_val = check_features(X_val, "X_val")
            if X_val.shape[1] != X.shape[1]:
                raise FeatcacheError(f"X_val has {X_val.shape[1]} features, X_train {X.shape[1]}")
            Y_val = check_targets(Y_val, self.task, X_val.shape[0], "Y_val")
        elif X_val is not None or Y_val is not None:
            raise FeatcacheError(
                "C is fixed, so there is nothing to select on X_val/Y_val: fit(X, Y) fits exactly the rows "
                "given; stack the validation rows into X and Y to fit them, or pass C=None to select C"
            )
        grid = self._grid()
        T, Tv = self._targets(Y, Y_val)
        stats = _standardizer(X, self.standardize)
        Xs = (X - stats[0]) / stats[1]
        path, n_iter, conv = self._path(Xs, T, grid)
        self.refit_, self.fitted_on_ = False, "train"
        if self.C is None:
            best = self._choose(path, (X_val - stats[0]) / stats[1], Tv, Y_val, grid, select)
        else:
            best = np.zeros(path.shape[1] if self.kind_ != "multinomial" else 1, dtype=np.int64)
        if self.kind_ == "multinomial":
            W, n_it, cv = path[best[0]], n_iter[best[0]], conv[best[0]]
        else:
            lab = np.arange(path.shape[1])
            W, n_it, cv = path[best, lab], n_iter[best, lab], conv[best, lab]
        C_used = grid[best]
        n_rows = self._n_rows(T)
        if self.C is None and self.refit:
            X_all = np.concatenate([X, X_val])
            T_all = np.concatenate([T, Tv])
            new = _standardizer(X_all, self.standardize)
            Xs_all = (X_all - new[0]) / new[1]
            if self.kind_ == "multinomial":
                W0 = _rebase(W.T, stats, new).T
                W, n_it, cv = fit_multinomial_lbfgs(
                    Xs_all[None],
                    T_all[None],
                    self.n_labels_,
                    float(C_used[0]),
                    coef0=W0[None],
                    **self._opts(),
                )
                W = W[0]
            else:
                W, n_it, cv = fit_ovr_lbfgs(
                    Xs_all, T_all, C_used, coef0=_rebase(W, stats, new), precondition=True, **self._opts()
                )
            stats, n_rows = new, self._n_rows(T_all)
            self.refit_, self.fitted_on_ = True, "train+val"
        self.mean_, self.scale_ = stats
        D = X.shape[1]
        if self.kind_ == "multinomial":
            self.coef_, self.intercept_ = W[:D].T.copy(), W[D].copy()
        else:
            self.coef_, self.intercept_ = W[:, :D].copy(), W[:, D].copy()
        self.C_ = C_used.astype(np.float64) if self.task == "multilabel" else float(C_used[0])
        self.n_iter_, self.converged_ = np.atleast_1d(n_it).astype(np.int64), np.atleast_1d(cv).astype(bool)
        self.n_fit_rows_ = n_rows
        self.grid_converged_ = conv.reshape(len(grid), -1)
        self._warn_unconverged()
        return self

    def _select(self) -> str:
        if self.select not in SELECT:
            raise FeatcacheError(f"unknown select {self.select!r}: use 'auto', 'auroc' or 'accuracy'")
        if self.task == "multilabel":
            if self.select == "accuracy":
                raise FeatcacheError(
                    "select='accuracy' needs task='multiclass'; multi-label selects on AUROC"
                )
            return "auroc"
        return "accuracy" if self.select == "auto" else self.select

    def _grid(self) -> np.ndarray:
        if self.C is not None:
            if not float(self.C) > 0:
                raise FeatcacheError(f"C must be positive; got {self.C!r}")
            return np.array([float(self.C)])
        grid = np.sort(np.asarray(self.C_grid, dtype=np.float64).ravel())
        if grid.size == 0 or not (grid > 0).all():
            raise FeatcacheError(f"C_grid must hold positive values; got {self.C_grid!r}")
        return grid

    def _opts(self) -> dict:
        return {"max_iter": int(self.max_iter), "tol": float(self.tol), "ftol": 0.0, "return_info": True}

    def _targets(self, Y, Y_val):
        """Solver targets: float [N, L] 1/0/NaN for binary problems, int [N] for multinomial."""
        if self.task == "multilabel":
            for j in range(Y.shape[1]):
                n_pos, n_neg = int((Y[:, j] == 1).sum()), int((Y[:, j] == 0).sum())
                if n_pos == 0 or n_neg == 0:
                    raise FeatcacheError(
                        f"label column {j} has {n_pos} positive and {n_neg} negative train rows: a linear "
                        "probe needs both; drop the label or change the split"
                    )
            self.kind_, self.n_labels_ = "ovr", Y.shape[1]
            self.classes_ = np.arange(Y.shape[1])
            return Y, Y_val
        n_classes = int(Y.max()) + 1
        if n_classes < 2:
            raise FeatcacheError(
                "the train rows hold fewer than two classes: a linear probe needs at least two"
            )
        counts = np.bincount(Y[Y >= 0], minlength=n_classes)
        if (counts == 0).any():
            c = int(np.flatnonzero(counts == 0)[0])
            raise FeatcacheError(f"class {c} has no labelled train rows: drop the class or change the split")
        if Y_val is not None and Y_val.max() >= n_classes:
            row = int(np.argmax(Y_val >= n_classes))
            raise FeatcacheError(
                f"Y_val row {row} holds class {Y_val[row]}, which no train row has: drop it or change the split"
            )
        self.n_labels_, self.classes_ = n_classes, np.arange(n_classes)
        if n_classes > 2:
            self.kind_ = "multinomial"
            return Y, Y_val
        self.kind_ = "binary"
        as_col = lambda y: np.where(y >= 0, (y == 1).astype(np.float64), np.nan)[:, None]  # noqa: E731
        return as_col(Y), (as_col(Y_val) if Y_val is not None else None)

    def _n_rows(self, T) -> np.ndarray:
        if self.kind_ == "multinomial":
            return np.array([int((T >= 0).sum())])
        return (~np.isnan(T)).sum(0).astype(np.int64)

    def _path(self, Xs, T, grid):
        """Fits at every grid C: (W [G, L, D + 1] or [G, D + 1, K], n_iter [G, L|1], converged [G, L|1])."""
        from featcache.progress import probe_progress

        fits, its, convs = [], [], []
        W = None
        bar = probe_progress(len(grid), "logreg C grid", unit="C")
        for c in grid:
            bar.update(1)
            if self.kind_ == "multinomial":
                W, it, cv = fit_multinomial_lbfgs(
                    Xs[None], T[None], self.n_labels_, c, coef0=W, **self._opts()
                )
                fits.append(W[0])
            else:
                W, it, cv = fit_ovr_lbfgs(
                    Xs, T, np.full(T.shape[1], c), coef0=W, precondition=True, **self._opts()
                )
                fits.append(W)
            its.append(it)
            convs.append(cv)
        bar.close()
        return np.stack(fits), np.stack(its), np.stack(convs)

    def _choose(self, path, Xv, Tv, Y_val, grid, select) -> np.ndarray:
        """Grid index per label [L] (or [1]) maximising the validation criterion; ties: smaller C."""
        D = Xv.shape[1]
        if self.kind_ == "ovr":
            self.val_auroc_ = np.stack([auroc_columns(Tv, Xv @ W[:, :D].T + W[:, D]) for W in path])
            undefined = np.flatnonzero(np.isnan(self.val_auroc_[0]))
            if undefined.size:
                j = int(undefined[0])
                raise FeatcacheError(
                    f"label column {j} has {int((Tv[:, j] == 1).sum())} positive and "
                    f"{int((Tv[:, j] == 0).sum())} negative validation rows: C cannot be selected on "
                    "AUROC; pass C=... or change the split"
                )
            self.val_score_ = self.val_auroc_
            best = np.argmax(self.val_score_, axis=0)
            self.val_proba_ = expit(
                np.stack([Xv @ path[g, j, :D] + path[g, j, D] for j, g in enumerate(best)], 1)
            )
            return best
        known = Y_val >= 0
        if not known.any():
            raise FeatcacheError(
                "Y_val has no labelled rows: C cannot be selected; pass C=... or change the split"
            )
        if self.kind_ == "binary":
            probas = [self._binary_proba(Xv @ W[0, :D] + W[0, D]) for W in path]
        else:
            probas = [multinomial_proba(Xv @ W[:D] + W[D]) for W in path]
        self.val_auroc_ = np.stack([ovr_auroc(Y_val, p) for p in probas])
        self.val_accuracy_ = np.array([np.mean(np.argmax(p[known], 1) == Y_val[known]) for p in probas])
        if select == "accuracy":
            self.val_score_ = self.val_accuracy_
        else:
            if np.isnan(self.val_auroc_[0]).all():
                raise FeatcacheError(
                    "no class has both members and non-members among the validation rows: "
                    "C cannot be selected on AUROC; pass C=..., select='accuracy' or change the split"
                )
            self.val_score_ = np.nanmean(self.val_auroc_, axis=1)
        best = int(np.argmax(self.val_score_))
        self.val_proba_ = probas[best]
        return np.array([best])

    def _warn_unconverged(self) -> None:
        if self.converged_.all() and self.grid_converged_.all():
            return
        warnings.warn(
            f"LogRegProbe: {int((~self.grid_converged_).sum())} of {self.grid_converged_.size} grid fits and "
            f"{int((~self.converged_).sum())} of {self.converged_.size} final fits reached max_iter="
            f"{self.max_iter} before the gradient fell to tol={self.tol:g} (see converged_, n_iter_); "
            "raise max_iter",
            ConvergenceWarning,
            stacklevel=3,
        )

    # ---- prediction ----

    @staticmethod
    def _binary_proba(z: np.ndarray) -> np.ndarray:
        p = expit(z)
        return np.stack([1.0 - p, p], axis=1)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits, as scikit-learn's ``decision_function``.

        Args:
            X: float [n, D] features (raw: the fitted standardisation is applied here).

        Returns:
            float64 [n, L] (multi-label), [n, K] (multi-class) or [n] (two classes: the logit of
            class 1).
        """
        if not hasattr(self, "coef_"):
            raise FeatcacheError("this LogRegProbe is not fitted yet: call fit first")
        X = check_features(X, "X")
        if X.shape[1] != self.coef_.shape[1]:
            raise FeatcacheError(
                f"X has {X.shape[1]} features; the probe was fitted on {self.coef_.shape[1]}"
            )
        Z = ((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return Z[:, 0] if self.kind_ == "binary" else Z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-label positive probabilities or class probabilities.

        Args:
            X: float [n, D] features.

        Returns:
            float64 [n, L] sigmoid probabilities (multi-label) or [n, K] class probabilities
            (multi-class, K = 2 included).
        """
        Z = self.decision_function(X)
        if self.kind_ == "ovr":
            return expit(Z)
        return self._binary_proba(Z) if self.kind_ == "binary" else multinomial_proba(Z)

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Alias of ``predict_proba`` (float64 [n, L] or [n, K]), the name the probe runner uses."""
        return self.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Hard predictions.

        Returns:
            int64 [n, L] 0/1 per label (logit > 0, as scikit-learn) or int64 [n] class indices.
        """
        Z = self.decision_function(X)
        if self.kind_ == "ovr":
            return (Z > 0).astype(np.int64)
        if self.kind_ == "binary":
            return (Z > 0).astype(np.int64)
        return np.argmax(Z, axis=1).astype(np.int64)

    def score(self, X: np.ndarray, y: np.ndarray) -> float:
        """Multi-class: top-1 accuracy over the labelled rows; multi-label: mean AUROC over labels.

        Args:
            X: float [n, D] features.
            y: targets as in ``fit``; -1 / NaN rows (and single-class labels) are left out.

        Returns:
            float in [0, 1].
        """
        y = check_targets(y, self.task, np.shape(X)[0], "y")
        if self.task == "multilabel":
            return float(np.nanmean(auroc_columns(y, self.decision_function(X))))
        known = y >= 0
        return float(np.mean(self.predict(X)[known] == y[known]))
