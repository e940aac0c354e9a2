"""Exact cosine top-k search engines for train sets past RAM and at the hardware's bf16 speed.

Both engines return what a FAISS ``IndexFlatIP`` over the L2-normalised train rows returns:
``(sims float32 [n, k] decreasing, idx int64 [n, k])``, ``idx`` the position of the row in the
train stream (the row of ``np.concatenate`` of the blocks).

- ``stream_search``: the train rows arrive as blocks (``FeatureSet.iter_blocks``, a memmap, ...);
  each chunk of blocks is normalised and searched with FAISS, and the running top-k of every
  query is merged exactly. FAISS computes every similarity the same way whatever the number of
  train rows in a call (checked in tests), so the similarities are bit-identical to the
  in-memory search rank by rank. Rows with exactly equal similarity are ordered by stream
  position, lower first, also at the k-th place; FAISS's own heap breaks such exact ties in no
  fixed order, so on exactly tied rows the two may list different (equally near) rows.
  Memory: one chunk of train rows (raw + normalised) + one pass of queries + the [n, k] result.
- ``probes.estimators.knn_bf16.bf16_search``: bf16 candidates (torch, optional) re-ranked exactly.

``ScalableKNNProbe`` is ``KNNProbe`` with a ``search`` choice (``"flat"``, ``"stream"``,
``"bf16"``): same votes, same outputs.

Example:
    >>> src = StoreBlocks("cache/", "nih/dinov3-vitb16/512", "cls", rows=train_rows)
    >>> sims, idx = stream_search(X_test, src, k=200, memory_cap=2 * 2**30)
    >>> probe = ScalableKNNProbe(k=(10, 20, 100, 200), search="stream", memory_cap=2 * 2**30)
    >>> probe.fit(src, Y_train).scores_for_ks(X_test)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from probes.estimators._linalg import l2_normalize
from probes.estimators.knn import KNNProbe, ProbeInputError, _FaissThreads
from probes.estimators.knn_topk import SearchError, block_topk, merge_topk

# Queries go to FAISS this many at a time, as KNNProbe's in-memory search does: FAISS takes another
# code path (and rounds differently) below 20 queries, so both must cut the queries the same way.
QUERY_BLOCK = 2048
# Train rows searched per FAISS call when no memory cap says otherwise.
_CHUNK_ROWS = 65536


# ---- block sources ----


class ArrayBlocks:
    """Re-iterable block source over an array or ``np.memmap`` [N, D], ``rows`` rows at a time.

    Args:
        X: float [N, D] (a memmap is read one block at a time).
        rows: rows per block.
    """

    def __init__(self, X, rows: int = 4096):
        self.X, self.rows = X, int(rows)

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, self.X.shape[0], self.rows):
            b = min(a + self.rows, self.X.shape[0])
            yield np.arange(a, b), np.asarray(self.X[a:b])


class StoreBlocks:
    """Re-iterable, picklable block source over a feature store array (``FeatureSet.iter_blocks``).

    Args:
        url: the store's URL or folder.
        set_name: feature set name.
        array: array name (``cls``, ``pooled``, ...).
        rows: int64 store rows to use (None: all), sorted ascending so that stream positions
            follow ``rows``.
    """

    def __init__(self, url, set_name: str, array: str = "cls", rows: np.ndarray | None = None):
        self.url, self.set_name, self.array = str(url), set_name, array
        self.rows = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from featcache.store.feature_store import FeatureStore

        fs = FeatureStore(self.url).open_set(self.set_name)
        yield from fs.iter_blocks(self.array, self.rows)


def _blocks(source) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """``(store rows or None, values [b, D])`` from a source: a callable (re-iterable) or an iterable."""
    it = source() if callable(source) else source
    for item in it:
        if isinstance(item, tuple) and len(item) == 2:
            yield np.asarray(item[0]), item[1]
        else:
            yield None, item


def _checked_block(block, d: int | None, pos: int) -> np.ndarray:
    B = np.asarray(block, dtype=np.float32)
    if B.ndim != 2 or (d is not None and B.shape[1] != d):
        raise SearchError(
            f"train block at stream row {pos} has shape {B.shape}; expected [b, {d if d else 'D'}]: "
            "every block must hold rows of the same feature array"
        )
    if not np.isfinite(B).all():
        bad = pos + np.flatnonzero(~np.isfinite(B).all(axis=1))
        raise SearchError(
            f"train rows at stream positions {bad[:5].tolist()} hold NaN or inf: re-extract or drop them"
        )
    return B


# ---- exact streamed search ----


def plan_stream(n_queries: int, d: int, k: int, memory_cap: int | None) -> tuple[int, int]:
    """Train rows per FAISS call and queries per pass over the train stream for a memory cap.

    Half the cap goes to the train chunk (raw + normalised float32 rows: ``8 D`` bytes a row,
    plus FAISS's [2048, 1024] product block), half to a pass of queries (normalised copy, the
    running top-k and the merge buffers: ``4 D + 48 k`` bytes a query).

    Returns:
        (chunk_rows, pass_queries: a multiple of ``QUERY_BLOCK`` or all queries).

    Raises:
        SearchError: the cap cannot hold 1,024 train rows and one query block.
    """
    if memory_cap is None:
        return _CHUNK_ROWS, max(n_queries, 1)
    half = int(memory_cap) // 2
    chunk = (half - 4 * QUERY_BLOCK * 1024) // (8 * d)
    per_q = 4 * d + 48 * k
    qpass = (half // per_q) // QUERY_BLOCK * QUERY_BLOCK
    if chunk < 1024 or qpass < min(QUERY_BLOCK, max(n_queries, 1)):
        need = 2 * max(8 * d * 1024 + 4 * QUERY_BLOCK * 1024, per_q * QUERY_BLOCK)
        raise SearchError(
            f"memory_cap={memory_cap} bytes is too small for d={d}, k={k}: give at least {need} bytes"
        )
    return int(chunk), int(max(qpass, QUERY_BLOCK))


def _stream_pass(Q, qblocks, source, k: int, d: int, chunk_rows: int, keep, st: dict, count: bool):
    """One pass over the train stream for the normalised queries Q, in ``qblocks``.

    Returns:
        (per query block (sims [b, k'], positions [b, k']), indexed rows, stream rows read).
    """
    run = [
        (np.empty((s.stop - s.start, 0), np.float32), np.empty((s.stop - s.start, 0), np.int64))
        for s in qblocks
    ]
    pending, n_pending, pos, seen = [], 0, 0, 0

    def flush():
        nonlocal pending, n_pending, pos
        if not n_pending:
            return
        Xb = l2_normalize(np.concatenate(pending) if len(pending) > 1 else pending[0])
        pending = []
        st["chunks"] += count
        st["max_chunk_rows"] = max(st["max_chunk_rows"], Xb.shape[0])
        for j, s in enumerate(qblocks):
            S_b, ids_b = block_topk(Q[s], Xb, k)
            run[j] = merge_topk(*run[j], S_b, ids_b + pos, k)
        pos += n_pending
        n_pending = 0

    for _rows, block in _blocks(source):
        B = _checked_block(block, d, seen)
        st["max_block_rows"] = max(st["max_block_rows"], B.shape[0])
        b = B.shape[0]
        if keep is not None:
            if seen + b > keep.shape[0]:
                raise SearchError(
                    f"the train stream holds more than the {keep.shape[0]} rows of its targets: "
                    "pass the targets of exactly the rows the source yields"
                )
            B = B[keep[seen : seen + b]]
        seen += b
        if not B.shape[0]:
            continue
        if n_pending and n_pending + B.shape[0] > chunk_rows:
            flush()
        pending.append(B)
        n_pending += B.shape[0]
    flush()
    return run, pos, seen


def stream_search(
    queries,
    source,
    k: int,
    *,
    memory_cap: int | None = None,
    n_jobs: int | None = None,
    keep: np.ndarray | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of the queries over a stream of train blocks.

    Args:
        queries: float [n, D] query features (array or memmap; normalised here, one pass at a time).
        source: the train rows: a callable returning an iterator of blocks (re-iterable: needed
            when the queries take several passes), or an iterable; each block is ``values``
            float [b, D] or ``(store_rows int64 [b], values)``.
        k: neighbours per query (at most the train rows; the train count is known after a pass).
        memory_cap: bytes for the working set (see ``plan_stream``), or None (64k-row chunks, one pass).
        n_jobs: FAISS threads (None: FAISS's default).
        keep: optional bool [N]: the stream rows to index (the others are skipped and take no
            position); the stream must then hold exactly N rows.
        stats: optional dict filled with ``passes``, ``chunks``, ``max_chunk_rows``,
            ``max_block_rows``, ``n_train`` (the block sizes seen, for memory checks).

    Returns:
        (sims float32 [n, k'] decreasing, idx int64 [n, k'] positions among the indexed rows),
        k' = min(k, indexed rows); exact ties ordered by position.

    Raises:
        SearchError: a block of another width or with NaN/inf, no train row, a source that can be
            read only once when the queries need several passes, or a cap too small.
    """
    nq, d = int(queries.shape[0]), int(queries.shape[1])
    k = int(k)
    chunk_rows, qpass = plan_stream(nq, d, k, memory_cap)
    n_pass = max(1, math.ceil(nq / qpass))
    if n_pass > 1 and not callable(source):
        raise SearchError(
            f"{nq} queries need {n_pass} passes over the train rows under memory_cap={memory_cap}: "
            "pass a re-iterable source (a callable such as StoreBlocks/ArrayBlocks) or raise the cap"
        )
    st = {"passes": n_pass, "chunks": 0, "max_chunk_rows": 0, "max_block_rows": 0, "n_train": 0}
    sims = idx = None
    with _FaissThreads(n_jobs):
        for p in range(n_pass):
            q0, q1 = p * qpass, min(nq, (p + 1) * qpass)
            Q = l2_normalize(np.asarray(queries[q0:q1], dtype=np.float32))
            qblocks = [slice(a, min(a + QUERY_BLOCK, q1 - q0)) for a in range(0, q1 - q0, QUERY_BLOCK)]
            run, pos, seen = _stream_pass(Q, qblocks, source, k, d, chunk_rows, keep, st, count=p == 0)
            if keep is not None and seen != keep.shape[0]:
                raise SearchError(
                    f"the train stream holds {seen} rows but its targets {keep.shape[0]}: pass the "
                    "targets of exactly the rows the source yields"
                )
            if pos == 0:
                raise SearchError("the train stream holds no row to index: check the train split/rows")
            st["n_train"] = pos
            kk = min(k, pos)
            if sims is None:
                sims, idx = np.empty((nq, kk), np.float32), np.empty((nq, kk), np.int64)
            for s, (S_r, I_r) in zip(qblocks, run):
                sims[q0 + s.start : q0 + s.stop], idx[q0 + s.start : q0 + s.stop] = S_r[:, :kk], I_r[:, :kk]
    if stats is not None:
        stats.update(st)
    return sims, idx


