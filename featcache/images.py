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

Defaults of :class:`Preprocess`, chosen for chest X-rays:

* ``resize="squash"``: chest radiographs are close to square (NIH 1:1, CheXpert and MIMIC about
  0.8:1), so squashing distorts anatomy by at most ~20% while keeping every pixel. ``letterbox``
  avoids distortion but adds black padding whose patch tokens enter the pooled (mean) feature, and
  the padded fraction varies with the aspect ratio, which tracks site and view (AP/PA), a confounder
  for probes. ``crop`` cuts the costophrenic angles and apices, where effusions and pneumothoraces
  show. Use ``letterbox`` for strongly non-square images (e.g. mammography, long-leg films).
* ``interpolation="bicubic"``: the DINOv2/DINOv3 evaluation transforms resize with bicubic
  interpolation; antialiasing on downsampling matches PIL (and torchvision on PIL images) to ~1e-5.
* ``mean``/``std``: the ImageNet statistics that DINOv2, DINOv3 and most ImageNet backbones were
  trained with; the model registry overrides them per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from featcache.dicom import check_pixel_count
from featcache.errors import FeatcacheError, ImageReadError
from featcache.store_io import UrlPath, is_url

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "Preprocess",
    "check_header",
    "is_dicom",
    "read_image",
    "read_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("squash", "letterbox", "crop")
INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")
_INTERPOLATION_ALIASES = {"box": "area"}
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
            from featcache.dicom import read_dicom

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
    (``featcache.dicom.max_pixels``), a DICOM file without pixel data or with corrupt geometry. PNG
    files also have their chunk checksums verified, which finds truncated and damaged files.

    Args:
        path: image (or mask) file.

    Raises:
        ImageReadError: naming the file and what is wrong.
    """
    path = _check_file(path)
    if is_dicom(path):
        from featcache.dicom import declared_pixels, read_dicom_header

        ds = read_dicom_header(path)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageReadError(f"{path}: DICOM file has no pixel data (not an image object)")
        n = declared_pixels(ds, path, frames=None) // max(1, declared_pixels(ds, path, frames=1))
        err = _frame_count_error(path, n, None)
        if err is not None:
            raise err
        check_pixel_count(declared_pixels(ds, path, frames=1), path)
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            err = _frame_count_error(path, getattr(im, "n_frames", 1), None)
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

            from featcache.dicom import read_dicom

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


def _frame_count_error(path: Path, n: int, frame: int | None) -> ImageReadError | None:
    if frame is None:
        if n > 1:
            return ImageReadError(
                f"{path}: has {n} frames; extraction reads single images: expand a multi-frame DICOM with "
                "`featcache volumes`, or save the frames as separate files (read_image(path, frame=i) reads one)"
            )
        return None
    if not 0 <= frame < n:
        return ImageReadError(f"{path}: frame {frame} is out of range; the file has {n} frame(s)")
    return None


def _read_pil(source: Path | Any, frame: int | None, name: str | None = None) -> np.ndarray:
    """Decode with Pillow from a file or a file-like ``source``; messages name ``name`` (default: the file)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = name if name is not None else source
    try:
        with Image.open(source) as im:
            err = _frame_count_error(path, getattr(im, "n_frames", 1), frame)
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
        return _minmax(arr.astype(np.float64))
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.float32) / 65535.0
        return _minmax(arr.astype(np.float64))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{path}: float image contains NaN or infinite values")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.array(arr, dtype=np.float32)
        return _minmax(arr.astype(np.float64))
    if mode in ("RGBA", "RGBX"):
        return np.asarray(im, dtype=np.float32)[..., :3] / 255.0
    if mode != "RGB":
        im = im.convert("RGB")  # palette (P, PA), CMYK, YCbCr, LAB, HSV, RGBa
    return np.asarray(im, dtype=np.float32) / 255.0


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


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


PIPELINE: dict[str, str] = {
    "decode": "float32 in [0, 1]: 8-bit / 255, 16-bit / 65535, DICOM after rescale and window; "
    "grayscale kept as one channel",
    "resize": "channels-first float32 in [0, 1]: bicubic/bilinear by torch.nn.functional.interpolate("
    "align_corners=False, antialias=True); area: overlap-weighted mean; nearest: pixel-centre "
    "floor((i + 0.5) * n_in / n_out); squash to res x res, letterbox long side / crop short side to res "
    "(round half up), centred, an odd remainder after",
    "clamp": "to [0, 1] after the resize",
    "pad": "0.0 (letterbox), before normalisation",
    "channels": "one channel replicated to 3 after the resize",
    "normalize": "(x - mean) / std per channel, float32",
}
"""The fixed steps of :class:`Preprocess`, recorded with every set's preprocessing settings."""


