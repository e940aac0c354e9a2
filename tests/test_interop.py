"""HDF5 / npz export and import: exact round trips, features from other tools matched by id, same kNN scores."""

from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from featcache.errors import FeatcacheError, StoreError
from featcache.interop import export_set, import_h5
from featcache.store.feature_store import FAILED, OK, ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest

N, D = 30, 16
SPECS = {"cls": ArraySpec((D,)), "pooled": ArraySpec((D,)), "patch": ArraySpec((2, 2, D), "float16")}


@pytest.fixture
def manifest_csv(tmp_path):
    rng = np.random.default_rng(0)
    cols = {
        "path": [f"img{i}.png" for i in range(N)],
        "id": [f"id{i:03d}" for i in range(N)],
        "patient_id": [f"p{i // 2}" for i in range(N)],
        "split": ["train"] * 20 + ["test"] * 10,
        "effusion": rng.choice([1.0, 0.0, np.nan, -1.0], N).tolist(),
        "edema": rng.choice([1.0, 0.0], N).tolist(),
        "meta_view": ["PA", "AP", "PA"] * 10,
    }
    return write_manifest(tmp_path / "m.csv", cols)


@pytest.fixture
def store(tmp_path, manifest_csv):
    """A feature set as extraction leaves it: 3 shards, one failed row, provenance attributes."""
    m = read_manifest(manifest_csv, check_files=False)
    attrs = {"config": {"model": "random:tiny", "res": 64}, "model": "random:tiny", "res": 64, "layers": []}
    fs = FeatureStore(tmp_path / "cache", mode="a").create_set(
        "toy/random-tiny/64", m, SPECS, attrs, shard_rows=12
    )
    rng = np.random.default_rng(1)
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        data = {k: rng.standard_normal((hi - lo, *v.shape)).astype(v.dtype) for k, v in SPECS.items()}
        failed = {7: "cannot decode img7.png"} if lo <= 7 < hi else {}
        if failed:
            for v in data.values():
                v[7 - lo] = 0
        fs.write_shard(s, data, failed)
    return tmp_path / "cache"


def _same_set(a, b, arrays):
    assert b.ids.tolist() == a.ids.tolist()
    assert b.patient_ids.tolist() == a.patient_ids.tolist()
    assert b.splits.tolist() == a.splits.tolist()
    assert b.label_names == a.label_names
    np.testing.assert_array_equal(b.labels, a.labels)  # NaN == NaN here
    assert b.meta("view").tolist() == a.meta("view").tolist()
    np.testing.assert_array_equal(b.status, a.status)
    assert b.failures() == a.failures()
    for name in arrays:
        x, y = a.read(name), b.read(name)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("fmt", ["h5", "npz"])
