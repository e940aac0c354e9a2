"""Segmentation heads on cached patch tokens and the token sources they train from.

Heads (trained with torch on CPU, from the cache; importing this module does not import torch):

- ``linear``: a 1x1 convolution over standardised patch tokens (the DINOv2 linear segmentation
  protocol): one logit per class (background + K structures) per token.
- ``conv``: a light decoder: 1x1 conv to ``hidden`` channels, then two (x2 bilinear upsample,
  3x3 conv, GELU) stages and a 1x1 conv to the class logits (at 4x the token grid).
- ``unet``: a U-Net-style decoder with skips from several layers' token maps
  (:func:`probes.seg.unet.build_unet`; logits at ``2**stages`` times the token grid).

Tokens are [n, h, w, D] (one layer) or [n, L, h, w, D] (L layers, stored order, shallow to deep).
Several layers are standardised per (layer, channel) and given to the head side by side as L*D
channels: ``linear`` and ``conv`` mix them in their first 1x1 conv, ``unet`` splits them again.

A head's logits are brought to any frame by bilinear interpolation (``align_corners=False``, the
upsampling of the linear and light decoders of the DINOv2 / RAD-DINO segmentation studies).
Both minimise pixel-wise cross-entropy between the bilinearly upsampled logits and the target
masks with AdamW mini-batches; ``torch.manual_seed(random_state)``, a seeded shuffling generator and
``torch.use_deterministic_algorithms`` make a fit repeatable. The head with the best validation
Dice is kept (at equal Dice, the one with the lower validation cross-entropy), and training stops
after ``patience`` epochs without improvement of either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from sklearn.base import BaseEstimator

from featcache.errors import FeatcacheError
from featcache.progress import probe_progress
from featcache.store.feature_store import FeatureSet
from probes.seg.metrics import _over_structures, dice
from probes.seg.unet import build_unet

__all__ = ["HEADS", "SegProbe", "StoreTokens", "mean_mask_baseline"]

HEADS = ("linear", "conv", "unet")
_ARRAY_BLOCK = 256  # rows per shuffled piece of an in-memory token array


# ------------------------------------------------------------------------------------------ token sources


class StoreTokens:
    """Patch tokens of chosen rows of a feature set, read one shard at a time, never all at once.

    Args:
        fs: the feature set.
        rows: int64 [n] row indices (the order defines positions 0..n-1).
        name: the token array (``patch``: float16 [N, h, w, D]; ``layer_patch``: [N, L, h, w, D]).
        layers: positions along ``layer_patch``'s layer axis to keep (None: all).

    Attributes:
        shape: ``(n, h, w, D)``, or ``(n, L', h, w, D)`` for a multi-layer array.
    """

    def __init__(self, fs: FeatureSet, rows: np.ndarray, name: str = "patch", layers=None):
        self.fs, self.name = fs, name
        self.layers = None if layers is None else list(layers)
        self.rows = np.asarray(rows, dtype=np.int64)
        shape = fs.shape(name)[1:]
        if self.layers is not None:
            shape = (len(self.layers), *shape[1:])
        self.shape = (len(self.rows), *shape)

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
            if self.layers is not None:
                block = block[:, self.layers]
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
    if X.ndim not in (4, 5):
        raise FeatcacheError(f"patch tokens must be [n, h, w, D] or [n, L, h, w, D], got shape {X.shape}")
    return _ArrayTokens(X)


def _flat(block: np.ndarray) -> np.ndarray:
    """[b, h, w, D] as is; [b, L, h, w, D] -> [b, h, w, L*D] (layer-major channels)."""
    if block.ndim == 5:
        b, n_layers, h, w, d = block.shape
        return block.transpose(0, 2, 3, 1, 4).reshape(b, h, w, n_layers * d)
    return block


# ------------------------------------------------------------------------------------------------ heads


def _build_head(head: str, dim: int, n_classes: int, hidden: int, n_layers: int = 1, stages: int = 2):
    """The head module; ``dim`` is the input channels (L*D for L layers)."""
    import torch.nn as nn

    if head == "unet":
        return build_unet(dim // n_layers, n_layers, n_classes, hidden, stages)
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
    return float(lr) if lr is not None else (1e-2 if head == "linear" else 1e-3)  # conv, unet: 1e-3


class SegProbe(BaseEstimator):
    """A segmentation head on frozen patch tokens (see the module docstring).

    Args:
        head: ``linear`` (1x1 conv), ``conv`` (light decoder) or ``unet`` (U-Net-style decoder).
        epochs: maximum passes over the training images.
        lr: AdamW learning rate (None: 1e-2 for ``linear``, 1e-3 for ``conv`` and ``unet``).
        weight_decay: AdamW weight decay.
        batch_size: images per optimisation step.
        patience: epochs without a better validation Dice before training stops (early stopping).
        hidden: channels of the ``conv`` decoder (the first width of ``unet``).
        stages: x2 up-blocks of the ``unet`` decoder.
        random_state: seed of the initialisation and of the shuffling.

    Attributes:
        n_classes_: int, background + K structures.
        n_layers_: int, L token layers of the input (1 for [n, h, w, D]).
        mean_, std_: float32 [L*D], token standardisation fitted on the training tokens.
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
        stages: int = 2,
        random_state: int = 0,
    ):
        self.head = head
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.hidden = hidden
        self.stages = stages
        self.random_state = random_state

    # ---- fitting ----

    def _check_params(self) -> None:
        if self.head not in HEADS:
            raise FeatcacheError(f"--head {self.head!r}: choose one of {', '.join(HEADS)}")
        for name in ("epochs", "batch_size", "hidden", "stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise FeatcacheError(f"{name} must be a positive integer, got {v!r}")

    def _standardiser(self, source) -> tuple[np.ndarray, np.ndarray]:
        d = source.shape[-1] * (source.shape[1] if len(source.shape) == 5 else 1)
        s1, s2, count = np.zeros(d), np.zeros(d), 0
        for _, block in source.blocks():
            flat = _flat(block).reshape(-1, d).astype(np.float64)
            s1 += flat.sum(axis=0)
            s2 += np.einsum("ij,ij->j", flat, flat)
            count += len(flat)
        mean = s1 / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
        std[std < 1e-6] = 1.0  # a constant channel carries nothing; keep it finite
        return mean.astype(np.float32), std.astype(np.float32)

    def _tensor(self, block: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(_flat(block), dtype=np.float32))
        x = (x - torch.from_numpy(self.mean_)) / torch.from_numpy(self.std_)
        return x.permute(0, 3, 1, 2).contiguous()

    def fit(self, X, Y, X_val=None, Y_val=None) -> SegProbe:
        """Train the head, keeping the weights with the best validation Dice.

        Args:
            X: patch tokens float16/float32 [n, h, w, D] or [n, L, h, w, D] (L layers): an array, a :class:`StoreTokens`, or any object
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
        self.n_layers_ = int(src.shape[1]) if len(src.shape) == 5 else 1
        self.mean_, self.std_ = self._standardiser(src)
        lr = _resolved_lr(self.head, self.lr)
        rng = np.random.default_rng(self.random_state)
        with _Deterministic():
            torch.manual_seed(self.random_state)
            model = self._new_head(len(self.mean_))
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.weight_decay)
            target_all = torch.from_numpy(Y.astype(np.int64))
            size = tuple(Y.shape[1:])
            best, best_state, best_epoch, waited = (-math.inf, math.inf), None, 0, 0
            self.val_dice_ = []
            epoch = 0
            bar = probe_progress(int(self.epochs), "seg training", unit="epochs")
            for epoch in range(1, int(self.epochs) + 1):
                bar.update(1)
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
            bar.close()  # early stopping leaves the loop before the last epoch
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

    def _new_head(self, dim: int):
        return _build_head(
            self.head, dim, self.n_classes_, self.hidden, getattr(self, "n_layers_", 1), self.stages
        )

    def _model(self):
        import torch

        model = self._new_head(len(self.mean_))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in self.state_.items()})
        return model.eval()

    def head_logits(self, model, block: np.ndarray):
        """The head's own class logits, before any upsampling.

        Args:
            model: ``self._model()``.
            block: patch tokens float16/float32 [b, h, w, D].

        Returns:
            float32 torch tensor [b, K + 1, h', w']: the token grid (``linear``), 4x it (``conv``),
            ``2**stages`` times it (``unet``).
        """
        import torch

        self._check_fitted()
        with torch.inference_mode():
            return torch.cat(
                [
                    model(self._tensor(block[j : j + self.batch_size]))
                    for j in range(0, len(block), self.batch_size)
                ]
            )

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
