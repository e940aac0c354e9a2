"""Reading 3D volumes: NIfTI files, DICOM series folders and multi-frame DICOM, in canonical RAS+.

The conventions (orientation, series ordering, modality LUT, MONOCHROME1) are those described in
:mod:`featcache.datasets.volumes`, which re-exports :class:`Volume`, :func:`read_volume` and
:func:`read_label_volume`; this module only reads and reorients, it writes nothing. DICOM pixels and
modality values come from the one DICOM path, :func:`featcache.decode.dicom.decode_pixels` and
:func:`featcache.decode.dicom.modality_values` (the same checks and errors as 2-D images).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.dicom import (
    _pi_text,
    check_pixel_count,
    declared_pixels,
    decode_pixels,
    frame_group,
    has_pixel_data,
    modality_values,
    photometric,
    read_dicom_header,
)
from featcache.errors import FeatcacheError, ImageReadError

__all__ = ["Volume", "read_label_volume", "read_volume", "voxel_spacing"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def _geometry(ds: Any, index: int | None) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(ImagePositionPatient [3] or None, ImageOrientationPatient [6] or None, PixelSpacing [2])."""
    pos = orient = None
    spacing = None
    if index is not None:
        g = frame_group(ds, index, "PlanePositionSequence")
        if g is not None and "ImagePositionPatient" in g:
            pos = np.array(g.ImagePositionPatient, dtype=np.float64)
        g = frame_group(ds, index, "PlaneOrientationSequence")
        if g is not None and "ImageOrientationPatient" in g:
            orient = np.array(g.ImageOrientationPatient, dtype=np.float64)
        g = frame_group(ds, index, "PixelMeasuresSequence")
        if g is not None and "PixelSpacing" in g:
            spacing = np.array(g.PixelSpacing, dtype=np.float64)
    if pos is None and "ImagePositionPatient" in ds:
        pos = np.array(ds.ImagePositionPatient, dtype=np.float64)
    if orient is None and "ImageOrientationPatient" in ds:
        orient = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    if spacing is None:
        spacing = np.array(ds.get("PixelSpacing", [1.0, 1.0]), dtype=np.float64)
    return pos, orient, spacing


def _photometric(ds: Any, path: Path) -> bool:
    pi = photometric(ds)
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
    arr = decode_pixels(ds, path, what="DICOM volume")
    if arr.ndim == 2:  # a single-frame file
        arr = arr[None]
    frames, geoms = [], []
    for i in range(arr.shape[0]):
        frames.append(np.asarray(modality_values(arr[i], ds, i, path=path), dtype=np.float32))
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
    frames, geoms, inverts = [], [], set()
    for f, _ in headers:
        ds = read_dicom_header(f, force=False)
        inverts.add(_photometric(ds, f))
        if not has_pixel_data(ds):
            raise ImageReadError(
                f"{f}: DICOM file has no pixel data; keep only image files in a series folder"
            )
        frames.append(np.asarray(modality_values(decode_pixels(ds, f), ds, 0, path=f), dtype=np.float32))
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
        if not has_pixel_data(ds):
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


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """The voxel size along each voxel axis of a volume: the norms of the affine's first three columns.

    Args:
        affine: float64 [4, 4] voxel index -> RAS millimetres (a :class:`Volume`'s ``affine``).

    Returns:
        float64 [3] mm between consecutive indices along voxel axes 0, 1, 2 (for a DICOM series:
        the PixelSpacing of the columns and rows, and the mean step between slice positions).
    """
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
