"""The linear decoder protocol of the DINOv2-radiology study, on cached tokens.

``protocol="dinov2-radiology-linear"`` trains the study's linear decoder as its code does
(MohammedSB/DINOv2ForRadiology, ``dinov2/eval/segmentation/segmentation.py`` and ``utils.py``):

Followed:

- Decoder: one 1x1 convolution on the raw patch tokens of the last layer (``x_norm_patchtokens``,
  what the store keeps as ``patch``; no standardisation), weights drawn from N(0, 0.01), bias 0;
  logits upsampled bilinearly (``align_corners=False``) to the target size.
- Loss: Dice loss as MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)``: softmax over classes,
  one-hot targets including the background, per image and class
  ``1 - (2 * sum(p * g) + 1e-5) / (sum(p) + sum(g) + 1e-5)``, averaged over images and classes.
- Optimiser: SGD, momentum 0.9, no weight decay; cosine annealing of the learning rate to 0 over
  ``epochs * ceil(n_train / batch_size)`` iterations, stepped every iteration; batch size 128
  (capped at the number of training images), 10 epochs (their defaults).
- Learning-rate grid: 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1, one decoder per rate trained side
  by side on the same batches (their decoders are initialised one after the other from one seed, so
  are ours); the last weights are kept (no early stopping); the rate is chosen by the validation
  Jaccard, macro over the structures (background ignored), pixels pooled over the validation set
  (their ``MulticlassJaccardIndex(average="macro", ignore_index=0)``).
- With a validation split, the decoder is trained again from scratch on train + val with the chosen
  rate, and that one is scored on test.

Where we differ: the tokens come from the cache, so there are no training augmentations (their
training transforms) and the images are at the extraction's ``res``; the loss is computed on the
training grid (``train_scale`` times the token grid) rather than at the image size (448); the
shuffling is one permutation per epoch rather than an infinite sampler; without a validation split
we carve one from train (they then select on the test set). The study scores test with torchmetrics
Dice/Jaccard pooled over pixels; ``probes seg`` scores per image (or per volume) in the mask's frame
with patient-level CIs, beside the usual metrics.
"""

from __future__ import annotations

import math

import numpy as np

from featcache.errors import FeatcacheError
from probes.seg.heads import SegProbe, _as_source, _Deterministic, _flat

__all__ = ["PROTOCOLS", "STUDY_LINEAR", "STUDY_LRS", "dice_loss", "fit_study_linear"]

STUDY_LINEAR = "dinov2-radiology-linear"
PROTOCOLS = (STUDY_LINEAR,)
STUDY_LRS = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1)
STUDY_EPOCHS, STUDY_BATCH = 10, 128
_SMOOTH = 1e-5


def dice_loss(logits, target):
    """MONAI ``DiceLoss(softmax=True, to_onehot_y=True)`` (defaults otherwise).

    Args:
        logits: float32 torch [b, C, H, W].
        target: int64 torch [b, H, W] class indices.

    Returns:
        Scalar tensor: mean over images and classes (background included) of
        ``1 - (2 * sum(p * g) + 1e-5) / (sum(p) + sum(g) + 1e-5)``, sums over pixels.
    """
    import torch.nn.functional as F

    p = logits.softmax(dim=1)
    g = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter = (p * g).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + g.sum(dim=(2, 3))
    return (1 - (2 * inter + _SMOOTH) / (denom + _SMOOTH)).mean()


class _Concat:
    """Two token sources one after the other (positions of the second shifted by the first's length)."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.shape = (len(a) + len(b), *a.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, rng=None):
        yield from self.a.blocks(rng)
        for pos, block in self.b.blocks(rng):
            yield pos + len(self.a), block


def _pooled_jaccard(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Macro Jaccard over classes 1..K, pixels pooled over all images (classes never seen count 0)."""
    values = []
    for k in range(1, n_classes):
        p, t = pred == k, truth == k
        union = int((p | t).sum())
        values.append(int((p & t).sum()) / union if union else 0.0)
    return float(np.mean(values))


