"""Extraction pipeline on CPU: end-to-end throughput vs the model's forward alone, and peak memory vs N.

(a) Throughput: the whole pipeline (PNG decode workers, preprocessing, forward, Zarr writes by shard) on
    generated PNGs vs the same model's forward on preloaded, preprocessed tensors with the same batch
    size. Target: ratio >= 0.8 on a 2-core machine.
(b) Peak memory (max RSS of a fresh process) of an extraction of N and 4N images: it must not grow with N.

Run: python benchmarks/bench_extract.py [--model random:dinov3-vits16] [--res 112] [--n 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from featcache.decode.images import read_image
from featcache.demo import make_demo_dataset
from featcache.extract import ExtractConfig, extract
from featcache.extract.transform import model_input
from featcache.models import load_backbone
from featcache.store.manifest import read_manifest
from featcache.store.preprocess import Preprocess

_PEAK = """
import resource, sys
from featcache.extract import ExtractConfig, extract
extract(ExtractConfig(model=sys.argv[1], data=sys.argv[2], out=sys.argv[3], res=int(sys.argv[4]), workers=1,
                      shard_rows=64), progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:dinov3-vits16")
    ap.add_argument("--res", type=int, default=112)
    ap.add_argument("--n", type=int, default=256, help="images for the throughput run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    out: dict = {"model": args.model, "res": args.res, "n": args.n, "threads": torch.get_num_threads()}
    try:
        manifest = make_demo_dataset(tmp / "data", n_patients=args.n // 2, size=256)
        m = read_manifest(manifest)
        backbone = load_backbone(args.model)
        pre = Preprocess(res=args.res, mean=tuple(backbone.spec.mean), std=tuple(backbone.spec.std))
        pixels = torch.stack([model_input(pre, read_image(m.abspath(i))) for i in range(len(m))])

        def forward_all() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for j in range(0, len(pixels), args.batch_size):
                    backbone(pixels[j : j + args.batch_size])
            return time.perf_counter() - t

        forward_all()  # warm-up
        r = None
        model_only, e2e = float("inf"), float("inf")
        for rep in range(args.repeats):  # interleaved, best of each: the machine is shared and noisy
            model_only = min(model_only, forward_all())
            cfg = ExtractConfig(
                model=args.model, data=str(manifest), out=str(tmp / f"cache{rep}"), res=args.res,
                batch_size=args.batch_size, workers=args.workers, shard_rows=64,
            )  # fmt: skip
            t = time.perf_counter()
            run = extract(cfg, progress=False)
            total = time.perf_counter() - t
            assert run.processed == len(m) and run.failed == 0
            if r is None or run.seconds < r.seconds:
                r = run
            e2e = min(e2e, total)
        out.update(
            model_only_img_s=len(m) / model_only,
            pipeline_img_s=r.images_per_s,
            end_to_end_img_s=len(m) / e2e,
            ratio_pipeline=r.images_per_s * model_only / len(m),
            ratio_end_to_end=model_only / e2e,
        )
        print(
            f"{args.model} @ {args.res}px, {len(m)} PNGs, batch {args.batch_size}, {args.workers} decode worker(s)"
        )
        print(f"  model forward only   {len(m) / model_only:8.1f} img/s (preloaded, preprocessed tensors)")
        print(f"  pipeline             {r.images_per_s:8.1f} img/s (decode + preprocess + forward + writes)")
        print(f"  end to end           {len(m) / e2e:8.1f} img/s (also model build, store creation)")
        print(
            f"  ratio pipeline/model {out['ratio_pipeline']:8.2f}   (target >= 0.8); end to end/model {out['ratio_end_to_end']:.2f}"
        )

        peaks = {}
        for n_pat in (args.n // 4, args.n):
            d = make_demo_dataset(tmp / f"peak{n_pat}", n_patients=n_pat, size=256)
            res = subprocess.run(
                [sys.executable, "-c", _PEAK, args.model, str(d), str(tmp / f"pc{n_pat}"), str(args.res)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[2 * n_pat] = int(res.stdout.strip().splitlines()[-1]) / 1024
        out["peak_rss_mib"] = peaks
        (a, pa), (b, pb) = sorted(peaks.items())
        print(
            f"  peak RSS (process + decode worker): {a} images {pa:.0f} MiB, {b} images {pb:.0f} MiB ({pb / pa:.2f}x)"
        )
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _ = resource


if __name__ == "__main__":
    main()
