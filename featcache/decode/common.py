"""Small pieces the decoders share (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.errors import ImageReadError


def frame_count_error(path: Path, n: int, frame: int | None) -> ImageReadError | None:
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


def minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)