# ---- the probe ----

SEARCHES = ("flat", "stream", "bf16")


class ScalableKNNProbe(KNNProbe):
    """``KNNProbe`` with a choice of exact search engine; votes and outputs as ``KNNProbe``'s.

    Args:
        k, temperature, task, softmax_k, vote, n_jobs: as ``KNNProbe``.
        search: ``"flat"`` (FAISS ``IndexFlatIP`` in memory, ``KNNProbe`` itself), ``"stream"``
            (train rows streamed at every search: ``fit`` takes a block source such as
            ``StoreBlocks``/``ArrayBlocks``, a callable yielding ``[b, D]`` blocks or
            ``(rows, block)`` pairs, or an array/memmap) or ``"bf16"`` (bf16 candidates + exact
            re-rank, ``probes.estimators.knn_bf16``; needs torch).
        memory_cap: ``"stream"``: bytes of the search's working set (``plan_stream``); None:
            64k-row chunks, one pass.
        bf16_margin: ``"bf16"``: candidates beyond k per query (None: k + 64).

    Attributes:
        as ``KNNProbe``'s, and:
        source_: ``"stream"``: the block source (re-read at every search).
        search_stats_: dict of the last search (``"stream"``: passes, chunks, largest chunk and
            block seen; ``"bf16"``: bound, candidates, widened and fallback query counts), or None.
            Callers record it with their results.
    """

    def __init__(
        self,
        k=20,
        temperature: float = 0.07,
        task: str = "multilabel",
        softmax_k: int | None = None,
        vote: str = "dinov2",
        n_jobs: int | None = None,
        search: str = "stream",
        memory_cap: int | None = None,
        bf16_margin: int | None = None,
    ):
        super().__init__(
            k=k, temperature=temperature, task=task, softmax_k=softmax_k, vote=vote, n_jobs=n_jobs
        )
        self.search = search
        self.memory_cap = memory_cap
        self.bf16_margin = bf16_margin

    def _check_params(self) -> list[int]:
        if self.search not in SEARCHES:
            raise ProbeInputError(f"unknown search {self.search!r}: use one of {', '.join(SEARCHES)}")
        self.search_stats_ = None
        return super()._check_params()

    def _fit_input(self, X, y):
        if self.search != "stream":
            return super()._fit_input(X, y)
        if X is None:
            raise ProbeInputError("X_train is None: pass a feature matrix [N, D] or a block source")
        if callable(X):
            source = X
        elif hasattr(X, "shape") and len(X.shape) == 2:
            source = ArrayBlocks(X)
        else:
            raise ProbeInputError(
                "search='stream' fits on a block source (a callable yielding [b, D] blocks, e.g. "
                "StoreBlocks) or a 2-D array/memmap"
            )
        if y is None:
            raise ProbeInputError("KNNProbe requires y to be passed, but the target y is None")
        first = next(iter(_blocks(source)), None)
        shape = None if first is None else np.shape(first[1])
        if shape is None or len(shape) != 2 or shape[1] == 0:
            raise ProbeInputError(
                f"the train block source must yield 2-D [b, D] feature blocks; its first is {shape}"
            )
        return source, int(np.shape(y)[0]), int(shape[1])

    def _build_index(self, X: Any, rows, n: int, d: int) -> None:
        for name in ("index_", "source_", "keep_", "xn_", "_xb"):
            self.__dict__.pop(name, None)
        if self.search == "flat":
            super()._build_index(X, rows, n, d)
        elif self.search == "bf16":
            self.xn_ = l2_normalize(X if rows is None else X[rows])
        else:
            self.source_ = X
            self.keep_ = None if rows is None else np.isin(np.arange(n), rows)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_xb", None)  # a torch tensor cache, rebuilt on demand
        return state

    def _neighbours(self, X: np.ndarray, kmax: int):
        """All queries in one search (one pass over the train stream), yielded in ``KNNProbe``'s blocks."""
        if self.search == "flat":
            yield from super()._neighbours(X, kmax)
            return
        if self.search == "stream":
            stats = {"engine": "stream", "memory_cap": self.memory_cap}
            sims, idx = stream_search(
                X,
                self.source_,
                kmax,
                memory_cap=self.memory_cap,
                n_jobs=self.n_jobs,
                keep=self.keep_,
                stats=stats,
            )
            if stats["n_train"] != self.n_train_:
                raise ProbeInputError(
                    f"the train block source now yields {stats['n_train']} indexed rows, not the "
                    f"{self.n_train_} of fit: the store changed; fit again"
                )
        else:
            from probes.estimators.knn_bf16 import bf16_search

            if getattr(self, "_xb", None) is None:
                import torch  # optional: search="bf16" only

                self._xb = torch.from_numpy(self.xn_).to(torch.bfloat16)
            sims, idx, stats = bf16_search(
                X,
                self.xn_,
                kmax,
                margin=self.bf16_margin,
                n_jobs=self.n_jobs,
                normalized=True,
                X_bf16=self._xb,
            )
            if stats["fallback"]:
                warnings.warn(
                    f"ScalableKNNProbe search='bf16': {stats['fallback']} of {X.shape[0]} queries searched "
                    f"exactly in float32 (their bf16 candidate window held more than "
                    f"{4 * stats['candidates']} rows; see search_stats_)",
                    stacklevel=3,
                )
        self.search_stats_ = stats
        for a in range(0, X.shape[0], QUERY_BLOCK):
            block = slice(a, a + QUERY_BLOCK)
            yield block, sims[block], idx[block]
