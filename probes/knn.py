"""Weighted k-nearest-neighbour probe on cached features (the DINOv2/v3 kNN protocol).

Features are L2-normalised and searched exactly by cosine similarity with a FAISS
``IndexFlatIP``. One search for the largest k serves every k: neighbour ``j`` votes with
weight ``exp(sim_j / T)`` normalised over the query's top k (T = 0.07).

- Multi-class: class probabilities are the weighted one-hot sums of the top k (as in
  ``dinov2/eval/knn.py``, except that the softmax is taken over each k's own neighbours so
  the probabilities of every k sum to one; the arg-max, hence top-1 accuracy, is the same).
  Train rows without a class (-1) are not indexed.
- Multi-label: the score of a label is the weighted mean of the neighbours' 0/1 labels, with
  neighbours whose label is missing (NaN) left out of both sums, so AUROC is defined per label.
  When all k neighbours miss a label the score is NaN.

Example:
    >>> probe = KNNProbe(k=(10, 20), task="multilabel").fit(X_train, Y_train)
    >>> scores = probe.predict_scores(X_test)   # {10: [n, L], 20: [n, L]}
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
from sklearn.base import BaseEstimator

from featcache.errors import FeatcacheError

from ._linalg import check_features, check_targets, check_task, knn_vote, l2_normalize

# Queries are searched this many at a time, bounding the [block, k, L] vote tensors.
_QUERY_BLOCK = 2048


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


class KNNProbe(BaseEstimator):
    """Cosine kNN with temperature-weighted votes, every k from one exact search.

    Args:
        k: the neighbour counts to evaluate; each is capped at the number of indexed train
            rows (results stay keyed by the requested k).
        temperature: softmax temperature T of the votes.
        task: ``"multilabel"`` (Y float [N, L], 1/0/NaN) or ``"multiclass"`` (y int [N], -1 missing).
        n_jobs: FAISS threads during search (None: FAISS's default, all cores).

    Attributes:
        n_train_: int, train rows in the index.
        n_labels_: int, L (multi-label) or C = max(y) + 1 classes (multi-class).
        index_: faiss.IndexFlatIP over the L2-normalised train rows.
        train_rows_: int64 [n_train_], the row of ``fit``'s X each index entry came from.
        targets_: float32 [n_train_, L] or int64 [n_train_], their targets.
    """

    def __init__(
        self,
        k: Sequence[int] = (10, 20, 100, 200),
        temperature: float = 0.07,
        task: str = "multilabel",
        n_jobs: int | None = None,
    ):
        self.k = k
        self.temperature = temperature
        self.task = task
        self.n_jobs = n_jobs

    def _ks(self) -> list[int]:
        ks = [self.k] if np.isscalar(self.k) else list(self.k)
        if not ks or any(int(k) != k or k < 1 for k in ks):
            raise FeatcacheError(f"k must be positive integers; got {self.k!r}")
        return [int(k) for k in ks]

    def fit(self, X: np.ndarray, Y: np.ndarray) -> KNNProbe:
        """Index the train features.

        Args:
            X: float [N, D] train features.
            Y: float32 [N, L] multi-label targets (1/0/NaN) or int64 [N] classes (-1 missing).

        Returns:
            self.
        """
        check_task(self.task)
        self._ks()
        if not self.temperature > 0:
            raise FeatcacheError(f"temperature must be positive; got {self.temperature!r}")
        X = check_features(X, "X_train")
        Y = check_targets(Y, self.task, X.shape[0], "Y_train")
        rows = np.arange(X.shape[0])
        if self.task == "multiclass":
            rows = np.flatnonzero(Y >= 0)
            if rows.size == 0:
                raise FeatcacheError("no train row has a class: check the labels of the train split")
            self.n_labels_ = int(Y.max()) + 1
        else:
            self.n_labels_ = Y.shape[1]
        every = rows.size == X.shape[0]
        self.train_rows_ = rows.astype(np.int64)
        self.targets_ = Y if every else Y[rows]
        self.index_ = faiss.IndexFlatIP(X.shape[1])
        self.index_.add(l2_normalize(X if every else X[rows]))
        self.n_train_ = int(rows.size)
        return self

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
        if not hasattr(self, "index_"):
            raise FeatcacheError("this KNNProbe is not fitted yet: call fit(X_train, Y_train) first")

    def _search(self, Xq: np.ndarray, kmax: int):
        with _FaissThreads(self.n_jobs):
            sims, idx = self.index_.search(l2_normalize(Xq), kmax)
        return sims, idx

    def kneighbors(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest train rows by cosine similarity, for the largest k (capped at the train size).

        Args:
            X: float [n, D] query features.

        Returns:
            (sims float32 [n, kmax] in decreasing order, idx int64 [n, kmax] rows of ``fit``'s X).
        """
        self._check_fitted()
        X = check_features(X, "X")
        kmax = min(max(self._ks()), self.n_train_)
        sims = np.empty((X.shape[0], kmax), dtype=np.float32)
        idx = np.empty((X.shape[0], kmax), dtype=np.int64)
        for start in range(0, X.shape[0], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            s, i = self._search(X[block], kmax)
            sims[block], idx[block] = s, self.train_rows_[i]
        return sims, idx

    def predict_scores(self, X: np.ndarray) -> dict[int, np.ndarray]:
        """Scores for every k from one search.

        Args:
            X: float [n, D] query features.

        Returns:
            dict requested k -> float64 [n, L] per-label positive scores (NaN where all k
            neighbours miss the label) or float64 [n, C] class probabilities.
        """
        self._check_fitted()
        X = check_features(X, "X")
        ks = self._ks()
        kmax = min(max(ks), self.n_train_)
        eff = {k: min(k, kmax) for k in ks}
        out = {k: np.empty((X.shape[0], self.n_labels_)) for k in ks}
        for start in range(0, X.shape[0], _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            sims, idx = self._search(X[block], kmax)
            votes = knn_vote(
                sims,
                self.targets_[idx],
                sorted(set(eff.values())),
                self.temperature,
                self.task,
                self.n_labels_,
            )
            for k in ks:
                out[k][block] = votes[eff[k]]
        return out
