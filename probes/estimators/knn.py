"""Weighted k-nearest-neighbour probe on cached features: the DINOv2/v3 kNN protocol.

Features are L2-normalised and searched exactly by cosine similarity with a FAISS
``IndexFlatIP``. The default vote (``vote="dinov2"``) is the arithmetic of ``KnnModule.forward``
in facebookresearch/dinov2 ``dinov2/eval/knn.py``: one search for the softmax window W
(``max(k)`` of the run, as dinov2's ``max_k``), ``w = softmax(sims / T)`` over those W
neighbours ONCE (T = 0.07), and the score at k the sum of the first k weighted votes, not
renormalised per k. The score at k = 10 therefore depends on the largest k evaluated with it
(W): ``scores_for_ks(X, (10, 20, 100, 200))[10]`` is dinov2's 10-NN score of a run with
``nb_knn = (10, 20, 100, 200)``; a single-k ``predict_proba`` has W = k unless ``softmax_k`` is
given.

- Multi-class: weighted one-hot sums (they sum to one at k = W). Train rows without a class
  (-1) are not indexed.
- Multi-label: the same sum with each neighbour's 0/1 label vector in place of the one-hot.
  A neighbour whose label is missing (NaN) does not vote for it: its weight goes to the
  neighbours among the first k that know the label, in proportion to their weights
  (``m_k * sum_known w y / sum_known w``, with ``m_k`` the weight of the first k). With no
  label missing this is exactly dinov2's sum; NaN when none of the first k knows the label.
- ``vote="renormalized"`` keeps the softmax over each k's own neighbours (probabilities that sum
  to one at every k; multi-label: the known-weighted mean). Same arg-max, different ranking
  across images, hence different AUROC, for k < W.

Past RAM or at the hardware's bf16 speed: ``probes.estimators.knn_search.ScalableKNNProbe`` (the same
probe with ``search="stream"``, train rows streamed block by block, or ``search="bf16"``, a bf16
candidate search re-ranked exactly).

k above the number of indexed train rows is capped at that number; the capped values are
recorded in ``k_effective_`` / ``softmax_k_effective_`` and said once as a warning.

Example:
    >>> probe = KNNProbe(k=20, task="multilabel").fit(X_train, Y_train)
    >>> probe.predict_proba(X_test).shape                    # (n, L)
    >>> scores = probe.scores_for_ks(X_test, (10, 20, 100, 200))   # {10: [n, L], ...}, one search
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import faiss
import numpy as np
from scipy.sparse import issparse
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import DataConversionWarning, NotFittedError

from featcache.errors import FeatcacheError
from probes.estimators._linalg import (
    VOTES,
    auroc_columns,
    check_features,
    check_targets,
    check_task,
    knn_vote,
    l2_normalize,
)

# Queries are searched this many at a time, bounding the [block, k, L] vote tensors.
_QUERY_BLOCK = 2048


class ProbeInputError(FeatcacheError, ValueError, TypeError):
    """Bad input to a probe estimator (also the ``ValueError``/``TypeError`` scikit-learn expects)."""


class ProbeNotFittedError(FeatcacheError, NotFittedError):
    """A probe estimator used before ``fit`` (also scikit-learn's ``NotFittedError``)."""


class _FaissThreads:
    """Set FAISS's OpenMP thread count for a block of code, then restore it."""

    def __init__(self, n_jobs: int | None):
        self.n_jobs = n_jobs

    def __enter__(self):
        self.saved = faiss.omp_get_max_threads()
        if self.n_jobs is not None:
            faiss.omp_set_num_threads(max(1, int(self.n_jobs)))

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.saved)


def as_ks(k) -> list[int]:
    """``k`` (an int or a sequence of ints) as a list of positive ints.

    Raises:
        FeatcacheError: for an empty list, a non-integer or a value below 1.
    """
    ks = [k] if np.isscalar(k) else list(k)
    if not ks or any(isinstance(v, bool) or int(v) != v or v < 1 for v in ks):
        raise FeatcacheError(f"k must be positive integers; got {k!r}")
    return [int(v) for v in ks]


