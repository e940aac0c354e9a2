"""Slice features pooled per volume at probe time: equal to a numpy mean / max over the stored slices,
one sample per volume with the volume's patient, split and labels, and refusals when slices disagree."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from featcache.datasets.volumes import expand_volumes
from featcache.errors import FeatcacheError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.aggregate import aggregate, aggregate_probe_data, aggregate_split, volume_ids
from probes.data import ProbeData, Split, load_probe_data


def test_aggregate_equals_numpy_per_group():
    rng = np.random.default_rng(0)
    groups = rng.choice(np.array(["v3", "v1", "v2", "v10", "v0"]), size=60)
    X = rng.normal(size=(60, 7)).astype(np.float32)
    for how, fn in (("mean", np.mean), ("max", np.max)):
        Xa, gid, first = aggregate(X, groups, how)
        expected_order = list(dict.fromkeys(groups.tolist()))  # first appearance
        assert gid.tolist() == expected_order
        assert first.tolist() == [int(np.flatnonzero(groups == g)[0]) for g in expected_order]
        assert Xa.dtype == np.float32 and Xa.shape == (5, 7)
        for j, g in enumerate(expected_order):
            ref = fn(X[groups == g].astype(np.float64), axis=0)
            np.testing.assert_allclose(Xa[j], ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(FeatcacheError, match="--aggregate"):
        aggregate(X, groups, "median")
    Xa, gid, first = aggregate(X[:0], groups[:0])
    assert Xa.shape == (0, 7) and len(gid) == len(first) == 0


def _volumes(tmp_path, n_slices=(5, 3, 4, 6, 2)):
    """Small NIfTI volumes, a volume manifest with patients, splits and labels, expanded into slices."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "vols"
    folder.mkdir()
    cols = {k: [] for k in ("path", "id", "patient_id", "split", "effusion", "nodule", "meta_site")}
    plan = [
        ("pA", "train", 1, 0),
        ("pB", "train", 0, 1),
        ("pA", "train", 0, 0),
        ("pC", "val", 1, 1),
        ("pD", "test", 1, 0),
    ]
    for i, (n, (patient, split, eff, nod)) in enumerate(zip(n_slices, plan)):
        nib.save(
            nib.Nifti1Image(rng.normal(size=(6, 5, n)).astype(np.float32), np.eye(4)), folder / f"v{i}.nii.gz"
        )
        cols["path"].append(f"v{i}.nii.gz")
        cols["id"].append(f"vol{i}")
        cols["patient_id"].append(patient)
        cols["split"].append(split)
        cols["effusion"].append(float(eff))
        cols["nodule"].append(float(nod))
        cols["meta_site"].append("s1")
    write_manifest(folder / "vols.csv", cols)
    return expand_volumes(folder / "vols.csv", tmp_path / "slices").manifest, plan


def test_pooled_probe_data_equals_numpy_mean_over_stored_slices(tmp_path):
    slices_csv, plan = _volumes(tmp_path)
    m = read_manifest(slices_csv)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(len(m), 16)).astype(np.float32)
    store = FeatureStore(tmp_path / "cache", mode="a")
    fs = store.create_set(
        "vols/m/32", m, {"cls": ArraySpec((16,)), "pooled": ArraySpec((16,))}, {}, shard_rows=8
    )
    failed_row = 1  # a slice of vol0 that failed extraction is simply not pooled
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        failed = {failed_row: "decode error"} if lo <= failed_row < hi else {}
        fs.write_shard(s, {"cls": X[lo:hi], "pooled": X[lo:hi]}, failed)

    data = load_probe_data(tmp_path / "cache", features="cls")
    reopened = FeatureStore(tmp_path / "cache").open_set()
    stored, vids = reopened.read("cls"), volume_ids(reopened)
    assert vids.tolist() == [f"vol{i}" for i, n in enumerate((5, 3, 4, 6, 2)) for _ in range(n)]
    for how, fn in (("mean", np.mean), ("max", np.max)):
        pooled = aggregate_probe_data(data, vids, how)
        assert pooled.context["aggregate"] == how and pooled.context["n_slices"] == len(m) - 1
        assert pooled.train.ids.tolist() == ["vol0", "vol1", "vol2"]
        assert pooled.val.ids.tolist() == ["vol3"] and pooled.test.ids.tolist() == ["vol4"]
        for split in (pooled.train, pooled.val, pooled.test):
            for j, vid in enumerate(split.ids):
                rows = np.flatnonzero((vids == vid) & reopened.ok)
                np.testing.assert_allclose(split.X[j], fn(stored[rows].astype(np.float64), axis=0), rtol=1e-6)
                i = int(vid[3:])
                assert split.patients[j] == plan[i][0]
                assert split.y[j].tolist() == [plan[i][2], plan[i][3]]
                assert split.rows[j] == rows[0]
    # the unpooled data is untouched (one extraction serves every aggregation)
    assert len(data.train) == sum((5, 3, 4)) - 1


