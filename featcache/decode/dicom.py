"""The one DICOM decoding path: 2-D images for :func:`featcache.decode.images.read_image`, and the pixels
and modality values of series and multi-frame volumes for :mod:`featcache.decode.volume`.

Every reader goes through :func:`decode_pixels` (pixel data present, transfer syntax decodable here, the
pixel limit below, one frame or all frames) and :func:`modality_values` (modality LUT or rescale, taken
per frame from the functional groups of enhanced multi-frame objects: the frame's own
PerFrameFunctionalGroupsSequence item, then the SharedFunctionalGroupsSequence, then the top level; the
data set is never changed, so one frame's values never leak into another). 2-D reads then apply the
frame's VOI LUT or window (FrameVOILUTSequence per frame) to reach [0, 1]; volumes keep modality units.

Decompression bombs. Pillow refuses PNG/JPEG/TIFF files whose declared size is absurd; pydicom does
not. Every DICOM reader of featcache (2-D images here, series and multi-frame volumes in
``featcache.decode.volume``) first reads the header only (pixel data deferred) and refuses a file whose
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

import copy
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.common import frame_count_error, minmax
from featcache.errors import ImageReadError

__all__ = [
    "MAX_PIXELS",
    "check_pixel_count",
    "declared_pixels",
    "decode_pixels",
    "frame_group",
    "frame_view",
    "has_pixel_data",
    "max_pixels",
    "modality_values",
    "photometric",
    "read_dicom_header",
]

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
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Functional groups whose attributes stand in for the top-level ones for one frame.
_FRAME_VALUE_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


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


def has_pixel_data(ds: Any) -> bool:
    """True when the data set holds (integer or float) pixel data, i.e. is an image object."""
    return any(k in ds for k in _PIXEL_KEYWORDS)


def photometric(ds: Any) -> str:
    """The PhotometricInterpretation, stripped and upper-case (MONOCHROME2 when absent)."""
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()


def _transfer_syntax(ds: Any) -> Any:
    """The data set's transfer syntax; for files without a meta header, the encoding the parser found."""
    import pydicom

    meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        # Files without a meta header (old ACR-NEMA style): pixel decoding needs the syntax recorded.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
        )
        ds.file_meta = meta
    return meta.TransferSyntaxUID


def decode_pixels(
    ds: Any, path: Path, frame: int | None = None, *, single: bool = False, what: str = "file"
) -> np.ndarray:
    """Decode the stored pixel values of a DICOM data set: one frame, or all of them.

    Checks, in this order, that the data set has pixel data, that pydicom can decode its transfer
    syntax and a decoding plugin for it is installed, that ``frame`` exists, and that the values to
    decode stay within :func:`max_pixels`; only then is pixel data read.

    Args:
        ds: the data set from :func:`read_dicom_header`.
        path: file named in errors.
        frame: the frame to decode (0-based); None decodes every frame.
        single: the caller reads single images: a multi-frame file without ``frame`` is refused.
        what: how the limit error names what is read ("file", "DICOM volume").

    Returns:
        Stored values as pydicom decodes them (YBR converted to RGB): [R, C] or [R, C, S] for one frame
        or a single-frame file, [N, R, C] or [N, R, C, S] for all frames of a multi-frame file.

    Raises:
        ImageReadError: one line naming the file; never quotes header text or decoder messages.
    """
    from pydicom.pixels import get_decoder

    if not has_pixel_data(ds):
        raise ImageReadError(f"{path}: DICOM file has no pixel data (not an image object)")
    ts = _transfer_syntax(ds)
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
    if single or frame is not None:
        err = frame_count_error(path, n, frame)
        if err is not None:
            raise err
    one = frame is not None or single
    check_pixel_count(declared_pixels(ds, path, frames=1 if one else None), path, what)
    try:
        if frame is not None and n > 1:
            ds.pixel_array_options(index=frame)
        return ds.pixel_array
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot decode pixel data in {ts_text} ({type(e).__name__}: truncated or corrupt "
            "pixel data, or a header that does not match it)"
        ) from None


