"""Segmentation probes on cached patch tokens: a linear or light conv head, Dice/Jaccard/HD95 with CIs.

Targets. Masks come from the manifest's ``mask`` column (stored in the feature set, relative to its
root). A mask is an integer label map read by :func:`featcache.images.read_mask`: 0 background,
k > 0 structure k (a binary 0/255 mask reads as 0/1), of any size. It is put through the exact
geometry of the extraction (:meth:`featcache.images.Preprocess.transform_mask`, nearest neighbour,
letterbox padding = background) so it lines up with the patch grid, giving a ``res`` x ``res`` map.
Structures are named by ``structures`` (``lung,heart`` names labels 1, 2), else ``structure_1``...

Heads (trained with torch on CPU, from the cache; ``import probes.seg`` itself does not import torch):

- ``linear``: a 1x1 convolution over standardised patch tokens (the DINOv2 linear segmentation
  protocol): one logit per class (background + K structures) per token, upsampled bilinearly.
- ``conv``: a light decoder: 1x1 conv to ``hidden`` channels, then two (x2 bilinear upsample,
  3x3 conv, GELU) stages and a 1x1 conv to the class logits, upsampled bilinearly.

Both minimise pixel-wise cross-entropy between the bilinearly upsampled logits and the masks with
AdamW mini-batches; ``torch.manual_seed(random_state)``, a seeded shuffling generator and
``torch.use_deterministic_algorithms`` make a fit repeatable. The loss and the validation Dice
used for early stopping are computed at ``train_scale`` times the token grid (at most ``res``),
which keeps training cheap; the head with the best validation Dice is kept (at equal Dice, the one
with the lower validation cross-entropy), and training stops after ``patience`` epochs without
improvement of either.

Scoring. Test predictions are upsampled to ``res`` x ``res`` (the model input geometry) and scored
there against the transformed masks, image by image:

- ``dice`` = 2|P∩T| / (|P| + |T|), ``jaccard`` = |P∩T| / |P∪T|, ``dice_jaccard_mean`` their average
  (the segmentation metric of the DINOv2 radiology study), ``hd95`` in pixels at ``res``: the larger
  of the two directed 95th percentiles of boundary-to-boundary distances (boundary pixels are
  those with a 4-neighbour outside the structure or on the image edge; Euclidean distances from
  ``scipy.ndimage.distance_transform_edt``; percentiles as ``np.percentile``).
- A structure absent from both prediction and target is undefined for all metrics (NaN), so
  images without the structure do not inflate the mean; absent from one only gives Dice = Jaccard
  = 0 and HD95 = NaN (no boundary to measure from). Undefined values are left out of means.
- A structure's value is the mean over test images; ``label="mean"`` is the mean over structures.
  CIs resample patients (:func:`probes.stats.bootstrap_ci`), like the other probes.

The ``seg-baseline`` rows score the mean training mask: the per-pixel average of the transformed
training masks, thresholded at 0.5 (arg-max over background and structures, ties to the
structure, for several structures). A probe that does not beat it has learned nothing beyond
where the structure usually is.

Patch tokens are read shard by shard: the train and validation tokens are held in memory when
they fit in ``max_memory_mb``, otherwise each epoch streams them from the store; test tokens are
always read and scored one shard at a time.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.base import BaseEstimator

from featcache.errors import FeatcacheError, StoreError
from featcache.images import Preprocess, read_mask
from featcache.store import FeatureSet, FeatureStore

from .data import SPLITS, carve_val
from .results import append_jsonl, make_rows
from .stats import bootstrap_ci

__all__ = [
    "HEADS",
    "SEG_METRICS",
    "SegProbe",
    "StoreTokens",
    "dice",
    "hd95",
    "jaccard",
    "mean_mask_baseline",
    "run_seg",
    "seg_metrics",
]

HEADS = ("linear", "conv")
SEG_METRICS = ("dice", "jaccard", "dice_jaccard_mean", "hd95")
_CROSS = ndimage.generate_binary_structure(2, 1)
_ARRAY_BLOCK = 256  # rows per shuffled piece of an in-memory token array


# ---------------------------------------------------------------------------------------------- metrics


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and target must be 2-D masks of one shape, got {p.shape} and {t.shape}")
    return p, t


def dice(pred, target) -> float:
    """Dice coefficient 2|P∩T| / (|P| + |T|) of two binary masks.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.

    Returns:
        Dice in [0, 1]; NaN when both masks are empty (undefined, left out of means).
    """
    p, t = _pair(pred, target)
    total = int(p.sum()) + int(t.sum())
    return float("nan") if total == 0 else 2.0 * int((p & t).sum()) / total


def jaccard(pred, target) -> float:
    """Jaccard index (IoU) |P∩T| / |P∪T| of two binary masks.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.

    Returns:
        Jaccard in [0, 1]; NaN when both masks are empty.
    """
    p, t = _pair(pred, target)
    union = int((p | t).sum())
    return float("nan") if union == 0 else int((p & t).sum()) / union


def _boundary(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def hd95(pred, target) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the boundaries of two masks, in pixels.

    The larger of the two directed distances: the 95th percentile (``np.percentile``, linear) over
    the boundary pixels of one mask of the Euclidean distance to the nearest boundary pixel of the
    other. Boundary pixels have a 4-neighbour outside the mask or lie on the image edge.

    Args:
        pred: bool [H, W] predicted structure.
        target: bool [H, W] true structure.

    Returns:
        The distance (float, pixels); NaN when either mask is empty.
    """
    p, t = _pair(pred, target)
    if not p.any() or not t.any():
        return float("nan")
    bp, bt = _boundary(p), _boundary(t)
    to_t = ndimage.distance_transform_edt(~bt)[bp]
    to_p = ndimage.distance_transform_edt(~bp)[bt]
    return float(max(np.percentile(to_t, 95), np.percentile(to_p, 95)))


