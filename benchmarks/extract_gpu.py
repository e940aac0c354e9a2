"""GPU extraction benchmark: model-only img/s and MFU, end to end PNG -> store, decode-only, compile/graphs.

Every figure is one JSON line in ``OUT/extract_gpu.jsonl``, written as soon as it is measured (a run cut
short keeps what it finished); a short table is printed last and written to ``OUT/extract_gpu.md``.

* ``env``: the device and its *measured* bf16 matmul rate (8192^3 GEMM, best of 5 timings), the MFU
  denominator (the datasheet peak is printed beside it, not used).
* ``model``: random-init weights of the exact architecture (``random:NAME``, drawn on the GPU: the values
  do not change the cost), synthetic inputs already on the GPU; the micro-batch starts at the
  requested batch and halves on out-of-memory (``featcache.extract.device.MicroBatch``, the
  extraction's own rule); img/s over a timed window; MFU = img/s x ``model_flops`` / measured rate;
  peak GPU memory.
* ``e2e``: ``featcache.extract.pipeline.extract`` from 8-bit PNG files on local disk (1024 px chest films, hard
  links to a few unique files, so they are in the page cache) to a finished store, enough images for
  about ``--e2e-seconds`` of GPU work. ``e2e_img_s`` counts the whole pass, ``e2e_steady_img_s`` leaves
  out the decode workers' start-up (until the first batch arrives); ratios use the steady rate.
* ``decode``: the same DataLoader (same workers, batch, pinning) with no model.
* ``compile`` / ``graphs``: ``torch.compile`` and a CUDA graph of the eager model: img/s and max |diff|
  of cls/pooled against eager on the same input.
* ``cosine``: GPU bf16 vs CPU float32 features of the same (CPU-drawn) random weights, min per row.

GPU:   PYTHONPATH=. python benchmarks/extract_gpu.py --out bench-out   (about 5 minutes on an H200)
CPU:   PYTHONPATH=. python benchmarks/extract_gpu.py --smoke --out /tmp/smoke   (every code path, tiny)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import featcache.extract.device as exd
import featcache.models as fm
from featcache.demo import synth_chest
from featcache.extract import ExtractConfig, extract
from featcache.extract.io import Images, collate
from featcache.models import REGISTRY, load_backbone, model_flops
from featcache.store.manifest import read_manifest, write_manifest
from featcache.store.preprocess import Preprocess

# (model, res, batch, extra end-to-end token sets)
GPU_PLAN = [
    ("dinov3-vit7b16", 224, 128, []),
    ("dinov3-vit7b16", 512, 64, [("cls", "pooled", "patch")]),
    ("dinov3-vit7b16", 1024, 16, []),
    ("dinov3-vitb16", 512, 128, []),
    ("dinov3-convnext-base", 512, 128, []),
    ("dinov2-vitg14", 518, 64, []),
]
GPU_COMPILE = [
    ("dinov3-vitb16", 512, 64, True),
    ("dinov3-vit7b16", 512, 32, False),
]  # (.., with torch.compile)
GPU_COSINE = [("dinov3-vitb16", 224), ("dinov3-convnext-base", 224)]
SMOKE_PLAN = [
    ("dinov3-vits16", 32, 8, [("cls", "pooled", "patch")]),
    ("dinov2-vits14", 28, 8, []),
    ("dinov3-convnext-tiny", 64, 8, []),
]
SMOKE_COMPILE = [("dinov3-vits16", 32, 4, True)]
SMOKE_COSINE = [("dinov3-vits16", 32)]
DATASHEET_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


class Log:
    """Appends one JSON line per result and keeps them for the final table."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []
        path.write_text("")

    def __call__(self, **row) -> dict:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_tflops(device, dtype, n: int, reps: int = 5) -> float:
    """Best of ``reps`` timings of 10 n^3 GEMMs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 10 * 2 * n**3 / best / 1e12


def _timed(fn, device, seconds: float) -> float:
    """Seconds per call of ``fn`` over a window of about ``seconds`` (after one warm-up call)."""
    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    one = time.perf_counter() - t
    n = max(2, int(seconds / max(one, 1e-6)))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


def _model_only(backbone, res, batch, device, dtype, seconds, fake_oom=None):
    """img/s at the micro-batch the back-off settles on, starting from ``batch``."""
    micro = exd.MicroBatch(batch)
    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
    while True:
        try:
            if fake_oom and micro.size > fake_oom:
                raise torch.OutOfMemoryError("simulated")
            with torch.inference_mode():
                backbone(x[: micro.size])
            failed = False
        except torch.OutOfMemoryError:
            failed = True
        if not failed:
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
        micro.out_of_memory()
    xs = x[: micro.size]

    def step():
        with torch.inference_mode():
            backbone(xs)

    return micro.size / _timed(step, device, seconds), micro


def _dataset(folder: Path, n: int, size: int, unique: int = 32) -> Path:
    rng = np.random.default_rng(0)
    (folder / "src").mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    for k in range(unique):
        img, _ = synth_chest(rng, size, {"cardiomegaly": k % 2 == 0, "nodule": k % 3 == 0})
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / "src" / f"{k}.png")
    for i in range(n):
        os.link(folder / "src" / f"{i % unique}.png", folder / "img" / f"{i}.png")
    return folder


def _manifest(folder: Path, n: int) -> Path:
    return write_manifest(folder / f"manifest-{n}.csv", {"path": [f"img/{i}.png" for i in range(n)]})


def _decode_only(manifest, res, workers, batch, device) -> tuple[float, float]:
    loader = torch.utils.data.DataLoader(
        Images(read_manifest(manifest), Preprocess(res=res)),
        batch_size=batch, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )  # fmt: skip
    t0 = time.perf_counter()
    n = first = 0
    start = None
    for idx, _, _ in loader:
        if start is None:
            start, first = time.perf_counter(), len(idx)
        n += len(idx)
    total = time.perf_counter() - t0
    return n / total, (n - first) / max(1e-9, time.perf_counter() - start)


@contextlib.contextmanager
def _cached_models(cache: dict, random_init: str):
    """extract() loads through featcache.models.load_backbone: hand it the backbone already built."""
    real = fm.load_backbone

    def load(model, **kw):
        key = (model, str(kw.get("device")), str(kw.get("dtype")))
        if key not in cache:
            cache.clear()  # one large model at a time
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cache[key] = real(model, random_init=random_init, **kw)
        return cache[key]

    fm.load_backbone = load
    try:
        yield load
    finally:
        fm.load_backbone = real


@contextlib.contextmanager
def _fake_oom(limit):
    """Smoke mode: out-of-memory above ``limit`` images, to run the back-off path on a CPU."""
    if not limit:
        yield
        return
    real = exd.forward

    def forward(backbone, pixels, *a, **kw):
        if len(pixels) > limit:
            raise torch.OutOfMemoryError("simulated")
        return real(backbone, pixels, *a, **kw)

    exd.forward = forward
    try:
        yield
    finally:
        exd.forward = real


def _graphed(backbone, x, device):
    """A CUDA graph of the eager forward on the static input ``x``; returns (replay, outputs)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            backbone(x)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        out = backbone(x)
    return graph.replay, out


