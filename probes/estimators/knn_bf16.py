"""bf16 pre-search + exact re-rank: the exact cosine top-k at the hardware's bf16 speed.

A bf16 matrix product (torch, imported only inside ``bf16_search``: an optional dependency; AMX /
AVX512-BF16 make it ~4x a float32 one) finds candidates, which are re-ranked exactly (float32
inner products of the float32-normalised rows). The candidate window is wide enough to provably
hold the exact top-k (``bf16_error_bound``); a query whose window does not fit the candidates
taken is widened once, then searched exactly with FAISS (both counted in the stats).

Example:
    >>> sims, idx, stats = bf16_search(X_test, X_train, k=200)   # stats["fallback"]: queries
"""

from __future__ import annotations

import numpy as np

from probes.estimators._linalg import l2_normalize
from probes.estimators.knn import _FaissThreads
from probes.estimators.knn_topk import SearchError, block_topk

_BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
_F32_U = 2.0**-24


def bf16_error_bound(d: int, norm_q: float = 1.0, norm_x: float = 1.0) -> float:
    """Largest possible |bf16 product - exact inner product| of a query and a train row.

    Both float32 vectors are rounded to bfloat16 (relative error <= u = 2^-8 per entry), their
    products are exact in float32 and summed in float32 (error <= gamma_d = d 2^-24 / (1 - d 2^-24)
    of the sum of |terms|, any order), and the sum is rounded to a bfloat16 output (<= u). With
    ``sum |x_i y_i| <= |x| |y|`` (Cauchy-Schwarz):
    ``|err| <= |x||y| [(2u + u^2)(1 + gamma_d) + gamma_d + u (1 + 2u + u^2)(1 + gamma_d)] + d 2^-120``
    (the last term covers flushed subnormals).

    Args:
        d: feature dimension.
        norm_q, norm_x: upper bounds of the query / train row L2 norms.

    Returns:
        float, the bound.
    """
    u, g = _BF16_U, d * _F32_U / (1 - d * _F32_U)
    rel = (2 * u + u * u) * (1 + g) + g
    return float(norm_q * norm_x * (rel + u * (1 + rel)) + d * 2.0**-120)


