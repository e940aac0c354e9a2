"""A synthetic chest-like dataset, generated offline, for the demo and the tests.

Each image is a 16-bit or 8-bit grayscale PNG of a stylised frontal chest film:
a body outline, two lung fields (dark), a heart shadow, ribs, film noise.
Findings are drawn into it and recorded as binary labels:

* ``cardiomegaly``: a heart shadow wider than half the thorax;
* ``effusion``: a bright meniscus filling a lung base;
* ``nodule``: a small bright round opacity inside a lung.

Every image also gets its lung mask (0 background, 1 lung), two images per
patient, and patient-level train/val/test splits, so every probe (kNN, logistic
regression, few-shot, segmentation) has something real to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from featcache.store.manifest import write_manifest

FINDINGS = ("cardiomegaly", "effusion", "nodule")


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[:h, :w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def synth_chest(
    rng: np.random.Generator, size: int, findings: dict[str, bool]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic chest film.

    Args:
        rng: random generator (anatomy jitter, noise, finding placement).
        size: image side in pixels.
        findings: finding name -> present.

    Returns:
        ``(image float32 [size, size] in [0, 1], lung mask uint8 [size, size] with 0/1)``.
    """
    s = size
    img = np.full((s, s), 0.08, np.float32)
    img[_ellipse(s, s, 0.55 * s, 0.5 * s, 0.48 * s, 0.42 * s)] = 0.55  # body
    j = lambda a: a * (1 + 0.06 * rng.standard_normal())  # noqa: E731 - anatomical jitter
    left = _ellipse(s, s, j(0.5 * s), j(0.32 * s), j(0.28 * s), j(0.12 * s))
    right = _ellipse(s, s, j(0.5 * s), j(0.68 * s), j(0.28 * s), j(0.12 * s))
    lungs = left | right
    img[lungs] = 0.22
    for k in range(6):  # ribs
        y = int((0.3 + 0.08 * k) * s)
        img[max(0, y - 1) : y + 1, :][lungs[max(0, y - 1) : y + 1, :]] += 0.12
    heart_w = (0.23 if findings.get("cardiomegaly") else 0.13) * s
    heart = _ellipse(s, s, j(0.62 * s), j(0.52 * s), j(0.14 * s), j(heart_w))
    img[heart] = 0.6
    if findings.get("effusion"):
        side = left if rng.random() < 0.5 else right
        ys = np.flatnonzero(side.any(axis=1))
        cut = int(ys.max() - 0.35 * (ys.max() - ys.min()))
        region = side.copy()
        region[:cut] = False
        img[region] = 0.62
    if findings.get("nodule"):
        ys, xs = np.nonzero(lungs)
        k = rng.integers(len(ys))
        img[_ellipse(s, s, ys[k], xs[k], 0.035 * s, 0.035 * s) & lungs] = 0.75
    img += 0.03 * rng.standard_normal((s, s)).astype(np.float32)
    return np.clip(img, 0, 1), lungs.astype(np.uint8)


def make_demo_dataset(
    out: str | Path,
    n_patients: int = 48,
    images_per_patient: int = 2,
    size: int = 128,
    seed: int = 0,
    bits: int = 8,
) -> Path:
    """Write a synthetic dataset (PNGs, lung masks, manifest.csv) and return the manifest path.

    Args:
        out: folder to write into (``images/``, ``masks/``, ``manifest.csv``).
        n_patients: number of patients; splits are 60/20/20 % of patients.
        images_per_patient: images per patient (the patient's findings are shared, anatomy varies).
        size: image side in pixels.
        seed: random seed; the same seed writes the same files.
        bits: 8 or 16 bit PNGs.

    Returns:
        Path of ``manifest.csv`` (columns path, id, patient_id, split, mask, the findings, meta_sex).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prevalence = {"cardiomegaly": 0.4, "effusion": 0.35, "nodule": 0.3}
    cols: dict[str, list] = {
        k: [] for k in ("path", "id", "patient_id", "split", "mask", *FINDINGS, "meta_sex")
    }
    order = rng.permutation(n_patients)
    n_train, n_val = int(0.6 * n_patients), int(0.2 * n_patients)
    for p in range(n_patients):
        rank = int(np.flatnonzero(order == p)[0])
        split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        findings = {f: bool(rng.random() < prevalence[f]) for f in FINDINGS}
        sex = "F" if rng.random() < 0.5 else "M"
        for k in range(images_per_patient):
            rid = f"p{p:03d}_{k}"
            img, mask = synth_chest(rng, size, findings)
            if bits == 16:
                Image.fromarray((img * 65535).astype(np.uint16)).save(out / "images" / f"{rid}.png")
            else:
                Image.fromarray((img * 255).round().astype(np.uint8)).save(out / "images" / f"{rid}.png")
            Image.fromarray(mask * 255).save(out / "masks" / f"{rid}.png")
            cols["path"].append(f"images/{rid}.png")
            cols["id"].append(rid)
            cols["patient_id"].append(f"p{p:03d}")
            cols["split"].append(split)
            cols["mask"].append(f"masks/{rid}.png")
            for f in FINDINGS:
                cols[f].append(1.0 if findings[f] else 0.0)
            cols["meta_sex"].append(sex)
    return write_manifest(out / "manifest.csv", cols)


def demo_extract(out: str | Path, model: str = "random:dinov3-vits16", res: int = 112, n_patients: int = 48):
    """The featcache half of the demo: generate the synthetic dataset and extract it.

    The probes half is :func:`probes.demo.demo_probes`; ``featcache demo`` runs one after the other.

    Args:
        out: folder for ``data/`` and ``cache/``.
        model: backbone; the default is a random-init DINOv3 ViT-S/16 (no download).
        res: input resolution.
        n_patients: patients to generate (two images each).

    Yields:
        Lines of text describing each step; the last value yielded is the extraction's result
        (:class:`featcache.extract.pipeline.ExtractResult`), not a line.
    """
    from featcache.extract import ExtractConfig, extract

    out = Path(out)
    manifest = make_demo_dataset(out / "data", n_patients=n_patients)
    yield f"data:     {manifest} ({2 * n_patients} synthetic chest films, findings {', '.join(FINDINGS)}, lung masks)"
    cfg = ExtractConfig(
        model=model, data=str(manifest), out=str(out / "cache"), res=res, name=f"demo/{model.replace(':', '-')}/{res}",
        tokens=("cls", "pooled", "patch"), workers=0,
    )  # fmt: skip
    r = extract(cfg, progress=False)
    yield f"extract:  {r.set_name}: {r.n - r.failed - r.pending}/{r.n} rows in {r.seconds:.1f} s -> {out / 'cache'}"
    yield r