def seg_metrics(pred, target, n_structures: int) -> dict[str, np.ndarray]:
    """Every segmentation metric of every structure of every image.

    Args:
        pred: int [n, H, W] predicted label maps (0 background, k structure k).
        target: int [n, H, W] true label maps.
        n_structures: K; structures 1..K are scored.

    Returns:
        ``{metric: float64 [n, K]}`` for ``dice``, ``jaccard``, ``dice_jaccard_mean``, ``hd95``
        (NaN where undefined, see the module docstring).
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must be [n, H, W] of one shape, got {pred.shape} and {target.shape}"
        )
    n = len(pred)
    out = {m: np.full((n, n_structures), np.nan) for m in SEG_METRICS}
    for i in range(n):
        for k in range(1, n_structures + 1):
            p, t = pred[i] == k, target[i] == k
            out["dice"][i, k - 1] = dice(p, t)
            out["jaccard"][i, k - 1] = jaccard(p, t)
            out["hd95"][i, k - 1] = hd95(p, t)
    out["dice_jaccard_mean"] = (out["dice"] + out["jaccard"]) / 2
    return out


def _nanmean(values: np.ndarray, axis=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is undefined, not an error
        return np.nanmean(values, axis=axis)


def _per_structure(values: np.ndarray, _unused=None) -> np.ndarray:
    return _nanmean(np.asarray(values, dtype=np.float64), axis=0)


def _over_structures(values: np.ndarray, _unused=None) -> float:
    return float(_nanmean(_per_structure(values)))


# ------------------------------------------------------------------------------------------ token sources


class StoreTokens:
    """Patch tokens of chosen rows of a feature set, read one shard at a time, never all at once.

    Args:
        fs: the feature set.
        rows: int64 [n] row indices (the order defines positions 0..n-1).
        name: the token array (``patch``: float16 [N, h, w, D]).

    Attributes:
        shape: ``(n, h, w, D)``.
    """

    def __init__(self, fs: FeatureSet, rows: np.ndarray, name: str = "patch"):
        self.fs, self.name = fs, name
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *fs.shape(name)[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions int64 [b], tokens float16 [b, h, w, D])`` shard by shard.

        Args:
            rng: when given, shards come in a random order and rows in random order within each.
        """
        shard_of = self.rows // self.fs.shard_rows
        shards = np.unique(shard_of)
        if rng is not None:
            shards = rng.permutation(shards)
        for s in shards:
            pos = np.flatnonzero(shard_of == s)
            order = np.argsort(self.rows[pos], kind="stable")
            pos = pos[order]
            block = self.fs.read(self.name, self.rows[pos])
            if rng is not None:
                perm = rng.permutation(len(pos))
                pos, block = pos[perm], block[perm]
            yield pos, block