def _split(X, y, patients, ids, rows):
    return Split(
        np.asarray(X, np.float32), np.asarray(y), np.asarray(patients), np.asarray(ids), np.asarray(rows)
    )


def test_multiclass_targets_and_disagreeing_slices():
    vol = np.array(["a", "a", "b", "b", "b"])
    sp = _split(
        np.arange(10).reshape(5, 2),
        [2, 2, 0, 0, 0],
        ["p1"] * 2 + ["p2"] * 3,
        [f"s{i}" for i in range(5)],
        range(5),
    )
    pooled = aggregate_split(sp, vol, "mean")
    assert pooled.y.tolist() == [2, 0] and pooled.patients.tolist() == ["p1", "p2"]
    np.testing.assert_allclose(pooled.X, [[1, 2], [6, 7]])
    bad = _split(
        np.zeros((5, 2)), [2, 1, 0, 0, 0], ["p1"] * 2 + ["p2"] * 3, [f"s{i}" for i in range(5)], range(5)
    )
    with pytest.raises(FeatcacheError, match="volume 'a': slice 's1' has other labels than slice 's0'"):
        aggregate_split(bad, vol, "mean")
    nan_ok = _split(np.zeros((2, 2)), [[1, np.nan], [1, np.nan]], ["p"] * 2, ["s0", "s1"], range(2))
    assert aggregate_split(nan_ok, vol[:2], "max").y.shape == (1, 2)  # a missing label agrees with itself
    other_patient = _split(np.zeros((2, 2)), [0, 0], ["p1", "p9"], ["s0", "s1"], range(2))
    with pytest.raises(FeatcacheError, match="other patient"):
        aggregate_split(other_patient, vol[:2], "mean")


def test_volume_in_two_splits_or_without_id_is_refused():
    vol = np.array(["a", "a", "b", "b"])
    tr = _split(np.zeros((2, 2)), [0, 0], ["p1", "p1"], ["s0", "s1"], [0, 2])
    te = _split(np.zeros((2, 2)), [0, 0], ["p1", "p1"], ["s2", "s3"], [1, 3])
    empty = _split(np.zeros((0, 2)), np.zeros(0, int), [], [], np.zeros(0, int))
    data = ProbeData("multiclass", ["x", "y"], tr, empty, te)
    with pytest.raises(FeatcacheError, match="volume 'a' has slices in both train and test"):
        aggregate_probe_data(data, vol, "mean")
    with pytest.raises(FeatcacheError, match="no volume id"):
        aggregate_probe_data(data, np.array(["a", "", "b", "b"]), "mean")
    with pytest.raises(FeatcacheError, match="--aggregate"):
        aggregate_probe_data(data, vol, "sum")


def test_volume_ids_need_a_slice_manifest(tmp_path):
    slices_csv, _ = _volumes(tmp_path)
    plain = read_manifest(slices_csv)
    plain.meta = {}
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("x/m/32", plain, {"cls": ArraySpec((4,))}, {})
    with pytest.raises(FeatcacheError, match="no meta_volume column"):
        volume_ids(fs)
