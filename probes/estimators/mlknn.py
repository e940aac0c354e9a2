"""ML-kNN (Zhang & Zhou 2007, "ML-KNN: A lazy learning approach to multi-label learning").

The multi-label kNN of the DINOv2-radiology study (MohammedSB/DINOv2ForMedical, whose
``MLkNN(k, s=1.0)`` follows scikit-multilearn's). Neighbours are cosine neighbours, searched
exactly with FAISS on L2-normalised features as in ``KNNProbe``. For label l, with m train rows:

- prior ``P(H1_l) = (s + sum_i y_il) / (2 s + m)``, ``P(H0_l) = 1 - P(H1_l)``;
- for every train row i, ``delta_il`` = how many of its k nearest OTHER train rows carry l
  (the row itself is excluded, as in the paper; ``exclude_self=False`` keeps it, which is what
  scikit-multilearn's and DINOv2ForMedical's default ``ignore_first_neighbours=0`` does);
- ``c1[l, j]`` / ``c0[l, j]`` = rows with / without l whose ``delta_il = j`` (j = 0..k);
  ``P(E_j | H1_l) = (s + c1[l, j]) / (s (k + 1) + sum_p c1[l, p])`` (the same with c0 for H0);
- a query with ``C_l`` of its k nearest train rows carrying l scores
  ``P(H1_l | C_l) = P(H1) P(E_C | H1) / (P(H1) P(E_C | H1) + P(H0) P(E_C | H0))``.

Missing labels (NaN) are handled per label: label l is learnt and scored with ML-kNN on the
train rows that know l only (its priors, its counts and its neighbours, train and query, all
come from those rows), exactly as if the rows missing l were not there. Labels that share the
same rows share one neighbour search. A label no train row knows scores NaN. k is capped per
label at the rows available (m - 1 with ``exclude_self``), recorded in ``k_effective_`` and said
once as a warning.

Example:
    >>> probe = MLkNNProbe(k=10, s=1.0).fit(X_train, Y_train)
    >>> probe.predict_proba(X_test).shape    # (n, L) posteriors P(H1 | C)
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
from sklearn.base import BaseEstimator

from featcache.errors import FeatcacheError
from probes.estimators._linalg import auroc_columns, check_targets, l2_normalize
from probes.estimators.knn import (
    _QUERY_BLOCK,
    ProbeInputError,
    ProbeNotFittedError,
    _FaissThreads,
    as_ks,
    checked_features,
)


class MLkNNProbe(BaseEstimator):
    """ML-kNN posteriors per label, cosine neighbours, missing labels handled per label.

    Args:
        k: neighbours.
        s: Laplace smoothing of the priors and of the neighbour-count likelihoods.
        exclude_self: a train row is not its own neighbour when counting (the paper); False
            reproduces scikit-multilearn's default (``ignore_first_neighbours=0``).
        n_jobs: FAISS threads during search (None: FAISS's default, all cores).

    Attributes:
        n_features_in_: int, D.
        n_labels_: int, L.
        k_effective_: int64 [L], k used for each label (0 for a label no train row knows).
        prior_: float64 [L], ``P(H1_l)`` (NaN for a label no train row knows).
        cond_true_: float64 [L, k + 1], ``P(E_j | H1_l)``; NaN beyond ``k_effective_``.
        cond_false_: float64 [L, k + 1], ``P(E_j | H0_l)``.
        groups_: list of (int64 label columns, int64 train rows) sharing one neighbour search.
        indexes_: list of faiss.IndexFlatIP, one per group, over those rows' normalised features.
        targets_: float32 [N, L] the train targets (1/0/NaN).
    """

    def __init__(self, k: int = 10, s: float = 1.0, exclude_self: bool = True, n_jobs: int | None = None):
        self.k = k
        self.s = s
        self.exclude_self = exclude_self
        self.n_jobs = n_jobs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.estimator_type = "classifier"
        tags.classifier_tags.multi_label = True
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: np.ndarray, Y: np.ndarray) -> MLkNNProbe:
        """Priors and neighbour-count likelihoods of every label.

        Args:
            X: float [N, D] train features.
            Y: float [N, L] multi-label targets (1 positive, 0 negative, NaN missing).

        Returns:
            self.
        """
        (k,) = as_ks(self.k)
        if not (isinstance(self.s, (int, float)) and self.s >= 0):
            raise FeatcacheError(f"s must be a non-negative smoothing constant; got {self.s!r}")
        X = checked_features(X, "X_train")
        if Y is None:
            raise ProbeInputError("MLkNNProbe requires y to be passed, but the target y is None")
        try:
            Y = check_targets(Y, "multilabel", X.shape[0], "Y_train")
        except FeatcacheError as err:
            raise ProbeInputError(str(err)) from None
        s = float(self.s)
        N, L = Y.shape
        Xn = l2_normalize(X)
        known = ~np.isnan(Y)
        masks, which = np.unique(known.T, axis=0, return_inverse=True)
        self.prior_ = np.full(L, np.nan)
        self.cond_true_ = np.full((L, k + 1), np.nan)
        self.cond_false_ = np.full((L, k + 1), np.nan)
        self.k_effective_ = np.zeros(L, dtype=np.int64)
        self.groups_, self.indexes_ = [], []
        for g, mask in enumerate(masks):
            cols = np.flatnonzero(np.ravel(which) == g).astype(np.int64)
            rows = np.flatnonzero(mask).astype(np.int64)
            m = rows.size
            if m == 0:
                continue
            kk = min(k, m - 1 if self.exclude_self else m)
            index = faiss.IndexFlatIP(X.shape[1])
            index.add(Xn[rows])
            self.groups_.append((cols, rows))
            self.indexes_.append(index)
            y = Y[np.ix_(rows, cols)].astype(np.float64)  # [m, l] 0/1, all known
            delta = self._counts(index, Xn[rows], y, kk, train=True)  # int [m, l]
            self.prior_[cols] = (s + y.sum(0)) / (2 * s + m)
            pos = y == 1
            j = np.arange(kk + 1)
            c1 = ((delta[None] == j[:, None, None]) & pos[None]).sum(1).T  # [l, kk + 1]
            c0 = ((delta[None] == j[:, None, None]) & ~pos[None]).sum(1).T
            self.cond_true_[cols, : kk + 1] = (s + c1) / (s * (kk + 1) + c1.sum(1, keepdims=True))
            self.cond_false_[cols, : kk + 1] = (s + c0) / (s * (kk + 1) + c0.sum(1, keepdims=True))
            self.k_effective_[cols] = kk
        self.targets_ = Y
        self.n_labels_ = L
        self.n_features_in_ = int(X.shape[1])
        unknown = np.flatnonzero(~known.any(0))
        capped = np.flatnonzero((self.k_effective_ < k) & known.any(0))
        if unknown.size:
            warnings.warn(
                f"MLkNNProbe: label columns {unknown.tolist()} have no known train row and score NaN",
                stacklevel=2,
            )
        if capped.size:
            warnings.warn(
                f"MLkNNProbe: k={k} exceeds the train rows of label columns {capped.tolist()}; "
                f"capped at {sorted(set(self.k_effective_[capped].tolist()))} (see k_effective_)",
                stacklevel=2,
            )
        return self

    def _counts(self, index, Q: np.ndarray, y: np.ndarray, kk: int, train: bool) -> np.ndarray:
        """How many of each query's kk nearest indexed rows carry each label.

        Args:
            index: the group's IndexFlatIP (rows in the order of ``y``).
            Q: float32 [n, D] normalised queries (for ``train``, the indexed rows themselves).
            y: float [m, l] 0/1 targets of the indexed rows.
            kk: neighbours.
            train: queries are the indexed rows: with ``exclude_self`` each skips itself.

        Returns:
            int64 [n, l].
        """
        out = np.zeros((Q.shape[0], y.shape[1]), dtype=np.int64)
        if kk == 0:
            return out
        skip = train and self.exclude_self
        for start in range(0, Q.shape[0], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            with _FaissThreads(self.n_jobs):
                _, idx = index.search(Q[block], kk + 1 if skip else kk)
            if skip:
                own = idx == np.arange(start, start + idx.shape[0])[:, None]
                keep = ~own
                keep[~own.any(1), -1] = False  # self beyond the first kk + 1 (ties): drop the farthest
                idx = idx[keep].reshape(idx.shape[0], kk)
            out[block] = y[idx].sum(1).astype(np.int64)
        return out

    def __getstate__(self):
        # FAISS indexes are SWIG objects: pickle (and joblib) them through their byte form.
        state = dict(super().__getstate__())
        if "indexes_" in state:
            state["indexes_"] = [faiss.serialize_index(i) for i in state["indexes_"]]
        return state

    def __setstate__(self, state):
        if "indexes_" in state:
            state = {**state, "indexes_": [faiss.deserialize_index(i) for i in state["indexes_"]]}
        super().__setstate__(state)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Posterior ``P(H1_l | C_l)`` of every label.

        Args:
            X: float [n, D] query features.

        Returns:
            float64 [n, L]; NaN for a label no train row knows.
        """
        if not hasattr(self, "indexes_"):
            raise ProbeNotFittedError("this MLkNNProbe is not fitted yet: call fit(X_train, Y_train) first")
        Q = l2_normalize(checked_features(X, "X", "MLkNNProbe", self.n_features_in_))
        out = np.full((Q.shape[0], self.n_labels_), np.nan)
        for (cols, rows), index in zip(self.groups_, self.indexes_):
            kk = int(self.k_effective_[cols[0]])
            C = self._counts(index, Q, self.targets_[np.ix_(rows, cols)], kk, train=False)
            lab = np.arange(cols.size)
            p1 = self.prior_[cols] * self.cond_true_[cols[lab], C]
            p0 = (1 - self.prior_[cols]) * self.cond_false_[cols[lab], C]
            out[:, cols] = p1 / (p1 + p0)
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Maximum a posteriori labels: float64 [n, L], 1 where ``P(H1 | C) >= P(H0 | C)``, NaN unknown."""
        P = self.predict_proba(X)
        return np.where(np.isnan(P), np.nan, (P >= 0.5).astype(np.float64))

    def score(self, X: np.ndarray, Y: np.ndarray, sample_weight=None) -> float:
        """Mean per-label AUROC over the labels with both classes among the known rows of ``Y``."""
        if sample_weight is not None:
            raise FeatcacheError("MLkNNProbe.score takes no sample_weight")
        Y = check_targets(Y, "multilabel", np.shape(X)[0], "Y")
        values = auroc_columns(Y, self.predict_proba(X))
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