class _ArrayTokens:
    """An in-memory [n, h, w, D] array with the ``blocks`` interface of :class:`StoreTokens`."""

    def __init__(self, X: np.ndarray):
        self.X = X
        self.shape = X.shape

    def __len__(self) -> int:
        return len(self.X)

    def blocks(self, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if rng is None:
            yield np.arange(len(self.X)), self.X
            return
        order = rng.permutation(len(self.X))
        for j in range(0, len(order), _ARRAY_BLOCK):  # a shuffled copy in pieces, not all at once
            pos = order[j : j + _ARRAY_BLOCK]
            yield pos, self.X[pos]


def _as_source(X):
    if hasattr(X, "blocks") and hasattr(X, "shape"):  # StoreTokens or any source with that interface
        return X
    X = np.asarray(X)
    if X.ndim != 4:
        raise FeatcacheError(f"patch tokens must be [n, h, w, D], got shape {X.shape}")
    return _ArrayTokens(X)


# ------------------------------------------------------------------------------------------------ heads


def _build_head(head: str, dim: int, n_classes: int, hidden: int):
    import torch.nn as nn

    if head == "linear":
        return nn.Conv2d(dim, n_classes, kernel_size=1)
    c1, c2 = hidden, max(8, hidden // 2)
    return nn.Sequential(
        nn.Conv2d(dim, c1, kernel_size=1),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.GELU(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(c2, c2, kernel_size=3, padding=1),
        nn.GELU(),
        nn.Conv2d(c2, n_classes, kernel_size=1),
    )


class _Deterministic:
    """Turn on torch's deterministic algorithms for a block of code, then restore the setting."""

    def __enter__(self):
        import torch

        self.saved = torch.are_deterministic_algorithms_enabled()
        self.saved_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc):
        import torch

        torch.use_deterministic_algorithms(self.saved, warn_only=self.saved_warn)


def _resolved_lr(head: str, lr: float | None) -> float:
    return float(lr) if lr is not None else (1e-2 if head == "linear" else 1e-3)


class SegProbe(BaseEstimator):
    """A segmentation head on frozen patch tokens (see the module docstring).

    Args:
        head: ``linear`` (1x1 conv) or ``conv`` (light decoder).
        epochs: maximum passes over the training images.
        lr: AdamW learning rate (None: 1e-2 for ``linear``, 1e-3 for ``conv``).
        weight_decay: AdamW weight decay.
        batch_size: images per optimisation step.
        patience: epochs without a better validation Dice before training stops (early stopping).
        hidden: channels of the ``conv`` decoder.
        random_state: seed of the initialisation and of the shuffling.

    Attributes:
        n_classes_: int, background + K structures.
        mean_, std_: float32 [D], token standardisation fitted on the training tokens.
        state_: dict of numpy arrays, the head's weights (best validation Dice).
        best_epoch_: int, the 1-based epoch whose weights were kept.
        epochs_run_: int, epochs trained before stopping.
        val_dice_: list of float, validation Dice after each epoch (empty without validation).

    Example:
        >>> probe = SegProbe(head="linear").fit(X_train, Y_train, X_val, Y_val)
        >>> labels = probe.predict(X_test, size=224)       # int64 [n, 224, 224]
    """

    def __init__(
        self,
        head: str = "linear",
        epochs: int = 100,
        lr: float | None = None,
        weight_decay: float = 1e-4,
        batch_size: int = 16,
        patience: int = 10,
        hidden: int = 128,
        random_state: int = 0,
    ):
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.hidden = hidden
        self.random_state = random_state

    # ---- fitting ----

    def _check_params(self) -> None:
        if self.head not in HEADS:
            raise FeatcacheError(f"--head {self.head!r}: choose one of {', '.join(HEADS)}")
        for name in ("epochs", "batch_size", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise FeatcacheError(f"{name} must be a positive integer, got {v!r}")

    def _standardiser(self, source) -> tuple[np.ndarray, np.ndarray]:
        d = source.shape[-1]
        s1, s2, count = np.zeros(d), np.zeros(d), 0
        for _, block in source.blocks():
            flat = block.reshape(-1, d).astype(np.float64)
            s1 += flat.sum(axis=0)
            s2 += np.einsum("ij,ij->j", flat, flat)
            count += len(flat)
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
        std[std < 1e-6] = 1.0  # a constant channel carries nothing; keep it finite
        return mean.astype(np.float32), std.astype(np.float32)

    def _tensor(self, block: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        x = (x - torch.from_numpy(self.mean_)) / torch.from_numpy(self.std_)
        return x.permute(0, 3, 1, 2).contiguous()

    def fit(self, X, Y, X_val=None, Y_val=None) -> SegProbe:
        """Train the head, keeping the weights with the best validation Dice.

        Args:
            X: patch tokens float16/float32 [n, h, w, D]: an array, a :class:`StoreTokens`, or any object
                with ``shape`` and ``blocks(rng)`` like it (e.g. tokens computed on the fly).
            Y: int [n, S, S] training label maps at the loss resolution S (0 background, k structure k).
            X_val: validation tokens [m, h, w, D], or None (train for ``epochs``, keep the last weights).
            Y_val: int [m, S', S'] validation label maps.

        Returns:
            self.
        """
        import torch
        import torch.nn.functional as F

        self._check_params()
        src = _as_source(X)
        Y = np.asarray(Y)
        if Y.ndim != 3 or len(Y) != len(src):
            raise FeatcacheError(f"masks must be [n, S, S] with n = {len(src)} images, got shape {Y.shape}")
        val = None
        if X_val is not None and Y_val is not None and len(Y_val):
            val = (_as_source(X_val), np.asarray(Y_val))
        self.n_classes_ = int(max(Y.max(initial=0), val[1].max(initial=0) if val else 0)) + 1
        self.n_classes_ = max(self.n_classes_, 2)
        self.mean_, self.std_ = self._standardiser(src)
        lr = _resolved_lr(self.head, self.lr)
        rng = np.random.default_rng(self.random_state)
        with _Deterministic():
            torch.manual_seed(self.random_state)
            model = _build_head(self.head, src.shape[-1], self.n_classes_, self.hidden)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.weight_decay)
            target_all = torch.from_numpy(Y.astype(np.int64))
            size = tuple(Y.shape[1:])
            best, best_state, best_epoch, waited = (-math.inf, math.inf), None, 0, 0
            self.val_dice_ = []
            epoch = 0
            for epoch in range(1, int(self.epochs) + 1):
                model.train()
                for pos, block in src.blocks(rng):
                    for j in range(0, len(pos), self.batch_size):
                        x = self._tensor(block[j : j + self.batch_size])
                        y = target_all[torch.from_numpy(pos[j : j + self.batch_size])]
                        logits = F.interpolate(model(x), size=size, mode="bilinear", align_corners=False)
                        loss = F.cross_entropy(logits, y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                if val is None:
                    continue
                score, val_loss = self._val_score(model, *val)
                self.val_dice_.append(score)
                # better Dice wins; at equal Dice (a plateau, e.g. 1.0) a lower loss still counts as progress
                if score > best[0] + 1e-6 or (score >= best[0] - 1e-6 and val_loss < best[1] - 1e-4):
                    best, best_epoch, waited = (score, val_loss), epoch, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
            if best_state is not None:
                model.load_state_dict(best_state)
            else:
                best_epoch = epoch
        self.best_epoch_ = int(best_epoch)
        self.epochs_run_ = int(epoch)
        self.state_ = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        return self

    def _val_score(self, model, src, Y_val: np.ndarray) -> tuple[float, float]:
        """(mean validation Dice over structures and images, mean validation cross-entropy)."""
        import torch
        import torch.nn.functional as F

        K = self.n_classes_ - 1
        size = tuple(Y_val.shape[1:])
        pred = np.empty(Y_val.shape, np.int64)
        loss = 0.0
        for pos, block in src.blocks():
            for j in range(0, len(pos), self.batch_size):
                logits = self._logits(model, block[j : j + self.batch_size], size)
                y = torch.from_numpy(Y_val[pos[j : j + self.batch_size]].astype(np.int64))
                loss += float(F.cross_entropy(logits, y, reduction="sum")) / (size[0] * size[1])
                pred[pos[j : j + self.batch_size]] = logits.argmax(1).numpy()
        scores = np.full((len(Y_val), K), np.nan)
        for i in range(len(Y_val)):
            for k in range(1, K + 1):
                scores[i, k - 1] = dice(pred[i] == k, Y_val[i] == k)
        value = _over_structures(scores)
        return (-1.0 if math.isnan(value) else value), loss / len(Y_val)

    # ---- prediction ----

    def _model(self):
        import torch

        model = _build_head(self.head, len(self.mean_), self.n_classes_, self.hidden)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in self.state_.items()})
        return model.eval()

    def _logits(self, model, block: np.ndarray, size: tuple[int, int]):
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            return F.interpolate(model(self._tensor(block)), size=size, mode="bilinear", align_corners=False)

    def _predict_block(self, model, block: np.ndarray, size) -> np.ndarray:
        out = np.empty((len(block), *size), np.int64)
        for j in range(0, len(block), self.batch_size):
            out[j : j + self.batch_size] = self._logits(model, block[j : j + self.batch_size], size).argmax(1)
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "state_"):
            raise FeatcacheError("this SegProbe is not fitted yet; call fit first")

    def predict_logits(self, X, size: int | tuple[int, int]) -> np.ndarray:
        """Class logits upsampled bilinearly to ``size``.

        Args:
            X: patch tokens [n, h, w, D].
            size: output side (or ``(H, W)``).

        Returns:
            float32 [n, K + 1, H, W] (class 0 = background).
        """
        self._check_fitted()
        size = (size, size) if np.isscalar(size) else tuple(size)
        model = self._model()
        X = np.asarray(X)
        out = np.empty((len(X), self.n_classes_, *size), np.float32)
        for j in range(0, len(X), self.batch_size):
            out[j : j + self.batch_size] = self._logits(model, X[j : j + self.batch_size], size).numpy()
        return out

    def predict(self, X, size: int | tuple[int, int]) -> np.ndarray:
        """Predicted label maps (arg-max of the upsampled logits).

        Args:
            X: patch tokens [n, h, w, D] (an array or a :class:`StoreTokens`).
            size: output side (or ``(H, W)``).

        Returns:
            int64 [n, H, W]: 0 background, k structure k.
        """
        self._check_fitted()
        size = (size, size) if np.isscalar(size) else tuple(size)
        src = _as_source(X)
        model = self._model()
        out = np.empty((len(src), *size), np.int64)
        for pos, block in src.blocks():
            out[pos] = self._predict_block(model, block, size)
        return out


def mean_mask_baseline(masks, n_structures: int) -> np.ndarray:
    """The mean training mask as a prediction: per pixel, the class covering it most often.

    Args:
        masks: int [n, H, W] training label maps.
        n_structures: K.

    Returns:
        int64 [H, W]: for one structure, 1 where at least half of the masks have it (threshold 0.5);
        for several, the arg-max of the per-class frequencies, ties going to the lowest structure.
    """
    masks = np.asarray(masks)
    counts = np.stack([(masks == k).sum(axis=0) for k in range(n_structures + 1)])
    return _baseline_from_counts(counts)


def _baseline_from_counts(counts: np.ndarray) -> np.ndarray:
    """[K + 1, H, W] per-class pixel counts -> int64 [H, W] arg-max with ties to structures."""
    order = np.r_[np.arange(1, len(counts)), 0]  # structures first, so a 0.5 tie goes to the structure
    return order[np.argmax(counts[order], axis=0)].astype(np.int64)


# ---------------------------------------------------------------------------------------------- the run


def _structure_names(structures: Sequence[str] | None, max_label: int) -> list[str]:
    if structures:
        names = [str(s).strip() for s in structures]
        if len(names) < max_label:
            raise FeatcacheError(
                f"--structures names {len(names)} structures but the training masks have labels up to "
                f"{max_label}; name one per label (label k -> k-th name)"
            )
        if len(set(names)) != len(names) or "mean" in names or not all(names):
            raise FeatcacheError(
                f"--structures {','.join(names)}: names must be distinct, non-empty, not 'mean'"
            )
        return names
    return [f"structure_{k}" for k in range(1, max_label + 1)]


class _Masks:
    """Reads mask files of a feature set and puts them in the extraction geometry."""

    def __init__(self, fs: FeatureSet, root: Path, preprocess: Preprocess):
        self.paths, self.root, self.pre, self.ids = fs.masks, root, preprocess, fs.ids

    def __call__(self, row: int) -> np.ndarray:
        path = self.root / self.paths[row]
        if not path.is_file():
            raise FeatcacheError(
                f"{path}: mask of row '{self.ids[row]}' not found; pass the manifest's image root with --root"
            )
        return self.pre.transform_mask(read_mask(path))


def _nearest(mask: np.ndarray, size: int) -> np.ndarray:
    idx = np.minimum(
        np.floor((np.arange(size) + 0.5) * (mask.shape[0] / size)).astype(np.int64), mask.shape[0] - 1
    )
    return mask[np.ix_(idx, idx)]


def _seg_context(fs: FeatureSet, features: str) -> dict[str, Any]:
    attrs = fs.attrs
    config = attrs.get("config", {})
    context = {
        "dataset": fs.name.split("/")[0],
        "model": attrs.get("model", config.get("model")),
        "res": attrs.get("res", config.get("res")),
        "features": features,
        "store_set": fs.name,
        "weights": config.get("weights", attrs.get("provenance", {}).get("weights")),
        "preprocessing": attrs.get("preprocessing", config.get("preprocessing")),
        "manifest_digest": attrs.get("manifest_digest"),
    }
    return {k: v for k, v in context.items() if v is not None}


def _safe_name(text: str) -> str:
    """A file name for a row id; ids that had to be changed get a hash suffix so two never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "row"
    if safe != text:
        safe += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return safe


def _save_mask(folder: Path, row_id: str, label_map: np.ndarray, n_structures: int) -> None:
    from PIL import Image

    if n_structures == 1:
        arr = (label_map > 0).astype(np.uint8) * 255
    else:
        arr = label_map.astype(np.uint8 if n_structures <= 255 else np.uint16)
    Image.fromarray(arr).save(folder / f"{_safe_name(row_id)}.png")


def _rows_of(fs: FeatureSet, seed: int, val_fraction: float) -> tuple[dict[str, np.ndarray], bool]:
    masks = fs.masks
    if masks is None:
        raise FeatcacheError(
            f"{fs.name}: the set has no mask column; add a 'mask' column to the manifest and extract again"
        )
    usable = fs.ok & (masks != "")
    keep = {s: np.flatnonzero(usable & (fs.splits == s)) for s in SPLITS}
    for s in ("train", "test"):
        if not len(keep[s]):
            raise FeatcacheError(
                f"{fs.name}: no {s} rows with a mask ({int((fs.splits == s).sum())} rows have split '{s}', "
                f"{int((usable & (fs.splits == s)).sum())} of them extracted with a mask); "
                f"give masks to some '{s}' rows of the manifest"
            )
    carved = False
    if not len(keep["val"]) and val_fraction > 0:
        to_val = carve_val(fs.patient_ids[keep["train"]], val_fraction, seed)
        keep["val"], keep["train"] = keep["train"][to_val], keep["train"][~to_val]
        carved = True
    return keep, carved


def _ci_entries(
    values: dict[str, np.ndarray], names: list[str], patients: np.ndarray, n_boot: int, seed: int
):
    """Per structure and mean: (label, metric, value, ci fields) from per-image values [n, K]."""
    entries = []
    dummy = np.zeros(len(patients))
    for metric in SEG_METRICS:
        v = values[metric]
        per = _per_structure(v)
        ci = bootstrap_ci(_per_structure, v, dummy, patients, n_boot, seed)
        low, high, skipped = np.atleast_1d(ci.low), np.atleast_1d(ci.high), np.atleast_1d(ci.n_skipped)
        for j, name in enumerate(names):
            defined = ~np.isnan(v[:, j])
            entries.append(
                {
                    "label": name,
                    "metric": metric,
                    "value": float(per[j]),
                    "ci_low": float(low[j]),
                    "ci_high": float(high[j]),
                    "n_boot": n_boot,
                    "n_boot_skipped": int(skipped[j]),
                    "n_test": int(defined.sum()),
                    "n_patients_test": int(len(np.unique(patients[defined]))),
                }
            )
        ci = bootstrap_ci(_over_structures, v, dummy, patients, n_boot, seed)
        entries.append(
            {
                "label": "mean",
                "metric": metric,
                "value": _over_structures(v),
                "ci_low": float(ci.low),
                "ci_high": float(ci.high),
                "n_boot": n_boot,
                "n_boot_skipped": int(ci.n_skipped),
                "n_test": len(patients),
                "n_patients_test": int(len(np.unique(patients))),
            }
        )
    return entries


def run_seg(
    cache: str | os.PathLike | FeatureStore,
    set_name: str | None = None,
    *,
    head: str = "linear",
    features: str = "patch",
    structures: Sequence[str] | None = None,
    epochs: int = 100,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    patience: int = 10,
    train_scale: int = 4,
    seed: int = 0,
    n_boot: int = 1000,
    val_fraction: float = 0.2,
    baseline: bool = True,
    root: str | os.PathLike | None = None,
    save_masks: str | os.PathLike | None = None,
    max_memory_mb: float = 2048,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Train a segmentation head on train, select on val, score test; also score the mean-mask baseline.

    Args:
        cache: feature store folder, URL or open ``FeatureStore``.
        set_name: feature set (None: the store's only set); it must hold ``patch`` tokens and masks.
        head: ``linear`` or ``conv``.
        features: the token array, ``patch`` (float16 [N, h, w, D]).
        structures: names of labels 1..K (default ``structure_1``...).
        epochs, lr, weight_decay, batch_size, patience: training settings (see :class:`SegProbe`).
        train_scale: the loss and validation Dice are computed at this multiple of the token grid
            (at most ``res``).
        seed: seed of the head's initialisation and shuffling, of the bootstrap and of a carved val.
        n_boot: patient bootstrap draws for the CIs.
        val_fraction: share of train patients carved into validation when the set has no val rows.
        baseline: also score the mean training mask (``probe="seg-baseline"`` rows).
        root: folder the mask paths are relative to (default: the root recorded at extraction).
        save_masks: folder for the predicted test label maps (PNG at ``res`` x ``res``, named by row id;
            one structure: 0/255, several: label values).
        max_memory_mb: train + val tokens up to this size are held in memory, larger sets are
            streamed from the store every epoch.
        out: JSON-lines file to append the rows to.

    Returns:
        Result rows: ``probe="seg"`` (and ``"seg-baseline"``), ``head``, ``label`` a structure or
        ``mean``, ``metric`` in ``dice``, ``jaccard``, ``dice_jaccard_mean``, ``hd95``, with CIs.

    Raises:
        FeatcacheError: no patch tokens or masks in the set, no train/test rows with masks, a test mask
            with a label unseen in training, bad options.
    """
    if head not in HEADS:
        raise FeatcacheError(f"--head {head!r}: choose one of {', '.join(HEADS)}")
    if not 0 <= val_fraction < 1:
        raise FeatcacheError(f"val_fraction must be in [0, 1); got {val_fraction}")
    store = cache if isinstance(cache, FeatureStore) else FeatureStore(cache)
    fs = store.open_set(set_name)
    if features not in fs.arrays() or len(fs.shape(features)) != 4:
        raise StoreError(
            f"{fs.name}: no patch tokens '{features}' [N, h, w, D] stored (arrays: {', '.join(fs.arrays())}); "
            "extract with --tokens cls,pooled,patch"
        )
    pre_cfg = fs.attrs.get("preprocessing")
    if not pre_cfg:
        raise StoreError(f"{fs.name}: no preprocessing recorded; masks cannot be aligned with the patch grid")
    pre = Preprocess.from_dict(pre_cfg)
    res = pre.res
    _, gh, gw, dim = fs.shape(features)
    size = int(min(res, train_scale * max(gh, gw)))
    keep, carved = _rows_of(fs, seed, val_fraction)
    masks = _Masks(fs, Path(root) if root is not None else fs.root, pre)

    # training / validation targets at the loss resolution; class counts at res for the baseline
    Y = {s: np.zeros((len(keep[s]), size, size), np.int64) for s in ("train", "val")}
    counts = np.zeros((1, res, res), np.int64)
    for s in ("train", "val"):
        for i, row in enumerate(keep[s]):
            m = masks(row)
            Y[s][i] = _nearest(m, size)
            if s == "train":
                top = int(m.max(initial=0))
                if top >= len(counts):
                    counts = np.concatenate([counts, np.zeros((top + 1 - len(counts), res, res), np.int64)])
                for k in range(len(counts)):
                    counts[k] += m == k
    max_label = max(len(counts) - 1, int(Y["val"].max(initial=0)))
    names = _structure_names(structures, max_label)
    K = len(names)
    if K == 0:
        raise FeatcacheError(f"{fs.name}: the training masks are all background; nothing to segment")
    counts = np.concatenate([counts, np.zeros((K + 1 - len(counts), res, res), np.int64)])

    token_mb = (len(keep["train"]) + len(keep["val"])) * gh * gw * dim * 2 / 2**20
    if token_mb <= max_memory_mb:
        X_train = fs.read(features, keep["train"])
        X_val = fs.read(features, keep["val"]) if len(keep["val"]) else None
    else:
        X_train = StoreTokens(fs, keep["train"], features)
        X_val = StoreTokens(fs, keep["val"], features) if len(keep["val"]) else None
    probe = SegProbe(
        head=head, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
        patience=patience, random_state=seed,
    )  # fmt: skip
    probe.fit(X_train, Y["train"], X_val, Y["val"] if X_val is not None else None)
    del X_train, X_val
    if probe.n_classes_ - 1 > K:
        K = probe.n_classes_ - 1

    # score test one shard at a time, at res
    test = keep["test"]
    base_map = _baseline_from_counts(counts)
    folder = Path(save_masks) if save_masks is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    probe_vals = {m: np.full((len(test), K), np.nan) for m in SEG_METRICS}
    base_vals = {m: np.full((len(test), K), np.nan) for m in SEG_METRICS}
    model = probe._model()
    ids = fs.ids
    for pos, block in StoreTokens(fs, test, features).blocks():
        pred = probe._predict_block(model, block, (res, res))
        for p, label_map in zip(pos, pred):
            row = test[p]
            truth = masks(row)
            if truth.max(initial=0) > K:
                raise FeatcacheError(
                    f"{fs.root / fs.masks[row]}: mask of test row '{ids[row]}' has label {int(truth.max())} but the "
                    f"training masks only have labels up to {K}; give every structure training examples"
                )
            for mname, v in seg_metrics(label_map[None], truth[None], K).items():
                probe_vals[mname][p] = v[0]
            if baseline:
                for mname, v in seg_metrics(base_map[None], truth[None], K).items():
                    base_vals[mname][p] = v[0]
            if folder is not None:
                _save_mask(folder, str(ids[row]), label_map, K)

    context = _seg_context(fs, features)
    params: dict[str, Any] = {
        "epochs": int(epochs),
        "lr": _resolved_lr(head, lr),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "patience": int(patience),
        "train_size": size,
        "scored_at": res,
        "val_carved": carved,
    }
    if carved:
        params.update(val_fraction=float(val_fraction), split_seed=int(seed))
    extracted_with = fs.attrs.get("versions", {}).get("featcache")
    if extracted_with:
        params["extracted_with"] = extracted_with
    patients = fs.patient_ids[test]
    common = {"seed": int(seed), "n_train": len(keep["train"])}
    names = names + [f"structure_{k}" for k in range(len(names) + 1, K + 1)]
    entries = [
        {**common, **e, "head": head, "params": params}
        for e in _ci_entries(probe_vals, names, patients, n_boot, seed)
    ]
    rows = make_rows({**context, "probe": "seg"}, entries)
    if baseline:
        base_params = {"scored_at": res, "val_carved": carved}
        base_entries = [
            {**common, **e, "params": base_params}
            for e in _ci_entries(base_vals, names, patients, n_boot, seed)
        ]
        rows += make_rows({**context, "probe": "seg-baseline"}, base_entries)
    if out is not None:
        append_jsonl(out, rows)
    return rows
