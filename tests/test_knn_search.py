"""Streamed and bf16 exact kNN search against FAISS's in-memory flat search and a canonical reference."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import faiss
import numpy as np
import pytest

from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import Manifest
from probes.estimators._linalg import l2_normalize
from probes.estimators.knn import KNNProbe, ProbeInputError
from probes.estimators.knn_bf16 import bf16_error_bound, bf16_search
from probes.estimators.knn_search import (
    ArrayBlocks,
    ScalableKNNProbe,
    SearchError,
    StoreBlocks,
    plan_stream,
    stream_search,
)


@pytest.fixture
def torch():
    """The bf16 engine's optional dependency (its tests skip without it)."""
    return pytest.importorskip("torch")


def _clustered(n, nq, d=32, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(8, d))
    X = (c[rng.integers(0, 8, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)
    Q = (c[rng.integers(0, 8, nq)] + spread * rng.normal(size=(nq, d))).astype(np.float32)
    return X, Q


def _flat(X, Q, k):
    """KNNProbe's in-memory search: FAISS IndexFlatIP, queries in blocks of 2048."""
    ix = faiss.IndexFlatIP(X.shape[1])
    ix.add(l2_normalize(X))
    out = [ix.search(l2_normalize(Q[a : a + 2048]), k) for a in range(0, Q.shape[0], 2048)]
    return np.vstack([o[0] for o in out]), np.vstack([o[1] for o in out])


def _canonical(X, Q, k):
    """Reference: every FAISS similarity (a full list), sorted by (similarity desc, row asc)."""
    S, ids = _flat(X, Q, X.shape[0])
    o = np.lexsort((ids, -S), axis=-1)[:, :k]
    return np.take_along_axis(S, o, 1), np.take_along_axis(ids, o, 1)


def _exact64(X, Q, k):
    """float64 brute force on the float32-normalised rows, ties by row."""
    S = l2_normalize(Q).astype(np.float64) @ l2_normalize(X).astype(np.float64).T
    o = np.lexsort((np.broadcast_to(np.arange(X.shape[0]), S.shape), -S), axis=-1)[:, :k]
    return np.take_along_axis(S, o, 1), o


def test_stream_equals_in_memory_search_over_chunks_and_passes():
    X, Q = _clustered(6000, 2100, seed=1)
    cap = 2 * (8 * 32 * 1500 + 4 * 2048 * 1024)  # ~1.5k-row chunks, one 2048-query block per pass
    chunk, qpass = plan_stream(Q.shape[0], 32, 50, cap)
    st = {}
    s1, i1 = stream_search(Q, ArrayBlocks(X, 333), 50, memory_cap=cap, stats=st)
    s0, i0 = _flat(X, Q, 50)
    assert st["passes"] == 2 and st["chunks"] >= 4 and qpass == 2048
    np.testing.assert_array_equal(s1, s0)  # bit-identical similarities rank by rank
    # the same neighbours; the order differs only inside groups of exactly equal similarity
    # (float32 ties happen in random data), which FAISS's heap leaves in no fixed order
    assert all(set(a) == set(b) for a, b in zip(i1, i0))
    r, c = np.nonzero(i1 != i0)
    assert all(np.count_nonzero(s0[i] == s0[i, j]) >= 2 for i, j in zip(r, c))
    np.testing.assert_array_equal(i1[:100], _canonical(X, Q[:100], 50)[1])


def test_stream_orders_exact_ties_by_row_and_keeps_the_lowest_rows_at_the_kth():
    X, Q = _clustered(3000, 300, seed=2)
    X[1000:1200] = X[2500]  # 200 identical rows (and the original), tied with each other
    Q[:40] = X[2500] + 0.01
    s1, i1 = stream_search(Q, ArrayBlocks(X, 250), 30, memory_cap=2 * (8 * 32 * 1024 + 4 * 2048 * 1024))
    s_ref, i_ref = _canonical(X, Q, 30)
    np.testing.assert_array_equal(i1, i_ref)
    np.testing.assert_array_equal(s1, s_ref)
    assert set(i1[0]) == set(range(1000, 1030))  # the tie reaches past k: the lowest rows kept
    s0, _ = _flat(X, Q, 30)
    np.testing.assert_array_equal(s1, s0)  # FAISS orders ties its own way, but the values agree


def test_stream_reads_block_by_block_without_materialising_the_train_set():
    X, Q = _clustered(9000, 64, seed=3)
    seen = []

    def source():
        for a in range(0, X.shape[0], 500):
            seen.append(min(500, X.shape[0] - a))
            yield np.arange(a, a + seen[-1]), X[a : a + 500]

    cap = 2 * (8 * 32 * 2048 + 4 * 2048 * 1024)
    chunk, _ = plan_stream(64, 32, 10, cap)
    st = {}
    s1, i1 = stream_search(Q, source, 10, memory_cap=cap, stats=st)
    assert max(seen) == 500 and sum(seen) == X.shape[0]
    assert st["max_block_rows"] == 500 and st["max_chunk_rows"] <= chunk < X.shape[0]
    assert st["chunks"] == -(-X.shape[0] // (chunk // 500 * 500))
    np.testing.assert_array_equal(i1, _canonical(X, Q, 10)[1])


def test_stream_errors_are_clear():
    X, Q = _clustered(100, 5)
    with pytest.raises(SearchError, match="too small"):
        stream_search(Q, ArrayBlocks(X), 5, memory_cap=1000)
    bad = X.copy()
    bad[42, 3] = np.nan
    with pytest.raises(SearchError, match=r"stream positions \[42\]"):
        stream_search(Q, ArrayBlocks(bad, 30), 5)
    with pytest.raises(SearchError, match="more than the 90 rows of its targets"):
        stream_search(Q, ArrayBlocks(X), 5, keep=np.ones(90, bool))
    with pytest.raises(SearchError, match="shape"):
        stream_search(Q, [X[:50], X[50:, :10]], 5)


def _store(tmp_path: Path, X: np.ndarray, shard_rows: int):
    n = X.shape[0]
    names = np.array([f"r{i}" for i in range(n)])
    m = Manifest("test", tmp_path, names, names, names, np.array(["train"] * n))
    fs = FeatureStore(tmp_path / "cache", mode="a").create_set(
        "d/m/8", m, {"cls": ArraySpec((X.shape[1],))}, {}, shard_rows=shard_rows
    )
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        fs.write_shard(s, {"cls": X[lo:hi]}, {})
    return tmp_path / "cache"


def test_probe_on_a_store_scores_as_the_in_memory_probe(tmp_path):
    X, Q = _clustered(700, 90, seed=4)
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 700)
    rows = np.sort(rng.choice(700, 500, replace=False))
    y_rows = y[rows].copy()
    y_rows[::7] = -1  # rows without a class are not indexed (stream positions skip them)
    url = _store(tmp_path, X, shard_rows=64)
    ks = (5, 20, 50)
    ref = KNNProbe(k=ks, task="multiclass").fit(X[rows], y_rows)
    probe = ScalableKNNProbe(k=ks, task="multiclass", search="stream", memory_cap=40 * 2**20)
    probe.fit(StoreBlocks(url, "d/m/8", "cls", rows), y_rows)
    got, want = probe.scores_for_ks(Q), ref.scores_for_ks(Q)
    for k in ks:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(probe.kneighbors(Q)[1], ref.kneighbors(Q)[1])
    assert probe.search_stats_["max_block_rows"] <= 64 and probe.search_stats_["n_train"] == probe.n_train_
    again = pickle.loads(pickle.dumps(probe))  # the store source pickles; it reopens the store
    np.testing.assert_array_equal(again.kneighbors(Q[:5])[1], ref.kneighbors(Q[:5])[1])


def test_bf16_error_bound_holds_and_search_equals_exact_on_near_ties(torch):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(1, 64))
    # 2000 rows near one direction: their similarities (~0.99) differ by ~1e-4, below bf16's
    # resolution there (2^-8) and far above float32 rounding (the re-rank's)
    X = (base + 0.1 * rng.normal(size=(2000, 64))).astype(np.float32)
    X = np.vstack([X, rng.normal(size=(2000, 64)).astype(np.float32)])
    Q = (base + 0.1 * rng.normal(size=(50, 64))).astype(np.float32)
    Qn, Xn = l2_normalize(Q), l2_normalize(X)
    approx = (torch.from_numpy(Qn).bfloat16() @ torch.from_numpy(Xn).bfloat16().T).float().numpy()
    err = np.abs(approx - Qn.astype(np.float64) @ Xn.astype(np.float64).T).max()
    assert err <= bf16_error_bound(64, 1 + 1e-6, 1 + 1e-6)
    s, i, st = bf16_search(Q, X, 20, margin=3000)
    s64, i64 = _exact64(X, Q, 20)
    # the exact neighbours; in order but for pairs whose exact similarities are within float32
    # rounding of each other (the re-rank is float32, as FAISS's)
    assert all(set(a) == set(b) for a, b in zip(i, i64))
    r, c = np.nonzero(i != i64)
    assert r.size <= 4 and np.all(np.abs(s64[r, c] - s[r, c]) < 1e-6)
    np.testing.assert_allclose(s, s64, rtol=0, atol=1e-6)
    assert st["fallback"] == 0 and st["widened"] == 0
    # the near-tied rows are ranked differently by bf16 alone: the exact re-rank is what fixes them
    bf_top = np.argsort(-approx, axis=1, kind="stable")[:, :20]
    assert not all(set(a) == set(b) for a, b in zip(bf_top, i64))


def test_bf16_widens_then_falls_back_exactly_and_counts_it(torch):
    rng = np.random.default_rng(6)
    X = (np.ones((1, 32)) + 1e-3 * rng.normal(size=(3000, 32))).astype(np.float32)
    Q = (np.ones((1, 32)) + 1e-3 * rng.normal(size=(7, 32))).astype(np.float32)
    s, i, st = bf16_search(Q, X, 5, margin=0)  # 5 candidates, widened to 20: all 3000 are in the window
    assert st["widened"] == 7 and st["fallback"] == 7 and st["candidates"] == 5
    np.testing.assert_array_equal(i, _canonical(X, Q, 5)[1])
    probe = ScalableKNNProbe(k=5, task="multiclass", search="bf16", bf16_margin=0)
    probe.fit(X, rng.integers(0, 2, 3000))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        probe.kneighbors(Q)
    assert any("7 of 7 queries searched exactly" in str(x.message) for x in w)
    assert probe.search_stats_["fallback"] == 7


def test_bf16_probe_scores_as_the_flat_probe(torch):
    X, Q = _clustered(3000, 200, d=48, seed=7, spread=0.7)
    Y = (np.random.default_rng(7).random((3000, 3)) < 0.3).astype(np.float32)
    ks = (10, 50)
    ref = KNNProbe(k=ks).fit(X, Y)
    probe = ScalableKNNProbe(k=ks, search="bf16").fit(X, Y)
    _, i64 = _exact64(X, Q, 50)
    np.testing.assert_array_equal(probe.kneighbors(Q)[1], i64)
    got, want = probe.scores_for_ks(Q), ref.scores_for_ks(Q)
    for k in ks:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)
    assert probe.search_stats_["engine"] == "bf16+exact-rerank"
    with pytest.raises(ProbeInputError, match="unknown search"):
        ScalableKNNProbe(search="ivf").fit(X, Y)
