"""Image readers and the preprocessing that turns a decoded image into a model input.

Reading (:func:`read_image`, :func:`read_mask`) is numpy only; :class:`Preprocess` builds the
torch tensor a backbone consumes.

Intensity conventions of :func:`read_image` (the output is always float32 in [0, 1]):

* 8-bit PNG/JPEG/TIFF: ``value / 255``. 16-bit (PIL modes ``I;16``, ``I;16B``, ...): ``value / 65535``,
  never clipped or quantised to 8 bit; a 12- or 15-bit image stored in 16 bits therefore keeps its
  stored range (e.g. up to 4095 / 65535) rather than being stretched, so every image of a dataset
  is scaled the same way. 32-bit integer images (mode ``I``) holding values in [0, 65535] are treated
  as 16 bit (some decoders widen 16-bit data to ``I``); other integer and float images are min-max
  scaled, float images already in [0, 1] are kept as they are.
* Alpha (RGBA, LA, palette transparency) is dropped, not composited: the stored colour is kept.
  Palette images are converted to RGB. 16-bit colour PNGs are reduced to 8 bit by Pillow.
* DICOM: Modality LUT (rescale slope/intercept), then the VOI LUT or the first Window Center/Width
  when present, scaled by the output range of that VOI transform (so a window is honoured exactly);
  otherwise the min-max of the image. MONOCHROME1 is inverted so bone is bright as in MONOCHROME2.
  RGB/YBR become RGB, palette colour goes through its LUT. Enhanced (multi-frame) objects take
  rescale and window from their functional groups. Multi-frame files need ``frame=``; volumes are
  read elsewhere.

:class:`Preprocess` (the model input) lives in :mod:`featcache.store.preprocess`, re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featcache.decode.common import frame_count_error, minmax
from featcache.decode.dicom import check_pixel_count
from featcache.errors import ImageReadError
from featcache.urls import UrlPath, is_url

__all__ = [
    "check_header",
    "is_dicom",
    "read_image",
    "read_mask",
]

_DICOM_SUFFIXES = (".dcm", ".dicom")


# --------------------------------------------------------------------------------------------- reading


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm``/``.dicom`` suffix or ``DICM`` at byte 128.

    Args:
        path: file to test (it is opened only when the suffix does not decide).

    Returns:
        True for a DICOM file by suffix or magic number; False otherwise or when unreadable.
    """
    path = Path(path)
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Decode one image file into float32 intensities in [0, 1].

    PNG, JPEG, TIFF (8 and 16 bit, grayscale, RGB, RGBA, LA, palette) through Pillow; DICOM (by
    suffix or magic number) through pydicom, with the transfer syntaxes its installed decoders
    support. See the module docstring for the intensity conventions.

    Args:
        path: image file.
        frame: frame of a multi-frame DICOM or page of a multi-page TIFF (0-based). Required for
            files with several frames; ``None`` or ``0`` for single-frame files.

    Returns:
        float32 [H, W] for grayscale, float32 [H, W, 3] (RGB) for colour, values in [0, 1].

    Raises:
        ImageReadError: the file is missing, not an image, truncated, has several frames and no
            ``frame``, or uses a DICOM transfer syntax no installed decoder handles (the message
            names the file and what to install or do).
    """
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise ImageReadError(f"{path}: frame must be an integer index, got {frame!r}")
    if is_url(path):
        return _read_url(path if isinstance(path, UrlPath) else UrlPath(str(path)), frame)
    path = _check_file(path)
    try:
        if is_dicom(path):
            from featcache.decode.dicom import read_dicom

            return read_dicom(path, frame)
        return _read_pil(path, frame)
    except ImageReadError:
        raise
    except Exception as e:  # a decoder bug: one line with fixed words, never the decoder's text
        raise ImageReadError(f"{path}: cannot decode ({_one_line(e)})") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a segmentation mask stored as an integer label map (PNG, TIFF; not JPEG).

    Convention: 0 is background and k > 0 is structure k. A binary mask stored as 0/255 (or
    0/65535 in 16 bit) reads as 0/1; other values are returned as stored. Palette images give their
    palette indices (the usual way label maps are saved); grayscale-looking RGB(A) masks give their
    first channel; alpha is ignored.

    Args:
        path: mask file.

    Returns:
        int64 [H, W] label map.

    Raises:
        ImageReadError: missing or undecodable file, lossy (JPEG) or colour-coded mask, negative or
            fractional labels.
    """
    from PIL import Image

    path = _check_file(path)
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                raise ImageReadError(f"{path}: JPEG is lossy and blurs label boundaries; save masks as PNG")
            if getattr(im, "n_frames", 1) > 1:
                raise ImageReadError(f"{path}: mask has {im.n_frames} frames; save one label map per file")
            check_pixel_count(im.size[0] * im.size[1] * len(im.getbands()), path)
            im.load()
            arr = _mask_array(im, path)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{path}: cannot decode mask ({_one_line(e)})") from None
    values = np.unique(arr)
    if values.size and values[0] < 0:
        raise ImageReadError(
            f"{path}: mask has negative label {values[0]}; labels must be 0 (background) or k > 0"
        )
    for full in (255, 65535):
        if values[-1:].tolist() == [full] and set(values.tolist()) <= {0, full}:
            return (arr == full).astype(np.int64)
    return arr