@dataclass(frozen=True)
class Preprocess:
    """Resize and normalise a decoded image into a model input.

    Geometry (``resize``): ``squash`` resizes to ``res`` x ``res`` ignoring the aspect ratio;
    ``letterbox`` keeps the aspect ratio (long side = ``res``) and pads the short side
    symmetrically with 0 (black, before normalisation; an odd remainder goes after the image);
    ``crop`` resizes the short side to ``res`` and crops the centre. Downsampling is antialiased
    (bicubic and bilinear match PIL); ``area`` averages source pixels weighted by their overlap
    with each output pixel;
    ``nearest`` takes the source pixel whose centre is nearest (pixel-centre convention). Values are
    clamped to [0, 1] after resizing (bicubic overshoots), then ``(x - mean) / std`` per channel.

    Attributes:
        res: output side in pixels (> 0).
        resize: ``squash`` (default), ``letterbox`` or ``crop``.
        interpolation: ``bicubic`` (default), ``bilinear``, ``area`` (alias ``box``) or ``nearest``.
        mean: per-channel mean (R, G, B) subtracted after scaling to [0, 1].
        std: per-channel standard deviation (R, G, B), each > 0.
    """

    res: int
    resize: str = "squash"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.res, bool) or not isinstance(self.res, (int, np.integer)) or self.res <= 0:
            raise FeatcacheError(f"resolution must be a positive integer, got {self.res!r}")
        object.__setattr__(self, "res", int(self.res))
        if self.resize not in RESIZE_MODES:
            raise FeatcacheError(
                f"unknown resize mode {self.resize!r}; choose one of {', '.join(RESIZE_MODES)}"
            )
        interpolation = _INTERPOLATION_ALIASES.get(self.interpolation, self.interpolation)
        if interpolation not in INTERPOLATIONS:
            raise FeatcacheError(
                f"unknown interpolation {self.interpolation!r}; choose one of {', '.join(INTERPOLATIONS)} "
                "(box = area)"
            )
        object.__setattr__(self, "interpolation", interpolation)
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise FeatcacheError(
                    f"{name} must be 3 finite numbers (R, G, B), got {getattr(self, name)!r}"
                )
            if name == "std" and min(values) <= 0:
                raise FeatcacheError(f"std must be > 0 for every channel, got {values}")
            object.__setattr__(self, name, values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-ready data (stored as provenance in the feature store).

        The record is complete enough to rebuild the model input without featcache: besides the
        settings it states the value domain and every fixed step (``PIPELINE``), so a reader can
        follow it with torch alone (``tests/test_provenance.py`` does, bit for bit).

        Returns:
            ``{"res", "resize", "interpolation", "mean", "std", "pipeline"}`` with lists for mean and
            std; ``pipeline`` is ``PIPELINE`` (fixed text, checked on reading).
        """
        return {
            "res": self.res,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "pipeline": dict(PIPELINE),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Rebuild a :class:`Preprocess` from :meth:`to_dict` output.

        Args:
            data: mapping with ``res`` and optionally ``resize``, ``interpolation``, ``mean``, ``std``.

        Returns:
            The equal :class:`Preprocess`.

        Raises:
            FeatcacheError: unknown or missing keys, or invalid values.
        """
        fields = ("res", "resize", "interpolation", "mean", "std")
        unknown = sorted(set(data) - set(fields) - {"pipeline"})
        if unknown:
            raise FeatcacheError(f"unknown preprocessing keys {unknown}; expected {', '.join(fields)}")
        if "res" not in data:
            raise FeatcacheError("preprocessing settings lack 'res'")
        if "pipeline" in data and dict(data["pipeline"]) != PIPELINE:  # older stores have none
            raise FeatcacheError(
                "the recorded preprocessing pipeline differs from this featcache's; extract with the "
                f"featcache version that made the set (recorded: {data['pipeline']})"
            )
        return cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in data.items() if k in fields})

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Where an image of ``height`` x ``width`` lands in the ``res`` x ``res`` output.

        The image is resized to ``(h, w)`` and placed with its top-left corner at ``(top, left)``
        of the output: positive offsets are letterbox padding, negative ones are cropped away.

        Args:
            height: input rows.
            width: input columns.

        Returns:
            ``(h, w, top, left)``.
        """
        res = self.res
        if self.resize == "squash":
            return res, res, 0, 0
        ref = max(height, width) if self.resize == "letterbox" else min(height, width)
        h = res if height == ref else max(1, math.floor(height * res / ref + 0.5))
        w = res if width == ref else max(1, math.floor(width * res / ref + 0.5))
        # Letterbox pads and crop trims symmetrically; an odd remainder goes after the image.
        top = (res - h) // 2 if h <= res else -((h - res) // 2)
        left = (res - w) // 2 if w <= res else -((w - res) // 2)
        return h, w, top, left

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Turn a decoded image into a normalised model input.

        Args:
            image: float32 [H, W] (grayscale) or [H, W, 3] (RGB) in [0, 1], as from
                :func:`read_image`; uint8 and uint16 arrays are scaled by 255 / 65535 first.

        Returns:
            float32 tensor [3, res, res]; grayscale is replicated to 3 channels.

        Raises:
            FeatcacheError: the array is not [H, W], [H, W, 1] or [H, W, 3].
        """
        import torch

        arr = _as_float(image)
        chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr[None]))
        h, w, top, left = self.geometry(arr.shape[0], arr.shape[1])
        chw = self._resize(chw, h, w).clamp_(0.0, 1.0)
        chw = _place(chw, self.res, top, left, fill=0.0)
        if chw.shape[0] == 1:
            chw = chw.expand(3, -1, -1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((chw - mean) / std).contiguous()

    def transform_mask(self, mask: np.ndarray) -> np.ndarray:
        """Apply the same geometry to a label map, by nearest neighbour, so it aligns with the image.

        Padding (letterbox) is labelled 0 (background).

        Args:
            mask: integer or bool [H, W] label map, e.g. from :func:`read_mask`.

        Returns:
            [res, res] label map of the same dtype.

        Raises:
            FeatcacheError: the mask is not 2-D.
        """
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.size == 0:
            raise FeatcacheError(f"a mask must be a non-empty [H, W] array, got shape {mask.shape}")
        h, w, top, left = self.geometry(*mask.shape)
        resized = mask[np.ix_(_nearest_index(mask.shape[0], h), _nearest_index(mask.shape[1], w))]
        out = np.zeros((self.res, self.res), dtype=mask.dtype)
        (oy, sy, ny), (ox, sx, nx) = _overlap(top, h, self.res), _overlap(left, w, self.res)
        out[oy : oy + ny, ox : ox + nx] = resized[sy : sy + ny, sx : sx + nx]
        return out

    def _resize(self, chw: torch.Tensor, h: int, w: int) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if chw.shape[1:] == (h, w):
            return chw.clone()
        if self.interpolation == "nearest":
            rows = torch.from_numpy(_nearest_index(chw.shape[1], h))
            cols = torch.from_numpy(_nearest_index(chw.shape[2], w))
            return chw.index_select(1, rows).index_select(2, cols)
        if self.interpolation == "area":
            # torch's "area" is adaptive pooling and PIL's BOX weighs by pixel centres; both differ
            # from an overlap-weighted average when the scale is not an integer.
            return torch.from_numpy(_area_resize(_area_resize(chw.numpy(), h, axis=1), w, axis=2))
        return F.interpolate(
            chw[None], size=(h, w), mode=self.interpolation, align_corners=False, antialias=True
        )[0]


def _as_float(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or arr.size == 0:
        raise FeatcacheError(f"expected an image [H, W] or [H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32, copy=False)


def _area_resize(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resize one axis by averaging source pixels weighted by their overlap with each output pixel."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    # Integral of the piecewise-constant signal at integer positions 0..n_in, linear in between.
    cum = np.cumsum(x, axis=axis, dtype=np.float64)
    cum = np.concatenate([np.zeros_like(np.take(cum, [0], axis=axis)), cum], axis=axis)
    edges = np.arange(n_out + 1) * (n_in / n_out)
    k = np.minimum(np.floor(edges).astype(np.int64), n_in - 1)
    frac = (edges - k).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    lo, hi = np.take(cum, k, axis=axis), np.take(cum, k + 1, axis=axis)
    at_edges = lo + frac * (hi - lo)
    return (np.diff(at_edges, axis=axis) * (n_out / n_in)).astype(np.float32)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: the pixel whose centre is nearest (as PIL's NEAREST)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _overlap(offset: int, size: int, res: int) -> tuple[int, int, int]:
    """(start in output, start in source, length) of a source of ``size`` placed at ``offset``."""
    out_start, src_start = max(offset, 0), max(-offset, 0)
    return out_start, src_start, min(size - src_start, res - out_start)


def _place(chw: torch.Tensor, res: int, top: int, left: int, fill: float) -> torch.Tensor:
    if chw.shape[1:] == (res, res) and top == 0 and left == 0:
        return chw
    import torch

    out = torch.full((chw.shape[0], res, res), fill, dtype=chw.dtype)
    (oy, sy, ny), (ox, sx, nx) = _overlap(top, chw.shape[1], res), _overlap(left, chw.shape[2], res)
    out[:, oy : oy + ny, ox : ox + nx] = chw[:, sy : sy + ny, sx : sx + nx]
    return out
