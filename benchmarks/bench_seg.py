"""`probes seg` on cached patch tokens vs re-embedding the images on the fly (CPU, tiny model).

Both sides train the same linear head (fixed epochs, early stopping off so the work is equal) on
the same synthetic chest films with lung masks, validate after every epoch and score the test split
at the input resolution. The cached side reads float16 patch tokens from the feature store
(``run_seg``); the on-the-fly side decodes, preprocesses and embeds every image with the backbone
each time the head needs its tokens, which is what a segmentation probe without a cache has to do
(tokens rounded to float16 as the store holds them, so both sides fit the same numbers and must
report the same Dice). The one-time extraction that fills the cache is timed as well.

Each side runs in its own process; memory is the peak resident set size of that process minus its
size after imports (torch, scikit-learn and torch's deterministic-mode machinery, on both sides),
and times exclude those imports.

Heads and token sources (``--heads``): each of linear, conv and unet on the last layer's tokens, and
unet / linear on four layers, trained on the cache in its own process (time, peak memory, token
bytes per image, test Dice). Until the extraction stores ``layer_patch``, the four-layer source is a
copy of the set whose ``layer_patch`` holds the last layer four times (the cost is that of four
layers; the Dice says nothing about intermediate layers).

Run: python benchmarks/bench_seg.py [--patients 48] [--res 128] [--epochs 10] [--threads 2] [--json out.json]
     [--heads linear,conv,unet,unet@last4,linear@last4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "random:dinov3-vits16"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _OnTheFly:
    """Patch tokens computed from the images whenever they are asked for (the ``blocks`` interface)."""

    def __init__(self, fs, rows, backbone, preprocess, batch: int = 16):
        self.fs, self.rows, self.backbone, self.pre, self.batch = (
            fs,
            np.asarray(rows),
            backbone,
            preprocess,
            batch,
        )
        self.shape = (len(self.rows), *fs.shape("patch")[1:])
        self.images = 0

    def __len__(self) -> int:
        return len(self.rows)

    def blocks(self, rng=None):
        import torch

        from featcache.decode.images import read_image
        from featcache.extract.transform import model_input

        order = np.arange(len(self.rows)) if rng is None else rng.permutation(len(self.rows))
        for j in range(0, len(order), self.batch):
            pos = order[j : j + self.batch]
            pixels = torch.stack(
                [model_input(self.pre, read_image(self.fs.root / self.fs.paths[r])) for r in self.rows[pos]]
            )
            with torch.inference_mode():
                patch = self.backbone(pixels, layers=[])["patch"]
            self.images += len(pos)
            yield pos, patch.float().numpy().astype(np.float16)


def run_side(mode: str, cache: str, epochs: int, threads: int) -> dict:
    """One side of the comparison in this process; returns its timings, memory and mean test Dice."""
    import torch

    torch.set_num_threads(threads)
    import probes.seg.data as seg_data
    import probes.seg.run as seg
    from featcache.store.feature_store import FeatureStore

    # one-time imports both sides pay (the deterministic mode pulls in torch's compiler modules, ~1 s, ~70 MB)
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())
    base = _rss_mb()
    fs = FeatureStore(cache).open_set()
    keep, _ = seg_data.seg_rows(fs, 0, 0.2)
    n_images = sum(len(v) for v in keep.values())
    _, gh, gw, dim = fs.shape("patch")
    token_mb = (
        (len(keep["train"]) + len(keep["val"])) * gh * gw * dim * 2 / 2**20
    )  # float16, held for training
    t0 = time.perf_counter()
    if mode == "cached":
        rows = seg.run_seg(
            cache,
            head="linear",
            epochs=epochs,
            patience=epochs,
            n_boot=200,
            baseline=False,
            scored_at="model",
        )  # the on-the-fly side scores in the model frame too
        dice = next(r["value"] for r in rows if r["label"] == "mean" and r["metric"] == "dice")
        embedded = 0
    else:
        from featcache.models import load_backbone

        pre = fs.record.preprocess()
        backbone = load_backbone(MODEL, seed=0, device=torch.device("cpu"), dtype=torch.float32).eval()
        masks = seg_data.Masks(fs, fs.root, pre)
        size = min(pre.res, 4 * gh)
        Y = {s: np.stack([seg._nearest(masks(r), size) for r in keep[s]]) for s in ("train", "val")}
        src = {s: _OnTheFly(fs, keep[s], backbone, pre) for s in keep}
        probe = seg.SegProbe(head="linear", epochs=epochs, patience=epochs, random_state=0)
        probe.fit(src["train"], Y["train"], src["val"], Y["val"])
        pred = probe.predict(src["test"], pre.res)
        truth = np.stack([masks(r) for r in keep["test"]])
        dice = float(seg._over_structures(seg.seg_metrics(pred, truth, 1)["dice"]))
        embedded = sum(s.images for s in src.values())
    seconds = time.perf_counter() - t0
    return {
        "mode": mode,
        "seconds": seconds,
        "images": n_images,
        "train_images": len(keep["train"]),
        "ms_per_image": 1000 * seconds / n_images,
        "images_embedded": embedded,
        "peak_mb_over_imports": _peak_mb() - base,
        "train_val_tokens_mb": token_mb if mode == "cached" else 0.0,
        "dice": dice,
    }


def run_head(spec: str, cache: str, epochs: int, threads: int) -> dict:
    """One head on one token source (``head`` or ``head@layers``) on the cache; time, memory, Dice."""
    import torch

    torch.set_num_threads(threads)
    import probes.seg.run as seg
    from featcache.store.feature_store import FeatureStore

    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled())
    head, _, layers = spec.partition("@")
    store = FeatureStore(cache)
    name = next(n for n in store.list_sets() if n.endswith("-layers") == bool(layers))
    fs = store.open_set(name)
    shape = fs.shape("layer_patch" if layers else "patch")[1:]
    base = _rss_mb()
    t0 = time.perf_counter()
    rows = seg.run_seg(cache, name, head=head, layers=layers or None, epochs=epochs, patience=epochs,
                       n_boot=200, baseline=False, scored_at="model")  # fmt: skip
    seconds = time.perf_counter() - t0
    dice = next(r["value"] for r in rows if r["label"] == "mean" and r["metric"] == "dice")
    return {
        "head": spec,
        "seconds": seconds,
        "peak_mb_over_imports": _peak_mb() - base,
        "token_bytes_per_image": int(np.prod(shape)) * 2,
        "dice": dice,
    }


def _layered_copy(cache: Path, n_layers: int = 4) -> None:
    """A second set of the cache whose ``layer_patch`` holds the last layer's tokens ``n_layers`` times."""
    from featcache.store.feature_store import ArraySpec, FeatureStore
    from featcache.store.manifest import Manifest

    store = FeatureStore(cache, mode="a")
    fs = store.open_set()
    m = Manifest(source="bench", root=fs.root, paths=fs.paths, ids=fs.ids, patient_ids=fs.patient_ids,
                 splits=fs.splits, masks=fs.masks)  # fmt: skip
    h, w, d = fs.shape("patch")[1:]
    attrs = {**fs.attrs, "layers": list(range(12 - n_layers, 12))}
    arrays = {"cls": ArraySpec((d,)), "layer_patch": ArraySpec((n_layers, h, w, d), "float16")}
    out = store.create_set(fs.name + "-layers", m, arrays, attrs, shard_rows=fs.shard_rows)
    for s in range(out.n_shards):
        lo, hi = out.shard_range(s)
        patch = fs.read("patch", np.arange(lo, hi))
        data = {
            "cls": np.zeros((hi - lo, d), np.float32),
            "layer_patch": np.repeat(patch[:, None], n_layers, 1),
        }
        out.write_shard(s, data, {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=48, help="synthetic patients (two films each)")
    ap.add_argument("--size", type=int, default=128, help="image side of the synthetic films")
    ap.add_argument("--res", type=int, default=128, help="extraction resolution")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--heads", default="linear,conv,unet,unet@last4,linear@last4", help="'' to skip")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        if args.side.startswith("head:"):
            print(json.dumps(run_head(args.side[5:], args.cache, args.epochs, args.threads)))
        else:
            print(json.dumps(run_side(args.side, args.cache, args.epochs, args.threads)))
        return

    import torch

    from featcache.demo import make_demo_dataset
    from featcache.extract import ExtractConfig, extract

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="featcache-bench-seg-"))
    try:
        manifest = make_demo_dataset(tmp / "data", n_patients=args.patients, size=args.size)
        cfg = ExtractConfig(
            model=MODEL, data=str(manifest), out=str(tmp / "cache"), res=args.res,
            tokens=("cls", "pooled", "patch"), workers=0, batch_size=16,
        )  # fmt: skip
        r = extract(cfg, progress=False)
        sides = {}
        for side in ("cached", "fly"):
            cmd = [sys.executable, __file__, "--side", side, "--cache", str(tmp / "cache")]
            cmd += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            sides[side] = json.loads(out.strip().splitlines()[-1])
        c, f = sides["cached"], sides["fly"]
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "model": MODEL,
            "res": args.res,
            "images": r.n,
            "epochs": args.epochs,
            "extract_seconds": r.seconds,
            "extract_ms_per_image": 1000 * r.seconds / r.n,
            "cached": c,
            "on_the_fly": f,
            "speedup": f["seconds"] / c["seconds"],
            "memory_ratio": f["peak_mb_over_imports"] / max(c["peak_mb_over_imports"], 1e-9),
            "same_dice": abs(c["dice"] - f["dice"]) < 1e-6,
        }
        print(
            f"{r.n} images at {args.res} px, {MODEL}, linear head, {args.epochs} epochs, {args.threads} threads\n"
            f"  one-time extraction:    {r.seconds:6.1f} s ({report['extract_ms_per_image']:.1f} ms/image)\n"
            f"  seg on cached tokens:   {c['seconds']:6.2f} s ({c['ms_per_image']:.2f} ms/image), "
            f"peak +{c['peak_mb_over_imports']:.0f} MB (tokens {c['train_val_tokens_mb']:.1f} MB), Dice {c['dice']:.4f}\n"
            f"  seg re-embedding:       {f['seconds']:6.2f} s ({f['ms_per_image']:.2f} ms/image, "
            f"{f['images_embedded']} forward passes), peak +{f['peak_mb_over_imports']:.0f} MB, Dice {f['dice']:.4f}\n"
            f"  cached is {report['speedup']:.1f}x faster; memory ratio (fly / cached) {report['memory_ratio']:.2f}; "
            f"same Dice: {report['same_dice']}"
        )
        heads = [h for h in args.heads.split(",") if h]
        if heads:
            if any("@" in h for h in heads):
                _layered_copy(tmp / "cache")
            report["heads"] = []
            for h in heads:
                cmd = [sys.executable, __file__, "--side", f"head:{h}", "--cache", str(tmp / "cache")]
                cmd += ["--epochs", str(args.epochs), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                report["heads"].append(row)
                print(
                    f"  head {row['head']:14} {row['seconds']:6.2f} s, peak +{row['peak_mb_over_imports']:.0f} MB, "
                    f"{row['token_bytes_per_image'] / 1024:.0f} KiB tokens/image, Dice {row['dice']:.4f}"
                )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
