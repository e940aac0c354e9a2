"""PCA pictures of patch tokens, as in the DINOv2 paper: what a backbone "sees" in a few images.

A PCA is fitted jointly on the patch tokens of the chosen images (so colours mean the same in
every image); the first three components are mapped to red, green and blue, each min-max scaled over
all images together. With a threshold, the first component separates foreground from background
(DINOv2, section 7): patches whose scaled first component exceeds the threshold are foreground, a
second PCA is fitted on the foreground patches only and coloured the same way, and background is
black. The sign of a principal component is arbitrary; it is fixed so that the first component is
higher on average in the central half of the grid than on its border (foreground up), and so that
the largest loading of the other components is positive, which makes the picture deterministic.

The picture has one row per image: the image as the model saw it (the extraction's resize
geometry, ``cell`` x ``cell``) and its PCA map (each patch a block of pixels), side by side on a white
background with 4-pixel gaps, written as an 8-bit RGB PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.decode.images import read_image
from featcache.errors import FeatcacheError, ImageReadError, StoreError
from featcache.store.feature_store import FeatureStore
from featcache.store.preprocess import Preprocess

__all__ = ["PcaResult", "patch_pca_rgb", "pca_picture"]

_GAP = 4  # pixels between cells


@dataclass
class PcaResult:
    """What :func:`pca_picture` wrote.

    Attributes:
        path: the PNG.
        size: ``(width, height)`` in pixels.
        ids: the images shown, in order.
        explained: explained variance ratio of the three components shown (of the foreground PCA
            when thresholded).
        foreground: fraction of patches kept as foreground (1.0 without a threshold).
        foreground_per_image: that fraction for each image, in order.
    """

    path: Path
    size: tuple[int, int]
    ids: list[str]
    explained: list[float] = field(default_factory=list)
    foreground: float = 1.0
    foreground_per_image: list[float] = field(default_factory=list)


def _pca(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal axes float64 [k, D] (largest loading positive) and explained variance ratios [k]."""
    Xc = X - X.mean(axis=0)
    _, s, vt = np.linalg.svd(Xc, full_matrices=False)
    axes = vt[:k]
    big = np.argmax(np.abs(axes), axis=1)
    axes = axes * np.sign(axes[np.arange(len(axes)), big])[:, None]
    var = s**2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(len(axes))
    if len(axes) < k:  # fewer patches or dims than components: pad with zero components
        axes = np.concatenate([axes, np.zeros((k - len(axes), X.shape[1]))])
        ratio = np.concatenate([ratio, np.zeros(k - len(ratio))])
    return axes, ratio


def _scale(P: np.ndarray) -> np.ndarray:
    lo, hi = P.min(axis=0), P.max(axis=0)
    return (P - lo) / np.where(hi > lo, hi - lo, 1.0)


