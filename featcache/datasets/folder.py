"""One class per folder: ``ROOT/<class>/*.png`` (the torchvision ImageFolder layout).

If ``ROOT`` holds ``train`` / ``val`` / ``test`` folders (``ROOT/<split>/<class>/...``), those become the
splits; otherwise the split is blank. Images are found recursively inside each class folder (PNG, JPEG,
TIFF, BMP, DICOM). A folder layout carries no patient ids: each image is its own patient, so split
such a set with care (``featcache split`` cannot keep a patient's images together).

Columns: ``label`` = the class folder name.
"""

from __future__ import annotations

from pathlib import Path

from featcache.datasets._common import IMAGE_EXTENSIONS, DatasetManifest, assemble, index_files
from featcache.errors import FeatcacheError

_SPLITS = ("train", "val", "test")


def _classes(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def build(root: str | Path, *, check_files: bool = True) -> DatasetManifest:
    """Build a multi-class manifest from class folders.

    Args:
        root: the folder holding one folder per class (or ``train``/``val``/``test`` folders of them).
        check_files: unused (the images are listed from the disk).

    Returns:
        A ``DatasetManifest`` with paths relative to ``root``.
    """
    del check_files
    root = Path(root)
    if not root.is_dir():
        raise FeatcacheError(
            f"{root}: folder not found; pass the folder holding one folder per class with --root"
        )
    split_folders = [root / s for s in _SPLITS if (root / s).is_dir()]
    layout = [(s.name, s) for s in split_folders] if split_folders else [("", root)]
    paths, splits, classes = [], [], []
    for split, folder in layout:
        for cls in _classes(folder):
            for rel in sorted(index_files(cls, extensions=IMAGE_EXTENSIONS, key="path").values()):
                paths.append((cls / rel).relative_to(root).as_posix())
                splits.append(split)
                classes.append(cls.name)
    if not paths:
        raise FeatcacheError(f"{root}: no images found in class folders (expected ROOT/<class>/*.png)")
    return assemble(
        "folder",
        root,
        paths=paths,
        ids=paths,
        patient_ids=paths,
        splits=splits,
        classes=classes,
        notes=["a folder layout has no patient ids: each image is its own patient"]
        + ([] if split_folders else ["no train/val/test folders: split left blank (run featcache split)"]),
    )
