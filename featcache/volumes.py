"""3D volumes as slice manifests: NIfTI files and DICOM series expand into 16-bit PNG slices.

``featcache volumes vols.csv --out slices/`` reads a volume manifest and writes every slice (or
every N-th) as a PNG plus ``slices/manifest.csv``, a normal manifest that ``featcache extract``
embeds as usual; probes pool slice features per volume at probe time (``probes.aggregate``), so
one extraction serves every aggregation.

The volume manifest has the columns of an image manifest (see ``featcache.manifest``), except that
``path`` names a volume: a ``.nii``/``.nii.gz`` file, a folder holding one DICOM series (one file
per slice), or a multi-frame DICOM file. ``mask`` (optional) names a label volume on the same voxel
grid (NIfTI or DICOM, 0 background, k > 0 structure k), sliced identically.

Slice manifest: ``id`` = ``<volume id>#<slice index>``, the volume's ``patient_id``, ``split``,
labels and ``meta_*`` copied to every slice, ``meta_volume`` = volume id, ``meta_slice`` = index;
images in ``images/<volume>/<index>.png``, masks in ``masks/<volume>/<index>.png``.

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

from featcache.dicom import _pi_text, check_pixel_count, declared_pixels, read_dicom_header
from featcache.errors import FeatcacheError, ImageReadError, ManifestError
from featcache.manifest import Manifest, read_manifest, write_manifest

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
    "volume_slice",
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
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Volume:
    """A volume in canonical RAS+ orientation.

    Attributes:
        data: float32 [X, Y, Z] intensities (modality units: HU for CT), voxel axes towards R, A, S.
        affine: float64 [4, 4] voxel index -> RAS millimetres.
        source: the file or folder read.
        invert: True for MONOCHROME1 DICOM (inverted after windowing).
    """

    data: np.ndarray
    affine: np.ndarray
    source: str
    invert: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)``."""
        return tuple(self.data.shape)  # type: ignore[return-value]


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise FeatcacheError("reading volumes needs nibabel; pip install 'featcache[nifti]'") from None
    return nibabel


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise FeatcacheError("reading DICOM volumes needs pydicom; pip install 'featcache[dicom]'") from None
    return pydicom


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nib = _nibabel()
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path, frame: int | None) -> tuple[np.ndarray, np.ndarray]:
    nib = _nibabel()
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise ImageReadError(f"{path}: not a readable NIfTI file ({type(e).__name__})") from None
    shape = img.shape
    check_pixel_count(int(np.prod(shape[:3], dtype=np.int64)), path, "volume")
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    elif len(shape) == 4:
        if frame is None:
            raise ImageReadError(
                f"{path}: 4D volume {'x'.join(map(str, shape))} with {shape[3]} time points; pick one with "
                f"--frame T (0..{shape[3] - 1}) or split the file into 3D volumes"
            )
        if not 0 <= frame < shape[3]:
            raise ImageReadError(
                f"{path}: --frame {frame} is out of range; the file has {shape[3]} time points"
            )
        img = img.slicer[..., frame]
    elif len(shape) == 2:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine)
    elif len(shape) != 3:
        raise ImageReadError(
            f"{path}: a {len(shape)}-D image ({shape}); volumes must be 3-D (or 4-D with --frame)"
        )
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    return data, np.asarray(img.affine, dtype=np.float64)


def _frame_groups(ds: Any, index: int | None, keyword: str) -> Any | None:
    """The first item of a functional-group sequence for a frame: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index is not None and index < len(per_frame):
        inner = per_frame[index].get(keyword)
        if inner:
            return inner[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        inner = shared[0].get(keyword)
        if inner:
            return inner[0]
    return None


def _geometry(ds: Any, index: int | None) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(ImagePositionPatient [3] or None, ImageOrientationPatient [6] or None, PixelSpacing [2])."""
    pos = orient = None
    spacing = None
    if index is not None:
        g = _frame_groups(ds, index, "PlanePositionSequence")
        if g is not None and "ImagePositionPatient" in g:
            pos = np.array(g.ImagePositionPatient, dtype=np.float64)
        g = _frame_groups(ds, index, "PlaneOrientationSequence")
        if g is not None and "ImageOrientationPatient" in g:
            orient = np.array(g.ImageOrientationPatient, dtype=np.float64)
        g = _frame_groups(ds, index, "PixelMeasuresSequence")
        if g is not None and "PixelSpacing" in g:
            spacing = np.array(g.PixelSpacing, dtype=np.float64)
    if pos is None and "ImagePositionPatient" in ds:
        pos = np.array(ds.ImagePositionPatient, dtype=np.float64)
    if orient is None and "ImageOrientationPatient" in ds:
        orient = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    if spacing is None:
        spacing = np.array(ds.get("PixelSpacing", [1.0, 1.0]), dtype=np.float64)
    return pos, orient, spacing


