"""3D volumes as slice manifests: NIfTI files and DICOM series expand into 16-bit PNG slices.

``featcache volumes vols.csv --out slices/`` reads a volume manifest and writes every slice (or
every N-th) as a PNG plus ``slices/manifest.csv``, a normal manifest that ``featcache extract``
embeds as usual; probes pool slice features per volume at probe time (``probes.aggregate``), so
one extraction serves every aggregation.

The volume manifest has the columns of an image manifest (see ``featcache.store.manifest``), except that
``path`` names a volume: a ``.nii``/``.nii.gz`` file, a folder holding one DICOM series (one file
per slice), or a multi-frame DICOM file. ``mask`` (optional) names a label volume on the same voxel
grid (NIfTI or DICOM, 0 background, k > 0 structure k), sliced identically.

Slice manifest: ``id`` = ``<volume id>#<slice index>``, the volume's ``patient_id``, ``split``,
labels and ``meta_*`` copied to every slice, ``meta_volume`` = volume id, ``meta_slice`` = index;
images in ``images/<volume>/<index>.png``, masks in ``masks/<volume>/<index>.png``. The voxel size
goes with every slice: ``meta_spacing_row`` and ``meta_spacing_col`` (mm between rows and between
columns of the slice PNG) and ``meta_spacing_slice`` (mm between consecutive slice indices, whatever
``every`` keeps), the norms of the canonical affine's columns (:func:`slice_spacing`); for a DICOM
series that affine comes from PixelSpacing and the slice positions, so these are the series' own.
Volumetric segmentation scores read them for HD95 in mm (:mod:`probes.seg.volume`).

Orientation. Every volume is brought to nibabel's closest canonical orientation, RAS+
(``nibabel.as_closest_canonical``: first voxel axis towards the patient's Right, second Anterior,
third Superior; axes are permuted and flipped, never resampled). DICOM geometry (LPS) is turned
into that RAS affine first. ``axis`` picks the slicing direction in that space: 2 axial (default),
1 coronal, 0 sagittal; slice index k runs from inferior to superior (axial), posterior to anterior
(coronal), left to right (sagittal). Slices are displayed as radiology viewers show them, which is
also the standard DICOM layout of each plane: axial with anterior up and the patient's right on
the image's left; coronal with superior up and the patient's right on the left; sagittal with
superior up and anterior on the left. An axial CT series in the usual orientation therefore gives
slices equal to the files' pixel arrays.

DICOM series. All files of the folder must belong to one series (SeriesInstanceUID); they are
ordered by the projection of ImagePositionPatient on the slice normal (the cross product of the
ImageOrientationPatient direction cosines), never by file name; two slices at one position are an
error, irregular gaps are not (slices are kept as they are; the affine takes the mean step). Without position/orientation attributes, files are ordered by InstanceNumber and taken as
axial slices in the standard orientation. Multi-frame (enhanced) objects take positions,
orientation, spacing and rescale per frame from their functional groups (frames without geometry
keep their stored order). The modality LUT (rescale slope/intercept: Hounsfield units for CT) is
applied; VOI windows stored in the files are not (the ``window`` option decides); MONOCHROME1 is
inverted after windowing so bright means high values as in MONOCHROME2.

Windowing maps intensities to [0, 65535]: a fixed window (``W,L`` or a preset, in the units of the
volume, i.e. HU for CT) maps ``L - W/2 .. L + W/2`` linearly onto 0..65535, clipping outside; the
default ``percentile:1,99`` uses the 1st and 99th percentiles of the whole volume, so all slices of
a volume share one mapping. Presets (W, L in HU): lung 1500, -600; mediastinum 350, 50; abdomen
400, 40; bone 1800, 400; brain 80, 40.

4D files (e.g. fMRI, T time points) are refused unless ``frame`` picks one time point; a 4th axis of
length 1 is dropped. Masks are written as 8-bit PNGs (16-bit above 255 labels); a binary label volume
is written 0/255 so the PNGs can be looked at (``read_mask`` reads them back as 0/1).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.volume import Volume, read_label_volume, read_volume, voxel_spacing
from featcache.errors import FeatcacheError, ManifestError
from featcache.store.manifest import Manifest, read_manifest, write_manifest

__all__ = [
    "WINDOW_PRESETS",
    "Volume",
    "VolumesResult",
    "Window",
    "apply_window",
    "expand_volumes",
    "parse_window",
    "read_label_volume",
    "read_volume",
    "slice_spacing",
    "volume_slice",
    "voxel_spacing",
]

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    # name: (width W, level L) in Hounsfield units
    "lung": (1500.0, -600.0),
    "mediastinum": (350.0, 50.0),
    "abdomen": (400.0, 40.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
AXES = {0: "sagittal", 1: "coronal", 2: "axial"}
SPACING_META = ("meta_spacing_row", "meta_spacing_col", "meta_spacing_slice")
RESERVED_META = ("meta_volume", "meta_slice", *SPACING_META)  # written by expand_volumes itself


# -------------------------------------------------------------------------------------------- windowing


@dataclass(frozen=True)
class Window:
    """An intensity window.

    Attributes:
        kind: ``fixed`` (``width``/``level``) or ``percentile`` (``low``/``high`` percentiles of the volume).
        width: window width W (fixed).
        level: window centre L (fixed).
        low: lower percentile in [0, 100) (percentile).
        high: upper percentile in (low, 100] (percentile).
    """

    kind: str
    width: float = 0.0
    level: float = 0.0
    low: float = 1.0
    high: float = 99.0

    def bounds(self, data: np.ndarray) -> tuple[float, float]:
        """The intensities mapped to 0 and 65535 for this volume.

        Args:
            data: float [X, Y, Z] volume.

        Returns:
            ``(lo, hi)``; for a constant volume under a percentile window, ``hi = lo + 1``.
        """
        if self.kind == "fixed":
            return self.level - self.width / 2, self.level + self.width / 2
        finite = data[
            np.isfinite(data)
        ]  # NaN voxels (masked or registered MR, PET) must not blank the window
        if not finite.size:
            raise FeatcacheError("the volume holds no finite intensity (all voxels NaN or Inf)")
        lo, hi = (float(v) for v in np.percentile(finite, [self.low, self.high]))
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def describe(self) -> str:
        """Human-readable form, e.g. ``W1500 L-600`` or ``percentile 1-99``."""
        if self.kind == "fixed":
            return f"W{self.width:g} L{self.level:g}"
        return f"percentile {self.low:g}-{self.high:g}"


def parse_window(spec: str | Window | None) -> Window:
    """Parse a ``--window`` value.

    Args:
        spec: a preset name (``lung``, ``mediastinum``, ``abdomen``, ``bone``, ``brain``), ``W,L``
            (e.g. ``400,40``), ``percentile`` (1st-99th) or ``percentile:LOW,HIGH``; None = percentile.

    Returns:
        The :class:`Window`.

    Raises:
        FeatcacheError: an unknown preset or malformed numbers.
    """
    if isinstance(spec, Window):
        return spec
    text = "percentile" if spec is None else str(spec).strip().lower()
    if text in WINDOW_PRESETS:
        w, lvl = WINDOW_PRESETS[text]
        return Window("fixed", width=w, level=lvl)
    hint = (
        f"--window {spec!r}: use a preset ({', '.join(WINDOW_PRESETS)}), W,L such as 400,40, "
        "or percentile[:LOW,HIGH] such as percentile:1,99"
    )
    if text.startswith("percentile"):
        rest = text[len("percentile") :]
        if not rest:
            return Window("percentile")
        if not rest.startswith(":"):
            raise FeatcacheError(hint)
        try:
            low, high = (float(v) for v in rest[1:].split(","))
        except ValueError:
            raise FeatcacheError(hint) from None
        if not 0 <= low < high <= 100:
            raise FeatcacheError(f"--window {spec!r}: percentiles need 0 <= LOW < HIGH <= 100")
        return Window("percentile", low=low, high=high)
    try:
        w, lvl = (float(v) for v in text.split(","))
    except ValueError:
        raise FeatcacheError(hint) from None
    if not w > 0 or not np.isfinite(lvl):
        raise FeatcacheError(f"--window {spec!r}: the width W must be > 0 and the level L finite")
    return Window("fixed", width=w, level=lvl)


def apply_window(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map intensities linearly from ``[lo, hi]`` to ``[0, 65535]``, clipping outside.

    Args:
        data: float array of any shape.
        lo: intensity mapped to 0.
        hi: intensity mapped to 65535 (> lo).

    Returns:
        uint16 array of the same shape (rounded to nearest); NaN maps to 0, +Inf to 65535.
    """
    scaled = (np.asarray(data, dtype=np.float64) - lo) / (hi - lo)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)  # NaN voxels become background
    return np.round(np.clip(scaled, 0.0, 1.0) * 65535.0).astype(np.uint16)