def patch_pca_rgb(tokens, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint PCA of patch tokens, first three components as RGB.

    Args:
        tokens: float [n, h, w, D] patch tokens of n images.
        threshold: foreground threshold on the first component scaled to [0, 1] (None: no masking).

    Returns:
        ``(rgb float32 [n, h, w, 3] in [0, 1], foreground bool [n, h, w], explained float64 [3])``.

    Raises:
        FeatcacheError: tokens not [n, h, w, D], a threshold outside [0, 1], or no foreground patch.
    """
    T = np.asarray(tokens, dtype=np.float64)
    if T.ndim != 4:
        raise FeatcacheError(f"patch tokens must be [n, h, w, D], got shape {T.shape}")
    n, h, w, d = T.shape
    X = T.reshape(-1, d)
    axes, ratio = _pca(X, 3)
    P = (X - X.mean(axis=0)) @ axes.T
    # orient the first component so that the centre of the grid (foreground) is high
    centre = np.zeros((h, w), bool)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    pc1 = P[:, 0].reshape(n, h, w)
    if not centre.all() and pc1[:, centre].mean() < pc1[:, ~centre].mean():
        P[:, 0] = -P[:, 0]
    rgb = _scale(P)
    fg = np.ones(len(X), bool)
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise FeatcacheError(
                f"--threshold {threshold}: use a value in [0, 1] (on the scaled first component)"
            )
        fg = rgb[:, 0] > threshold
        if not fg.any():
            raise FeatcacheError(f"--threshold {threshold}: no patch is above it; use a lower threshold")
        axes, ratio = _pca(X[fg], 3)
        Pf = (X[fg] - X[fg].mean(axis=0)) @ axes.T
        rgb = np.zeros_like(rgb)
        rgb[fg] = _scale(Pf)
    return rgb.reshape(n, h, w, 3).astype(np.float32), fg.reshape(n, h, w), ratio


def _cell_image(path: Path, pre: Preprocess, cell: int) -> np.ndarray:
    view = Preprocess(
        res=cell, resize=pre.resize, interpolation=pre.interpolation, mean=(0, 0, 0), std=(1, 1, 1)
    )
    from featcache.extract.transform import model_input

    return np.clip(model_input(view, read_image(path)).numpy().transpose(1, 2, 0), 0, 1)


def pca_picture(
    cache: str | os.PathLike | FeatureStore,
    set_name: str | None = None,
    *,
    ids: Sequence[str],
    out: str | os.PathLike,
    threshold: float | None = None,
    root: str | os.PathLike | None = None,
    cell: int | None = None,
    features: str = "patch",
) -> PcaResult:
    """Draw the images and their joint patch-token PCA maps side by side into one PNG.

    Args:
        cache: feature store folder, URL or open ``FeatureStore``.
        set_name: feature set (None: the store's only set); it must hold patch tokens.
        ids: row ids of the images to show (the manifest's ``id``).
        out: PNG path to write.
        threshold: foreground threshold on the scaled first component (e.g. 0.5), or None.
        root: folder the image paths are relative to (default: the root recorded at extraction).
        cell: side of each image and map in pixels (default: the resolution, between 224 and 512).
        features: the token array (``patch``).

    Returns:
        A :class:`PcaResult`; the PNG is ``2 * cell + 3 * 4`` pixels wide and
        ``n * cell + (n + 1) * 4`` high.

    Raises:
        FeatcacheError: no patch tokens, unknown or unextracted ids, missing image files, bad threshold.
    """
    from PIL import Image

    store = cache if isinstance(cache, FeatureStore) else FeatureStore(cache)
    fs = store.open_checked(set_name)  # every guard a probe has
    if features not in fs.arrays() or len(fs.shape(features)) != 4:
        raise StoreError(
            f"{fs.name}: no patch tokens '{features}' stored (arrays: {', '.join(fs.arrays())}); "
            "extract with --tokens cls,pooled,patch"
        )
    ids = [str(i).strip() for i in ids if str(i).strip()]
    if not ids:
        raise FeatcacheError("--ids: give one or more row ids, e.g. --ids img1,img2")
    lookup = {v: i for i, v in enumerate(fs.ids.tolist())}
    unknown = [i for i in ids if i not in lookup]
    if unknown:
        raise FeatcacheError(f"{fs.name}: unknown ids {unknown[:5]}; ids look like {fs.ids[:3].tolist()}")
    rows = np.array([lookup[i] for i in ids], dtype=np.int64)
    not_ok = [ids[j] for j, r in enumerate(rows) if not fs.ok[r]]
    if not_ok:
        raise FeatcacheError(f"{fs.name}: ids {not_ok[:5]} were not extracted (failed or pending)")
    pre = fs.record.preprocess()
    cell = int(cell or min(max(pre.res, 224), 512))
    if cell < 8:
        raise FeatcacheError(f"--cell {cell}: use at least 8 pixels")
    base = Path(root) if root is not None else fs.root
    images = []
    for r in rows:
        path = base / fs.paths[r]
        if not path.is_file():
            raise ImageReadError(
                f"{path}: image of row '{fs.ids[r]}' not found; pass the image root with --root"
            )
        images.append(_cell_image(path, pre, cell))
    tokens = np.stack([fs.read(features, np.array([r]))[0] for r in rows])
    rgb, fg, ratio = patch_pca_rgb(tokens, threshold)
    _, gh, gw, _ = tokens.shape
    rr = np.minimum((np.arange(cell) * gh) // cell, gh - 1)
    cc = np.minimum((np.arange(cell) * gw) // cell, gw - 1)
    n = len(rows)
    width, height = 2 * cell + 3 * _GAP, n * cell + (n + 1) * _GAP
    canvas = np.full((height, width, 3), 255, np.uint8)
    for j in range(n):
        top = _GAP + j * (cell + _GAP)
        canvas[top : top + cell, _GAP : _GAP + cell] = np.round(images[j] * 255).astype(np.uint8)
        left = 2 * _GAP + cell
        canvas[top : top + cell, left : left + cell] = np.round(rgb[j][np.ix_(rr, cc)] * 255).astype(np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out)
    return PcaResult(
        path=out,
        size=(width, height),
        ids=ids,
        explained=[float(v) for v in ratio],
        foreground=float(fg.mean()),
        foreground_per_image=[float(v) for v in fg.reshape(n, -1).mean(axis=1)],
    )
