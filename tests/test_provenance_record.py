"""featcache.store.provenance.SetRecord: one reading of how a set was made, older layouts included."""

from __future__ import annotations

import pytest

from featcache.errors import FeatcacheError
from featcache.store.provenance import SetRecord


def test_record_reads_the_top_level_attributes():
    attrs = {
        "model": "random:dinov3-vits16",
        "res": 224,
        "preprocessing": {"res": 224, "resize": "squash"},
        "tokens": ["cls", "pooled", "patch"],
        "layers": [8, 11],
        "patch_pool": 2,
        "provenance": {"weights": "random seed 0"},
        "versions": {"featcache": "0.1.0"},
        "manifest_digest": "abc",
        "config": {"model": "other", "res": 512, "weights": "other"},
    }
    r = SetRecord.from_attrs(attrs)
    assert (r.model, r.res, r.weights, r.tokens, r.layers, r.patch_pool) == (
        "random:dinov3-vits16", 224, "random seed 0", ("cls", "pooled", "patch"), (8, 11), 2,
    )  # fmt: skip
    assert r.featcache_version == "0.1.0" and r.manifest_digest == "abc"
    assert r.backbone() == {
        "model": "random:dinov3-vits16", "weights": "random seed 0", "resolution": 224,
        "preprocessing": {"resize": "squash"},
    }  # fmt: skip


def test_older_sets_kept_their_settings_under_config_only():
    r = SetRecord.from_attrs(
        {
            "config": {
                "model": "m",
                "res": 448,
                "weights": "w",
                "preprocessing": {"res": 448, "resize": "crop"},
            }
        }
    )
    assert (r.model, r.res, r.weights, r.preprocessing, r.layers, r.patch_pool) == (
        "m",
        448,
        "w",
        {"resize": "crop"},
        (),
        1,
    )
    assert SetRecord.from_attrs({}) == SetRecord()


def test_each_value_is_read_once_from_the_current_layout_and_rebuilds_the_preprocess():
    from featcache.store.preprocess import Preprocess

    pre = Preprocess(96, resize="letterbox")
    prep = {k: v for k, v in pre.to_dict().items() if k != "res"}
    new = {"model": "m", "weights": "w", "res": 96, "preprocessing": prep, "compute_dtype": "bfloat16"}
    r = SetRecord.from_attrs(new)
    assert (r.weights, r.res, r.compute_dtype) == ("w", 96, "bfloat16")
    assert r.preprocess() == pre
    # the same extraction recorded the way sets were before: res inside the preprocessing,
    # weights inside the provenance, a copy under config; it reads the same
    before = {
        "model": "m", "res": 96, "provenance": {"weights": "w"}, "preprocessing": pre.to_dict(),
        "config": {"model": "m", "res": 96, "weights": "w", "compute_dtype": "bfloat16"},
    }  # fmt: skip
    assert SetRecord.from_attrs(before).backbone() == r.backbone()
    assert SetRecord.from_attrs(before).preprocess() == pre
    with pytest.raises(FeatcacheError, match="records no preprocessing"):
        SetRecord.from_attrs({"res": 96}).preprocess()