def check_header(path: str | Path) -> None:
    """Check a file as far as possible without decoding its pixels (what ``featcache check`` runs).

    Refuses what :func:`read_image` would refuse from the header alone: a missing, empty or folder
    path, an unrecognised format, several frames, more pixels than the decode limit
    (``featcache.decode.dicom.max_pixels``), a DICOM file without pixel data or with corrupt geometry. PNG
    files also have their chunk checksums verified, which finds truncated and damaged files.

    Args:
        path: image (or mask) file.

    Raises:
        ImageReadError: naming the file and what is wrong.
    """
    path = _check_file(path)
    if is_dicom(path):
        from featcache.decode.dicom import declared_pixels, read_dicom_header

        ds = read_dicom_header(path)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageReadError(f"{path}: DICOM file has no pixel data (not an image object)")
        n = declared_pixels(ds, path, frames=None) // max(1, declared_pixels(ds, path, frames=1))
        err = frame_count_error(path, n, None)
        if err is not None:
            raise err
        check_pixel_count(declared_pixels(ds, path, frames=1), path)
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            err = frame_count_error(path, getattr(im, "n_frames", 1), None)
            if err is not None:
                raise err
            check_pixel_count(im.size[0] * im.size[1] * len(im.getbands()), path)
            if im.format == "PNG":
                im.verify()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a recognised image (expected PNG, JPEG, TIFF or DICOM)") from None
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"{path}: declares more pixels than Pillow's limit (a possible decompression bomb); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from None
    except Exception as e:
        raise ImageReadError(f"{path}: cannot decode ({_one_line(e)})") from None


def _read_url(url: UrlPath, frame: int | None) -> np.ndarray:
    """Decode an image on an fsspec URL: its bytes are fetched whole, PIL decodes them from memory;
    DICOM goes through a private temporary file (pydicom's deferred reads need a seekable file)."""
    import io

    try:
        fs, where = url.fs()
        data = fs.cat_file(where)
    except FileNotFoundError:
        raise ImageReadError(f"{url}: no such file; check the path and the manifest root") from None
    except Exception as e:
        raise ImageReadError(
            f"{url}: cannot be read ({type(e).__name__}); check the URL and --storage-options"
        ) from None
    if not data:
        raise ImageReadError(f"{url}: empty file (0 bytes); the copy or upload did not finish")
    try:
        if url.suffix.lower() in _DICOM_SUFFIXES or data[128:132] == b"DICM":
            import tempfile

            from featcache.decode.dicom import read_dicom

            with tempfile.TemporaryDirectory(prefix="featcache-dicom-") as tmp:
                local = Path(tmp) / "image.dcm"
                local.write_bytes(data)
                try:
                    return read_dicom(local, frame)
                except ImageReadError as e:
                    raise ImageReadError(str(e).replace(str(local), str(url))) from None
        return _read_pil(io.BytesIO(data), frame, name=url)
    except ImageReadError:
        raise
    except Exception as e:  # a decoder bug: one line with fixed words, never the decoder's text
        raise ImageReadError(f"{url}: cannot decode ({_one_line(e)})") from None


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file (DICOM series are read as volumes)")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file; check the path and the manifest root")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageReadError(f"{path}: cannot be read ({type(e).__name__}); check its permissions") from None
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); the copy or download did not finish")
    return path


