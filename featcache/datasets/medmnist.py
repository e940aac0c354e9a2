"""MedMNIST v2 (Yang et al., Scientific Data 2023) ``.npz`` files -> PNG images + a manifest.

A MedMNIST 2D file holds ``{train,val,test}_images`` (uint8 [N, H, W] or [N, H, W, 3]) and
``{train,val,test}_labels`` (int [N, 1] class indices, or [N, L] 0/1 for the multi-label ChestMNIST).
Each image is written as ``<out folder>/<out stem>/<split>_<index>.png`` and listed with its split
(the file's own split keys; a file without ``test_*`` simply has no test rows).

Class names: the MedMNIST names for ``pneumoniamnist``, ``breastmnist`` and ``chestmnist`` (detected
from the file name; ChestMNIST's NIH findings use the shared vocabulary), the ``class_names`` option
otherwise, or the class index as text. Single-label files give a ``label`` column, ChestMNIST one
binary column per finding.

MedMNIST publishes no patient ids: each image is its own patient (``patient_id`` = ``id`` =
``<split>_<index>``), so patient-disjointness is only as good as the source's own split.
3D MedMNIST volumes are not supported.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from featcache.datasets._common import DatasetManifest, assemble
from featcache.datasets.vocabulary import VOCABULARY
from featcache.errors import FeatcacheError

CLASS_NAMES: dict[str, list[str]] = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal_or_benign"],
    "chestmnist": list(VOCABULARY[1:15]),  # the 14 NIH findings, in NIH order
}
_SPLITS = ("train", "val", "test")


def _npz_file(root: Path) -> Path:
    if root.is_file():
        return root
    if root.is_dir():
        found = sorted(root.glob("*.npz"))
        if len(found) == 1:
            return found[0]
        if found:
            raise FeatcacheError(
                f"{root}: several .npz files ({[f.name for f in found]}); pass one with --root"
            )
    raise FeatcacheError(f"{root}: no MedMNIST .npz file found; pass the .npz file with --root")


def build(
    root: str | Path, *, out: str | Path, check_files: bool = True, class_names: list[str] | None = None
) -> DatasetManifest:
    """Write a MedMNIST file's images as PNGs beside the manifest ``out`` and list them.

    Args:
        root: the ``.npz`` file (or a folder holding exactly one).
        out: the manifest CSV about to be written; images go to ``<out folder>/<out stem>/``.
        check_files: unused (the images are written here).
        class_names: names of the class indices (overrides the built-in table).

    Returns:
        A ``DatasetManifest`` with paths relative to the folder of ``out``.
    """
    del check_files
    from PIL import Image

    npz_path = _npz_file(Path(root))
    out = Path(out)
    try:
        data = np.load(npz_path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FeatcacheError(f"{npz_path}: not a readable .npz file ({e})") from None
    splits_present = [s for s in _SPLITS if f"{s}_images" in arrays]
    if not splits_present:
        raise FeatcacheError(
            f"{npz_path}: no train_images / val_images / test_images arrays (keys: {sorted(arrays)})"
        )
    flavour = next((k for k in CLASS_NAMES if npz_path.name.lower().startswith(k)), None)
    names = class_names or (CLASS_NAMES[flavour] if flavour else None)

    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    paths, splits, label_rows = [], [], []
    for split in splits_present:
        images = arrays[f"{split}_images"]
        labels = arrays.get(f"{split}_labels")
        if images.ndim == 4 and images.shape[-1] != 3 or images.ndim not in (3, 4):
            raise FeatcacheError(
                f"{npz_path}: {split}_images has shape {images.shape}; only 2D MedMNIST (N x H x W [x 3]) is supported"
            )
        if labels is None or len(labels) != len(images):
            raise FeatcacheError(
                f"{npz_path}: {split}_labels is missing or has a different length than {split}_images"
            )
        if images.dtype != np.uint8:
            raise FeatcacheError(f"{npz_path}: {split}_images is {images.dtype}; MedMNIST images are uint8")
        for i, img in enumerate(images):
            rel = f"{folder.name}/{split}_{i:05d}.png"
            Image.fromarray(img).save(out.parent / rel)
            paths.append(rel)
            splits.append(split)
        label_rows.append(np.asarray(labels).reshape(len(labels), -1))
    labels = np.concatenate(label_rows)
    ids = [Path(p).stem for p in paths]
    notes = [
        f"wrote {len(paths)} PNG images to {folder}",
        "MedMNIST has no patient ids: each image is its own patient",
    ]

    if labels.shape[1] == 1:  # one class index per image: a multi-class manifest
        idx = labels[:, 0].astype(np.int64)
        if names is not None and idx.max() >= len(names):
            raise FeatcacheError(
                f"{npz_path}: class index {idx.max()} but only {len(names)} class names {names}"
            )
        targets = {"classes": [names[k] if names else str(k) for k in idx]}
    else:  # one 0/1 column per finding: multi-label
        columns = (
            names
            if names is not None and len(names) == labels.shape[1]
            else [f"finding_{j}" for j in range(labels.shape[1])]
        )
        targets = {"labels": {c: labels[:, j].astype(np.float32) for j, c in enumerate(columns)}}
    return assemble(
        "medmnist", out.parent, paths=paths, ids=ids, patient_ids=ids, splits=splits, notes=notes, **targets
    )
