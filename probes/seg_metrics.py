"""Segmentation metrics of binary and label masks: Dice, Jaccard and HD95 (in pixels or millimetres).

- ``dice`` = 2|P∩T| / (|P| + |T|), ``jaccard`` = |P∩T| / |P∪T|, ``dice_jaccard_mean`` their average
  (the segmentation metric of the DINOv2 radiology study).
- ``hd95``: the larger of the two directed 95th percentiles of boundary-to-boundary distances.
  Boundary pixels are those with a 4-neighbour outside the structure or on the image edge;
  distances are Euclidean between pixel centres, from ``scipy.ndimage.distance_transform_edt``
  with ``sampling = spacing`` (rows and columns scaled separately, so anisotropic pixels are
  measured correctly); percentiles as ``np.percentile`` (linear). With ``spacing=None`` the unit is
  the pixel of the frame the masks are in; with a spacing in mm per pixel it is millimetres.
- A structure absent from both prediction and target is undefined for all metrics (NaN); absent
  from one only gives Dice = Jaccard = 0 and HD95 = NaN (no boundary to measure from). Undefined
  values are left out of means.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["SEG_METRICS", "dice", "hd95", "jaccard", "seg_metrics"]

SEG_METRICS = ("dice", "jaccard", "dice_jaccard_mean", "hd95")
_CROSS = ndimage.generate_binary_structure(2, 1)


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and target must be 2-D masks of one shape, got {p.shape} and {t.shape}")
    return p, t


def dice(pred, target) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two binary masks.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty (undefined, left out of means).
    """
    p, t = _pair(pred, target)
    total = int(p.sum()) + int(t.sum())
    return float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total


def jaccard(pred, target) -> float:
    """Jaccard index (IoU) |P∩T| / |P∪T| of two binary masks.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.

    Returns:
        Jaccard in [0, 1]; NaN when both masks are empty.
    """
    p, t = _pair(pred, target)
    union = int((p | t).sum())
    return float("nan") if union == 0 else int((p & t).sum()) / union


def _boundary(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def _spacing(spacing) -> tuple[float, float] | None:
    if spacing is None:
        return None
    s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,))
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"spacing must be two positive numbers (row, column), got {spacing!r}")
    return float(s[0]), float(s[1])


def hd95(pred, target, spacing: float | Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of two masks.

    The larger of the two directed distances: the 95th percentile (``np.percentile``, linear) over
    the boundary pixels of one mask of the Euclidean distance to the nearest boundary pixel of the
    other. Boundary pixels have a 4-neighbour outside the mask or lie on the image edge.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.
        spacing: pixel size ``(row spacing, column spacing)`` (DICOM ``PixelSpacing`` order: the
            distance between rows first), or one number for square pixels; None: 1 (pixels).

    Returns:
        The distance (float, in the unit of ``spacing``, pixels when None); NaN when either mask
        is empty.
    """
    p, t = _pair(pred, target)
    sampling = _spacing(spacing)
    if not p.any() or not t.any():
        return float("nan")
    bp, bt = _boundary(p), _boundary(t)
    # the distances are between boundary points only: the box around both boundaries gives the same
    # numbers as the whole image at a fraction of the cost on full-resolution films
    rows, cols = np.flatnonzero((bp | bt).any(axis=1)), np.flatnonzero((bp | bt).any(axis=0))
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    bp, bt = bp[box], bt[box]
    to_t = ndimage.distance_transform_edt(~bt, sampling=sampling)[bp]
    to_p = ndimage.distance_transform_edt(~bp, sampling=sampling)[bt]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def seg_metrics(
    pred, target, n_structures: int, spacing: float | Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Every segmentation metric of every structure of every image.

    Args:
        pred: int [n, H, W] predicted label maps (0 background, k structure k).
        target: int [n, H, W] true label maps.
        n_structures: K; structures 1..K are scored.
        spacing: pixel size ``(row, column)`` for HD95 (see :func:`hd95`), the same for all n images;
            None: pixels.

    Returns:
        ``{metric: float64 [n, K]}`` for ``dice``, ``jaccard``, ``dice_jaccard_mean``, ``hd95``
        (NaN where undefined, see the module docstring).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must be [n, H, W] of one shape, got {pred.shape} and {target.shape}"
        )
    n = len(pred)
    out = {m: np.full((n, n_structures), np.nan) for m in SEG_METRICS}
    for i in range(n):
        for k in range(1, n_structures + 1):
            p, t = pred[i] == k, target[i] == k
            out["dice"][i, k - 1] = dice(p, t)
            out["jaccard"][i, k - 1] = jaccard(p, t)
            out["hd95"][i, k - 1] = hd95(p, t, spacing)
    out["dice_jaccard_mean"] = (out["dice"] + out["jaccard"]) / 2
    return out


def _nanmean(values: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is undefined, not an error
        return np.nanmean(values, axis=axis)


def _per_structure(values: np.ndarray, _unused=None) -> np.ndarray:
    return _nanmean(np.asarray(values, dtype=np.float64), axis=0)


def _over_structures(values: np.ndarray, _unused=None) -> float:
    return float(_nanmean(_per_structure(values)))
