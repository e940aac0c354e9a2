"""The torch half of preprocessing: a decoded image to the model input that a set records.

:class:`featcache.store.preprocess.Preprocess` holds the settings, their geometry and the mask
transform (numpy, read by the probes); :func:`model_input` follows them with torch, step by step as
``PIPELINE`` states (resize in float32 [0, 1], antialiased; clamp; pad; channels; normalise).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featcache.errors import FeatcacheError
from featcache.store.preprocess import Preprocess, _overlap, nearest_index

__all__ = ["model_input"]


def model_input(pre: Preprocess, image: np.ndarray) -> torch.Tensor:
    """Turn a decoded image into a normalised model input, as ``pre`` records it (``PIPELINE``).

    Args:
        pre: the preprocessing settings.
        image: float32 [H, W] (grayscale) or [H, W, 3] (RGB) in [0, 1], as from
            :func:`read_image`; uint8 and uint16 arrays are scaled by 255 / 65535 first.

    Returns:
        float32 tensor [3, res, res]; grayscale is replicated to 3 channels.

    Raises:
        FeatcacheError: the array is not [H, W], [H, W, 1] or [H, W, 3].
    """
    arr = _as_float(image)
    chw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0) if arr.ndim == 3 else arr[None]))
    h, w, top, left = pre.geometry(arr.shape[0], arr.shape[1])
    chw = _resize(chw, h, w, pre.interpolation).clamp_(0.0, 1.0)
    chw = _place(chw, pre.res, top, left, fill=0.0)
    if chw.shape[0] == 1:
        chw = chw.expand(3, -1, -1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)
    return ((chw - mean) / std).contiguous()


def _resize(chw: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    if chw.shape[1:] == (h, w):
        return chw.clone()
    if interpolation == "nearest":
        rows = torch.from_numpy(nearest_index(chw.shape[1], h))
        cols = torch.from_numpy(nearest_index(chw.shape[2], w))
        return chw.index_select(1, rows).index_select(2, cols)
    if interpolation == "area":
        # torch's "area" is adaptive pooling and PIL's BOX weighs by pixel centres; both differ
        # from an overlap-weighted average when the scale is not an integer.
        return torch.from_numpy(_area_resize(_area_resize(chw.numpy(), h, axis=1), w, axis=2))
    return F.interpolate(chw[None], size=(h, w), mode=interpolation, align_corners=False, antialias=True)[0]


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


def _place(chw: torch.Tensor, res: int, top: int, left: int, fill: float) -> torch.Tensor:
    if chw.shape[1:] == (res, res) and top == 0 and left == 0:
        return chw
    out = torch.full((chw.shape[0], res, res), fill, dtype=chw.dtype)
    (oy, sy, ny), (ox, sx, nx) = _overlap(top, chw.shape[1], res), _overlap(left, chw.shape[2], res)
    out[:, oy : oy + ny, ox : ox + nx] = chw[:, sy : sy + ny, sx : sx + nx]
    return out