def _rescale(ds: Any, index: int | None) -> tuple[float, float]:
    g = _frame_groups(ds, index, "PixelValueTransformationSequence") if index is not None else None
    src = g if g is not None and "RescaleSlope" in g else ds
    return float(src.get("RescaleSlope", 1.0) or 1.0), float(src.get("RescaleIntercept", 0.0) or 0.0)


def _pixels(ds: Any, path: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot decode DICOM pixel data ({type(e).__name__}: truncated or corrupt pixel data, "
            "or a header that does not match it)"
        ) from None


def _photometric(ds: Any, path: Path) -> bool:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(
            f"{path}: photometric interpretation {_pi_text(pi)}; only grayscale DICOM volumes are supported"
        )
    return pi == "MONOCHROME1"


def _assemble(frames: list[np.ndarray], geoms: list[tuple], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Order slices along the normal and build the RAS affine; returns (data [X, Y, Z], affine)."""
    have_geometry = all(g[0] is not None and g[1] is not None for g in geoms)
    if have_geometry:
        orient = geoms[0][1]
        if any(not np.allclose(g[1], orient, atol=1e-4) for g in geoms):
            raise ImageReadError(
                f"{where}: slices have different ImageOrientationPatient; one volume per series"
            )
        row_dir, col_dir = orient[:3], orient[3:]
        normal = np.cross(row_dir, col_dir)
        positions = np.array([float(np.dot(g[0], normal)) for g in geoms])
        order = np.argsort(positions, kind="stable")
        steps = np.diff(positions[order])
        if len(steps) and steps.min() < 1e-3:
            k = int(np.argmin(steps))
            raise ImageReadError(
                f"{where}: two slices at the same position {positions[order][k]:.3f} mm along the normal "
                "(a second series or time point in the folder?); keep one series per folder"
            )
    else:
        row_dir, col_dir, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        order = np.arange(len(frames))
    spacing = geoms[0][2]
    shape = frames[0].shape
    if any(f.shape != shape for f in frames):
        raise ImageReadError(f"{where}: slices have different sizes; one volume per series")
    data = np.stack([frames[i] for i in order], axis=-1).transpose(1, 0, 2)  # [cols, rows, slices]
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # column index runs along the row direction
    affine[:3, 1] = col_dir * spacing[0]
    if have_geometry:
        first = geoms[order[0]][0]
        step = (geoms[order[-1]][0] - first) / (len(order) - 1) if len(order) > 1 else normal
        affine[:3, 2], affine[:3, 3] = step, first
    else:
        affine[:3, 2] = normal
    return _canonical(data.astype(np.float32), _LPS_TO_RAS @ affine)


def _read_dicom_multiframe(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    invert = _photometric(ds, path)
    check_pixel_count(declared_pixels(ds, path), path, "DICOM volume")
    arr = _pixels(ds, path)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n == 1:
        arr = arr[None]
    frames, geoms = [], []
    for i in range(n):
        slope, intercept = _rescale(ds, i)
        frames.append(arr[i].astype(np.float32) * np.float32(slope) + np.float32(intercept))
        geoms.append(_geometry(ds, i))
    data, affine = _assemble(frames, geoms, str(path))
    return data, affine, invert


def _inside_root(path: Path, root: Path | None) -> bool:
    if root is None:
        return True
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _read_dicom_series(folder: Path, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    pydicom = _pydicom()
    headers = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        if not _inside_root(f, root):
            raise ImageReadError(
                f"{f}: a symbolic link in the series folder leads outside the root {root}; copy the file "
                "into the folder or pass a --root that holds the link targets"
            )
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM (a README, a thumbnail): not part of the series
            continue
        headers.append((f, ds))
    if not headers:
        raise ImageReadError(
            f"{folder}: no DICOM files in this folder; a volume folder holds one DICOM series"
        )
    series: dict[str, list] = defaultdict(list)
    for f, ds in headers:
        series[str(ds.get("SeriesInstanceUID", ""))].append(f)
    if len(series) > 1:
        detail = ", ".join(f"{uid or '<none>'}: {len(v)} files" for uid, v in list(series.items())[:4])
        raise ImageReadError(
            f"{folder}: holds {len(series)} DICOM series ({detail}); put one series per folder"
        )
    if len(headers) == 1:
        f = headers[0][0]
        return _read_dicom_multiframe(read_dicom_header(f), f)
    total = sum(declared_pixels(ds, f, frames=1) for f, ds in headers if "Rows" in ds)
    check_pixel_count(total, folder, f"DICOM series of {len(headers)} files")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise ImageReadError(
            f"{folder}: mixes multi-frame files with other files; list multi-frame files on their own"
        )
    has_geometry = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in headers)
    if not has_geometry:
        headers.sort(key=lambda h: int(h[1].get("InstanceNumber", 0) or 0))
    from pydicom.pixels import apply_modality_lut

    frames, geoms, inverts = [], [], set()
    for f, _ in headers:
        ds = read_dicom_header(f, force=False)
        inverts.add(_photometric(ds, f))
        if "PixelData" not in ds:
            raise ImageReadError(
                f"{f}: DICOM file has no pixel data; keep only image files in a series folder"
            )
        frames.append(np.asarray(apply_modality_lut(_pixels(ds, f), ds), dtype=np.float32))
        geoms.append(_geometry(ds, None))
    data, affine = _assemble(frames, geoms, str(folder))
    return data, affine, inverts == {True}


def read_volume(
    path: str | os.PathLike, frame: int | None = None, *, root: str | os.PathLike | None = None
) -> Volume:
    """Read a NIfTI file, a DICOM series folder or a multi-frame DICOM file as a canonical RAS+ volume.

    Args:
        path: ``.nii``/``.nii.gz`` file, folder of one DICOM series, or a (multi-frame) DICOM file.
        frame: time point of a 4-D NIfTI file (required when it has more than one).
        root: when given, every file read (the files of a series folder included) must lie inside it
            once symbolic links are followed.

    Returns:
        The :class:`Volume` (see the module docstring for orientation and intensity conventions).

    Raises:
        ImageReadError: missing or unreadable file, a 4-D file without ``frame``, a folder with several
            series or duplicate slice positions, colour DICOM.
    """
    path = Path(path)
    if not _inside_root(path, root):
        raise ImageReadError(
            f"{path}: leads outside the root {root} (a symbolic link?); keep volumes under the root"
        )
    if path.is_dir():
        data, affine, invert = _read_dicom_series(path, None if root is None else Path(root))
    elif not path.is_file():
        raise ImageReadError(f"{path}: no such file or folder; check the path and the manifest root")
    elif _is_nifti(path):
        data, affine = _read_nifti(path, frame)
        invert = False
    else:
        _pydicom()
        try:
            ds = read_dicom_header(path, force=False)
        except ImageReadError as e:
            if "decompression bomb" in str(e):
                raise
            raise ImageReadError(
                f"{path}: not a volume; expected a .nii/.nii.gz file, a DICOM series folder or a multi-frame DICOM"
            ) from None
        if "PixelData" not in ds:
            raise ImageReadError(f"{path}: DICOM file has no pixel data (not an image object)")
        data, affine, invert = _read_dicom_multiframe(ds, path)
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32), affine=affine, source=str(path), invert=invert
    )


def read_label_volume(
    path: str | os.PathLike, like: Volume, frame: int | None = None, *, root: str | os.PathLike | None = None
) -> np.ndarray:
    """Read a label volume and check that it lies on the voxel grid of ``like``.

    Args:
        path: NIfTI file, DICOM series folder or multi-frame DICOM of integer labels.
        like: the image volume it annotates.
        frame: time point of a 4-D label file.
        root: see :func:`read_volume`.

    Returns:
        int64 [X, Y, Z] labels in the same canonical orientation as ``like.data``.

    Raises:
        ImageReadError: unreadable, on another grid (shape or affine), negative or fractional labels.
    """
    lab = read_volume(path, frame, root=root)
    if lab.shape != like.shape or not np.allclose(lab.affine, like.affine, atol=1e-3):
        raise ImageReadError(
            f"{path}: label volume grid {lab.shape} does not match the image {like.source} {like.shape} "
            "(shape or affine differ); resample the labels onto the image grid"
        )
    data = lab.data
    if not np.isfinite(data).all() or (data != np.round(data)).any() or data.min(initial=0) < 0:
        raise ImageReadError(f"{path}: labels must be integers >= 0 (0 background, k structure k)")
    return data.astype(np.int64)


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


# ------------------------------------------------------------------------------------------ the manifest


@dataclass
class VolumesResult:
    """What :func:`expand_volumes` wrote.

    Attributes:
        manifest: path of the slice manifest.
        n_volumes: volumes expanded.
        n_slices: slice rows written.
        volumes: per volume: ``{"id", "source", "shape", "slices", "window"}``.
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
        ManifestError: invalid manifest, missing volumes, reserved ``meta_volume``/``meta_slice`` columns.
        ImageReadError: a volume or label volume that cannot be read (the file is named).
    """
    if axis not in AXES:
        raise FeatcacheError(f"--axis {axis}: use 0 (sagittal), 1 (coronal) or 2 (axial)")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise FeatcacheError(f"--every {every!r}: must be a positive integer")
    win = parse_window(window)
    m = read_manifest(manifest, root, check_files=False)
    clash = [k for k in ("meta_volume", "meta_slice") if k in m.meta]
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
        volumes.append(
            {
                "id": vid,
                "source": vol.source,
                "shape": list(vol.shape),
                "slices": len(indices),
                "window": win.describe() if win.kind == "fixed" else f"{win.describe()}: {lo:g}..{hi:g}",
            }
        )
    path = write_manifest(out / "manifest.csv", dict(cols))
    return VolumesResult(manifest=path, n_volumes=len(m), n_slices=len(cols["id"]), volumes=volumes)
