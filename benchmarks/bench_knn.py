"""kNN neighbour search: KNNProbe (exact FAISS IndexFlatIP on L2-normalised float32) vs scikit-learn
KNeighborsClassifier(algorithm="brute", metric="cosine"), on the same synthetic data.

100k train rows x d = 768 (clustered, like embeddings), 2k queries, k = 200 (the largest default k,
one search serves 10/20/100/200). Reports the time of fit + neighbour search for both, their ratio,
whether both return the same neighbours (same ordered lists; same sets), and the time of the full
probe (search + votes for all four k, 14 labels).

Target: ratio >= 3x with identical neighbours (up to exact similarity ties). Both sides spend most
of their time in the same float32 matrix product, so the float32 ratio is bounded by what FAISS saves
around it (top-k heaps instead of a full partition, no distance matrix); scikit-learn on float64
features (a float64 array, a CSV-loaded table) is timed too, as a second reference.

Run: python benchmarks/bench_knn.py [--n-train 100000] [--queries 2000] [--json bench-out/bench_knn.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from probes.knn import KNNProbe


def make_data(n: int, d: int, n_queries: int, n_labels: int, seed: int = 0):
    """Clustered float32 features [n + n_queries, d] and multi-label targets [n, L]."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, d)).astype(np.float32)
    assign = rng.integers(0, 200, n + n_queries)
    X = centers[assign] + 1.5 * rng.normal(size=(n + n_queries, d)).astype(np.float32)
    Y = (rng.random((200, n_labels)) < 0.2)[assign[:n]].astype(np.float32)
    flip = rng.random(Y.shape) < 0.1
    Y[flip] = 1 - Y[flip]
    return X[:n], Y, X[n:], assign[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for both sides (default: all cores; FAISS and BLAS)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    ap.add_argument("--json", type=Path, default=Path("bench-out/bench_knn.json"))
    args = ap.parse_args()

    X, Y, Q, cluster = make_data(args.n_train, args.dim, args.queries, 14)

    def ours():
        probe = KNNProbe(k=(10, 20, 100, args.k), n_jobs=args.threads).fit(X, Y)
        return probe, *probe.kneighbors(Q)

    def theirs(A, B):
        return (
            KNeighborsClassifier(n_neighbors=args.k, algorithm="brute", metric="cosine")
            .fit(A, cluster)
            .kneighbors(B)
        )

    # The same baseline on float64 features (what a float64 array or a CSV-loaded table gives it).
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    times: dict[str, list[float]] = {"faiss": [], "sklearn": [], "sklearn64": [], "probe": []}
    # Shared machines are noisy: interleave the contenders and keep the median of the repeats.
    limits = threadpool_limits(limits=args.threads) if args.threads else contextlib.nullcontext()
    with limits:
        for _ in range(args.repeats):
            t = time.perf_counter()
            probe, sims, idx = ours()
            times["faiss"].append(time.perf_counter() - t)
            t = time.perf_counter()
            dist, sk_idx = theirs(X, Q)
            times["sklearn"].append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs(X64, Q64)
            times["sklearn64"].append(time.perf_counter() - t)
            t = time.perf_counter()
            probe.predict_scores(Q)
            times["probe"].append(time.perf_counter() - t)
    del X64, Q64
    faiss_s, sklearn_s, sklearn64_s, probe_s = (float(np.median(times[k])) for k in times)

    same_order = np.mean(np.all(idx == sk_idx, axis=1))
    same_set = np.mean([np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(idx, sk_idx)])
    # Where lists differ, the swapped neighbours must be ties: compare the similarity at each rank.
    max_sim_gap = float(np.abs(sims - (1.0 - dist)).max())

    out = {
        "n_train": args.n_train,
        "queries": args.queries,
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads or os.cpu_count(),
        "repeats": args.repeats,
        "times_s": times,
        "cpus": os.cpu_count(),
        "faiss_fit_search_s": faiss_s,
        "sklearn_fit_search_s": sklearn_s,
        "speedup": sklearn_s / faiss_s,
        "sklearn_float64_fit_search_s": sklearn64_s,
        "speedup_vs_sklearn_float64": sklearn64_s / faiss_s,
        "probe_all_k_scores_s": probe_s,
        "same_ordered_neighbours": float(same_order),
        "same_neighbour_sets": float(same_set),
        "max_similarity_gap_by_rank": max_sim_gap,
    }
    print(f"kNN search: {args.n_train} train x d={args.dim}, {args.queries} queries, k={args.k}")
    print(f"median of {args.repeats} interleaved runs, {args.threads or os.cpu_count()} threads each")
    print(f"{'method':<52}{'seconds':>10}{'ratio':>8}")
    print(f"{'KNNProbe (FAISS IndexFlatIP) fit + kneighbors':<52}{faiss_s:>10.2f}{1.0:>8.1f}")
    print(f"{'scikit-learn brute cosine fit + kneighbors':<52}{sklearn_s:>10.2f}{out['speedup']:>8.1f}")
    print(
        f"{'scikit-learn brute cosine, float64 features':<52}{sklearn64_s:>10.2f}"
        f"{out['speedup_vs_sklearn_float64']:>8.1f}"
    )
    print(f"{'KNNProbe predict_scores, k=10/20/100/200, 14 labels':<52}{probe_s:>10.2f}")
    print(
        f"same ordered neighbours: {same_order:.4f} of queries; same sets: {same_set:.4f}; "
        f"max |sim difference| at equal rank: {max_sim_gap:.1e}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