def _exact_rerank(torch, Q: np.ndarray, X: np.ndarray, cand: np.ndarray, k: int):
    """Exact top-k among candidates: float32 inner products (torch's gather + bmm), ties by position.

    torch rather than numpy here: numpy's gather is single-threaded and its BLAS threads would
    compete with torch's still-spinning OpenMP threads on the same cores.

    Args:
        Q: float32 [n, D] normalised queries; X: float32 [N, D] normalised train rows;
        cand: int64 [n, m] candidate positions (m >= k).

    Returns:
        (float32 [n, k], int64 [n, k]).
    """
    n = Q.shape[0]
    Xt, Qt = torch.from_numpy(X), torch.from_numpy(Q)
    sub = max(1, 2**25 // (cand.shape[1] * X.shape[1] * 4))  # ~32 MiB of gathered rows at a time
    S = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    buf = torch.empty((min(sub, n) * cand.shape[1], X.shape[1]), dtype=torch.float32)
    for a in range(0, n, sub):
        c = np.sort(cand[a : a + sub], axis=1)  # position order, so a stable sort breaks ties by it
        # float32 products, as FAISS's own (a float64 copy of the gathered rows would cost
        # several times the whole bf16 product)
        # into one reused buffer: fresh [s, m, D] pages each time cost more than the gather itself
        g = buf[: c.size]
        torch.index_select(Xt, 0, torch.from_numpy(c.ravel()), out=g)
        s = torch.bmm(g.view(c.shape[0], c.shape[1], -1), Qt[a : a + sub, :, None])[..., 0].numpy()
        o = np.argsort(-s, axis=1, kind="stable")[:, :k]
        S[a : a + sub] = np.take_along_axis(s, o, 1)
        ids[a : a + sub] = np.take_along_axis(c, o, 1)
    return S, ids


def bf16_search(
    queries,
    X,
    k: int,
    *,
    margin: int | None = None,
    n_jobs: int | None = None,
    normalized: bool = False,
    query_block: int = 512,
    X_bf16=None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Exact cosine top-k through a bf16 candidate search and an exact re-rank.

    For each query, with t the k-th largest bf16 similarity and B = ``bf16_error_bound``, every
    exact top-k row has a bf16 similarity >= t - 2B (the true k-th is >= t - B, and each row's
    bf16 value is within B of its true one; ``_candidates`` uses the tighter per-value form).
    The ``k + margin`` best bf16 candidates are re-ranked exactly; a query whose
    (k + margin)-th bf16 value is still inside that window (its window may hold more rows) is
    widened to 4x the candidates once, then searched exactly with FAISS.

    Needs torch (imported here only; bf16 matrix products use AMX / AVX512-BF16 where the CPU
    has them, and are slower than float32 where it has not).

    Args:
        queries: float [n, D] query features.
        X: float [N, D] train features (kept in float32 for the re-rank).
        k: neighbours per query (capped at N).
        margin: extra candidates per query (None: ``k + 64``).
        n_jobs: torch and FAISS threads (None: their defaults).
        normalized: ``X`` is already L2-normalised float32 (no copy is made).
        query_block: queries per bf16 product (the [query_block, N] bf16 block is the peak).
        X_bf16: optional torch bfloat16 [N, D] of the normalised ``X`` (reused across calls).

    Returns:
        (sims float32 [n, k'] decreasing, float32 inner products (within float32 rounding of
        FAISS's);
        idx int64 [n, k'] rows of X, exact ties by row; stats dict: ``engine``, ``bound``,
        ``candidates`` (k + margin), ``widened`` and ``fallback`` query counts).

    Raises:
        SearchError: torch is not installed, or a shape mismatch.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is optional for the probes
        raise SearchError("search='bf16' needs torch (pip install torch); use search='flat'") from None
    Xn = X if normalized else l2_normalize(X)
    Q = l2_normalize(np.asarray(queries, dtype=np.float32))
    N, d = Xn.shape
    if Q.shape[1] != d:
        raise SearchError(f"queries have {Q.shape[1]} features, the train rows {d}")
    k = min(int(k), N)
    m0 = min(N, k + (k + 64 if margin is None else int(margin)))
    nx = float(np.sqrt(np.einsum("ij,ij->i", Xn, Xn, dtype=np.float64).max()))
    nqs = np.sqrt(np.einsum("ij,ij->i", Q, Q, dtype=np.float64))
    saved = torch.get_num_threads()
    if n_jobs is not None:
        torch.set_num_threads(max(1, int(n_jobs)))
    try:
        xb = X_bf16 if X_bf16 is not None else torch.from_numpy(Xn).to(torch.bfloat16)
        sims = np.empty((Q.shape[0], k), np.float32)
        idx = np.empty((Q.shape[0], k), np.int64)
        widened = fallback = 0
        for a in range(0, Q.shape[0], query_block):
            q = Q[a : a + query_block]
            # the input-rounding + accumulation part of the bound; the output rounding is per value
            bound = np.array([bf16_input_bound(d, v, nx) for v in nqs[a : a + query_block]])
            S = torch.from_numpy(q).to(torch.bfloat16) @ xb.T  # [b, N] bf16
            cand, ok = _candidates(torch, S, k, m0, bound)
            plain = np.flatnonzero(ok)
            if plain.size:
                sims[a + plain], idx[a + plain] = _exact_rerank(torch, q[plain], Xn, cand[plain], k)
            widen = np.flatnonzero(~ok)
            if widen.size and m0 < N:  # (m0 == N: every row was a candidate, ok is all True)
                widened += widen.size
                c2, ok2 = _candidates(torch, S[torch.from_numpy(widen)], k, min(N, 4 * m0), bound[widen])
                w = widen[ok2]
                if w.size:
                    sims[a + w], idx[a + w] = _exact_rerank(torch, q[w], Xn, c2[ok2], k)
                ok[w] = True
            del S
            bad = np.flatnonzero(~ok)
            if bad.size:
                fallback += bad.size
                with _FaissThreads(n_jobs):
                    sims[a + bad], idx[a + bad] = block_topk(q[bad], Xn, k)  # exact ties by row
    finally:
        torch.set_num_threads(saved)
    stats = {
        "engine": "bf16+exact-rerank",
        "bound": float(bf16_error_bound(d, float(nqs.max(initial=1.0)), nx)),
        "candidates": int(m0),
        "widened": int(widened),
        "fallback": int(fallback),
    }
    return sims, idx, stats


def bf16_input_bound(d: int, norm_q: float = 1.0, norm_x: float = 1.0) -> float:
    """The part of ``bf16_error_bound`` before the output rounding: ``|r - s|`` for the float32 sum r.

    The bf16 value v then satisfies ``|v - r| <= u |r| <= u |v| / (1 - u)``.
    """
    u, g = _BF16_U, d * _F32_U / (1 - d * _F32_U)
    return float(norm_q * norm_x * ((2 * u + u * u) * (1 + g) + g) + d * 2.0**-120)


def _candidates(torch, S, k: int, m: int, bound: np.ndarray):
    """Top-m bf16 candidates per row of S and whether they provably hold the exact top-k.

    With ``e(v) = bound + u |v| / (1 - u)`` the error of a bf16 value v (increasing in v's
    distance from 0 slower than v itself), the k rows with ``v >= v_k`` have exact similarities
    ``>= L = v_k - e(v_k)``, so the exact k-th is ``>= L``; a row outside the top m has
    ``v <= v_m`` and an exact similarity ``<= U = v_m + e(v_m)``. ``U < L`` proves that every
    exact top-k row (and every row tied with the k-th) is among the candidates.

    Returns:
        (int64 [b, m] candidate positions, bool [b]: the m-th bf16 value is below t - 2B, or m
        is every row).
    """
    v, i = torch.topk(S, m, dim=1, sorted=True)
    v = v.float().numpy()
    if m == S.shape[1]:
        return i.numpy(), np.ones(S.shape[0], bool)
    u = _BF16_U / (1 - _BF16_U)
    vk, vm = v[:, k - 1].astype(np.float64), v[:, m - 1].astype(np.float64)
    ok = vm + bound + u * np.abs(vm) < vk - bound - u * np.abs(vk)
    return i.numpy(), ok
