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

Scale suites (``--suite``):

- ``stream``: ``--stream-rows`` (1M) x 768 float32 rows written block by block to a Zarr feature
  store, searched by ``stream_search`` under ``--memory-cap`` in a child process (its peak RSS is
  reported against the cap), then the same queries searched in memory with FAISS: identical
  neighbour sets, similarities rank by rank.
- ``bf16``: ``bf16_search`` vs FAISS ``IndexFlatIP`` float32 on 100k x 768, 5k queries, k = 200:
  identical neighbour sets, whole-call time ratio (the CPU's AMX / AVX512-BF16 flags are printed).

Run: python benchmarks/bench_knn.py --suite stream|bf16 [--json bench-out/bench_knn_SUITE.json]
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

from probes.estimators.knn import KNNProbe


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


def _cpu() -> dict:
    model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def _same_sets(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([np.array_equal(np.sort(x), np.sort(y)) for x, y in zip(a, b)]))


def _write_store(path: Path, n: int, d: int, seed: int = 0):
    """n clustered rows x d float32 in a feature store, written shard by shard (never all in RAM)."""
    from featcache.store.feature_store import ArraySpec, FeatureStore
    from featcache.store.manifest import Manifest

    names = np.char.add("r", np.arange(n).astype(str))
    m = Manifest("bench", path, names, names, names, np.full(n, "train"))
    fs = FeatureStore(path / "cache", mode="a").create_set("bench/m/1", m, {"cls": ArraySpec((d,))}, {})
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, d)).astype(np.float32)
    for sh in range(fs.n_shards):
        lo, hi = fs.shard_range(sh)
        r = np.random.default_rng([seed, sh])
        X = centers[r.integers(0, 200, hi - lo)] + 1.5 * r.normal(size=(hi - lo, d)).astype(np.float32)
        fs.write_shard(sh, {"cls": X}, {})
    Q = centers[rng.integers(0, 200, 4096)] + 1.5 * rng.normal(size=(4096, d)).astype(np.float32)
    return fs, Q


def _stream_child(url: str, queries: str, k: int, cap: int, out: str) -> None:
    """Child process: streamed search only, so that its peak RSS is the search's."""
    from probes.estimators.knn_search import StoreBlocks, stream_search

    def status(key: str) -> int:  # kB lines of /proc/self/status (VmRSS now, VmHWM the peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    Q = np.load(queries)
    base = status("VmRSS:")
    t = time.perf_counter()
    st = {}
    sims, idx = stream_search(Q, StoreBlocks(url, "bench/m/1", "cls"), k, memory_cap=cap, stats=st)
    secs = time.perf_counter() - t
    peak = status("VmHWM:")
    np.savez(out, sims=sims, idx=idx, secs=secs, peak=peak, base=base, stats=json.dumps(st))


def bench_stream(args) -> dict:
    import subprocess
    import sys
    import tempfile

    import faiss

    from probes.estimators._linalg import l2_normalize

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        fs, Q = _write_store(tmp, args.stream_rows, args.dim)
        write_s = time.perf_counter() - t
        Q = Q[: args.stream_queries]
        np.save(tmp / "q.npy", Q)
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); from benchmarks.bench_knn import _stream_child; "
            "_stream_child(*sys.argv[1:3], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(tmp / "cache"), str(tmp / "q.npy"), str(args.k), str(args.memory_cap),
             str(tmp / "out.npz")], check=True,
        )  # fmt: skip
        got = np.load(tmp / "out.npz")
        # the in-memory reference: all rows in RAM, one FAISS index (KNNProbe's flat search)
        t = time.perf_counter()
        ix = faiss.IndexFlatIP(args.dim)
        for _, block in fs.iter_blocks("cls"):
            ix.add(l2_normalize(block))
        ref_s, ref_i = ix.search(l2_normalize(Q), args.k)
        mem_s = time.perf_counter() - t
    out = {
        "n_train": args.stream_rows, "dim": args.dim, "queries": int(Q.shape[0]), "k": args.k,
        "memory_cap_bytes": args.memory_cap, "store_write_s": write_s,
        "stream_search_s": float(got["secs"]), "in_memory_build_search_s": mem_s,
        "child_peak_rss_bytes": int(got["peak"]), "child_rss_before_search_bytes": int(got["base"]),
        "train_bytes": args.stream_rows * args.dim * 4, "stats": json.loads(str(got["stats"])),
        "same_neighbour_sets": _same_sets(got["idx"], ref_i),
        "same_ordered_neighbours": float(np.mean(np.all(got["idx"] == ref_i, axis=1))),
        "sims_bit_identical": bool(np.array_equal(got["sims"], ref_s)),
    }  # fmt: skip
    growth = out["child_peak_rss_bytes"] - out["child_rss_before_search_bytes"]
    print(
        f"streamed exact kNN: {args.stream_rows} x {args.dim} from a Zarr store, {Q.shape[0]} queries, k={args.k}"
    )
    print(f"{'':<44}{'value':>16}")
    for name, v in [
        ("store write (s)", f"{write_s:.1f}"),
        ("stream_search (s)", f"{out['stream_search_s']:.1f}"),
        ("in-memory FAISS build + search (s)", f"{mem_s:.1f}"),
        ("train matrix (MiB)", f"{out['train_bytes'] / 2**20:.0f}"),
        ("memory cap (MiB)", f"{args.memory_cap / 2**20:.0f}"),
        ("child peak RSS (MiB)", f"{out['child_peak_rss_bytes'] / 2**20:.0f}"),
        ("child RSS before the search (MiB)", f"{out['child_rss_before_search_bytes'] / 2**20:.0f}"),
        ("peak growth during the search (MiB)", f"{growth / 2**20:.0f}"),
        ("same neighbour sets", f"{out['same_neighbour_sets']:.4f}"),
        ("same ordered lists", f"{out['same_ordered_neighbours']:.4f}"),
        ("similarities bit-identical", str(out["sims_bit_identical"])),
    ]:
        print(f"{name:<44}{v:>16}")
    if out["sims_bit_identical"] and out["same_neighbour_sets"] < 1:
        print("the lists that differ hold the same similarity at every rank: exactly tied rows, which FAISS")
        print("orders in no fixed way and the streamed search by row")
    return out


