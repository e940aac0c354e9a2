"""What a segmentation run reads from its feature set, before any head is trained.

:func:`probes.seg.run.run_seg` takes from here: the rows it uses (:func:`seg_rows`: extracted, with a
mask, by split, a validation share carved off train when the set has none), the mask files
(:class:`Masks`: as stored, or put through the extraction's geometry into the model frame), the
training targets and the class counts of the mean-mask baseline (:func:`training_targets`), the
names of the structures (:func:`structure_names`) and the spacing of every test row, which fixes
the one unit of HD95 (:func:`scoring_spacings`, :func:`hd95_unit`). The rules themselves are those
of the :mod:`probes.seg.run` docstring; nothing here imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.images import read_mask
from featcache.errors import FeatcacheError
from featcache.store.feature_store import FeatureSet
from featcache.store.preprocess import Preprocess
from probes.data import SPLITS, carve_val
from probes.seg.frame import SPACING_TAGS, nearest_resize, pixel_spacing
from probes.seg.volume import SPACING_COLUMNS, slice_spacings, spacing_unit

__all__ = ["Masks", "hd95_unit", "seg_rows", "structure_names", "scoring_spacings", "training_targets"]


def structure_names(structures: Sequence[str] | None, max_label: int) -> list[str]:
    """The names of labels 1..``max_label``: ``structures`` as given, else ``structure_<k>``."""
    if structures:
        names = [str(s).strip() for s in structures]
        if len(names) < max_label:
            raise FeatcacheError(
                f"--structures names {len(names)} structures but the training masks have labels up to "
                f"{max_label}; name one per label (label k -> k-th name)"
            )
        if len(set(names)) != len(names) or "mean" in names or not all(names):
            raise FeatcacheError(
                f"--structures {','.join(names)}: names must be distinct, non-empty, not 'mean'"
            )
        return names
    return [f"structure_{k}" for k in range(1, max_label + 1)]


class Masks:
    """Reads mask files of a feature set: as stored (``read``) or in the model frame (calling it)."""

    def __init__(self, fs: FeatureSet, root: Path, preprocess: Preprocess):
        self.paths, self.root, self.pre, self.ids = fs.masks, root, preprocess, fs.ids

    def path(self, row: int) -> Path:
        return self.root / self.paths[row]

    def read(self, row: int) -> np.ndarray:
        """int64 [H, W] label map of ``row`` in its own frame."""
        path = self.path(row)
        if not path.is_file():
            raise FeatcacheError(
                f"{path}: mask of row '{self.ids[row]}' not found; pass the manifest's image root with --root"
            )
        return read_mask(path)

    def __call__(self, row: int) -> np.ndarray:
        """int64 [res, res] label map of ``row`` in the model frame."""
        return self.pre.transform_mask(self.read(row))


def seg_rows(fs: FeatureSet, seed: int, val_fraction: float) -> tuple[dict[str, np.ndarray], bool]:
    """Row indices per split of the extracted rows with a mask, and whether val was carved off train."""
    masks = fs.masks
    if masks is None:
        raise FeatcacheError(
            f"{fs.name}: the set has no mask column; add a 'mask' column to the manifest and extract again"
        )
    usable = fs.ok & (masks != "")
    keep = {s: np.flatnonzero(usable & (fs.splits == s)) for s in SPLITS}
    for s in ("train", "test"):
        if not len(keep[s]):
            raise FeatcacheError(
                f"{fs.name}: no {s} rows with a mask ({int((fs.splits == s).sum())} rows have split '{s}', "
                f"{int((usable & (fs.splits == s)).sum())} of them extracted with a mask); "
                f"give masks to some '{s}' rows of the manifest"
            )
    carved = False
    if not len(keep["val"]) and val_fraction > 0:
        to_val = carve_val(fs.patient_ids[keep["train"]], val_fraction, seed)
        keep["val"], keep["train"] = keep["train"][to_val], keep["train"][~to_val]
        carved = True
    return keep, carved


def training_targets(
    masks: Masks, keep: dict[str, np.ndarray], size: int, res: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The train and val targets at the loss resolution, and the training masks' class counts.

    Returns:
        ``(Y, counts)``: int64 [n, size, size] label maps for ``train`` and ``val``, and int64
        [L + 1, res, res] per-pixel counts of each label 0..L over the training masks in the model
        frame (the mean-mask baseline), L the largest training label.
    """
    Y = {s: np.zeros((len(keep[s]), size, size), np.int64) for s in ("train", "val")}
    counts = np.zeros((1, res, res), np.int64)
    for s in ("train", "val"):
        for i, row in enumerate(keep[s]):
            m = masks(row)
            Y[s][i] = nearest_resize(m, size)
            if s == "train":
                top = int(m.max(initial=0))
                if top >= len(counts):
                    counts = np.concatenate([counts, np.zeros((top + 1 - len(counts), res, res), np.int64)])
                for k in range(len(counts)):
                    counts[k] += m == k
    return Y, counts


def hd95_unit(image_paths: Sequence[Path]) -> tuple[list, str, dict[str, Any]]:
    """Pixel spacings of the test images and the one HD95 unit for all of them.

    Args:
        image_paths: the test images' files.

    Returns:
        ``(spacings, unit, params)``: a :class:`~probes.seg.frame.Spacing` or None per image (all
        None when the unit is ``px``), ``mm`` or ``px``, and the params that record the choice.
    """
    spacings = [pixel_spacing(p) for p in image_paths]
    have = sum(s is not None for s in spacings)
    if have and have == len(spacings):
        tags = {t: n for t in SPACING_TAGS if (n := sum(s.tag == t for s in spacings))}
        return spacings, "mm", {"hd95_unit": "mm", "spacing_tags": tags}
    params: dict[str, Any] = {"hd95_unit": "px"}
    if have:
        why = (
            f"{len(spacings) - have} of {len(spacings)} test images have no DICOM pixel spacing "
            "(PixelSpacing or ImagerPixelSpacing), so HD95 is in pixels for all of them"
        )
        params["hd95_px_because"] = why
        warnings.warn(why, UserWarning, stacklevel=3)  # the line of run_seg that asked
    return [None] * len(spacings), "px", params


def scoring_spacings(fs: FeatureSet, test: np.ndarray, data_root: Path, per_volume: bool):
    """Spacing per test row (for the scorer) and the params recording the HD95 unit.

    The voxel spacing a slice manifest records (``meta_spacing_*``) comes first; a set without those
    columns scored per slice falls back to the images' DICOM pixel spacing; a set that has them on
    only some test rows is scored in pixels, and says why.
    """
    recorded, why_not = slice_spacings(fs, test)
    has_columns = all(c in fs.meta_names() for c in SPACING_COLUMNS)
    if why_not is None or per_volume or has_columns:
        return recorded, spacing_unit(recorded, why_not, stacklevel=4)
    spacings, _, unit_params = hd95_unit([data_root / fs.paths[r] for r in test])
    return spacings, unit_params