def _train(src, Y: np.ndarray, lrs, n_classes: int, epochs: int, batch_size: int, seed: int):
    """Train one linear decoder per learning rate on the same batches; returns the modules."""
    import torch
    import torch.nn.functional as F

    dim = src.shape[-1] * (src.shape[1] if len(src.shape) == 5 else 1)
    batch_size = min(batch_size, len(src))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    heads, opts, scheds = [], [], []
    max_iter = epochs * math.ceil(len(src) / batch_size)
    for lr in lrs:
        head = torch.nn.Conv2d(dim, n_classes, kernel_size=1)
        head.weight.data.normal_(mean=0.0, std=0.01)
        head.bias.data.zero_()
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0)
        heads.append(head)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_iter, eta_min=0))
    target_all = torch.from_numpy(Y.astype(np.int64))
    size = tuple(Y.shape[1:])
    for _ in range(epochs):
        for pos, block in src.blocks(rng):
            for j in range(0, len(pos), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(_flat(block[j : j + batch_size]), dtype=np.float32))
                x = x.permute(0, 3, 1, 2).contiguous()
                y = target_all[torch.from_numpy(pos[j : j + batch_size])]
                for head, opt, sched in zip(heads, opts, scheds):
                    logits = F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)
                    loss = dice_loss(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    return heads


def _as_probe(head, n_classes: int, n_layers: int, dim: int, batch_size: int, seed: int) -> SegProbe:
    probe = SegProbe(head="linear", batch_size=min(batch_size, 16), random_state=seed)
    probe.n_classes_, probe.n_layers_ = n_classes, n_layers
    probe.mean_, probe.std_ = np.zeros(dim, np.float32), np.ones(dim, np.float32)  # raw tokens
    probe.state_ = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}
    return probe


def fit_study_linear(
    X,
    Y,
    X_val=None,
    Y_val=None,
    *,
    epochs: int = STUDY_EPOCHS,
    batch_size: int = STUDY_BATCH,
    lrs=STUDY_LRS,
    refit_on_val: bool = True,
    random_state: int = 0,
) -> SegProbe:
    """Train the study's linear decoder over its learning-rate grid (see the module docstring).

    Args:
        X: patch tokens [n, h, w, D] (or [n, L, h, w, D], concatenated), array or token source.
        Y: int [n, S, S] training label maps at the loss resolution.
        X_val, Y_val: validation tokens and label maps (None: every rate trained, the last kept
            weights of the first rate with the best training Jaccard; recorded in ``selected_on_``).
        epochs, batch_size, lrs: the study's schedule (defaults: 10, 128, their grid).
        refit_on_val: train again on train + val with the chosen rate (the study does).
        random_state: seed of the initialisation and the shuffling.

    Returns:
        A fitted :class:`SegProbe` (``head="linear"``, no standardisation) with ``lr_`` the chosen
        rate, ``lr_grid_``, ``val_jaccard_`` (one per rate), ``selected_on_`` (``val`` or
        ``train``) and ``refit_on_val_``.
    """
    lrs = [float(v) for v in lrs]
    if not lrs or any(not v > 0 for v in lrs):
        raise FeatcacheError(f"learning-rate grid {lrs!r}: give one or more positive rates")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise FeatcacheError(f"{name} must be a positive integer, got {v!r}")
    src, Y = _as_source(X), np.asarray(Y)
    has_val = X_val is not None and Y_val is not None and len(Y_val)
    val = (_as_source(X_val), np.asarray(Y_val)) if has_val else None
    n_classes = max(2, int(max(Y.max(initial=0), val[1].max(initial=0) if val else 0)) + 1)
    n_layers = int(src.shape[1]) if len(src.shape) == 5 else 1
    dim = src.shape[-1] * n_layers
    sel_src, sel_Y = val if val else (src, Y)
    with _Deterministic():
        heads = _train(src, Y, lrs, n_classes, int(epochs), int(batch_size), random_state)
        scores = []
        for head in heads:
            probe = _as_probe(head, n_classes, n_layers, dim, batch_size, random_state)
            pred = probe.predict(sel_src, tuple(sel_Y.shape[1:]))
            scores.append(_pooled_jaccard(pred, sel_Y, n_classes))
        best = int(np.argmax(scores))
        refit = bool(refit_on_val and val)
        if refit:
            both_Y = np.concatenate([Y, val[1]]) if val[1].shape[1:] == Y.shape[1:] else None
            if both_Y is None:
                raise FeatcacheError("train and val label maps must have one size to train on both")
            head = _train(_Concat(src, val[0]), both_Y, [lrs[best]], n_classes, int(epochs), int(batch_size),
                          random_state)[0]  # fmt: skip
        else:
            head = heads[best]
    probe = _as_probe(head, n_classes, n_layers, dim, batch_size, random_state)
    probe.lr_, probe.lr_grid_, probe.val_jaccard_ = lrs[best], lrs, [float(v) for v in scores]
    probe.selected_on_, probe.refit_on_val_ = ("val" if val else "train"), refit
    probe.best_epoch_ = probe.epochs_run_ = int(epochs)
    probe.val_dice_ = []
    return probe
