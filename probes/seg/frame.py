"""Geometry of segmentation scoring: between the model's input frame and the mask's own frame.

Frames. The *model frame* is the ``res`` x ``res`` input of the backbone: the image put through
:meth:`featcache.store.preprocess.Preprocess.geometry` (``squash``, ``letterbox`` or ``crop``). The *mask
frame* is the mask file's own pixels (the original image's pixels when, as usual, the mask has the
image's size).

Nearest-neighbour resizing of label maps (masks into the model frame by
:meth:`~featcache.store.preprocess.Preprocess.transform_mask`, and model-frame masks to the training grid by
:func:`nearest_resize`): output pixel ``i`` of ``n_out`` takes source pixel
``min(floor((i + 0.5) * (n_in / n_out)), n_in - 1)`` (float64), the source pixel whose extent holds
the output pixel's centre. When that centre falls exactly on the border of two source pixels the
*later* one is taken; PIL's ``NEAREST`` takes the earlier one, so the two differ on such ties
(e.g. 2 -> 7 pixels: ``0001111`` here, ``0000111`` in PIL).

Logits (or class frequencies) go from any grid covering the model frame to the mask frame in one
bilinear step (``align_corners=False``, the interpolation of the DINOv2 / RAD-DINO linear and light
decoders): mask-frame pixel centre ``(y + 0.5, x + 0.5)`` is placed in the model frame by the
extraction geometry, ``top + (y + 0.5) * h / H`` (``left + (x + 0.5) * w / W`` for columns), and the
source grid is sampled there, its edge values extending past its outer pixel centres. For
``squash`` this is exactly ``torch.nn.functional.interpolate(size=(H, W), mode="bilinear",
align_corners=False)``, which is used there; ``letterbox`` and ``crop`` use ``grid_sample`` with the
same convention. A ``crop`` model frame does not see the whole film: only the mask-frame pixels
whose centres fall inside the model input are scored (:func:`visible_box`).

Pixel spacing (:func:`pixel_spacing`) is read from the image's DICOM header, without the pixels:
``PixelSpacing`` (0028,0030) first, since in projection radiography it is the calibrated spacing at
the patient when a system or user calibrated it, else ``ImagerPixelSpacing`` (0018,1164), the
spacing at the detector front plane (it includes the geometric magnification, so distances are
a few percent larger than in the patient). Both are ``[row spacing, column spacing]`` in mm, the
distance between rows first. When the mask's size differs from the image's (``Rows`` x
``Columns``), the spacing is scaled per axis by image size / mask size.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from featcache.decode.images import is_dicom
from featcache.errors import FeatcacheError
from featcache.store.preprocess import Preprocess, nearest_index
from probes.seg.heads import _baseline_from_counts

__all__ = [
    "SPACING_TAGS",
    "Scorer",
    "Spacing",
    "nearest_resize",
    "pixel_spacing",
    "to_mask_frame",
    "visible_box",
]

SPACING_TAGS = ("PixelSpacing", "ImagerPixelSpacing")


class Spacing(NamedTuple):
    """Pixel size of an image file.

    Attributes:
        row_mm: distance between rows (mm).
        col_mm: distance between columns (mm).
        tag: the DICOM attribute it came from (``PixelSpacing`` or ``ImagerPixelSpacing``).
        shape: ``(Rows, Columns)`` of the image the spacing belongs to.
    """

    row_mm: float
    col_mm: float
    tag: str
    shape: tuple[int, int]

    def for_shape(self, shape: tuple[int, int]) -> tuple[float, float]:
        """``(row, column)`` spacing in mm of a mask of ``shape`` covering the same film."""
        return self.row_mm * self.shape[0] / shape[0], self.col_mm * self.shape[1] / shape[1]


def pixel_spacing(path: str | Path) -> Spacing | None:
    """The pixel spacing of an image file from its DICOM header (the pixel data is not read).

    Args:
        path: the image file.

    Returns:
        A :class:`Spacing`; None when the file is not DICOM, does not exist, or has neither
        ``PixelSpacing`` nor ``ImagerPixelSpacing`` with two positive values.

    Raises:
        FeatcacheError: a DICOM file whose header cannot be parsed.
    """
    path = Path(path)
    if not path.is_file() or not is_dicom(path):
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:
        raise FeatcacheError(f"{path}: cannot read the DICOM header for its pixel spacing ({e})") from e
    shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    for tag in SPACING_TAGS:
        value = ds.get(tag)
        if value is None:
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0 and min(shape) > 0:
            return Spacing(row, col, tag, shape)
    return None


def nearest_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a square label map to ``size`` x ``size`` by the nearest rule of the module docstring.

    Args:
        mask: int [S, S] label map (a model-frame mask).
        size: output side.

    Returns:
        int [size, size] of the same dtype.
    """
    idx = nearest_index(mask.shape[0], size)
    return mask[np.ix_(idx, idx)]


