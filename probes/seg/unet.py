"""Segmentation from the patch tokens of several transformer layers: the choice of layers, and a U-Net-style decoder.

Token sources (:func:`resolve_layers`). The store keeps the last layer's patch tokens as ``patch``
(float16 [N, h, w, D]) and, when extracted with intermediate layers, ``layer_patch`` (float16
[N, L, h, w, D], the model layer indices in ``attrs["layers"]``, the order of the array, shallow to
deep). ``--layers`` picks from them: ``last`` (default: ``patch``), ``lastN`` (the N deepest stored
layers of ``layer_patch``, ``last4`` as in the DINOv2-radiology U-Net), or model layer indices
``"4,8,11"`` (a negative number is a position among the stored layers, ``-1`` the deepest). Several
layers are given to a head as one array [n, L, h, w, D] in the stored order; the ``linear`` and
``conv`` heads concatenate them channel-wise (L*D channels, the DINOv2 multi-layer linear head),
the ``unet`` head keeps them apart.

U-Net-style decoder (``head="unet"``), after the decoder of the DINOv2-radiology study
(MohammedSB/DINOv2ForRadiology, ``dinov2/eval/segmentation/utils.py``: ``UNetDecoder``): the
deepest layer's map, projected by a 1x1 conv (+ ReLU) to ``hidden`` channels, goes through
``stages`` up-blocks; each block upsamples x2 with a 2x2 transposed conv (stride 2), halving the
channels (at least 16), and concatenates a skip: the sum of 1x1-conv projections (+ ReLU) of its
layers' token maps, bilinearly upsampled to the block's grid (``align_corners=False``), followed by
a 3x3 conv, BatchNorm and ReLU; a final 1x1 conv gives the class logits at ``2**stages`` times the
token grid. The layers are dealt to the blocks deepest first, in ``stages`` contiguous groups
(``numpy.array_split``): with four layers and four stages block k takes the k-th deepest layer, as in
the study (its first block's skip is the deepest layer itself); with four layers and two stages
each block sums two; with one layer the first block takes it and the others have no skip (a
progressive-upsampling decoder). Where we differ from the study: skips are projected by 1x1 convs
to the block's width (theirs: 3x3 conv + BatchNorm + ReLU from the full embedding dimension),
widths start at ``hidden`` (theirs: D/2, D/4, D/8 from the embedding dimension D), and the default
is two stages (4x the token grid; theirs: four, 16x), so it trains on CPU from the cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featcache.errors import FeatcacheError, StoreError
from featcache.store.feature_store import FeatureSet

__all__ = ["LayerChoice", "build_unet", "resolve_layers"]

_LAST_N = re.compile(r"^last(\d+)$")


@dataclass(frozen=True)
class LayerChoice:
    """The token array and layers a segmentation head reads.

    Attributes:
        array: ``patch`` (float16 [N, h, w, D]) or ``layer_patch`` (float16 [N, L, h, w, D]).
        positions: indices along ``layer_patch``'s layer axis (ascending), or None for ``patch``.
        layers: the model layer indices (``["last"]`` for ``patch``).
        features: the ``features`` field of result rows, e.g. ``patch`` or ``layer_patch:8,9,10,11``.
    """

    array: str
    positions: tuple[int, ...] | None
    layers: tuple
    features: str


def resolve_layers(fs: FeatureSet, layers: str | Sequence[int] | None = None) -> LayerChoice:
    """Resolve a ``--layers`` value against a feature set (see the module docstring).

    Args:
        fs: the feature set.
        layers: None or ``last``; ``lastN``; model layer indices as ``"4,8,11"`` or a list of ints.

    Returns:
        A :class:`LayerChoice`.

    Raises:
        StoreError: the tokens asked for are not stored (the error says what is).
        FeatcacheError: a malformed value or a layer named twice.
    """
    arrays = fs.arrays()
    if layers is None or (isinstance(layers, str) and layers.strip() in ("", "last")):
        if "patch" not in arrays or len(fs.shape("patch")) != 4:
            raise StoreError(
                f"{fs.name}: no patch tokens 'patch' [N, h, w, D] stored (arrays: {', '.join(arrays)}); "
                "extract with --tokens cls,pooled,patch"
                + (" or pick stored layers with --layers last4" if "layer_patch" in arrays else "")
            )
        return LayerChoice("patch", None, ("last",), "patch")
    if "layer_patch" not in arrays or len(fs.shape("layer_patch")) != 5:
        raise StoreError(
            f"{fs.name}: --layers {layers!r} needs multi-layer patch tokens 'layer_patch' [N, L, h, w, D] "
            f"(arrays: {', '.join(arrays)}); re-extract with intermediate layers and patch tokens, "
            "or use --layers last"
        )
    n_stored = fs.shape("layer_patch")[1]
    stored = list(fs.record.layers)
    if len(stored) != n_stored:
        raise StoreError(
            f"{fs.name}: attrs['layers'] lists {len(stored)} layers but layer_patch holds {n_stored}; "
            "the set is inconsistent, re-extract it"
        )
    text = layers.strip() if isinstance(layers, str) else None
    m = _LAST_N.match(text) if text is not None else None
    if m:
        n = int(m.group(1))
        if not 1 <= n <= n_stored:
            raise FeatcacheError(
                f"--layers {text}: the set stores {n_stored} layers ({stored}); use last1..last{n_stored}"
            )
        positions = list(range(n_stored - n, n_stored))
    else:
        try:
            wanted = [int(v) for v in text.split(",")] if text is not None else [int(v) for v in layers]
        except (TypeError, ValueError):
            raise FeatcacheError(
                f"--layers {layers!r}: use last, lastN (e.g. last4) or layer indices such as 8,9,10,11"
            ) from None
        positions = []
        for k in wanted:
            if k in stored:
                positions.append(stored.index(k))
            elif -n_stored <= k < 0:
                positions.append(n_stored + k)
            else:
                raise StoreError(
                    f"{fs.name}: layer {k} is not stored (stored layers: {stored}); use one of those, a "
                    "negative position such as -1, or re-extract with --layers"
                )
        if len(set(positions)) != len(positions):
            raise FeatcacheError(f"--layers {layers!r} names a stored layer twice")
        positions.sort()
    chosen = tuple(stored[p] for p in positions)
    return LayerChoice("layer_patch", tuple(positions), chosen, "layer_patch:" + ",".join(map(str, chosen)))


def _unet_groups(n_layers: int, stages: int) -> list[list[int]]:
    """Layer positions (0 = shallowest) feeding each up-block, deepest first."""
    return [[int(i) for i in g] for g in np.array_split(np.arange(n_layers)[::-1], stages)]


def build_unet(dim: int, n_layers: int, n_classes: int, hidden: int = 128, stages: int = 2):
    """The U-Net-style decoder of the module docstring (a ``torch.nn.Module``).

    Args:
        dim: D, channels of one layer's token map.
        n_layers: L; the module's input is float32 [b, L*D, h, w], the layers' maps side by side in
            stored order (shallow to deep).
        n_classes: K + 1 output logits.
        hidden: channels after the first projection; halved by every block, at least 16.
        stages: x2 up-blocks; the logits come out at ``2**stages`` times the token grid.

    Returns:
        The module; ``forward(x [b, L*D, h, w]) -> logits [b, K + 1, 2**stages * h, 2**stages * w]``.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class _UpBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, n_skip: int):
            super().__init__()
            self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
            self.skips = nn.ModuleList([nn.Conv2d(dim, c_out, kernel_size=1) for _ in range(n_skip)])
            self.fuse = nn.Sequential(
                nn.Conv2d(c_out * (2 if n_skip else 1), c_out, kernel_size=3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            )

        def forward(self, x, maps):
            x = self.up(x)
            if len(self.skips):
                s = F.relu(sum(conv(m) for conv, m in zip(self.skips, maps)))
                s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
                x = torch.cat([x, s], dim=1)
            return self.fuse(x)

    class UNetDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dim, self.groups = dim, _unet_groups(n_layers, stages)
            widths = [max(16, hidden // 2**s) for s in range(stages + 1)]
            self.stem = nn.Sequential(nn.Conv2d(dim, widths[0], kernel_size=1), nn.ReLU())
            self.blocks = nn.ModuleList(
                [_UpBlock(widths[s], widths[s + 1], len(self.groups[s])) for s in range(stages)]
            )
            self.out = nn.Conv2d(widths[-1], n_classes, kernel_size=1)

        def forward(self, x):
            maps = torch.split(x, self.dim, dim=1)
            y = self.stem(maps[-1])
            for block, group in zip(self.blocks, self.groups):
                y = block(y, [maps[i] for i in group])
            return self.out(y)

    if stages < 1 or n_layers < 1:
        raise FeatcacheError(f"the U-Net decoder needs stages >= 1 and a layer; got {stages}, {n_layers}")
    return UNetDecoder()