def _maxdiff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in ("cls", "pooled"))


def run(args) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "extract_gpu.jsonl")
    plan, comp, cosine = (
        (SMOKE_PLAN, SMOKE_COMPILE, SMOKE_COSINE) if args.smoke else (GPU_PLAN, GPU_COMPILE, GPU_COSINE)
    )
    if args.only:
        plan = [p for p in plan if p[0] in args.only.split(",")]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    rate = _matmul_tflops(device, dtype, 8192 if cuda else 512)
    log(kind="env", device=name, matmul_tflops=rate, matmul_dtype=str(dtype)[6:], datasheet_bf16_tflops=peak,
        torch=torch.__version__, cpu_cores=os.cpu_count(), workers=args.workers, date=time.strftime("%Y-%m-%d"))  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="featcache-gpu-"))
    n_max = 8 * max(b for _, _, b, _ in plan) if args.smoke else 4096
    data = _dataset(tmp / "data", n_max, args.image_size)
    cache: dict = {}
    fake = 4 if args.smoke else None
    try:
        with _cached_models(cache, "device") as load:
            for model, res, batch, extra in plan:
                spec = REGISTRY.get(model)
                gflop = model_flops(spec, res)
                try:
                    bb = load(f"random:{model}", device=device, dtype=dtype)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    ips, micro = _model_only(bb, res, batch, device, dtype, args.seconds, fake)
                    m = log(kind="model", model=model, res=res, gflop_per_img=gflop, img_s=ips, batch=batch,
                            settled_batch=micro.size, mfu=ips * gflop / 1e3 / rate,
                            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)  # fmt: skip
                    n = min(
                        n_max, max(4 * micro.size, int(ips * args.e2e_seconds) // micro.size * micro.size)
                    )
                    manifest = _manifest(data, n)
                    for tokens in [("cls", "pooled"), *extra]:
                        out = tmp / f"store-{model}-{res}-{len(tokens)}"
                        cfg = ExtractConfig(model=f"random:{model}", data=str(manifest), out=str(out), res=res,
                                            workers=args.workers, device=args.device, batch_size=micro.size,
                                            tokens=tokens, shard_rows=max(micro.size, 256 // micro.size * micro.size))  # fmt: skip
                        with _fake_oom(fake and max(1, micro.size // 2)):  # smoke: the e2e back-off too
                            r = extract(cfg, progress=False)
                        steady = r.processed / max(1e-9, r.seconds - r.startup_seconds)
                        log(kind="e2e", model=model, res=res, tokens="+".join(tokens), n=r.processed,
                            failed=r.failed, e2e_img_s=r.images_per_s, e2e_steady_img_s=steady,
                            startup_s=r.startup_seconds, over_model=steady / m["img_s"],
                            mfu=steady * gflop / 1e3 / rate, micro_batch=r.micro_batch)  # fmt: skip
                        shutil.rmtree(out, ignore_errors=True)
                    whole, steady_d = _decode_only(manifest, res, args.workers, micro.size, device)
                    log(
                        kind="decode",
                        model=model,
                        res=res,
                        n=n,
                        workers=args.workers,
                        img_s=whole,
                        steady_img_s=steady_d,
                    )
                except Exception as e:  # one configuration failing must not end the run
                    log(kind="error", model=model, res=res, error=f"{type(e).__name__}: {str(e)[:300]}",
                        where=traceback.format_exc().splitlines()[-3][:200])  # fmt: skip
            for model, res, batch, with_compile in comp:
                try:
                    bb = load(f"random:{model}", device=device, dtype=dtype)
                    x = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
                    with torch.inference_mode():
                        ref = bb(x)
                    eager = batch / _timed(lambda bb=bb, x=x: bb(x), device, args.seconds)
                    if with_compile:
                        t = time.perf_counter()
                        cb = torch.compile(bb, backend=args.compile_backend)
                        with torch.no_grad():
                            got = cb(x)
                        compile_s = time.perf_counter() - t

                        def step(cb=cb, x=x):
                            with torch.no_grad():
                                cb(x)

                        log(kind="compile", model=model, res=res, batch=batch, eager_img_s=eager,
                            img_s=batch / _timed(step, device, args.seconds), compile_s=compile_s,
                            backend=args.compile_backend, max_abs_diff=_maxdiff(ref, got))  # fmt: skip
                    if cuda:
                        replay, got = _graphed(bb, x, device)
                        replay()
                        log(kind="graphs", model=model, res=res, batch=batch, eager_img_s=eager,
                            img_s=batch / _timed(replay, device, args.seconds), max_abs_diff=_maxdiff(ref, got))  # fmt: skip
                    else:
                        log(kind="graphs", model=model, res=res, skipped="CUDA graphs need a CUDA device")
                except Exception as e:
                    log(
                        kind="error",
                        model=model,
                        res=res,
                        error=f"compile/graphs: {type(e).__name__}: {str(e)[:300]}",
                    )
            cache.clear()
        for model, res in cosine:
            try:
                cpu = load_backbone(f"random:{model}")  # float32, drawn on the CPU
                dev = load_backbone(f"random:{model}", device=device, dtype=torch.bfloat16)  # same draw, bf16
                x = torch.randn(16, 3, res, res)
                with torch.inference_mode():
                    a, b = cpu(x), dev(x.to(device))
                cos = {
                    k: float(torch.nn.functional.cosine_similarity(a[k], b[k].float().cpu(), dim=1).min())
                    for k in ("cls", "pooled")
                }
                log(
                    kind="cosine",
                    model=model,
                    res=res,
                    device=name,
                    min_cos_cls=cos["cls"],
                    min_cos_pooled=cos["pooled"],
                )
                del cpu, dev
            except Exception as e:
                log(kind="error", model=model, res=res, error=f"cosine: {type(e).__name__}: {str(e)[:300]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return log.rows


def table(rows: list[dict]) -> str:
    env = rows[0]
    lines = [
        f"{env['device']}: measured {env['matmul_dtype']} matmul {env['matmul_tflops']:.0f} TFLOP/s "
        f"(datasheet {env['datasheet_bf16_tflops']}); {env['workers']} decode workers",
        "| model | res | model img/s (batch) | MFU | e2e img/s steady (tokens) | e2e/model | decode img/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in (r for r in rows if r["kind"] == "model"):
        key = (m["model"], m["res"])
        e2e = [r for r in rows if r["kind"] == "e2e" and (r["model"], r["res"]) == key]
        dec = next((r for r in rows if r["kind"] == "decode" and (r["model"], r["res"]) == key), {})
        lines.append(
            f"| {m['model']} | {m['res']} | {m['img_s']:.1f} ({m['settled_batch']}) | {m['mfu']:.2f} | "
            + ", ".join(f"{r['e2e_steady_img_s']:.1f} ({r['tokens']})" for r in e2e)
            + " | "
            + ", ".join(f"{r['over_model']:.2f}" for r in e2e)
            + f" | {dec.get('steady_img_s', float('nan')):.0f} | {m['peak_gib'] or float('nan'):.1f} |"
        )
    for r in rows:
        if r["kind"] in ("compile", "graphs") and "img_s" in r:
            lines.append(
                f"{r['kind']} {r['model']}@{r['res']}: {r['img_s']:.1f} img/s vs eager {r['eager_img_s']:.1f}, max|diff| {r['max_abs_diff']:.3g}"
            )
        elif r["kind"] == "cosine":
            lines.append(
                f"cosine {r['model']}@{r['res']} GPU bf16 vs CPU fp32: min cls {r['min_cos_cls']:.4f}, pooled {r['min_cos_pooled']:.4f}"
            )
        elif r["kind"] == "error":
            lines.append(f"ERROR {r['model']}@{r['res']}: {r['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU: every code path")
    ap.add_argument("--only", help="comma-separated model names of the plan to run")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: all cores)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the PNG files (default 1024)")
    ap.add_argument("--seconds", type=float, default=None, help="timing window per model-only figure")
    ap.add_argument("--e2e-seconds", type=float, default=None, help="GPU work per end-to-end run")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    args = ap.parse_args()
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.workers = args.workers if args.workers is not None else (1 if smoke else os.cpu_count() or 1)
    args.image_size = args.image_size or (64 if smoke else 1024)
    args.seconds = args.seconds or (0.2 if smoke else 3.0)
    args.e2e_seconds = args.e2e_seconds or (0.2 if smoke else 10.0)
    args.compile_backend = args.compile_backend or ("eager" if smoke else "inductor")
    t = time.perf_counter()
    rows = run(args)
    text = table(rows) + f"\ntotal {time.perf_counter() - t:.0f} s"
    (args.out / "extract_gpu.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