def _frame_coords(pre: Preprocess, shape: tuple[int, int]):
    """Normalised model-frame coordinates ([-1, 1], align_corners=False) of mask-frame pixel centres."""
    H, W = shape
    h, w, top, left = pre.geometry(H, W)
    ys = 2 * (top + (np.arange(H) + 0.5) * (h / H)) / pre.res - 1
    xs = 2 * (left + (np.arange(W) + 0.5) * (w / W)) / pre.res - 1
    return ys, xs


def visible_box(pre: Preprocess, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The mask-frame rows and columns whose pixel centres lie inside the model input.

    Args:
        pre: the extraction's preprocessing.
        shape: ``(H, W)`` of the mask.

    Returns:
        ``(rows, cols)`` slices; the whole frame for ``squash`` and ``letterbox``.
    """
    ys, xs = _frame_coords(pre, shape)
    r, c = np.flatnonzero(np.abs(ys) < 1), np.flatnonzero(np.abs(xs) < 1)
    return slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)


def to_mask_frame(maps, pre: Preprocess, shape: tuple[int, int]):
    """Bilinearly resample maps covering the model frame into a mask's own frame.

    Args:
        maps: float32 torch tensor [C, h', w'] (logits of a head, or class frequencies at ``res``)
            covering the whole ``res`` x ``res`` model frame.
        pre: the extraction's preprocessing (its geometry places the mask in the model frame).
        shape: ``(H, W)`` of the mask.

    Returns:
        float32 torch tensor [C, H, W].
    """
    import torch
    import torch.nn.functional as F

    H, W = int(shape[0]), int(shape[1])
    if pre.geometry(H, W) == (pre.res, pre.res, 0, 0):  # squash: the frames are the same film
        return F.interpolate(maps[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    ys, xs = _frame_coords(pre, (H, W))
    gy = torch.from_numpy(ys.astype(np.float32))[:, None].expand(H, W)
    gx = torch.from_numpy(xs.astype(np.float32))[None, :].expand(H, W)
    grid = torch.stack([gx, gy], dim=-1)[None]  # [1, H, W, (x, y)]
    return F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class Scorer:
    """Puts one test image's head logits, its mask and the baseline into the scoring frame.

    Args:
        pre: the extraction's preprocessing.
        counts: int64 [K + 1, res, res] per-class pixel counts of the transformed training masks.
        n_structures: K.
        scored_at: ``mask`` or ``model``.
    """

    def __init__(self, pre: Preprocess, counts: np.ndarray, n_structures: int, scored_at: str):
        import torch
        import torch.nn.functional as F

        self.pre, self.K, self.scored_at = pre, n_structures, scored_at
        self.freq = torch.from_numpy((counts / max(1, counts[:, 0, 0].sum())).astype(np.float32))
        self.base_model = _baseline_from_counts(counts)
        self._up = lambda maps: F.interpolate(
            maps[None], size=(pre.res, pre.res), mode="bilinear", align_corners=False
        )[0]

    def __call__(self, logits, truth: np.ndarray, spacing, baseline: bool):
        """(pred int64 [H', W'], truth int64 [H', W'], baseline int64 [H', W'] or None, spacing or None).

        Args:
            logits: float32 torch [K + 1, h', w'] of the head.
            truth: int64 [H, W] mask as read.
            spacing: the image's :class:`~probes.seg.frame.Spacing`, or None (HD95 in pixels).
            baseline: whether to put the mean-mask baseline in the frame too.
        """
        pre, shape = self.pre, truth.shape
        if self.scored_at == "model":
            h, w, _, _ = pre.geometry(*shape)
            mm = (
                None
                if spacing is None
                else tuple(np.multiply(spacing.for_shape(shape), (shape[0] / h, shape[1] / w)))
            )
            pred = self._up(logits).argmax(0).numpy()
            return pred, pre.transform_mask(truth), self.base_model if baseline else None, mm
        rows, cols = visible_box(pre, shape)
        pred = to_mask_frame(logits, pre, shape)[:, rows, cols].argmax(0).numpy()
        base = None
        if baseline:
            freq = to_mask_frame(self.freq, pre, shape)[:, rows, cols].numpy()
            base = _baseline_from_counts(freq)
        mm = None if spacing is None else spacing.for_shape(shape)
        return pred, truth[rows, cols], base, mm
