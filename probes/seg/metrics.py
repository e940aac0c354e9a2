"""Segmentation metrics of binary and label masks, 2-D or 3-D: Dice, Jaccard and HD95 (px or mm).

- ``dice`` = 2|P∩T| / (|P| + |T|), ``jaccard`` = |P∩T| / |P∪T|, ``dice_jaccard_mean`` their average
  (the segmentation metric of the DINOv2 radiology study).
- ``hd95``: the larger of the two directed 95th percentiles of boundary-to-boundary distances.
  Boundary pixels are those with a 4-neighbour (6-neighbour in 3-D) outside the structure or on the
  image edge; distances are Euclidean between pixel centres, from
  ``scipy.ndimage.distance_transform_edt`` with ``sampling = spacing`` (each axis scaled
  separately, so anisotropic pixels and voxels are measured correctly); percentiles as
  ``np.percentile`` (linear). With ``spacing=None`` the unit is the pixel (voxel) of the frame the
  masks are in; with a spacing in mm per pixel it is millimetres.
- Volumes (3-D masks ``[S, H, W]``, slices stacked in order) are scored as one object: Dice and
  Jaccard count voxels of the whole volume, HD95 measures between 3-D surfaces with spacing
  ``(slice, row, column)``.
- A structure absent from both prediction and target is undefined for all metrics (NaN); absent
  from one only gives Dice = Jaccard = 0 and HD95 = NaN (no boundary to measure from). Undefined
  values are left out of means.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from probes.evaluation.stats import bootstrap_ci

__all__ = ["SEG_METRICS", "dice", "hd95", "jaccard", "seg_metrics"]

SEG_METRICS = ("dice", "jaccard", "dice_jaccard_mean", "hd95")
_CROSS = {n: ndimage.generate_binary_structure(n, 1) for n in (2, 3)}


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape or p.ndim not in (2, 3):
        raise ValueError(
            f"pred and target must be 2-D or 3-D masks of one shape, got {p.shape} and {t.shape}"
        )
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
    return m & ~ndimage.binary_erosion(m, structure=_CROSS[m.ndim], border_value=0)


def _spacing(spacing, ndim: int = 2) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    try:
        s = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    except ValueError:
        s = np.array([np.nan])
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        what = "(row, column)" if ndim == 2 else "(slice, row, column)"
        raise ValueError(f"spacing must be {ndim} positive numbers {what}, got {spacing!r}")
    return tuple(float(v) for v in s)


def hd95(pred, target, spacing: float | Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of two masks.

    The larger of the two directed distances: the 95th percentile (``np.percentile``, linear) over
    the boundary pixels of one mask of the Euclidean distance to the nearest boundary pixel of the
    other. Boundary pixels have a 4-neighbour outside the mask or lie on the image edge.

    Args:
        pred: bool [H, W] predicted structure (or [S, H, W], a volume of S slices).
        target: bool [H, W] true structure (or [S, H, W]).
        spacing: pixel size ``(row spacing, column spacing)`` (DICOM ``PixelSpacing`` order: the
            distance between rows first), or one number for square pixels; for a volume
            ``(slice, row, column)``; None: 1 (pixels / voxels).

    Returns:
        The distance (float, in the unit of ``spacing``, pixels when None); NaN when either mask
        is empty.
    """
    p, t = _pair(pred, target)
    sampling = _spacing(spacing, p.ndim)
    if not p.any() or not t.any():
        return float("nan")
    bp, bt = _boundary(p), _boundary(t)
    # the distances are between boundary points only: the box around both boundaries gives the same
    # numbers as the whole image at a fraction of the cost on full-resolution films
    both = bp | bt
    box = []
    for axis in range(both.ndim):
        idx = np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != axis)))
        box.append(slice(idx[0], idx[-1] + 1))
    bp, bt = bp[tuple(box)], bt[tuple(box)]
    to_t = ndimage.distance_transform_edt(~bt, sampling=sampling)[bp]
    to_p = ndimage.distance_transform_edt(~bp, sampling=sampling)[bt]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def seg_metrics(
    pred, target, n_structures: int, spacing: float | Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Every segmentation metric of every structure of every image.

    Args:
        pred: int [n, H, W] predicted label maps (0 background, k structure k), or [n, S, H, W]
            label volumes.
        target: int [n, H, W] (or [n, S, H, W]) true label maps.
        n_structures: K; structures 1..K are scored.
        spacing: pixel size ``(row, column)`` (volumes: ``(slice, row, column)``) for HD95 (see
            :func:`hd95`), the same for all n images; None: pixels.

    Returns:
        ``{metric: float64 [n, K]}`` for ``dice``, ``jaccard``, ``dice_jaccard_mean``, ``hd95``
        (NaN where undefined, see the module docstring).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim not in (3, 4):
        raise ValueError(
            f"pred and target must be [n, H, W] or [n, S, H, W] of one shape, got {pred.shape} and "
            f"{target.shape}"
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


def _ci_entries(
    values: dict[str, np.ndarray], names: list[str], patients: np.ndarray, n_boot: int, seed: int
):
    """Result-row fields per structure and for the mean over structures, with patient-bootstrap CIs.

    Args:
        values: ``{metric: float64 [n, K]}`` per image (or per volume), NaN undefined.
        names: the K structure names.
        patients: str [n] patient of each image (the bootstrap resamples patients).
        n_boot: bootstrap draws.
        seed: bootstrap seed.

    Returns:
        One dict per (structure or ``mean``, metric): ``label``, ``metric``, ``value``, ``ci_low``,
        ``ci_high``, ``n_boot``, ``n_boot_skipped``, ``n_test``, ``n_patients_test``.
    """
    entries = []
    dummy = np.zeros(len(patients))
    for metric in SEG_METRICS:
        v = values[metric]
        per = _per_structure(v)
        ci = bootstrap_ci(_per_structure, v, dummy, patients, n_boot, seed)
        low, high, skipped = np.atleast_1d(ci.low), np.atleast_1d(ci.high), np.atleast_1d(ci.n_skipped)
        reasons = ci.reason if isinstance(ci.reason, list) else [ci.reason] * len(names)
        for j, name in enumerate(names):
            defined = ~np.isnan(v[:, j])
            entries.append(
                {
                    "label": name,
                    "metric": metric,
                    "value": float(per[j]),
                    **_ci_fields(low[j], high[j], skipped[j], reasons[j], n_boot),
                    "n_test": int(defined.sum()),
                    "n_patients_test": int(len(np.unique(patients[defined]))),
                }
            )
        ci = bootstrap_ci(_over_structures, v, dummy, patients, n_boot, seed)
        entries.append(
            {
                "label": "mean",
                "metric": metric,
                "value": _over_structures(v),
                **_ci_fields(ci.low, ci.high, ci.n_skipped, ci.reason, n_boot),
                "n_test": len(patients),
                "n_patients_test": int(len(np.unique(patients))),
            }
        )
    return entries


def _ci_fields(low, high, skipped, reason, n_boot: int) -> dict:
    """A row's CI fields; a CI that cannot be given (too few patients) has none, and says why."""
    if reason or not np.isfinite(low):
        return {"params": {"ci": f"no CI ({reason or 'too few patients with a defined value'})"}}
    return {"ci_low": float(low), "ci_high": float(high), "n_boot": n_boot, "n_boot_skipped": int(skipped)}