def _group_items(ds: Any, index: int | None, keyword: str) -> list[Any]:
    """The first items of functional group ``keyword`` that apply to a frame: shared, then the frame's."""
    groups = [(ds.get("SharedFunctionalGroupsSequence") or [None])[0]]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index is not None and 0 <= index < len(per_frame):
        groups.append(per_frame[index])
    return [inner[0] for g in groups if g is not None and (inner := g.get(keyword))]


def frame_group(ds: Any, index: int | None, keyword: str) -> Any | None:
    """The first item of functional group ``keyword`` (e.g. ``"PlanePositionSequence"``) for a frame.

    The frame's own (PerFrameFunctionalGroupsSequence item ``index``, 0-based), else the shared one
    (``index`` None: the shared one only); None when neither has it.
    """
    items = _group_items(ds, index, keyword)
    return items[-1] if items else None


def frame_view(ds: Any, index: int | None) -> Any:
    """The data set as one frame sees it: the attributes of its rescale and VOI functional groups on top.

    Each attribute of the frame's PixelValueTransformationSequence / FrameVOILUTSequence item overrides
    the shared group's, which overrides the top level's. ``ds`` is not changed: the view is a copy with
    its own element table (``copy.copy`` alone would share it), so frames never see each other's values.

    Returns:
        ``ds`` itself when no functional group applies, else the view (for pydicom's LUT functions).
    """
    items = [item for keyword in _FRAME_VALUE_GROUPS for item in _group_items(ds, index, keyword)]
    if not items:
        return ds
    view = copy.copy(ds)
    view._dict = dict(ds._dict)
    # shared items come before the frame's within each group, so the frame's values win
    for item in items:
        for elem in item:
            view[elem.tag] = elem
    return view


def _transform_error(path: Path | str, e: Exception) -> ImageReadError:
    return ImageReadError(
        f"{path}: cannot apply the DICOM intensity transforms ({type(e).__name__}: malformed rescale, "
        "window or lookup table attributes)"
    )


def modality_values(
    arr: np.ndarray, ds: Any, index: int | None = None, *, path: Path | str = "DICOM file"
) -> np.ndarray:
    """Stored values of one frame to modality values (HU for CT): the modality LUT, else slope/intercept.

    Args:
        arr: the frame's stored values ([R, C]), as :func:`decode_pixels` returns them.
        ds: its data set.
        index: the frame's 0-based index in a multi-frame file (its functional groups apply, see
            :func:`frame_view`); None uses the shared group and top level only.
        path: file named in errors.

    Returns:
        float64 when rescaled (both RescaleSlope and RescaleIntercept present), the LUT's integer type
        for a modality LUT, else ``arr`` unchanged.

    Raises:
        ImageReadError: malformed rescale or LUT attributes.
    """
    from pydicom.pixels import apply_modality_lut

    try:
        return apply_modality_lut(arr, frame_view(ds, index))
    except Exception as e:
        raise _transform_error(path, e) from None


def read_dicom(path: Path, frame: int | None) -> np.ndarray:
    """Decode one DICOM image (see :func:`featcache.decode.images.read_image` for the conventions)."""

    try:
        import pydicom  # noqa: F401
    except ImportError as e:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom; pip install 'featcache[dicom]'") from e
    ds = read_dicom_header(path)
    arr = decode_pixels(ds, path, frame, single=True)
    index = frame or 0
    pi = photometric(ds)
    try:
        if pi in _MONOCHROME and arr.ndim == 2:
            return _dicom_gray(arr, ds, index, path, invert=pi == "MONOCHROME1")
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
        raise _transform_error(path, e) from None
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


def _dicom_gray(arr: np.ndarray, ds: Any, index: int, path: Path, invert: bool) -> np.ndarray:
    from pydicom.pixels import apply_voi, apply_windowing

    x = modality_values(arr, ds, index, path=path)
    ds = frame_view(ds, index)  # the frame's VOI LUT or window
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
