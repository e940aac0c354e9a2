"""featcache.store.provenance.SetRecord: one reading of how a set was made, older layouts included."""

from __future__ import annotations

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
        "preprocessing": {"res": 224, "resize": "squash"},
    }  # fmt: skip


def test_older_sets_kept_their_settings_under_config_only():
    r = SetRecord.from_attrs(
        {"config": {"model": "m", "res": 448, "weights": "w", "preprocessing": {"res": 448}}}
    )
    assert (r.model, r.res, r.weights, r.preprocessing, r.layers, r.patch_pool) == (
        "m",
        448,
        "w",
        {"res": 448},
        (),
        1,
    )
    assert SetRecord.from_attrs({}) == SetRecord()
