"""probes.data: from a feature store to per-split features, targets and patients.

Stores are built directly with FeatureStore.create_set + write_shard from synthetic features
(no torch, no model). ``build_store`` is reused by test_probes_run.py and test_probes_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.data import carve_val, check_same_test, load_probe_data

LABELS = ("effusion", "nodule")


def build_store(
    root: Path,
    *,
    name: str = "toy/random-tiny/32",
    model: str = "random:tiny",
    task: str = "multilabel",
    n_patients: int = 30,
    per_patient: int = 2,
    dim: int = 6,
    with_val: bool = True,
    failed: tuple[int, ...] = (),
    uncertain_rows: tuple[int, ...] = (),
    signal: float = 3.0,
    seed: int = 0,
    manifest_name: str = "manifest.csv",
    layers: bool = False,
    drop_test_patient: bool = False,
) -> dict:
    """Write a manifest and a feature set whose features carry the labels (plus noise).

    Multi-label: labels ``effusion`` and ``nodule``, per patient, about half positive each;
    feature column j is ``signal * label_j + noise``. Multi-class: classes ``a``, ``b``, ``c``.
    Patients are split 60/20/20 (train/val/test), or 80/0/20 with ``with_val=False``.

    Returns:
        dict with ``cache`` (store folder), ``name``, ``manifest`` (CSV path), ``X`` float32 [N, D]
        (the features as written), ``Y`` (raw labels float [N, L] or class names [N]),
        ``patients``, ``splits``, ``ids``.
    """
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    patients = np.repeat([f"p{p:03d}" for p in range(n_patients)], per_patient)
    order = rng.permutation(n_patients)
    n_train = int((0.6 if with_val else 0.8) * n_patients)
    n_val = int(0.2 * n_patients) if with_val else 0
    split_of = np.where(order < n_train, "train", np.where(order < n_train + n_val, "val", "test"))
    splits = np.repeat(split_of, per_patient)
    ids = np.array([f"img{i:04d}" for i in range(n)])
    cols: dict = {
        "path": [f"images/{i}.png" for i in ids],
        "id": ids,
        "patient_id": patients,
        "split": splits,
    }
    X = rng.normal(size=(n, dim)).astype(np.float32)
    if task == "multilabel":
        Yp = (rng.random((n_patients, len(LABELS))) < 0.5).astype(np.float32)
        Y = np.repeat(Yp, per_patient, axis=0)
        for s in ("train", "val", "test"):  # both classes in every split, whatever the draw
            rows = np.flatnonzero(splits == s)
            if len(rows):
                Y[rows[:per_patient]] = 1
                Y[rows[per_patient : 2 * per_patient]] = 0
        X[:, : len(LABELS)] += signal * Y
        Y[list(uncertain_rows), 0] = -1
        for j, lab in enumerate(LABELS):
            cols[lab] = Y[:, j]
    else:
        names = np.array(["a", "b", "c"])
        cls = np.repeat(rng.integers(0, 3, n_patients), per_patient)
        for s in ("train", "val", "test"):
            rows = np.flatnonzero(splits == s)
            for c in range(3):
                if len(rows) >= 3 * per_patient:
                    cls[rows[c * per_patient : (c + 1) * per_patient]] = c
        X[:, :3] += signal * np.eye(3, dtype=np.float32)[cls]
        Y = names[cls]
        cols["label"] = Y
    csv = write_manifest(root / manifest_name, cols)
    manifest = read_manifest(csv, check_files=False)
    store = FeatureStore(root / "cache", mode="a")
    arrays = {"cls": ArraySpec((dim,)), "pooled": ArraySpec((dim,))}
    if layers:
        arrays["layer_cls"] = ArraySpec((2, dim))
    attrs = {
        "config": {"model": model, "weights": "random-init seed 0", "res": 32},
        "model": model,
        "res": 32,
        "preprocessing": {"resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3},
        "provenance": {"weights": "random-init seed 0"},
        "layers": [3, 7] if layers else [],
        "versions": {"featcache": "0.1.0"},
    }
    fs = store.create_set(name, manifest, arrays, attrs, shard_rows=16)
    pooled = -X
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        data = {"cls": X[lo:hi], "pooled": pooled[lo:hi]}
        if layers:
            data["layer_cls"] = np.stack([X[lo:hi] * 2, X[lo:hi] * 3], axis=1)
        bad = {i: "cannot decode" for i in failed if lo <= i < hi}
        for i in bad:
            for key in data:
                data[key][i - lo] = 0
        fs.write_shard(s, data, bad)
    return {
        "cache": str(root / "cache"),
        "name": name,
        "manifest": csv,
        "X": X,
        "Y": Y,
        "patients": patients,
        "splits": splits,
        "ids": ids,
    }


def test_splits_match_the_manifest_and_features_come_back_in_row_order(tmp_path):
    s = build_store(tmp_path)
    d = load_probe_data(s["cache"])
    assert d.task == "multilabel" and d.label_names == list(LABELS)
    assert d.context["val_carved"] is False
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(s["splits"] == split)
        part = d.split(split)
        assert part.ids.tolist() == s["ids"][rows].tolist()
        assert part.patients.tolist() == s["patients"][rows].tolist()
        np.testing.assert_array_equal(part.X, s["X"][rows])
        np.testing.assert_array_equal(part.y, s["Y"][rows])
        assert part.X.dtype == np.float32 and part.y.dtype == np.float32
    assert len(d.train) + len(d.val) + len(d.test) == len(s["ids"])


def test_features_pooled_concatenated_and_layers(tmp_path):
    s = build_store(tmp_path, layers=True)
    test = np.flatnonzero(s["splits"] == "test")
    X = s["X"][test]
    np.testing.assert_array_equal(load_probe_data(s["cache"], features="pooled").test.X, -X)
    both = load_probe_data(s["cache"], features="cls+pooled").test.X
    np.testing.assert_array_equal(both, np.concatenate([X, -X], axis=1))
    # -1 is the last stored layer; 3 is the model layer index recorded at extraction
    last = load_probe_data(s["cache"], features="layer_cls:-1")
    np.testing.assert_allclose(last.test.X, 3 * X)
    assert last.context["layer"] == 7
    np.testing.assert_allclose(load_probe_data(s["cache"], features="layer_cls:3").test.X, 2 * X)
    np.testing.assert_allclose(
        load_probe_data(s["cache"], features="layer_cls").test.X,
        np.concatenate([2 * X, 3 * X], axis=1),
    )


def test_failed_rows_are_left_out(tmp_path):
    s0 = build_store(tmp_path / "probe")
    test_rows = np.flatnonzero(s0["splits"] == "test")
    failed = (int(test_rows[0]), 5)
    s = build_store(tmp_path / "real", failed=failed)
    d = load_probe_data(s["cache"])
    kept = set(d.train.ids) | set(d.val.ids) | set(d.test.ids)
    assert kept == set(s["ids"].tolist()) - {s["ids"][i] for i in failed}
    assert s["ids"][failed[0]] not in d.test.ids
    assert not np.any(np.all(d.test.X == 0, axis=1))


def test_uncertain_policies(tmp_path):
    s = build_store(tmp_path, uncertain_rows=(0, 1, 2, 3))
    raw = s["Y"]
    expected = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
    for policy, value in expected.items():
        d = load_probe_data(s["cache"], uncertain=policy)
        for split in ("train", "val", "test"):
            part = d.split(split)
            want = raw[part.rows].copy()
            want[want == -1] = value
            np.testing.assert_array_equal(part.y, want)
            assert not np.any(part.y == -1)
        assert d.context["uncertain"] == policy


def test_label_subset_and_rows_without_any_known_label(tmp_path):
    s = build_store(tmp_path, uncertain_rows=(0, 1))
    d = load_probe_data(s["cache"], labels=["effusion"], uncertain="ignore")
    assert d.label_names == ["effusion"]
    assert d.train.y.shape[1] == 1
    # rows 0 and 1 only had an (ignored) uncertain effusion label: nothing left to learn from
    kept = np.concatenate([d.train.rows, d.val.rows, d.test.rows])
    assert 0 not in kept and 1 not in kept
    d2 = load_probe_data(s["cache"], labels=["effusion"], uncertain="zeros")
    assert 0 in np.concatenate([d2.train.rows, d2.val.rows, d2.test.rows])


def test_multiclass_targets_are_sorted_class_indices(tmp_path):
    s = build_store(tmp_path, task="multiclass")
    d = load_probe_data(s["cache"])
    assert d.task == "multiclass" and d.label_names == ["a", "b", "c"]
    np.testing.assert_array_equal(np.array(d.label_names)[d.test.y], s["Y"][d.test.rows])
    assert d.test.y.dtype == np.int64
    sub = load_probe_data(s["cache"], labels=["c", "a"])
    assert sub.label_names == ["a", "c"]
    assert set(np.array(["a", "c"])[sub.train.y]) <= {"a", "c"}
    assert len(sub.train) == int(np.isin(s["Y"][s["splits"] == "train"], ["a", "c"]).sum())


def test_carved_val_is_patient_level_and_deterministic(tmp_path):
    s = build_store(tmp_path, with_val=False, n_patients=40)
    a = load_probe_data(s["cache"], val_fraction=0.25, seed=3)
    b = load_probe_data(s["cache"], val_fraction=0.25, seed=3)
    c = load_probe_data(s["cache"], val_fraction=0.25, seed=4)
    assert a.context["val_carved"] is True and a.context["val_fraction"] == 0.25
    assert a.val.ids.tolist() == b.val.ids.tolist()
    assert a.val.ids.tolist() != c.val.ids.tolist()
    assert not set(a.val.patients) & set(a.train.patients)
    train_patients = set(s["patients"][s["splits"] == "train"])
    assert set(a.val.patients) | set(a.train.patients) == train_patients
    assert len(set(a.val.patients)) == int(np.ceil(0.25 * len(train_patients)))
    none = load_probe_data(s["cache"], val_fraction=0)
    assert len(none.val) == 0 and none.context["val_carved"] is False


def test_carve_val_by_hand():
    pids = np.array(["x", "x", "y", "z", "z", "z"])
    mask = carve_val(pids, 0.5, seed=0)
    chosen = set(pids[mask])
    assert len(chosen) == 2  # ceil(0.5 * 3)
    for p in "xyz":  # whole patients only
        assert mask[pids == p].all() or not mask[pids == p].any()
    with pytest.raises(FeatcacheError, match="train patient"):
        carve_val(np.array(["x", "x"]), 0.2, seed=0)


def test_context_carries_provenance(tmp_path):
    s = build_store(tmp_path)
    d = load_probe_data(s["cache"], features="pooled")
    c = d.context
    store = FeatureStore(s["cache"])
    fs = store.open_set()
    assert c["dataset"] == "toy" and c["model"] == "random:tiny" and c["res"] == 32
    assert c["features"] == "pooled" and c["store_set"] == s["name"]
    assert c["manifest_digest"] == read_manifest(s["manifest"], check_files=False).digest()
    assert c["manifest_digest"] == fs.attrs["manifest_digest"]
    assert c["weights"] == "random-init seed 0" and c["preprocessing"]["resize"] == "squash"
    assert c["featcache_version"] == "0.1.0"


def test_errors_are_clear(tmp_path):
    s = build_store(tmp_path)
    with pytest.raises(FeatcacheError, match="unknown labels.*'atelectasis'.*effusion, nodule"):
        load_probe_data(s["cache"], labels=["atelectasis"])
    with pytest.raises(FeatcacheError, match="not stored.*cls, pooled.*--layers"):
        load_probe_data(s["cache"], features="layer_cls:-1")
    with pytest.raises(FeatcacheError, match="segmentation probes"):
        load_probe_data(s["cache"], features="patch")
    with pytest.raises(FeatcacheError, match="features 'bogus' are not stored"):
        load_probe_data(s["cache"], features="cls+bogus")
    with pytest.raises(FeatcacheError, match="no feature set 'nope'"):
        load_probe_data(s["cache"], "nope")
    with pytest.raises(FeatcacheError, match="uncertain"):
        load_probe_data(s["cache"], uncertain="maybe")


def test_no_test_rows_and_no_labels(tmp_path):
    cols = {
        "path": [f"{i}.png" for i in range(6)],
        "patient_id": ["a", "a", "b", "b", "c", "c"],
        "split": ["train"] * 4 + ["val"] * 2,
        "effusion": [1, 0, 1, 0, 1, 0],
    }
    m = read_manifest(write_manifest(tmp_path / "m.csv", cols), check_files=False)
    store = FeatureStore(tmp_path / "cache", mode="a")
    fs = store.create_set("d/m/8", m, {"cls": ArraySpec((2,))}, {"model": "m", "res": 8}, shard_rows=16)
    fs.write_shard(0, {"cls": np.ones((6, 2), np.float32)}, {})
    with pytest.raises(FeatcacheError, match="no usable test rows.*0 rows have split 'test'"):
        load_probe_data(tmp_path / "cache")

    cols.pop("effusion")
    cols["split"] = ["train"] * 4 + ["test"] * 2
    m = read_manifest(write_manifest(tmp_path / "n.csv", cols), check_files=False)
    fs = store.create_set("e/m/8", m, {"cls": ArraySpec((2,))}, {"model": "m", "res": 8}, shard_rows=16)
    fs.write_shard(0, {"cls": np.ones((6, 2), np.float32)}, {})
    with pytest.raises(FeatcacheError, match="no labels.*task 'none'"):
        load_probe_data(tmp_path / "cache", "e/m/8")


def test_pending_rows_are_not_used(tmp_path):
    s = build_store(tmp_path)
    fs = FeatureStore(s["cache"], mode="a").open_set()
    status = fs.status
    status[fs.splits == "test"] = 0  # as if the test shards had not been written yet
    fs.group["status"][:] = status
    with pytest.raises(FeatcacheError, match="12 of 60 row.* still pending.*--allow-partial"):
        load_probe_data(s["cache"])  # a set still being written is refused by default
    with pytest.raises(FeatcacheError, match="no usable test rows.*0 of them extracted"):
        load_probe_data(s["cache"], allow_partial=True)  # and even allowed, pending rows are never used


def test_check_same_test(tmp_path):
    s = build_store(tmp_path)
    build_store(tmp_path, name="toy/other/32", model="random:other", seed=0)
    a = load_probe_data(s["cache"], "toy/random-tiny/32")
    b = load_probe_data(s["cache"], "toy/other/32")
    check_same_test(a, b)  # same manifest, other model: fine

    test_row = int(np.flatnonzero(s["splits"] == "test")[0])
    build_store(tmp_path, name="toy/failing/32", failed=(test_row,))
    c = load_probe_data(s["cache"], "toy/failing/32")
    with pytest.raises(FeatcacheError, match="differ in test rows.*retry-failed"):
        check_same_test(a, c)

    build_store(tmp_path, name="toy/othermanifest/32", seed=1, manifest_name="other.csv")
    d = load_probe_data(s["cache"], "toy/othermanifest/32")
    with pytest.raises(FeatcacheError, match="different manifests"):
        check_same_test(a, d)
    with pytest.raises(FeatcacheError, match="different labels"):
        check_same_test(a, load_probe_data(s["cache"], "toy/other/32", labels=["nodule"]))


def test_allow_partial_probes_the_finished_rows_and_says_how_many_are_missing(tmp_path):
    from probes.run import run_knn

    s = build_store(tmp_path)
    fs = FeatureStore(s["cache"], mode="a").open_set()
    status = fs.status
    status[np.flatnonzero(fs.splits == "train")[:4]] = 0
    fs.group["status"][:] = status
    with pytest.raises(FeatcacheError, match="still pending"):
        run_knn(s["cache"], k=(3,), n_boot=10)
    rows = run_knn(s["cache"], k=(3,), n_boot=10, allow_partial=True)
    assert all(r["params"]["pending_rows"] == 4 for r in rows)
    assert rows[0]["n_train"] == int(((fs.splits == "train") | (fs.splits == "val")).sum()) - 4


def relabel(s: dict, labels: np.ndarray, name: str | None = None) -> None:
    """Give a test store new label values the way a user does: a new manifest, taken without
    re-embedding (the features are kept; the recorded manifest digest follows the new columns)."""
    import csv as _csv

    with open(s["manifest"], newline="") as f:
        rows = list(_csv.DictReader(f))
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    for j, lab in enumerate(LABELS):
        cols[lab] = [("" if np.isnan(v) else str(int(v))) for v in labels[:, j]]
    csv_path = write_manifest(s["manifest"], cols)
    fs = FeatureStore(s["cache"], mode="a").open_set(name or s["name"])
    m = read_manifest(csv_path, check_files=False)
    assert fs.needs_manifest(m) and fs.replace_manifest(m)
