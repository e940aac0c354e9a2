"""Volumetric scoring of slice-wise segmentation: slices stacked back into their volumes.

A volume expanded by ``featcache volumes`` is one row per slice with ``meta_volume`` (the volume
id) and ``meta_slice`` (the slice index along the slicing axis). With ``scored_per="volume"`` the
test slices' predicted and true label maps (in the scoring frame) are stacked by ``meta_slice``
into [S, H, W] volumes and scored as one object each (:func:`probes.seg.metrics.seg_metrics` on
3-D masks): Dice and Jaccard over voxels, HD95 between 3-D surfaces. A volume's slices must be
evenly spaced in ``meta_slice`` (every one, or every N-th as ``--every N`` writes them); a volume
with slices missing in between (a failed extraction) is refused, naming the slices, since its
surface would be wrong.

Voxel spacing. HD95 is in millimetres when the slice rows carry ``meta_spacing_row``,
``meta_spacing_col`` (mm between rows and columns of the slice image) and ``meta_spacing_slice``
(mm between consecutive slice indices); the distance between stacked slices is
``spacing_slice * N`` for every N-th slice. ``featcache volumes`` writes them (from the volume's
canonical affine: the NIfTI header, or a DICOM series' PixelSpacing and slice positions). Without
them, or when some test slices lack a positive value, HD95 is in voxels of the stacked grid (one
unit per row, column and kept slice, however anisotropic the voxels), which is recorded
(``params.hd95_unit = "px"``, ``hd95_px_because``) and said once. The same columns give per-slice
HD95 in millimetres. A volume is scored with the spacing of its first slice (the slices of one
volume share it).

CIs resample patients (a patient's volumes together); ``n_test`` counts volumes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from featcache.errors import FeatcacheError
from featcache.store.feature_store import FeatureSet
from probes.aggregate import volume_ids
from probes.seg.metrics import SEG_METRICS, seg_metrics

__all__ = [
    "SCORED_PER",
    "SPACING_COLUMNS",
    "SliceSpacing",
    "VolumeGroup",
    "score_volumes",
    "slice_spacings",
    "volume_groups",
]

SCORED_PER = ("slice", "volume")
SPACING_COLUMNS = ("spacing_row", "spacing_col", "spacing_slice")


class SliceSpacing(NamedTuple):
    """Pixel size of a volume slice as the slice manifest records it (the slice image is the voxel grid).

    Attributes:
        row_mm, col_mm: mm between rows and between columns of the slice image.
        slice_mm: mm between consecutive slice indices.
        tag: where it came from (``meta_spacing``).
    """

    row_mm: float
    col_mm: float
    slice_mm: float
    tag: str = "meta_spacing"

    def for_shape(self, shape: tuple[int, int]) -> tuple[float, float]:
        """``(row, column)`` spacing in mm of the slice's mask (the mask is the slice's own grid)."""
        return self.row_mm, self.col_mm


@dataclass
class VolumeGroup:
    """The test slices of one volume.

    Attributes:
        id: the volume id (``meta_volume``).
        rows: int64 [S] feature-set rows in slice order.
        slices: int64 [S] their ``meta_slice`` indices (ascending, evenly spaced).
        step: the distance between kept slice indices (1 unless every N-th slice was kept).
        patient: the volume's patient.
    """

    id: str
    rows: np.ndarray
    slices: np.ndarray
    step: int
    patient: str


def volume_groups(fs: FeatureSet, rows: np.ndarray) -> list[VolumeGroup]:
    """Group rows of a slice feature set by volume, each in ``meta_slice`` order.

    Args:
        fs: a feature set extracted from a slice manifest.
        rows: int64 [n] rows to group (e.g. the test rows).

    Returns:
        The volumes in order of first appearance among ``rows``.

    Raises:
        FeatcacheError: no ``meta_volume``/``meta_slice`` column, a slice index that is not an
            integer, one index twice in a volume, slices missing between the first and last, or one
            volume under two patients.
    """
    rows = np.asarray(rows, dtype=np.int64)
    vids = volume_ids(fs)[rows]
    if "slice" not in fs.meta_names():
        raise FeatcacheError(
            f"{fs.name}: no meta_slice column; volumetric scores need the slice manifest of featcache volumes"
        )
    raw, patients, ids = fs.meta("slice")[rows], fs.patient_ids[rows], fs.ids[rows]
    try:
        index = np.array([int(v) for v in raw], dtype=np.int64)
    except ValueError:
        bad = next(i for i, v in enumerate(raw) if not str(v).strip().lstrip("-").isdigit())
        raise FeatcacheError(
            f"{fs.name}: row '{ids[bad]}' has meta_slice {raw[bad]!r}, not a slice index; fix the slice manifest"
        ) from None
    groups = []
    _, first = np.unique(vids, return_index=True)
    for vid in vids[np.sort(first)]:
        at = np.flatnonzero(vids == vid)
        at = at[np.argsort(index[at], kind="stable")]
        idx = index[at]
        if len(np.unique(idx)) != len(idx):
            dup = int(idx[np.flatnonzero(np.diff(idx) == 0)[0]])
            raise FeatcacheError(f"{fs.name}: volume '{vid}' has slice {dup} twice; fix the slice manifest")
        steps = np.diff(idx)
        step = int(steps.min()) if len(steps) else 1
        if len(steps) and np.any(steps != step):
            missing = sorted(set(range(int(idx[0]), int(idx[-1]) + 1, step)) - set(idx.tolist()))
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise FeatcacheError(
                f"{fs.name}: test volume '{vid}' lacks slices {shown} between its first and last "
                f"(not extracted or without a mask); re-extract them, or score with --scored-per slice"
            )
        if len(set(patients[at])) != 1:
            raise FeatcacheError(
                f"{fs.name}: volume '{vid}' has slices of several patients; fix the manifest"
            )
        groups.append(VolumeGroup(str(vid), rows[at], idx, step, str(patients[at][0])))
    return groups


def slice_spacings(fs: FeatureSet, rows: np.ndarray) -> tuple[list, str | None]:
    """The recorded voxel spacing of each row, or why there is none.

    Args:
        fs: the feature set.
        rows: int64 [n] rows.

    Returns:
        ``(spacings, why_not)``: a :class:`SliceSpacing` per row and None, or ``[None] * n`` and the
        reason (the columns are absent, or some rows have no positive spacing).
    """
    names = fs.meta_names()
    if not all(c in names for c in SPACING_COLUMNS):
        return [None] * len(rows), (
            "the slice manifest records no voxel spacing (meta_spacing_row, meta_spacing_col, "
            "meta_spacing_slice), so HD95 is in voxels"
        )
    cols = [fs.meta(c)[rows] for c in SPACING_COLUMNS]
    out = []
    for values in zip(*cols):
        try:
            r, c, s = (float(v) for v in values)
        except ValueError:
            r = c = s = float("nan")
        out.append(SliceSpacing(r, c, s) if all(np.isfinite(v) and v > 0 for v in (r, c, s)) else None)
    bad = sum(v is None for v in out)
    if bad:
        return [None] * len(
            rows
        ), f"{bad} of {len(rows)} test slices have no positive voxel spacing, so HD95 is in voxels"
    return out, None


def spacing_unit(spacings: list, why_not: str | None, stacklevel: int = 3) -> dict[str, Any]:
    """The params that record the HD95 unit; the reason for pixels is said once as a warning."""
    if why_not is None:
        return {"hd95_unit": "mm", "spacing_tags": {"meta_spacing": len(spacings)}}
    warnings.warn(why_not, UserWarning, stacklevel=stacklevel)
    return {"hd95_unit": "px", "hd95_px_because": why_not}


def stack_volume(maps: dict[int, np.ndarray], group: VolumeGroup) -> np.ndarray:
    """int64 [S, H, W]: the slices' label maps of one volume stacked in slice order.

    Raises:
        FeatcacheError: slices of different sizes (they cannot come from one volume).
    """
    slices = [maps[int(r)] for r in group.rows]
    if len({s.shape for s in slices}) != 1:
        raise FeatcacheError(
            f"volume '{group.id}': its slices' masks differ in size ({sorted({s.shape for s in slices})}); "
            "they must share the volume's grid"
        )
    return np.stack(slices).astype(np.int64)


def save_volume(folder: Path, name: str, volume: np.ndarray) -> Path:
    """Write a predicted label volume as ``<folder>/volumes/<name>.npy`` (uint8/uint16 [S, H, W])."""
    (folder / "volumes").mkdir(parents=True, exist_ok=True)
    path = folder / "volumes" / f"{name}.npy"
    np.save(path, volume.astype(np.uint8 if volume.max(initial=0) <= 255 else np.uint16))
    return path


def score_volumes(groups, kept, K: int, spacings, test, baseline: bool, folder: Path | None, name_of=str):
    """Per-volume metrics of the probe and the baseline from their stacked slices.

    Args:
        groups: the test volumes (:func:`volume_groups`).
        kept: ``{"pred", "truth", "base", "mm"}``, each ``{row: value}``: the slice's predicted, true
            and baseline label maps int64 [H, W] in the scoring frame, and its (row, col) spacing.
        K: structures.
        spacings: per test row a :class:`SliceSpacing` or None (then HD95 in voxels).
        test: int64 [n] the test rows (positions of ``spacings``).
        baseline: whether the baseline maps are there to score.
        folder: where predicted volumes are saved (``volumes/<name>.npy``), or None.
        name_of: file name of a volume id.

    Returns:
        ``(probe_values, baseline_values)``, each ``{metric: float64 [g, K]}``.
    """
    at = {int(r): p for p, r in enumerate(test)}
    probe_vals = {m: np.full((len(groups), K), np.nan) for m in SEG_METRICS}
    base_vals = {m: np.full((len(groups), K), np.nan) for m in SEG_METRICS}
    for g, group in enumerate(groups):
        first = spacings[at[int(group.rows[0])]]
        mm = None
        if first is not None:
            row_mm, col_mm = kept["mm"][int(group.rows[0])]
            mm = (first.slice_mm * group.step, row_mm, col_mm)
        truth = stack_volume(kept["truth"], group)
        pred = stack_volume(kept["pred"], group)
        for mname, v in seg_metrics(pred[None], truth[None], K, mm).items():
            probe_vals[mname][g] = v[0]
        if baseline:
            base = stack_volume(kept["base"], group)
            for mname, v in seg_metrics(base[None], truth[None], K, mm).items():
                base_vals[mname][g] = v[0]
        if folder is not None:
            save_volume(folder, name_of(group.id), pred)
    return probe_vals, base_vals
