"""Canonical top-k lists shared by the exact search engines, and their error type.

A canonical list is ``(sims float32 [nq, k], idx int64 [nq, k])`` ordered by similarity
decreasing, then position increasing, so rows with exactly equal similarity keep their stream
order, also at the k-th place. :func:`block_topk` makes one from a FAISS search of one chunk
(FAISS's own heap breaks exact ties in no fixed order); :func:`merge_topk` merges a running list
with the next chunk's. Used by ``stream_search`` (:mod:`probes.estimators.knn_search`) and by the exact
fallback of ``bf16_search`` (:mod:`probes.estimators.knn_bf16`).
"""

from __future__ import annotations

import faiss
import numpy as np

from featcache.errors import FeatcacheError

__all__ = ["SearchError", "block_topk", "merge_topk"]


class SearchError(FeatcacheError, ValueError):
    """Bad input to a search engine (a block of the wrong width, NaN rows, a cap too small)."""


def block_topk(Q: np.ndarray, Xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of normalised queries against one normalised chunk, exact ties by position.

    FAISS's heap breaks exact ties in no fixed order; asking one more and, where the tie reaches
    past the k-th, sorting the whole chunk makes the k kept the lowest positions of the tie.
    Returns float32 [nq, kb], int64 [nq, kb] local positions (kb = min(k, b)), ordered by
    (sim decreasing, position increasing).
    """
    b = Xb.shape[0]
    kb = min(k + 1, b)
    S, ids = faiss.knn(Q, Xb, kb, metric=faiss.METRIC_INNER_PRODUCT)
    if kb == k + 1:
        tied = S[:, k] == S[:, k - 1]
        if tied.any():  # whole-chunk list for this query block (same FAISS path: same rounding)
            S2, ids2 = faiss.knn(Q, Xb, b, metric=faiss.METRIC_INNER_PRODUCT)
            o = np.lexsort((ids2[tied], -S2[tied]), axis=-1)[:, :kb]
            S[tied] = np.take_along_axis(S2[tied], o, 1)
            ids[tied] = np.take_along_axis(ids2[tied], o, 1)
        S, ids = S[:, :k], ids[:, :k]
    o = np.lexsort((ids, -S), axis=-1)
    return np.take_along_axis(S, o, 1), np.take_along_axis(ids, o, 1)


def merge_topk(S_run, I_run, S_new, I_new, k: int):
    """Merge two canonical lists where every new position exceeds every running one.

    A stable sort on the similarity alone keeps (sim decreasing, position increasing) because the
    running list comes first and each list is already in that order.
    """
    S = np.concatenate([S_run, S_new], axis=1)
    ids = np.concatenate([I_run, I_new], axis=1)
    o = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, o, 1), np.take_along_axis(ids, o, 1)