def checked_features(X, name: str, owner: str = "the probe", n_features: int | None = None) -> np.ndarray:
    """``check_features`` raising ``ProbeInputError``, with scikit-learn's wording for its checks.

    Args:
        X: float [N, D] features (dense, real, finite).
        name: how the matrix is named in messages.
        owner: the estimator's class name, for the feature-count message.
        n_features: D the estimator was fitted on, or None (at fit).

    Returns:
        float32 [N, D].
    """
    if X is None:
        raise ProbeInputError(f"{name} is None: pass a feature matrix [N, D]")
    if issparse(X):
        raise ProbeInputError(f"{name}: sparse input is not supported; pass a dense array (X.toarray())")
    try:
        X = np.asarray(X)
        if np.iscomplexobj(X):
            raise ProbeInputError(f"{name}: Complex data not supported; pass real features")
        X = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as err:
        if isinstance(err, ProbeInputError):
            raise
        raise ProbeInputError(f"{name} must be a numeric feature matrix [N, D]: {err}") from None
    if X.ndim != 2:
        raise ProbeInputError(
            f"{name} must be a 2-D feature matrix [N, D]; got shape {X.shape}. Reshape your data "
            "(X.reshape(-1, 1) for one feature, X.reshape(1, -1) for one sample)"
        )
    if X.shape[1] == 0:
        raise ProbeInputError(
            f"{name} has 0 feature(s) (shape={X.shape}) while a minimum of 1 is required: check the feature selection"
        )
    if X.size and not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ProbeInputError(
            f"{name} holds NaN or inf in {bad.size} rows (first: {bad[:5].tolist()}); "
            "re-extract those rows or drop them before probing"
        )
    try:
        X = check_features(X, name)
    except FeatcacheError as err:
        raise ProbeInputError(str(err)) from None
    if n_features is not None and X.shape[1] != n_features:
        raise ProbeInputError(
            f"{name} has {X.shape[1]} features, but {owner} is expecting {n_features} features as input "
            "(was it fitted on another feature set?)"
        )
    return X


