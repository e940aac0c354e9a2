"""Reading the CLS features of 100k rows: the feature store vs one .npy per row vs one monolithic .npy.

Targets: store >= 10x faster than per-row files, >= 0.5x the speed of the monolithic file.
Also reports the stored size of fp32 CLS and of bf16-origin fp16 patch tokens (codec choice).

Run: python benchmarks/bench_store_read.py [--rows 100000] [--dim 768]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import Manifest


def _manifest(n: int) -> Manifest:
    ids = np.array([f"r{i}" for i in range(n)])
    return Manifest(
        source="bench", root=Path("."), paths=ids, ids=ids, patient_ids=ids, splits=np.full(n, "train")
    )


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument(
        "--per-row-sample", type=int, default=10_000, help="per-row files written and read (extrapolated)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    n, d = args.rows, args.dim
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    try:
        store = FeatureStore(tmp / "store", mode="a")
        fs = store.create_set("bench/m/224", _manifest(n), {"cls": ArraySpec((d,))}, {})
        for s in range(fs.n_shards):
            lo, hi = fs.shard_range(s)
            fs.write_shard(s, {"cls": X[lo:hi]}, {})
        np.save(tmp / "mono.npy", X)
        k = min(args.per_row_sample, n)
        (tmp / "rows").mkdir()
        for i in range(k):
            np.save(tmp / "rows" / f"{i}.npy", X[i])

        fs_read = FeatureStore(tmp / "store").open_set()
        t_store = _timed(lambda: fs_read.read("cls"))
        assert np.array_equal(fs_read.read("cls"), X)
        t_mono = _timed(lambda: np.load(tmp / "mono.npy"))
        t_rows = (
            _timed(lambda: np.stack([np.load(tmp / "rows" / f"{i}.npy") for i in range(k)]), repeat=1) * n / k
        )

        # codec check: fp16 tokens that came from a bf16 model (3 zero mantissa bits) vs from fp32
        tok32 = rng.standard_normal((64, 16, 16, d), dtype=np.float32)
        import torch

        tok_bf16 = torch.from_numpy(tok32).to(torch.bfloat16).float().numpy().astype(np.float16)
        sizes = {}
        for label, arr in (("fp16_from_fp32", tok32.astype(np.float16)), ("fp16_from_bf16", tok_bf16)):
            st = FeatureStore(tmp / f"s_{label}", mode="a")
            f2 = st.create_set(
                "x", _manifest(64), {"patch": ArraySpec((16, 16, d), "float16")}, {}, shard_rows=64
            )
            f2.write_shard(0, {"patch": arr}, {})
            sizes[label] = arr.nbytes / f2.group["patch"].nbytes_stored()
        res = {
            "rows": n,
            "dim": d,
            "store_s": t_store,
            "monolithic_npy_s": t_mono,
            "per_row_npy_s_extrapolated": t_rows,
            "store_vs_per_row": t_rows / t_store,
            "store_vs_monolithic": t_mono / t_store,
            "patch_compression_ratio": sizes,
            "store_bytes": fs_read.group["cls"].nbytes_stored(),
            "raw_bytes": X.nbytes,
        }
        print(f"read {n} x {d} float32 CLS rows")
        print(f"  feature store        {t_store:8.3f} s")
        print(
            f"  monolithic .npy      {t_mono:8.3f} s   (store speed = {t_mono / t_store:.2f}x of it; target >= 0.5x)"
        )
        print(
            f"  one .npy per row     {t_rows:8.3f} s   (extrapolated from {k} rows; store is {t_rows / t_store:.1f}x faster; target >= 10x)"
        )
        print(f"  fp16 patch tokens stored ratio (raw/stored): {sizes}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