# ------------------------------------------------------------------------------------------------ slicing


def volume_slice(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a canonical RAS+ volume, in display orientation.

    Args:
        data: [X, Y, Z] canonical volume (any dtype).
        axis: 2 axial, 1 coronal, 0 sagittal.
        index: slice index along ``axis``.

    Returns:
        [rows, cols] view: axial anterior up / patient right on the left, coronal superior up / right
        on the left, sagittal superior up / anterior on the left.
    """
    if axis not in AXES:
        raise FeatcacheError(f"--axis {axis}: use 0 (sagittal), 1 (coronal) or 2 (axial)")
    # the plane's two remaining RAS axes, transposed so the higher one runs down the rows, both reversed
    return np.take(data, index, axis=axis).T[::-1, ::-1]


def slice_spacing(affine: np.ndarray, axis: int) -> tuple[float, float, float]:
    """Pixel size of the slices :func:`volume_slice` cuts along ``axis``, from the canonical affine.

    The slice's rows run along the higher of the two in-plane voxel axes and its columns along the
    lower (the transpose in :func:`volume_slice`; the flips change no distance): axial (2) rows =
    axis 1, columns = axis 0; coronal (1) rows = axis 2, columns = axis 0; sagittal (0) rows = axis 2,
    columns = axis 1.

    Args:
        affine: float64 [4, 4] canonical RAS+ affine of the volume.
        axis: the slicing axis (0, 1, 2).

    Returns:
        ``(row_mm, col_mm, slice_mm)``: mm between rows and between columns of a slice image, and
        between consecutive slice indices along ``axis``.
    """
    if axis not in AXES:
        raise FeatcacheError(f"--axis {axis}: use 0 (sagittal), 1 (coronal) or 2 (axial)")
    size = voxel_spacing(affine)
    low, high = (a for a in range(3) if a != axis)
    return float(size[high]), float(size[low]), float(size[axis])


# ------------------------------------------------------------------------------------------ the manifest


@dataclass
class VolumesResult:
    """What :func:`expand_volumes` wrote.

    Attributes:
        manifest: path of the slice manifest.
        n_volumes: volumes expanded.
        n_slices: slice rows written.
        volumes: per volume: ``{"id", "source", "shape", "slices", "window", "spacing_mm"}``
            (``spacing_mm`` = row, column, slice spacing as written to the slice manifest).
    """

    manifest: Path
    n_volumes: int
    n_slices: int
    volumes: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """One line per volume and a total."""
        lines = [
            f"{v['id']}: {'x'.join(map(str, v['shape']))} -> {v['slices']} slices ({v['window']})"
            for v in self.volumes
        ]
        lines.append(f"{self.n_slices} slices of {self.n_volumes} volumes -> {self.manifest}")
        return "\n".join(lines)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "volume"


def _check_paths(m: Manifest) -> None:
    missing = [(i, p) for i, p in enumerate(m.paths) if not (m.root / p).exists()]
    if m.masks is not None:
        missing += [(i, p) for i, p in enumerate(m.masks) if p and not (m.root / p).exists()]
    if missing:
        shown = ", ".join(f"line {i + 2} ({p})" for i, p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ManifestError(
            f"{m.source}: rows {shown}{more} name volumes or masks that do not exist under {m.root}"
        )


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def expand_volumes(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    axis: int = 2,
    window: str | Window | None = "percentile",
    every: int = 1,
    frame: int | None = None,
) -> VolumesResult:
    """Write every volume of a volume manifest as PNG slices plus a slice manifest.

    Args:
        manifest: volume manifest CSV (``path`` = NIfTI file, DICOM series folder or multi-frame DICOM).
        out: output folder (``manifest.csv``, ``images/``, ``masks/``).
        root: folder the manifest's paths are relative to (default: the CSV's folder).
        axis: slicing axis in canonical RAS+ space: 2 axial, 1 coronal, 0 sagittal.
        window: see :func:`parse_window` (default: 1st-99th percentile of each volume).
        every: keep every N-th slice (indices 0, N, 2N, ...).
        frame: time point of 4-D files (otherwise they are refused).

    Returns:
        A :class:`VolumesResult`.

    Raises:
        ManifestError: invalid manifest, missing volumes, reserved ``meta_volume``/``meta_slice``/
            ``meta_spacing_*`` columns.
        ImageReadError: a volume or label volume that cannot be read (the file is named).
    """
    if axis not in AXES:
        raise FeatcacheError(f"--axis {axis}: use 0 (sagittal), 1 (coronal) or 2 (axial)")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise FeatcacheError(f"--every {every!r}: must be a positive integer")
    win = parse_window(window)
    m = read_manifest(manifest, root, check_files=False)
    clash = [k for k in RESERVED_META if k in m.meta]
    if clash:
        raise ManifestError(f"{m.source}: columns {clash} are reserved for the slice manifest; rename them")
    _check_paths(m)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = defaultdict(list)
    used: set[str] = set()
    volumes = []
    for i in range(len(m)):
        vid = str(m.ids[i])
        folder = _safe(vid)
        n = 2
        while folder in used:
            folder, n = f"{_safe(vid)}_{n}", n + 1
        used.add(folder)
        vol = read_volume(m.root / m.paths[i], frame, root=m.root)
        labels = None
        if m.masks is not None and m.masks[i]:
            labels = read_label_volume(m.root / m.masks[i], vol, frame, root=m.root)
        lo, hi = win.bounds(vol.data)
        img16 = apply_window(vol.data, lo, hi)
        if vol.invert:
            img16 = 65535 - img16
        binary = labels is not None and labels.max(initial=0) <= 1
        mask_dtype = np.uint8 if labels is None or labels.max(initial=0) <= 255 else np.uint16
        indices = range(0, vol.shape[axis], every)
        spacing = [f"{v:.10g}" for v in slice_spacing(vol.affine, axis)]  # mm, independent of every
        for k in indices:
            rel = f"images/{folder}/{k:04d}.png"
            _save_png(out / rel, volume_slice(img16, axis, k))
            cols["path"].append(rel)
            cols["id"].append(f"{vid}#{k}")
            cols["patient_id"].append(str(m.patient_ids[i]))
            cols["split"].append(str(m.splits[i]))
            if m.classes is not None:
                cols["label"].append(str(m.classes[i]))
            for j, name in enumerate(m.label_names):
                cols[name].append(float(m.labels[i, j]))
            if m.masks is not None:
                if labels is None:
                    cols["mask"].append("")
                else:
                    mrel = f"masks/{folder}/{k:04d}.png"
                    sl = volume_slice(labels, axis, k)
                    _save_png(out / mrel, (sl * 255 if binary else sl).astype(mask_dtype))
                    cols["mask"].append(mrel)
            for key, values in m.meta.items():
                cols[key].append(str(values[i]))
            cols["meta_volume"].append(vid)
            cols["meta_slice"].append(str(k))
            for key, v in zip(SPACING_META, spacing):
                cols[key].append(v)
        volumes.append(
            {
                "id": vid,
                "source": vol.source,
                "shape": list(vol.shape),
                "slices": len(indices),
                "spacing_mm": [float(v) for v in spacing],
                "window": win.describe() if win.kind == "fixed" else f"{win.describe()}: {lo:g}..{hi:g}",
            }
        )
    path = write_manifest(out / "manifest.csv", dict(cols))
    return VolumesResult(manifest=path, n_volumes=len(m), n_slices=len(cols["id"]), volumes=volumes)