def _one_line(e: BaseException) -> str:
    """A fixed description of a decoder failure: never the decoder's text, which may quote file content."""
    text = str(e).lower()
    if "truncat" in text or isinstance(e, EOFError):
        what = "truncated file"
    elif isinstance(e, MemoryError):
        what = "out of memory"
    else:
        what = "corrupt or unsupported image data"
    return f"{type(e).__name__}: {what}"


def _read_pil(source: Path | Any, frame: int | None, name: str | None = None) -> np.ndarray:
    """Decode with Pillow from a file or a file-like ``source``; messages name ``name`` (default: the file)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = name if name is not None else source
    try:
        with Image.open(source) as im:
            err = frame_count_error(path, getattr(im, "n_frames", 1), frame)
            if err is not None:
                raise err
            check_pixel_count(im.size[0] * im.size[1] * len(im.getbands()), path)
            if frame:
                im.seek(frame)
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: store pixels the way they display
                im = ImageOps.exif_transpose(im)
            return _pil_to_float(im, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageReadError(f"{path}: not a recognised image (expected PNG, JPEG, TIFF or DICOM)") from e
    except Image.DecompressionBombError:
        raise ImageReadError(
            f"{path}: declares more pixels than Pillow's limit (a possible decompression bomb); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from None
    except Exception as e:
        raise ImageReadError(f"{path}: cannot decode ({_one_line(e)})") from None


def _pil_to_float(im: Any, path: Path) -> np.ndarray:
    mode = im.mode
    if mode == "1":
        return np.asarray(im, dtype=np.float32)
    if mode == "L":
        return np.asarray(im, dtype=np.float32) / 255.0
    if mode == "LA":
        return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
    if mode.startswith("I;16"):
        arr = np.asarray(im)
        if arr.dtype.kind == "u":
            return arr.astype(np.float32) / 65535.0
        return minmax(arr.astype(np.float64))
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.float32) / 65535.0
        return minmax(arr.astype(np.float64))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: float image contains NaN or infinite values")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.array(arr, dtype=np.float32)
        return minmax(arr.astype(np.float64))
    if mode in ("RGBA", "RGBX"):
        return np.asarray(im, dtype=np.float32)[..., :3] / 255.0
    if mode != "RGB":
        im = im.convert("RGB")  # palette (P, PA), CMYK, YCbCr, LAB, HSV, RGBa
    return np.asarray(im, dtype=np.float32) / 255.0


def _mask_array(im: Any, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("LA", "PA"):
        arr = np.asarray(im)[..., 0]
    elif mode in ("RGB", "RGBA", "RGBX"):
        rgb = np.asarray(im)[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise ImageReadError(
                f"{path}: colour-coded mask; save an integer label map (0 background, k structure k) "
                "as a grayscale or palette PNG"
            )
        arr = rgb[..., 0]
    elif mode in ("1", "L", "P", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im)
    else:
        raise ImageReadError(f"{path}: unsupported mask mode {mode}; save a grayscale or palette PNG")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ImageReadError(f"{path}: mask has fractional labels; labels must be integers")
    return arr.astype(np.int64)


# ------------------------------------------------------------------------------------------ preprocess