def bench_bf16(args) -> dict:
    import faiss

    from probes.estimators._linalg import l2_normalize
    from probes.estimators.knn_bf16 import bf16_search

    X, _, Q, _ = make_data(args.n_train, args.dim, args.queries, 1)
    times: dict[str, list[float]] = {"flat": [], "bf16": []}
    t = time.perf_counter()
    bf16_search(Q[:8], X, args.k)  # torch's import and first-call set-up, reported apart
    warmup_s = time.perf_counter() - t
    for _ in range(args.repeats):
        t = time.perf_counter()
        ix = faiss.IndexFlatIP(args.dim)
        ix.add(l2_normalize(X))
        fs_, fi = ix.search(l2_normalize(Q), args.k)
        times["flat"].append(time.perf_counter() - t)
        del ix
        t = time.perf_counter()
        bs, bi, st = bf16_search(Q, X, args.k)
        times["bf16"].append(time.perf_counter() - t)
    flat_s, bf_s = (float(np.median(times[k])) for k in times)
    out = {
        "n_train": args.n_train, "dim": args.dim, "queries": args.queries, "k": args.k, "repeats": args.repeats,
        "cpu": _cpu(), "times_s": times, "flat_s": flat_s, "bf16_s": bf_s, "speedup": flat_s / bf_s, "stats": st,
        "bf16_first_call_8_queries_s": warmup_s,
        "same_neighbour_sets": _same_sets(bi, fi),
        "same_ordered_neighbours": float(np.mean(np.all(bi == fi, axis=1))),
        "max_abs_sim_diff": float(np.abs(bs - fs_).max()),
    }  # fmt: skip
    cpu = out["cpu"]
    print(f"bf16 pre-search + exact re-rank vs FAISS IndexFlatIP float32: {args.n_train} x {args.dim}, "
          f"{args.queries} queries, k={args.k}, median of {args.repeats}")  # fmt: skip
    print(f"CPU {cpu['model']}: amx_bf16={cpu['amx_bf16']} avx512_bf16={cpu['avx512_bf16']}")
    print(f"{'method (whole call, index build included)':<52}{'seconds':>10}{'ratio':>8}")
    print(f"{'FAISS IndexFlatIP float32':<52}{flat_s:>10.2f}{1.0:>8.1f}")
    print(f"{'bf16_search (bf16 GEMM + exact re-rank)':<52}{bf_s:>10.2f}{out['speedup']:>8.2f}")
    print(
        f"same neighbour sets {out['same_neighbour_sets']:.4f}, same order {out['same_ordered_neighbours']:.4f}, "
        f"max |sim diff| {out['max_abs_sim_diff']:.1e}; candidates {st['candidates']}, widened {st['widened']}, "
        f"fallback {st['fallback']}, bound {st['bound']:.4f}"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", choices=("sklearn", "stream", "bf16"), default="sklearn")
    ap.add_argument("--stream-rows", type=int, default=1_000_000)
    ap.add_argument("--stream-queries", type=int, default=200)
    ap.add_argument("--memory-cap", type=int, default=512 * 2**20, help="bytes, stream suite")
    ap.add_argument("--tmp", default=None, help="folder for the stream suite's store (default: system temp)")
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
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.suite != "sklearn":
        out = bench_stream(args) if args.suite == "stream" else bench_bf16(args)
        path = args.json or Path(f"bench-out/bench_knn_{args.suite}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))
        return
    args.json = args.json or Path("bench-out/bench_knn.json")

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
