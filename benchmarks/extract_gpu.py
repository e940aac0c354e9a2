"""GPU extraction benchmark: model-only throughput and MFU, end-to-end PNG -> store throughput, decode bound.

For each (model, resolution): random-init weights in bf16 (no download), then

* model only: forward on synthetic tensors already on the GPU, at the largest batch (doubling up to
  --max-batch until out-of-memory), images/s and MFU from analytic FLOPs (``featcache.models.model_flops``)
  against the device's dense bf16 peak;
* end to end: ``featcache.extract.extract`` from real PNG files (generated chest films, 1024 px,
  hard-linked to N paths) to a finished store, with the same decode workers; the chosen micro-batch;
* decode only: the same DataLoader (decode + preprocess) with no model, to tell decode-bound from
  GPU-bound configurations;
* peak GPU memory.

Targets: DINOv3-7B at 512 px >= 50% MFU end to end on an H100; end-to-end / model-only >= 0.9 where decode is
not the bound; where it is, end-to-end within 10% of decode-only.

Run on a GPU: python benchmarks/extract_gpu.py --out bench-out/
Smoke test on CPU: python benchmarks/extract_gpu.py --device cpu --configs random:dinov3-vits16@64 --n 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.demo import synth_chest
from featcache.extract import ExtractConfig, _collate, _Images, extract
from featcache.images import Preprocess
from featcache.manifest import read_manifest, write_manifest
from featcache.models import REGISTRY, load_backbone, model_flops

DEFAULT_CONFIGS = [
    "random:dinov3-vitb16@224",
    "random:dinov3-vitb16@512",
    "random:dinov3-vitb16@1024",
    "random:dinov3-convnext-base@224",
    "random:dinov3-convnext-base@512",
    "random:dinov3-convnext-base@1024",
    "random:dinov3-vit7b16@224",
    "random:dinov3-vit7b16@512",
    "random:dinov3-vit7b16@1024",
]

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment
PEAKS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
}


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAKS.items():
        if key in name:
            return val
    return None


def _matmul_tflops(device: torch.device) -> float | None:
    """Measured bf16 matmul rate (8192^3) as a practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _dataset(folder: Path, n: int, size: int, unique: int = 32) -> Path:
    rng = np.random.default_rng(0)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    for k in range(unique):
        img, _ = synth_chest(rng, size, {"cardiomegaly": k % 2 == 0, "nodule": k % 3 == 0})
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / "src" / f"{k}.png")
    paths = []
    for i in range(n):
        p = folder / "img" / f"{i}.png"
        if not p.exists():
            os.link(folder / "src" / f"{i % unique}.png", p)
        paths.append(f"img/{i}.png")
    return write_manifest(folder / "manifest.csv", {"path": paths})


def _model_only(backbone, res: int, device, dtype, max_batch: int, iters: int) -> tuple[float, int]:
    batch = 1
    best = None
    while batch <= max_batch:
        try:
            x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
            with torch.inference_mode():
                backbone(x)
                _sync(device)
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
    assert best is not None, "not even one image fits"
    x = torch.randn(best, 3, res, res, device=device, dtype=dtype)
    with torch.inference_mode():
        backbone(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            backbone(x)
        _sync(device)
    return best * iters / (time.perf_counter() - t), best


def _decode_only(manifest_path: Path, res: int, workers: int, batch: int) -> float:
    m = read_manifest(manifest_path)
    pre = Preprocess(res=res)
    loader = torch.utils.data.DataLoader(
        _Images(m, pre),
        batch_size=batch,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    t = time.perf_counter()
    n = 0
    for idx, _, _ in loader:
        n += len(idx)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="MODEL@RES,... ")
    ap.add_argument("--n", type=int, default=512, help="images for the end-to-end run")
    ap.add_argument("--image-size", type=int, default=1024, help="side of the generated PNGs")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-gpu-"))
    peak = _peak_tflops(device)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak,
        "matmul_bf16_tflops": _matmul_tflops(device),
        "torch": torch.__version__,
        "cpu_workers": args.workers,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(env))
    manifest = _dataset(tmp / "data", args.n, args.image_size)
    results = []
    decode_cache: dict[int, float] = {}
    try:
        for item in args.configs.split(","):
            model, res = item.rsplit("@", 1)
            res = int(res)
            spec = REGISTRY.get(model.removeprefix("random:"))
            gflop = model_flops(spec, res)
            row = {"model": model, "res": res, "gflop_per_img": gflop}
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                backbone = load_backbone(model, device=device, dtype=dtype)
                ips, batch = _model_only(backbone, res, device, dtype, args.max_batch, args.iters)
                row.update(model_only_img_s=ips, model_only_batch=batch)
                del backbone
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if res not in decode_cache:
                    decode_cache[res] = _decode_only(manifest, res, args.workers, 32)
                row["decode_only_img_s"] = decode_cache[res]
                out = tmp / f"store-{len(results)}"
                cfg = ExtractConfig(
                    model=model, data=str(manifest), out=str(out), res=res, workers=args.workers,
                    device=args.device, batch_size=min(batch, 128),
                )  # fmt: skip
                r = extract(cfg, progress=False)
                row.update(end_to_end_img_s=r.images_per_s, micro_batch=r.batch_size, failed=r.failed)
                row["e2e_over_model"] = r.images_per_s / ips
                row["e2e_over_decode"] = r.images_per_s / decode_cache[res]
                row["decode_bound"] = decode_cache[res] < ips
                if peak:
                    row["mfu_model_only"] = ips * gflop / 1e3 / peak
                    row["mfu_end_to_end"] = r.images_per_s * gflop / 1e3 / peak
                if device.type == "cuda":
                    row["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                shutil.rmtree(out, ignore_errors=True)
            except Exception as e:  # one config failing (e.g. 7B at 1024 on a small GPU) must not end the run
                row["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (args.out / "extract_gpu.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    lines = [
        f"device: {env['device']}; bf16 peak {peak} TFLOP/s; measured matmul {env['matmul_bf16_tflops']}",
        "| model | res | GFLOP/img | model-only img/s (batch) | MFU | decode-only img/s | end-to-end img/s | e2e MFU | e2e/model | micro-batch | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['res']} | {r['gflop_per_img']:.0f} | {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['res']} | {r['gflop_per_img']:.0f} | {r['model_only_img_s']:.1f} ({r['model_only_batch']}) "
            f"| {r.get('mfu_model_only', float('nan')):.2f} | {r['decode_only_img_s']:.0f} | {r['end_to_end_img_s']:.1f} "
            f"| {r.get('mfu_end_to_end', float('nan')):.2f} | {r['e2e_over_model']:.2f} | {r['micro_batch']} "
            f"| {r.get('peak_gpu_mem_gib', float('nan')):.1f} |"
        )
    (args.out / "extract_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
