"""The preprocessing that turns a decoded image into a model input (:class:`Preprocess`).

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
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "PIPELINE", "RESIZE_MODES", "Preprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("squash", "letterbox", "crop")
INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")
_INTERPOLATION_ALIASES = {"box": "area"}


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
        resized = mask[np.ix_(nearest_index(mask.shape[0], h), nearest_index(mask.shape[1], w))]
        out = np.zeros((self.res, self.res), dtype=mask.dtype)
        (oy, sy, ny), (ox, sx, nx) = _overlap(top, h, self.res), _overlap(left, w, self.res)
        out[oy : oy + ny, ox : ox + nx] = resized[sy : sy + ny, sx : sx + nx]
        return out


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel: the pixel whose centre is nearest (as PIL's NEAREST)."""
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _overlap(offset: int, size: int, res: int) -> tuple[int, int, int]:
    """(start in output, start in source, length) of a source of ``size`` placed at ``offset``."""
    out_start, src_start = max(offset, 0), max(-offset, 0)
    return out_start, src_start, min(size - src_start, res - out_start)
