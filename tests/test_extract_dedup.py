"""Extraction refuses the same image file in two splits before any model is loaded."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from featcache.errors import FeatcacheError
from featcache.extract import ExtractConfig, extract
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest


def _films(root, n=6):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(root / f"f{i}.png")
    return [f"f{i}.png" for i in range(n)]


def test_same_file_in_train_and_test_is_refused_naming_both_rows(tmp_path):
    paths = _films(tmp_path)
    shutil.copyfile(tmp_path / "f0.png", tmp_path / "copy.png")  # same bytes, another id and patient
    write_manifest(
        tmp_path / "m.csv",
        {
            "path": [*paths, "copy.png"],
            "patient_id": [f"p{i}" for i in range(7)],
            "split": ["train"] * 4 + ["test"] * 3,
            "effusion": [1, 0, 1, 0, 1, 0, 1],
        },
    )
    cfg = ExtractConfig(
        model="random:no-such-model", data=str(tmp_path / "m.csv"), out=str(tmp_path / "c"), res=32
    )
    with pytest.raises(FeatcacheError) as e:  # refused before the (unknown) model is even looked up
        extract(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "f0.png" in msg and "copy.png" in msg and "train" in msg and "test" in msg


def test_duplicates_within_one_split_are_counted_in_the_provenance(tmp_path, capsys):
    paths = _films(tmp_path)
    shutil.copyfile(tmp_path / "f5.png", tmp_path / "again.png")  # both rows in test
    write_manifest(
        tmp_path / "m.csv",
        {"path": [*paths, "again.png"], "split": ["train"] * 5 + ["test"] * 2, "effusion": [1, 0] * 3 + [1]},
    )
    cfg = ExtractConfig(
        model="random:dinov3-vits16", data=str(tmp_path / "m.csv"), out=str(tmp_path / "c"), res=32, workers=0
    )
    r = extract(cfg, progress=False)
    attrs = FeatureStore(tmp_path / "c").open_set(r.set_name).attrs
    assert attrs["duplicates"]["within_split"] == 1 and attrs["duplicates"]["cross_split"] == 0
    assert capsys.readouterr().err.count("featcache extract:") == 1
