"""DICOM decoding for :func:`featcache.decode.images.read_image`, and the limits every DICOM reader obeys.

Decompression bombs. Pillow refuses PNG/JPEG/TIFF files whose declared size is absurd; pydicom does
not. Every DICOM reader of featcache (2-D images here, series and multi-frame volumes in
``featcache.datasets.volumes``) first reads the header only (pixel data deferred) and refuses a file whose
declared size, ``Rows x Columns x SamplesPerPixel x frames decoded``, exceeds :func:`max_pixels`
values, before any pixel data is inflated or decoded. The limit is ``FEATCACHE_MAX_PIXELS`` when that
environment variable is set (a positive integer), else :data:`MAX_PIXELS` (module setting, default
178,956,970 = Pillow's error threshold, ``2 * PIL.Image.MAX_IMAGE_PIXELS``: a 4096 x 5120
mammogram has 21M, a 512 x 512 x 600 CT series 157M). Deflated-syntax files (the whole data set is
zlib-compressed, so pydicom inflates it in one piece) are first inflated chunk by chunk into
nothing, and refused when they grow beyond 4 bytes per allowed value plus 64 MiB.

Failure reasons. Messages name the file and say what went wrong in fixed words (exception type, the
numbers of the geometry); they never quote header text or decoder messages, which may carry patient
data (PatientName, PatientID ...) into stored failure reasons and logs.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.common import frame_count_error, minmax
from featcache.errors import ImageReadError

__all__ = ["MAX_PIXELS", "check_pixel_count", "declared_pixels", "max_pixels", "read_dicom_header"]

MAX_PIXELS = 178_956_970
_ENV = "FEATCACHE_MAX_PIXELS"
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# pydicom converts YBR_FULL(_422) to RGB; JPEG 2000 decoders undo the YBR_ICT/YBR_RCT transform.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_KNOWN_PI = (
    *_MONOCHROME,
    *_COLOUR,
    "PALETTE COLOR",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
    "HSV",
    "ARGB",
    "CMYK",
)
# pip names of pydicom's decoding plugins where they differ from the import name.
_PIP_NAMES = {"gdcm": "python-gdcm"}
_DEFLATE_SLACK = 64 << 20
_BITS = (1, 8, 16, 32, 64)


def max_pixels() -> int:
    """The largest number of decoded values (rows x columns x samples x frames) a DICOM read accepts.

    Returns:
        ``FEATCACHE_MAX_PIXELS`` when set, else :data:`MAX_PIXELS`.

    Raises:
        ImageReadError: ``FEATCACHE_MAX_PIXELS`` is set but not a positive integer.
    """
    text = os.environ.get(_ENV, "").strip()
    if not text:
        return int(MAX_PIXELS)
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ImageReadError(f"{_ENV}={text!r}: must be a positive integer (decoded values per file)")
    return value


def _int(ds: Any, keyword: str, default: int, where: Path) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ImageReadError(f"{where}: DICOM {keyword} is not an integer; the header is corrupt") from None


def declared_pixels(ds: Any, where: Path, frames: int | None = None) -> int:
    """Decoded values a header declares: Rows x Columns x SamplesPerPixel x frames.

    Args:
        ds: a pydicom data set (pixel data need not be loaded).
        where: file named in errors.
        frames: frames to count (default: NumberOfFrames, 1 when absent).

    Returns:
        The count (int).

    Raises:
        ImageReadError: a dimension is missing, negative or not an integer, or BitsAllocated is not
            1, 8, 16, 32 or 64.
    """
    rows, cols = _int(ds, "Rows", 0, where), _int(ds, "Columns", 0, where)
    samples = _int(ds, "SamplesPerPixel", 1, where)
    n = (_int(ds, "NumberOfFrames", 1, where) or 1) if frames is None else frames
    if rows <= 0 or cols <= 0 or samples <= 0 or n <= 0:
        raise ImageReadError(
            f"{where}: DICOM header declares an empty or negative size ({rows} x {cols}, {samples} samples, "
            f"{n} frames); the file is corrupt or not an image"
        )
    bits = _int(ds, "BitsAllocated", 0, where) if "PixelData" in ds else 32
    if bits not in _BITS:
        raise ImageReadError(
            f"{where}: DICOM BitsAllocated {bits} is not one of 1, 8, 16, 32, 64; the header is corrupt"
        )
    return rows * cols * samples * n


def check_pixel_count(count: int, where: Path | str, what: str = "file") -> None:
    """Refuse a read that would decode more than :func:`max_pixels` values.

    Raises:
        ImageReadError: naming ``where``, the count, the limit and how to raise it.
    """
    limit = max_pixels()
    if count > limit:
        raise ImageReadError(
            f"{where}: {what} declares {count:,} pixel values, above the limit of {limit:,} (a possible "
            f"decompression bomb); if the file is trusted, raise the limit with {_ENV}=<values>"
        )


def _deflated_size_guard(path: Path) -> None:
    """Inflate a deflated-syntax file into nothing; refuse it when it grows past the limit."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    cap = 4 * max_pixels() + _DEFLATE_SLACK
    try:
        with open(path, "rb") as f:
            read_preamble(f, False)
            _read_file_meta_info(f)
            inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
            while chunk := f.read(1 << 20):
                total += len(inflate.decompress(chunk, cap + 1 - total))
                while inflate.unconsumed_tail and total <= cap:
                    total += len(inflate.decompress(inflate.unconsumed_tail, cap + 1 - total))
                if total > cap:
                    raise ImageReadError(
                        f"{path}: deflated file inflates beyond {cap:,} bytes, more than {max_pixels():,} pixel "
                        f"values can need (a possible decompression bomb); if the file is trusted, raise the "
                        f"limit with {_ENV}=<values>"
                    )
    except ImageReadError:
        raise
    except (zlib.error, pydicom.errors.InvalidDicomError, OSError, ValueError) as e:
        raise ImageReadError(f"{path}: not a readable deflated DICOM file ({type(e).__name__})") from None


