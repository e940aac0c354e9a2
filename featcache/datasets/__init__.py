"""Dataset adapters: official files of public datasets -> featcache manifests; splits and checks.

Each adapter reads a dataset's own files as documented by its authors and
writes a manifest in the format of ``featcache.store.manifest`` (paths relative to the
dataset root, ids, patient ids, splits, labels renamed to the shared
vocabulary of ``featcache.datasets.vocabulary``, ``meta_*`` columns):

=====================  ==========================================================
name                   module
=====================  ==========================================================
nih                    ``nih``: Data_Entry_2017(_v2020).csv + official split lists
chexpert               ``chexpert``: train.csv / valid.csv
mimic-cxr-jpg          ``mimic``: mimic-cxr-2.0.0-{chexpert,metadata,split}.csv
vindr-cxr              ``vindr``: annotations/image_labels_{train,test}.csv
rsna-pneumonia         ``rsna``: stage_2_train_labels.csv
padchest               ``padchest``: PADCHEST_chest_x_ray_images_labels_160K*.csv
pediatric-pneumonia    ``pediatric``: Kermany chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}
folder                 ``folder``: ROOT/<class>/*.png (optionally ROOT/<split>/<class>/)
medmnist               ``medmnist``: a MedMNIST .npz; writes PNGs beside the manifest
=====================  ==========================================================

Usage::

    from featcache.datasets import build_manifest, split_manifest, check_manifest
    built = build_manifest("nih", "/data/nih", "nih.csv")
    split_manifest("nih.csv", "nih.split.csv", val=0.1, test=0.2, stratify="all")
    print(check_manifest("nih.split.csv", root="/data/nih").render())
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from featcache.datasets import chexpert, folder, medmnist, mimic, nih, padchest, pediatric, rsna, vindr
from featcache.datasets._common import DatasetManifest
from featcache.datasets.check import CheckReport, check_manifest
from featcache.datasets.split import SplitResult, assign_splits, split_manifest
from featcache.errors import FeatcacheError
from featcache.store.manifest import read_manifest, write_manifest


@dataclass(frozen=True)
class Adapter:
    """A registered adapter.

    Attributes:
        name: the name users type (``featcache manifest NAME``).
        build: ``build(root, **options) -> DatasetManifest``.
        writes_images: the adapter writes image files beside the manifest (its ``build`` takes ``out``).
    """

    name: str
    build: Callable[..., DatasetManifest]
    writes_images: bool = False


ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in (
        Adapter("nih", nih.build),
        Adapter("chexpert", chexpert.build),
        Adapter("mimic-cxr-jpg", mimic.build),
        Adapter("vindr-cxr", vindr.build),
        Adapter("rsna-pneumonia", rsna.build),
        Adapter("padchest", padchest.build),
        Adapter("pediatric-pneumonia", pediatric.build),
        Adapter("folder", folder.build),
        Adapter("medmnist", medmnist.build, writes_images=True),
    )
}


def build_manifest(
    dataset: str, root: str | Path, out: str | Path, *, check_files: bool = True, **options
) -> DatasetManifest:
    """Build a dataset's manifest with its adapter, validate it, and write it.

    The CSV is written only if the manifest reader accepts it (ids unique, no
    patient in two splits, label values valid, and with ``check_files`` every
    image present), so a written manifest is always one ``featcache extract`` takes.

    Args:
        dataset: an ``ADAPTERS`` name.
        root: the dataset's folder (for ``medmnist``: the .npz file).
        out: the manifest CSV to write.
        check_files: look for image files on disk (missing ones are dropped and reported).
        **options: the adapter's own options (see its ``build``).

    Returns:
        The ``DatasetManifest``, with ``out`` set; its paths are relative to ``root``
        (``medmnist``: to the CSV's folder).

    Raises:
        FeatcacheError: unknown dataset, missing or malformed official files, an invalid manifest.
    """
    if dataset not in ADAPTERS:
        raise FeatcacheError(f"unknown dataset {dataset!r}; choose one of {sorted(ADAPTERS)}")
    adapter = ADAPTERS[dataset]
    out = Path(out)
    if adapter.writes_images:
        built = adapter.build(root, out=out, check_files=check_files, **options)
    else:
        built = adapter.build(root, check_files=check_files, **options)
    if built.n == 0:
        raise FeatcacheError(
            f"{root}: no images of {dataset} were found; check --root (the folder holding its files)"
        )
    tmp = out.with_name(out.name + ".tmp")
    write_manifest(tmp, built.columns)
    try:
        read_manifest(tmp, built.root, check_files=check_files)
    except FeatcacheError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    built.out = out
    return built


__all__ = [
    "ADAPTERS",
    "Adapter",
    "CheckReport",
    "DatasetManifest",
    "SplitResult",
    "assign_splits",
    "build_manifest",
    "check_manifest",
    "split_manifest",
]