def checked_classes(y, n_rows: int, name: str = "y_train") -> tuple[np.ndarray, np.ndarray | None]:
    """Multi-class targets: int class indices (-1 missing) or string labels.

    Args:
        y: [N] int class indices (-1 missing), integer-valued floats (NaN missing) or strings;
            a column vector [N, 1] is flattened with a ``DataConversionWarning``.
        n_rows: N, the feature rows.
        name: how the targets are named in messages.

    Returns:
        (int64 [N] class indices, -1 missing; the string label of each index, or None).

    Raises:
        ProbeInputError: for None, continuous values or a shape mismatch.
    """
    if y is None:
        raise ProbeInputError(f"KNNProbe requires y to be passed, but the target y is None ({name})")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn(
            f"A column-vector y was passed when a 1d array was expected ({name} [N, 1]): flattened to [N]",
            DataConversionWarning,
            stacklevel=3,
        )
        y = y[:, 0]
    names = None
    if y.ndim == 1 and y.dtype.kind in "USO":
        names, y = np.unique(y.astype(str), return_inverse=True)
    if y.dtype.kind == "f" and not np.all(np.isnan(y) | (y == np.round(y))):
        raise ProbeInputError(
            f"{name} holds continuous values (Unknown label type: continuous): multi-class targets are "
            "class indices or names"
        )
    try:
        return check_targets(y, "multiclass", n_rows, name), names
    except FeatcacheError as err:
        raise ProbeInputError(str(err)) from None


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Cosine kNN with temperature-softmax votes (dinov2 arithmetic by default).

    Args:
        k: neighbours of the vote (``predict_proba``/``predict``/``score``). A sequence is
            accepted for ``scores_for_ks``/``predict_scores`` (the ks of one search).
        temperature: softmax temperature T of the votes.
        task: ``"multilabel"`` (Y float [N, L], 1/0/NaN) or ``"multiclass"`` (y [N]: int class
            indices with -1 missing, or string labels).
        softmax_k: softmax window W of the ``"dinov2"`` vote (None: the largest k scored
            together: ``k`` for ``predict_proba``, ``max(ks)`` for ``scores_for_ks``). Must be at
            least every k scored with it.
        vote: ``"dinov2"`` (softmax over W once, no per-k renormalisation) or ``"renormalized"``.
        n_jobs: FAISS threads during search (None: FAISS's default, all cores).

    Attributes:
        n_train_: int, train rows in the index.
        n_features_in_: int, D.
        n_labels_: int, L (multi-label) or C classes (multi-class).
        classes_: multi-class: the labels of the probability columns (``arange(max(y) + 1)`` for
            integer classes, the sorted labels for string ones); multi-label: ``arange(L)``.
        k_effective_: int (or dict requested k -> int for a sequence ``k``), k capped at n_train_.
        softmax_k_effective_: int or None, ``softmax_k`` capped at n_train_.
        index_: faiss.IndexFlatIP over the L2-normalised train rows.
        train_rows_: int64 [n_train_], the row of ``fit``'s X each index entry came from.
        targets_: float32 [n_train_, L] or int64 [n_train_] class indices, their targets.
    """

    def __init__(
        self,
        k: int | Sequence[int] = 20,
        temperature: float = 0.07,
        task: str = "multilabel",
        softmax_k: int | None = None,
        vote: str = "dinov2",
        n_jobs: int | None = None,
    ):
        self.k = k
        self.temperature = temperature
        self.task = task
        self.softmax_k = softmax_k
        self.vote = vote
        self.n_jobs = n_jobs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.task == "multilabel":
            tags.classifier_tags.multi_label = True
            tags.target_tags.multi_output = True
        tags.input_tags.allow_nan = False
        return tags

    def _check_params(self) -> list[int]:
        check_task(self.task)
        ks = as_ks(self.k)
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise FeatcacheError(f"temperature must be positive; got {self.temperature!r}")
        if self.vote not in VOTES:
            raise FeatcacheError(f"unknown vote {self.vote!r}: use 'dinov2' or 'renormalized'")
        if self.softmax_k is not None:
            (w,) = as_ks(self.softmax_k)
            if w < max(ks):
                raise FeatcacheError(f"softmax_k={w} is below k={max(ks)}: the window must hold every k")
        return ks

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNProbe:
        """Index the train features.

        Args:
            X: float [N, D] train features.
            y: float [N, L] multi-label targets (1/0/NaN) or [N] classes (int, -1 missing; or str).

        Returns:
            self.
        """
        ks = self._check_params()
        X, n, d = self._fit_input(X, y)
        if self.task == "multiclass":
            y, names = checked_classes(y, n)
            rows = np.flatnonzero(y >= 0)
            if rows.size == 0:
                raise ProbeInputError("no train row has a class: check the labels of the train split")
            self.classes_ = names if names is not None else np.arange(int(y.max()) + 1)
            self.n_labels_ = len(self.classes_)
        else:
            if y is None:
                raise ProbeInputError("KNNProbe requires y to be passed, but the target y is None")
            try:
                y = check_targets(y, self.task, n, "Y_train")
            except FeatcacheError as err:
                raise ProbeInputError(str(err)) from None
            rows = np.arange(n)
            self.n_labels_ = y.shape[1]
            self.classes_ = np.arange(self.n_labels_)
        every = rows.size == n
        self.train_rows_ = rows.astype(np.int64)
        self.targets_ = y if every else y[rows]
        self._build_index(X, None if every else rows, n, d)
        self.n_train_ = int(rows.size)
        self.n_features_in_ = int(d)
        eff = {v: min(v, self.n_train_) for v in ks}
        self.k_effective_ = eff[ks[0]] if np.isscalar(self.k) else eff
        w = None if self.softmax_k is None else int(self.softmax_k)
        self.softmax_k_effective_ = None if w is None else min(w, self.n_train_)
        capped = sorted(v for v in {*ks, *([w] if w else [])} if v > self.n_train_)
        if capped:
            warnings.warn(
                f"KNNProbe: k/softmax_k {capped} exceed the {self.n_train_} indexed train rows and are "
                f"capped at {self.n_train_} (see k_effective_)",
                stacklevel=2,
            )
        return self

    def _fit_input(self, X, y) -> tuple[np.ndarray, int, int]:
        """(checked float32 X [N, D], N, D); subclasses may take other train sources."""
        X = checked_features(X, "X_train")
        return X, X.shape[0], X.shape[1]

    def _build_index(self, X: np.ndarray, rows: np.ndarray | None, n: int, d: int) -> None:
        """Index X's rows ``rows`` (None: all) in a FAISS ``IndexFlatIP`` over the normalised rows."""
        self.index_ = faiss.IndexFlatIP(d)
        self.index_.add(l2_normalize(X if rows is None else X[rows]))

    def __getstate__(self):
        # FAISS indexes are SWIG objects: pickle (and joblib) them through their byte form.
        state = dict(super().__getstate__())
        if "index_" in state:
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state):
        if "index_" in state:
            state = {**state, "index_": faiss.deserialize_index(state["index_"])}
        super().__setstate__(state)

    def _check_fitted(self):
        if not hasattr(self, "n_train_"):
            raise ProbeNotFittedError("this KNNProbe is not fitted yet: call fit(X_train, Y_train) first")

    def _search(self, Xq: np.ndarray, kmax: int):
        with _FaissThreads(self.n_jobs):
            sims, idx = self.index_.search(l2_normalize(Xq), kmax)
        return sims, idx

    def _neighbours(self, X: np.ndarray, kmax: int):
        """Yield ``(query slice, sims float32 [b, kmax], index positions int64 [b, kmax])`` per query block."""
        for start in range(0, X.shape[0], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            yield (block, *self._search(X[block], kmax))

    def kneighbors(self, X: np.ndarray, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest train rows by cosine similarity.

        Args:
            X: float [n, D] query features.
            n_neighbors: how many (None: the largest of k and softmax_k), capped at the train size.

        Returns:
            (sims float32 [n, kmax] in decreasing order, idx int64 [n, kmax] rows of ``fit``'s X).
        """
        self._check_fitted()
        X = checked_features(X, "X", "KNNProbe", self.n_features_in_)
        if n_neighbors is None:
            n_neighbors = max(as_ks(self.k) + ([int(self.softmax_k)] if self.softmax_k else []))
        kmax = min(int(n_neighbors), self.n_train_)
        sims = np.empty((X.shape[0], kmax), dtype=np.float32)
        idx = np.empty((X.shape[0], kmax), dtype=np.int64)
        for block, s, i in self._neighbours(X, kmax):
            sims[block], idx[block] = s, self.train_rows_[i]
        return sims, idx

    def _scores(self, X, ks: list[int], vote: str, softmax_k: int | None) -> dict[int, np.ndarray]:
        self._check_fitted()
        X = checked_features(X, "X", "KNNProbe", self.n_features_in_)
        eff = {k: min(k, self.n_train_) for k in ks}
        window = max(ks) if softmax_k is None else int(softmax_k)
        if window < max(ks):
            raise FeatcacheError(f"softmax_k={window} is below k={max(ks)}: the window must hold every k")
        window = min(window, self.n_train_)
        kmax = window if vote == "dinov2" else max(eff.values())
        out = {k: np.empty((X.shape[0], self.n_labels_)) for k in ks}
        for block, sims, idx in self._neighbours(X, kmax):
            votes = knn_vote(
                sims,
                self.targets_[idx],
                sorted(set(eff.values())),
                self.temperature,
                self.task,
                self.n_labels_,
                softmax_k=window,
                vote=vote,
            )
            for k in ks:
                out[k][block] = votes[eff[k]]
        return out

    def scores_for_ks(self, X: np.ndarray, ks: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Scores for several k from ONE search, with this probe's ``vote`` (the runner's call).

        With ``vote="dinov2"`` the softmax window is ``softmax_k`` or, when None, ``max(ks)``
        (dinov2's ``max_k``), capped at the train size: the score at a small k depends on the
        largest k asked with it.

        Args:
            X: float [n, D] query features.
            ks: the k values (None: this probe's ``k``); each capped at the train size.

        Returns:
            dict requested k -> float64 [n, L] per-label scores (NaN where none of the first k
            neighbours knows the label) or float64 [n, C] class probabilities.
        """
        ks = as_ks(self.k if ks is None else ks)
        return self._scores(X, ks, self.vote, self.softmax_k)

    def predict_scores(self, X: np.ndarray) -> dict[int, np.ndarray]:
        """Scores for every k of this probe's ``k``, per-k renormalised (the interface before ``vote``).

        Kept for existing callers: it always uses ``vote="renormalized"`` whatever ``vote`` says,
        so their numbers do not change. New code calls ``scores_for_ks`` (dinov2 by default).

        Returns:
            dict requested k -> float64 [n, L] or [n, C].
        """
        return self._scores(X, as_ks(self.k), "renormalized", None)

    def _single_k(self) -> int:
        self._check_fitted()
        ks = as_ks(self.k)
        if len(ks) != 1:
            raise FeatcacheError(
                f"predict_proba scores one k; this probe has k={self.k!r}: use scores_for_ks(X) for several"
            )
        return ks[0]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Vote of the k nearest train rows.

        Args:
            X: float [n, D] query features.

        Returns:
            float64 [n, C] class probabilities (columns ``classes_``; they sum to one unless
            ``softmax_k`` > k) or float64 [n, L] per-label scores (NaN where none of the k
            neighbours knows the label).
        """
        k = self._single_k()
        return self._scores(X, [k], self.vote, self.softmax_k)[k]

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Scores thresholded at 0, ranked as ``predict_proba``.

        Returns:
            float64 [n] ``p1 - p0`` for two classes; [n, C] the probabilities for more;
            multi-label [n, L] the known-weighted share of positive votes minus one half.
        """
        if self.task == "multilabel":
            k = self._single_k()
            return self._scores(X, [k], "renormalized", None)[k] - 0.5
        P = self.predict_proba(X)
        return P[:, 1] - P[:, 0] if P.shape[1] == 2 else P

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels.

        Returns:
            multi-class: [n] the arg-max class (from ``classes_``); multi-label: float64 [n, L]
            1 where the known neighbours' weighted positive share exceeds one half, else 0,
            NaN where none of the k neighbours knows the label.
        """
        if self.task == "multilabel":
            D = self.decision_function(X)
            return np.where(np.isnan(D), np.nan, (D > 0).astype(np.float64))
        P = self.predict_proba(X)
        return self.classes_[np.argmax(P, axis=1)]

    def score(self, X: np.ndarray, y: np.ndarray, sample_weight=None) -> float:
        """Multi-class: accuracy over the rows with a class; multi-label: mean per-label AUROC.

        Args:
            X: float [n, D] features.
            y: targets in ``fit``'s convention.
            sample_weight: not supported (must be None).

        Returns:
            float; the multi-label mean skips labels without both classes among the known rows.
        """
        if sample_weight is not None:
            raise FeatcacheError("KNNProbe.score takes no sample_weight")
        if self.task == "multilabel":
            Y = check_targets(y, "multilabel", np.shape(X)[0], "Y")
            values = auroc_columns(Y, self.predict_proba(X))
            return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        y = np.asarray(y)
        keep = np.ones(y.shape[0], bool) if y.dtype.kind in "USO" else y >= 0
        pred = self.predict(X)
        return float(np.mean(pred[keep].astype(str) == y[keep].astype(str)))
