"""A feature set opened by other Zarr readers without featcache: xarray, dask, tensorstore, plain zarr.

Each reader's numbers are compared with featcache's own reads. Readers that are not installed
(the ``test-ecosystem`` extra) skip their test.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from featcache.store.check import verify
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.layout import decode_utf8_matrix, utf8_matrix
from featcache.store.manifest import read_manifest

N = 23
SET = "toy/model/64"


@pytest.fixture
def store(tmp_path) -> tuple[Path, dict]:
    """A finished set with cls, pooled, patch and layer arrays, labels, and non-ASCII ids."""
    (tmp_path / "img").mkdir()
    rows = ["path,id,patient_id,split,Effusion,Mass"]
    for i in range(N):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"x")
        split = ("train", "val", "test")[i % 3]
        rows.append(f"img/{i}.png,bild-{i}-ä{'x' * (i % 5)},p{i},{split},{i % 2},{(i + 1) % 2}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    m = read_manifest(tmp_path / "m.csv", check_files=False)
    specs = {
        "cls": ArraySpec((8,)),
        "pooled": ArraySpec((8,)),
        "patch": ArraySpec((2, 2, 8), "float16"),
        "layer_cls": ArraySpec((3, 8)),
    }
    out = tmp_path / "cache"
    fs = FeatureStore(out, mode="a").create_set(SET, m, specs, {"config": {"model": "toy"}}, shard_rows=10)
    rng = np.random.default_rng(0)
    truth = {k: rng.standard_normal((N, *s.shape)).astype(s.dtype) for k, s in specs.items()}
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        fs.write_shard(s, {k: v[lo:hi] for k, v in truth.items()}, {})
    fs.update_attrs(updated="now")  # what extract does at the end: re-consolidates
    return out, {**truth, "ids": m.ids, "splits": m.splits, "paths": m.paths, "labels": m.labels}


def test_every_array_has_dimension_names_and_the_set_is_consolidated(store):
    out, _ = store
    meta = json.loads((out / SET / "zarr.json").read_text())
    consolidated = meta["consolidated_metadata"]["metadata"]
    g = zarr.open_group(str(out / SET), mode="r", use_consolidated=False)
    for name, a in g.arrays():
        assert a.metadata.dimension_names and a.metadata.dimension_names[0] == "row", name
        assert name in consolidated and consolidated[name]["dimension_names"] == list(
            a.metadata.dimension_names
        )
    assert g["patch"].metadata.dimension_names == ("row", "h", "w", "dim")
    assert meta["attributes"]["updated"] == "now"  # the attributes and their consolidated copy agree
    assert zarr.open_group(str(out / SET), mode="r", use_consolidated=True).attrs["updated"] == "now"


def test_no_foreign_files_in_the_hierarchy_zarr_warns_about(store):
    out, _ = store
    from featcache.store.feature_store import FeatureStore

    fs = FeatureStore(out, mode="a").open_set()
    from featcache.store.locks import extraction_lock

    with extraction_lock(fs, 0, 2):  # what two workers hold
        assert not list((out / SET).glob(".*lock*"))
        assert (out.parent / "cache.locks" / SET / "extract.lock.0-of-2").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Object at ... is not recognized as a component of a Zarr hierarchy"
        g = zarr.open_group(str(out), mode="r")
        assert sorted(n for n, _ in g[SET].members()) == sorted(
            p.name for p in (out / SET).iterdir() if p.is_dir()
        )


def test_utf8_bytes_columns_round_trip():
    values = np.array(["a", "", "ää", "日本語", "x" * 40])
    m = utf8_matrix(values)
    assert m.dtype == np.uint8 and m.shape == (5, 40)
    assert bytes(m[3][:9]) == "日本語".encode()
    np.testing.assert_array_equal(decode_utf8_matrix(m), values)


def test_xarray_opens_the_set(store):
    xr = pytest.importorskip("xarray")
    out, truth = store
    # consolidated metadata is per set: open the set's folder, or the store with group= unconsolidated
    for ds in (
        xr.open_zarr(str(out / SET), consolidated=True, zarr_format=3),
        xr.open_zarr(str(out), group=SET, consolidated=False, zarr_format=3),
    ):
        np.testing.assert_array_equal(ds["cls"].values, truth["cls"])
        np.testing.assert_array_equal(ds["patch"].values, truth["patch"])
        assert ds["patch"].dims == ("row", "h", "w", "dim") and ds.sizes["row"] == N
        assert ds["ids"].values.tolist() == truth["ids"].tolist()
        np.testing.assert_array_equal(ds["labels"].values, truth["labels"])
        # the status says which rows are done, as featcache reads it
        assert (ds["status"].values == 1).all()


def test_xarray_datatree_opens_the_whole_store(store):
    xr = pytest.importorskip("xarray")
    if not hasattr(xr, "open_datatree"):
        pytest.skip("this xarray has no open_datatree")
    out, truth = store
    tree = xr.open_datatree(str(out), engine="zarr", consolidated=False, zarr_format=3)
    np.testing.assert_array_equal(tree[SET]["pooled"].values, truth["pooled"])


def test_dask_reads_lazily_in_shard_chunks(store):
    da = pytest.importorskip("dask.array")
    out, truth = store
    x = da.from_zarr(str(out / SET / "cls"))
    assert x.chunks[0] == (10, 10, 3)  # one dask chunk per shard
    np.testing.assert_allclose(x.mean(axis=0).compute(), truth["cls"].mean(axis=0), rtol=1e-6)
    p = da.from_zarr(str(out / SET / "patch"))
    np.testing.assert_array_equal(p[5:7].compute(), truth["patch"][5:7])


def test_tensorstore_reads_numbers_and_the_byte_columns(store):
    ts = pytest.importorskip("tensorstore")
    out, truth = store

    def read(name):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / SET / name)}}
        return ts.open(spec, read=True).result().read().result()

    np.testing.assert_array_equal(read("cls"), truth["cls"])
    np.testing.assert_array_equal(read("patch"), truth["patch"])  # sharded, Blosc, crc32c
    np.testing.assert_array_equal(read("layer_cls"), truth["layer_cls"])
    assert (read("status") == 1).all()
    for col in ("ids", "splits", "paths"):
        raw = read(col + "_utf8")
        assert raw.dtype == np.uint8
        decoded = [bytes(r).rstrip(b"\0").decode("utf-8") for r in raw]  # no featcache code
        assert decoded == truth[col].tolist()


def test_sets_written_before_have_no_new_arrays_and_still_read(store, tmp_path):
    """A set as an older featcache wrote it: no byte columns, no consolidated metadata, locks inside."""
    out, truth = store
    folder = out / SET
    g = zarr.open_group(str(folder), mode="a", use_consolidated=False)
    for col in ("ids", "paths", "patient_ids", "splits"):
        del g[col + "_utf8"]
    meta = json.loads((folder / "zarr.json").read_text())
    meta.pop("consolidated_metadata", None)
    (folder / "zarr.json").write_text(json.dumps(meta))
    (folder / ".extract.lock").write_text("")
    (folder / ".manifest.lock").write_text("")
    fs = FeatureStore(out).open_checked()
    np.testing.assert_array_equal(fs.read("cls"), truth["cls"])
    np.testing.assert_array_equal(fs.ids, truth["ids"])
    assert verify(fs) == []
    from featcache.store.locks import extraction_lock

    with extraction_lock(FeatureStore(out, mode="a").open_set()):  # the next extraction tidies up
        pass
    assert not (folder / ".extract.lock").exists() and not (folder / ".manifest.lock").exists()
