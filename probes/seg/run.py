"""Segmentation probes on cached patch tokens: a linear or light conv head, Dice/Jaccard/HD95 with CIs.

Opening. The set is opened by :func:`probes.data.open_checked_set`, the one guarded path of every
consumer of stored features (it refuses, e.g., a set whose manifest replacement was interrupted).
Rows: extracted rows (status ok) with a mask and a ``train``/``val``/``test`` split; without val
rows, a patient-level share of train is carved off by :func:`probes.data.carve_val` and recorded.
What is read from the set before training (rows, masks, targets, test spacings) is in
:mod:`probes.seg.data`; this module trains, scores and writes the result rows.

Targets. Masks come from the manifest's ``mask`` column (stored in the feature set, relative to its
root). A mask is an integer label map read by :func:`featcache.decode.images.read_mask`: 0 background,
k > 0 structure k (a binary 0/255 mask reads as 0/1), of any size. For training it is put through
the geometry of the extraction (:meth:`featcache.store.preprocess.Preprocess.transform_mask`, letterbox
padding = background) into the ``res`` x ``res`` model frame and from there to the training grid
(``train_scale`` times the token grid, at most ``res``), both by the pixel-centre nearest rule of
:mod:`probes.seg.frame` (``floor((i + 0.5) * n_in / n_out)``; not PIL's ``NEAREST``, which breaks
exact ties the other way). Structures are named by ``structures`` (``lung,heart`` names labels 1,
2), else ``structure_1``...

Tokens: the last layer's ``patch`` array, or several layers of ``layer_patch`` (``layers``, see
:mod:`probes.seg.unet`); ``params.layers`` and the rows' ``features`` say which.

Heads: :class:`probes.seg.heads.SegProbe` (``linear`` 1x1 conv, ``conv`` light decoder, ``unet``
U-Net-style decoder with skips from several layers), trained with torch on CPU; ``import
probes.seg.run`` itself does not import torch. The loss and the validation Dice used for early stopping
are computed on the training grid. ``protocol="dinov2-radiology-linear"`` instead trains the
DINOv2-radiology study's linear decoder as its code does (:mod:`probes.seg.study`).

Volumes (``scored_per="volume"``): the test slices of a slice manifest are stacked per volume and
scored as 3-D objects (:mod:`probes.seg.volume`).

Scoring (``scored_at``), test images one at a time:

- ``mask`` (default): in the mask's own frame, i.e. the original image's pixels. The head's logits
  go from its output grid straight to the mask's (H, W) in one bilinear step (``align_corners=False``,
  see :mod:`probes.seg.frame`), are arg-maxed there and compared to the mask file as read. A ``crop``
  extraction scores only the part of each film the model saw (``params.scored_region``).
- ``model``: in the ``res`` x ``res`` model frame against the transformed masks (logits upsampled
  bilinearly to ``res``); cheaper, but for non-square films on ``squash`` its pixels are anisotropic.

Metrics (:mod:`probes.seg.metrics`): ``dice``, ``jaccard``, ``dice_jaccard_mean`` and ``hd95``.
HD95 is in millimetres when every test row of a slice manifest records its voxel spacing
(``meta_spacing_row``/``_col``/``_slice``, written by ``featcache volumes``), or, for sets without
those columns, when every test image is a DICOM file with a pixel spacing
(:func:`probes.seg.frame.pixel_spacing`: ``PixelSpacing``, else ``ImagerPixelSpacing``), rows and
columns scaled separately; otherwise in pixels of the scoring frame. One mean never mixes units:
when only some test images have a spacing, every HD95 is in pixels, and that is said once (a
warning) and recorded (``params.hd95_unit`` = ``mm`` | ``px``, ``params.hd95_px_because``).
A structure's value is the mean over test images (undefined values left out), ``label="mean"`` the
mean over structures; CIs resample patients (:func:`probes.evaluation.stats.bootstrap_ci`).

The ``seg-baseline`` rows score the mean training mask: the per-pixel class frequencies of the
transformed training masks (model frame), thresholded at 0.5 (arg-max over background and
structures, ties to the structure, for several structures); in the mask frame the frequencies are
resampled bilinearly like the logits before the arg-max. A probe that does not beat it has learned
nothing beyond where the structure usually is.

Patch tokens are read shard by shard: the train and validation tokens are held in memory when
they fit in ``max_memory_mb``, otherwise each epoch streams them from the store; test tokens are
read one shard at a time and scored image by image.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError, StoreError
from featcache.progress import probe_progress
from featcache.store.feature_store import FeatureSet, FeatureStore
from probes.data import open_checked_set
from probes.results import append_jsonl, make_rows
from probes.seg.data import Masks, scoring_spacings, seg_rows, structure_names, training_targets
from probes.seg.frame import Scorer, nearest_resize
from probes.seg.heads import HEADS, SegProbe, StoreTokens, _resolved_lr, mean_mask_baseline
from probes.seg.metrics import SEG_METRICS, _ci_entries, _over_structures, dice, hd95, jaccard, seg_metrics  # noqa: F401
from probes.seg.study import PROTOCOLS, STUDY_BATCH, STUDY_EPOCHS, STUDY_LRS, fit_study_linear
from probes.seg.unet import LayerChoice, resolve_layers
from probes.seg.volume import SCORED_PER, score_volumes, volume_groups

__all__ = [
    "HEADS",
    "PROTOCOLS",
    "SCORED_AT",
    "SCORED_PER",
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

SCORED_AT = ("mask", "model")
_nearest = nearest_resize  # the name earlier callers use

# ---------------------------------------------------------------------------------------------- the run


def _seg_context(fs: FeatureSet, features: str) -> dict[str, Any]:
    rec = fs.record
    context = {
        "dataset": fs.name.split("/")[0],
        "model": rec.model,
        "res": rec.res,
        "features": features,
        "store_set": fs.name,
        "weights": rec.weights,
        "preprocessing": rec.preprocessing,
        "manifest_digest": rec.manifest_digest,
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


def run_seg(
    cache: str | os.PathLike | FeatureStore,
    set_name: str | None = None,
    *,
    head: str = "linear",
    features: str = "patch",
    layers: str | Sequence[int] | None = None,
    protocol: str | None = None,
    structures: Sequence[str] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    patience: int = 10,
    hidden: int = 128,
    stages: int = 2,
    train_scale: int = 4,
    seed: int = 0,
    n_boot: int = 1000,
    val_fraction: float = 0.2,
    baseline: bool = True,
    scored_at: str = "mask",
    scored_per: str = "slice",
    root: str | os.PathLike | None = None,
    save_masks: str | os.PathLike | None = None,
    max_memory_mb: float = 2048,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Train a segmentation head on train, select on val, score test; also score the mean-mask baseline.

    Args:
        cache: feature store folder, URL or open ``FeatureStore``.
        set_name: feature set (None: the store's only set); it must hold patch tokens and masks.
        head: ``linear``, ``conv`` or ``unet``.
        features: the single-layer token array, ``patch`` (float16 [N, h, w, D]), when ``layers``
            is None.
        layers: ``last`` / None (``patch``), ``lastN`` or layer indices of ``layer_patch``
            (:func:`probes.seg.unet.resolve_layers`).
        protocol: None (our training: AdamW, cross-entropy, early stopping on val Dice) or
            ``dinov2-radiology-linear`` (:mod:`probes.seg.study`; needs ``head="linear"``).
        structures: names of labels 1..K (default ``structure_1``...).
        epochs, lr, weight_decay, batch_size, patience: training settings (see :class:`SegProbe`);
            ``epochs``/``batch_size`` None: 100/16, or the study's 10/128 under its protocol (which
            searches its learning-rate grid unless ``lr`` is given, and uses no weight decay).
        hidden, stages: width and x2 up-blocks of the ``conv``/``unet`` decoders.
        train_scale: the loss and validation Dice are computed at this multiple of the token grid
            (at most ``res``).
        seed: seed of the head's initialisation and shuffling, of the bootstrap and of a carved val.
        n_boot: patient bootstrap draws for the CIs.
        val_fraction: share of train patients carved into validation when the set has no val rows.
        baseline: also score the mean training mask (``probe="seg-baseline"`` rows).
        scored_at: ``mask`` (each mask's own pixels, the default) or ``model`` (the ``res`` x ``res``
            model input); see the module docstring.
        scored_per: ``slice`` (every test image, the default) or ``volume`` (slices of a slice
            manifest stacked per ``meta_volume``, :mod:`probes.seg.volume`).
        root: folder the mask and image paths are relative to (default: the root recorded at
            extraction); the images are only opened for their DICOM pixel spacing.
        save_masks: folder for the predicted test label maps (PNG in the scoring frame, named by row
            id; one structure: 0/255, several: label values); per volume also
            ``volumes/<volume>.npy`` (uint8 [S, H, W], slices in ``meta_slice`` order).
        max_memory_mb: train + val tokens up to this size are held in memory, larger sets are
            streamed from the store every epoch.
        out: JSON-lines file to append the rows to.

    Returns:
        Result rows: ``probe="seg"`` (and ``"seg-baseline"``), ``head``, ``label`` a structure or
        ``mean``, ``metric`` in ``dice``, ``jaccard``, ``dice_jaccard_mean``, ``hd95``, with CIs;
        ``params`` records ``scored_at``, ``scored_per``, ``layers``, ``hd95_unit`` and every carve or
        fallback.

    Raises:
        FeatcacheError: an interrupted manifest replacement, no patch tokens or masks in the set, no
            train/test rows with masks, a test mask with a label unseen in training, bad options.
    """
    if head not in HEADS:
        raise FeatcacheError(f"--head {head!r}: choose one of {', '.join(HEADS)}")
    if scored_at not in SCORED_AT:
        raise FeatcacheError(f"scored_at {scored_at!r}: choose one of {', '.join(SCORED_AT)}")
    if scored_per not in SCORED_PER:
        raise FeatcacheError(f"--scored-per {scored_per!r}: choose one of {', '.join(SCORED_PER)}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise FeatcacheError(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol is not None and head != "linear":
        raise FeatcacheError(f"--protocol {protocol} trains the study's linear decoder; use --head linear")
    if not 0 <= val_fraction < 1:
        raise FeatcacheError(f"val_fraction must be in [0, 1); got {val_fraction}")
    fs = open_checked_set(cache, set_name)
    if layers is None and features != "patch":
        if features not in fs.arrays() or len(fs.shape(features)) != 4:
            raise StoreError(
                f"{fs.name}: no patch tokens '{features}' [N, h, w, D] stored (arrays: "
                f"{', '.join(fs.arrays())}); extract with --tokens cls,pooled,patch"
            )
        choice = LayerChoice(features, None, ("last",), features)
    else:
        choice = resolve_layers(fs, layers)
    if not fs.record.preprocessing:
        raise StoreError(f"{fs.name}: no preprocessing recorded; masks cannot be aligned with the patch grid")
    pre = fs.record.preprocess()
    res = pre.res
    *_, gh, gw, dim = fs.shape(choice.array)
    n_layers = 1 if choice.positions is None else len(choice.positions)
    size = int(min(res, train_scale * max(gh, gw)))
    keep, carved = seg_rows(fs, seed, val_fraction)
    test = keep["test"]
    groups = volume_groups(fs, test) if scored_per == "volume" else None
    data_root = Path(root) if root is not None else fs.root
    masks = Masks(fs, data_root, pre)

    # training / validation targets at the loss resolution; class counts at res for the baseline
    Y, counts = training_targets(masks, keep, size, res)
    max_label = max(len(counts) - 1, int(Y["val"].max(initial=0)))
    names = structure_names(structures, max_label)
    K = len(names)
    if K == 0:
        raise FeatcacheError(f"{fs.name}: the training masks are all background; nothing to segment")
    counts = np.concatenate([counts, np.zeros((K + 1 - len(counts), res, res), np.int64)])

    def tokens(rows):
        return StoreTokens(fs, rows, choice.array, choice.positions)

    token_mb = (len(keep["train"]) + len(keep["val"])) * n_layers * gh * gw * dim * 2 / 2**20
    if token_mb <= max_memory_mb:
        read = (lambda r: fs.read(choice.array, r)) if choice.positions is None else (
            lambda r: fs.read(choice.array, r)[:, list(choice.positions)])  # fmt: skip
        X_train = read(keep["train"])
        X_val = read(keep["val"]) if len(keep["val"]) else None
    else:
        X_train = tokens(keep["train"])
        X_val = tokens(keep["val"]) if len(keep["val"]) else None
    Y_val = Y["val"] if X_val is not None else None
    train_params: dict[str, Any]
    if protocol is None:
        epochs, batch_size = 100 if epochs is None else epochs, 16 if batch_size is None else batch_size
        probe = SegProbe(
            head=head, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            patience=patience, hidden=hidden, stages=stages, random_state=seed,
        )  # fmt: skip
        probe.fit(X_train, Y["train"], X_val, Y_val)
        train_params = {"lr": _resolved_lr(head, lr), "weight_decay": float(weight_decay),
                        "patience": int(patience)}  # fmt: skip
        if head != "linear":
            train_params["hidden"] = int(hidden)
        if head == "unet":
            train_params["stages"] = int(stages)
    else:
        epochs = STUDY_EPOCHS if epochs is None else epochs
        batch_size = STUDY_BATCH if batch_size is None else batch_size
        probe = fit_study_linear(
            X_train, Y["train"], X_val, Y_val, epochs=epochs, batch_size=batch_size,
            lrs=STUDY_LRS if lr is None else (lr,), random_state=seed,
        )  # fmt: skip
        train_params = {"protocol": protocol, "lr": probe.lr_, "lr_grid": probe.lr_grid_,
                        "val_jaccard": probe.val_jaccard_, "lr_selected_on": probe.selected_on_,
                        "refit_on_train_val": probe.refit_on_val_, "loss": "dice", "optimizer": "sgd",
                        "schedule": "cosine", "weight_decay": 0.0}  # fmt: skip
    del X_train, X_val
    if probe.n_classes_ - 1 > K:
        K = probe.n_classes_ - 1

    spacings, unit_params = scoring_spacings(fs, test, data_root, groups is not None)
    folder = Path(save_masks) if save_masks is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(pre, counts, K, scored_at)
    probe_vals = {m: np.full((len(test), K), np.nan) for m in SEG_METRICS}
    base_vals = {m: np.full((len(test), K), np.nan) for m in SEG_METRICS}
    kept: dict[str, dict[int, np.ndarray]] = {"pred": {}, "truth": {}, "base": {}, "mm": {}}
    model = probe._model()
    ids = fs.ids
    bar = probe_progress(len(test), "seg: scoring test masks (HD95)", unit="images")
    for pos, block in tokens(test).blocks():
        logits = probe.head_logits(model, block)
        for p, image_logits in zip(pos, logits):
            row = test[p]
            truth = masks.read(row)
            if truth.max(initial=0) > K:
                raise FeatcacheError(
                    f"{masks.path(row)}: mask of test row '{ids[row]}' has label {int(truth.max())} but the "
                    f"training masks only have labels up to {K}; give every structure training examples"
                )
            label_map, truth, base_map, spacing = scorer(image_logits, truth, spacings[p], baseline)
            if folder is not None:
                _save_mask(folder, str(ids[row]), label_map, K)
            if groups is not None:  # scored once the volume is stacked
                kept["pred"][int(row)], kept["truth"][int(row)] = label_map, truth
                kept["base"][int(row)], kept["mm"][int(row)] = base_map, spacing
                continue
            for mname, v in seg_metrics(label_map[None], truth[None], K, spacing).items():
                probe_vals[mname][p] = v[0]
            if baseline:
                for mname, v in seg_metrics(base_map[None], truth[None], K, spacing).items():
                    base_vals[mname][p] = v[0]
        bar.update(len(pos))
    bar.close()
    patients = fs.patient_ids[test]
    if groups is not None:
        probe_vals, base_vals = score_volumes(groups, kept, K, spacings, test, baseline, folder, _safe_name)
        patients = np.array([g.patient for g in groups])

    context = _seg_context(fs, choice.features)
    frame: dict[str, Any] = {"scored_at": scored_at, "scored_per": scored_per, **unit_params}
    if scored_at == "mask" and pre.resize == "crop":
        frame["scored_region"] = "the part of each mask inside the centre crop the model saw"
    if groups is not None:
        frame["n_slices_test"] = len(test)
        steps = sorted({g.step for g in groups})
        if steps != [1]:
            frame["slice_steps"] = steps
    params: dict[str, Any] = {
        "epochs": int(epochs),
        **train_params,
        "batch_size": int(batch_size),
        "train_size": size,
        "layers": list(choice.layers),
        **frame,
        "val_carved": carved,
    }
    if carved:
        params.update(val_fraction=float(val_fraction), split_seed=int(seed))
    extracted_with = fs.attrs.get("versions", {}).get("featcache")
    if extracted_with:
        params["extracted_with"] = extracted_with
    common = {"seed": int(seed), "n_train": len(keep["train"])}
    names = names + [f"structure_{k}" for k in range(len(names) + 1, K + 1)]
    entries = [
        {**common, **e, "head": head, "params": {**params, **e.get("params", {})}}
        for e in _ci_entries(probe_vals, names, patients, n_boot, seed)
    ]
    rows = make_rows({**context, "probe": "seg"}, entries)
    if baseline:
        base_params = {**frame, "val_carved": carved}
        base_entries = [
            {**common, **e, "params": {**base_params, **e.get("params", {})}}
            for e in _ci_entries(base_vals, names, patients, n_boot, seed)
        ]
        rows += make_rows({**context, "probe": "seg-baseline"}, base_entries)
    if out is not None:
        append_jsonl(out, rows)
    return rows