def test_export_then_import_round_trips_exactly(tmp_path, store, manifest_csv, fmt):
    out = export_set(store, None, tmp_path / f"toy.{fmt}", fmt)
    result = import_h5(
        out,
        tmp_path / "copy",
        "toy/imported/64",
        manifest=manifest_csv,
        format=fmt,  # the default features key takes an export's own arrays
    )
    assert result.matched == N and result.n_missing == 0 and result.failed_in_source == 1
    original = FeatureStore(store).open_set()
    copy = FeatureStore(tmp_path / "copy").open_set("toy/imported/64")
    _same_set(original, copy, ["cls", "pooled"])
    assert copy.arrays() == ["cls", "pooled"]  # patch is exported only when asked
    assert copy.attrs["source"] == "imported"
    assert copy.attrs["imported"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert copy.attrs["model"] == "random:tiny" and copy.attrs["res"] == 64
    assert copy.attrs["manifest_digest"] == original.attrs["manifest_digest"]


def test_h5_export_layout_and_patch_on_request(tmp_path, store):
    out = export_set(store, "toy/random-tiny/64", tmp_path / "toy.h5", patch=True)
    fs = FeatureStore(store).open_set()
    with h5py.File(out, "r") as f:
        assert {
            "cls",
            "pooled",
            "patch",
            "ids",
            "patient_ids",
            "splits",
            "labels",
            "label_names",
            "status",
        } <= set(f)
        np.testing.assert_array_equal(f["patch"][()], fs.read("patch"))
        assert f["patch"].dtype == np.float16
        assert [v.decode() for v in f["ids"][()]] == fs.ids.tolist()
        assert [v.decode() for v in f["label_names"][()]] == ["effusion", "edema"]
        assert [v.decode() for v in f["meta/view"][()]] == fs.meta("view").tolist()
        assert f.attrs["featcache_export"] == 1 and f.attrs["model"] == "random:tiny"
        assert json.loads(f.attrs["attrs_json"])["manifest_digest"] == fs.attrs["manifest_digest"]


def test_import_features_from_another_tool_matched_by_id(tmp_path, manifest_csv):
    """A TRIDENT/THUNDER-style file: `features` [M, D] and byte-string `ids`, in its own order."""
    m = read_manifest(manifest_csv, check_files=False)
    rng = np.random.default_rng(2)
    present = [i for i in range(N) if i not in (3, 17)]  # two manifest ids absent from the file
    order = rng.permutation(present).tolist()
    ids = [m.ids[i] for i in order] + ["not-in-manifest"]
    feats = rng.standard_normal((len(ids), D))  # float64, as numpy makes it
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("ids", data=np.array(ids, dtype="S"))
    result = import_h5(path, tmp_path / "cache", "toy/other/224", manifest=manifest_csv, res=224)
    assert (result.matched, result.n_missing, result.extra) == (N - 2, 2, 1)
    fs = FeatureStore(tmp_path / "cache").open_set()
    assert fs.arrays() == ["cls"] and fs.read("cls").dtype == np.float32
    status = fs.status
    assert (
        status[3] == status[17] == FAILED and (status[[i for i in range(N) if i not in (3, 17)]] == OK).all()
    )
    assert fs.failures()[0] == {"index": 3, "id": "id003", "reason": "id not in other.h5"}
    cls = fs.read("cls")
    for k, i in enumerate(order):
        np.testing.assert_array_equal(cls[i], feats[k].astype(np.float32))
    assert fs.attrs["source"] == "imported" and fs.attrs["res"] == 224 and fs.attrs["model"] == "imported"
    # Missing ids can be refused instead; a second file into the same set is refused.
    with pytest.raises(FeatcacheError, match="2 manifest ids are not in the file"):
        import_h5(path, tmp_path / "other", "x/y/1", manifest=manifest_csv, missing="error")
    path2 = tmp_path / "other2.h5"
    with h5py.File(path2, "w") as f:
        f.create_dataset("features", data=feats + 1)
        f.create_dataset("ids", data=np.array(ids, dtype="S"))
    with pytest.raises(StoreError, match="other settings"):
        import_h5(path2, tmp_path / "cache", "toy/other/224", manifest=manifest_csv)


def test_import_refuses_files_that_do_not_fit(tmp_path, manifest_csv):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("embeddings", data=np.zeros((4, D), np.float32))
        f.create_dataset("ids", data=np.array(["a", "b", "c"], dtype="S"))
    with pytest.raises(
        FeatcacheError, match=r"no dataset \['features'\] \(datasets: \['embeddings', 'ids'\]\)"
    ):
        import_h5(path, tmp_path / "c", "s/m/1", manifest=manifest_csv)
    with pytest.raises(FeatcacheError, match="'embeddings' has shape \\(4, 16\\) but 'ids' holds 3 ids"):
        import_h5(path, tmp_path / "c", "s/m/1", manifest=manifest_csv, features_key="embeddings")
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((2, D), np.float32))
        f.create_dataset("ids", data=np.array(["a", "b"], dtype="S"))
    with pytest.raises(FeatcacheError, match="none of the 2 ids"):
        import_h5(path, tmp_path / "c", "s/m/1", manifest=manifest_csv)


def test_knn_scores_identical_on_the_imported_copy(tmp_path, store, manifest_csv):
    pytest.importorskip("probes.estimators.knn")
    from probes.data import load_probe_data
    from probes.estimators.knn import KNNProbe

    out = export_set(store, None, tmp_path / "toy.h5")
    import_h5(out, tmp_path / "copy", "toy/imported/64", manifest=manifest_csv, features_key="cls")
    scores = []
    for cache in (store, tmp_path / "copy"):
        data = load_probe_data(cache, features="cls", val_fraction=0)
        probe = KNNProbe(k=(3, 5), task="multilabel").fit(data.train.X, data.train.y)
        scores.append((data.test.ids, probe.predict_scores(data.test.X)))
    (ids_a, a), (ids_b, b) = scores
    assert ids_a.tolist() == ids_b.tolist() and len(ids_a) == 10
    for k in (3, 5):
        np.testing.assert_array_equal(a[k], b[k])


def test_cli_export_import(tmp_path, store, manifest_csv):
    out = tmp_path / "toy.npz"
    r = CliRunner().invoke(cli.featcache, ["export", str(store), "--out", str(out)])
    assert r.exit_code == 0 and r.output.strip() == f"wrote {out}"
    args = [
        "import",
        str(out),
        "--out",
        str(tmp_path / "c"),
        "--name",
        "toy/npz/64",
        "--manifest",
        str(manifest_csv),
    ]
    r = CliRunner().invoke(cli.featcache, [*args, "--features-key", "pooled"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"imported {N} of {N} rows into 'toy/npz/64' (pooled)")
    np.testing.assert_array_equal(
        FeatureStore(tmp_path / "c").open_set().read("pooled"), FeatureStore(store).open_set().read("pooled")
    )
    r = CliRunner().invoke(cli.featcache, [*args, "--features-key", "nope"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "Traceback" not in r.output


def test_npz_with_object_ids_is_a_clear_error(tmp_path):
    from featcache.errors import FeatcacheError
    from featcache.interop import import_h5
    from featcache.store.manifest import write_manifest

    (tmp_path / "a.png").write_bytes(b"x")
    write_manifest(tmp_path / "m.csv", {"path": ["a.png"]})
    np.savez(tmp_path / "f.npz", features=np.zeros((1, 4), np.float32), ids=np.array(["a.png"], dtype=object))
    with pytest.raises(FeatcacheError, match=r"array 'ids' is stored as Python objects.*astype\(str\)"):
        import_h5(tmp_path / "f.npz", tmp_path / "cache", "x/y/1", manifest=tmp_path / "m.csv", format="npz")