def read_dicom_header(path: Path, *, force: bool = True) -> Any:
    """Read a DICOM file with its pixel data deferred (read from disk only when it is decoded).

    Args:
        path: the file.
        force: read files without the ``DICM`` preamble too.

    Returns:
        The pydicom ``Dataset``.

    Raises:
        ImageReadError: not readable as DICOM, or a deflated file that inflates past the limit.
    """
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        deflated = meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian
    except Exception:
        deflated = False
    if deflated:
        _deflated_size_guard(path)
    try:
        return pydicom.dcmread(path, force=force, defer_size="256 KB")
    except Exception as e:
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(e).__name__})") from None


def _pi_text(pi: str) -> str:
    """The photometric interpretation if it is a defined term, else a fixed word (never header text)."""
    return pi if pi in _KNOWN_PI else "an undefined photometric interpretation"


def _ts_text(ts: Any) -> str:
    if ts.name != str(ts):
        return f"'{ts.name}' ({ts})"
    return f"'{ts}'" if re.fullmatch(r"[0-9.]{1,64}", str(ts)) else "an unknown transfer syntax"


def read_dicom(path: Path, frame: int | None) -> np.ndarray:
    """Decode one DICOM image (see :func:`featcache.decode.images.read_image` for the conventions)."""

    try:
        import pydicom
        from pydicom.pixels import get_decoder
    except ImportError as e:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom; pip install 'featcache[dicom]'") from e
    ds = read_dicom_header(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(f"{path}: DICOM file has no pixel data (not an image object)")

    meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # Files without a meta header (old ACR-NEMA style): take the encoding the parser found.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        )
        ds.file_meta = meta
    ts = meta.TransferSyntaxUID
    ts_text = _ts_text(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise ImageReadError(
            f"{path}: transfer syntax {ts_text} cannot be decoded by pydicom; convert the file to an "
            "uncompressed syntax (e.g. gdcmconv --raw, dcmdjpeg)"
        ) from e
    if not decoder.is_available:
        raise ImageReadError(
            f"{path}: no decoder installed for transfer syntax {ts_text}; {_install_hint(decoder)}"
        )

    n = _int(ds, "NumberOfFrames", 1, path) or 1
    err = frame_count_error(path, n, frame)
    if err is not None:
        raise err
    check_pixel_count(declared_pixels(ds, path, frames=1), path)
    index = frame or 0
    try:
        if n > 1:
            ds.pixel_array_options(index=index)
        arr = ds.pixel_array
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot decode pixel data in {ts_text} ({type(e).__name__}: truncated or corrupt "
            "pixel data, or a header that does not match it)"
        ) from None

    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if pi in _MONOCHROME and arr.ndim == 2:
            return _dicom_gray(arr, ds, index, invert=pi == "MONOCHROME1")
        if pi in _COLOUR and arr.ndim == 3 and arr.shape[-1] == 3:
            bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
            return np.clip(arr.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)
        if pi == "PALETTE COLOR" and arr.ndim == 2:
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(arr, ds)
            return rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot apply the DICOM intensity transforms ({type(e).__name__}: malformed rescale, "
            "window or lookup table attributes)"
        ) from None
    raise ImageReadError(
        f"{path}: unsupported photometric interpretation {_pi_text(pi)} with pixel array shape {arr.shape}"
    )


def _install_hint(decoder: Any) -> str:
    options = []
    for line in decoder.missing_dependencies:
        label, _, needs = line.partition(" - requires ")
        if not needs:
            continue
        pkgs = [
            _PIP_NAMES.get(re.split(r"[<>=]", p)[0].strip(), p.strip()) for p in re.split(r",| and ", needs)
        ]
        options.append("pip install " + " ".join(f"'{p}'" for p in pkgs if p and p != "numpy"))
    if not options:
        return "no pydicom decoding plugin supports it here; convert the file to an uncompressed syntax"
    return "install one of: " + "; ".join(options)


def _use_frame_groups(ds: Any, index: int) -> None:
    """Copy rescale and window attributes of an enhanced multi-frame object to the top level."""
    items = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        items.append(per_frame[index])  # per-frame values override shared ones
    for item in items:
        for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            seq = item.get(keyword)
            if seq:
                for elem in seq[0]:
                    ds[elem.tag] = elem


def _dicom_gray(arr: np.ndarray, ds: Any, index: int, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    _use_frame_groups(ds, index)
    x = apply_modality_lut(arr, ds)
    lo = hi = None
    voi_seq = ds.get("VOILUTSequence")
    has_lut = bool(voi_seq) and "LUTDescriptor" in voi_seq[0] and "LUTData" in voi_seq[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut:
        if x.dtype.kind == "f" and (x == np.round(x)).all():
            x = x.astype(np.int64)  # a VOI LUT indexes by integer value
        first, n_entries = int(voi_seq[0].LUTDescriptor[1]), int(voi_seq[0].LUTDescriptor[0]) or 2**16
        lut = apply_voi(np.arange(first, first + n_entries), ds)
        x, lo, hi = apply_voi(x, ds), float(lut.min()), float(lut.max())
    elif has_window:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                ends = apply_windowing(np.array([-np.inf, np.inf]), ds)
            x, lo, hi = apply_windowing(x, ds), float(ends[0]), float(ends[1])
        except ValueError:
            lo = hi = None  # an invalid window (width < 1, unknown function): fall back to min-max
    x = np.asarray(x, dtype=np.float64)
    if lo is None or hi is None or not hi > lo:
        out = minmax(x)
    else:
        out = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return 1.0 - out if invert else out
