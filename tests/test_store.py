"""FeatureStore contract: layout, whole-shard commits, reading block by block, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from featcache.errors import FeatcacheError, StoreError
from featcache.store.check import verify
from featcache.store.feature_store import (
    FAILED,
    OK,
    PENDING,
    ArraySpec,
    FeatureStore,
    default_shard_rows,
    extraction_lock,
)
from featcache.store.manifest import read_manifest, write_manifest


@pytest.fixture
def manifest(tmp_path):
    n = 10
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    cols = {
        "path": [f"{i}.png" for i in range(n)],
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "split": ["train"] * 6 + ["test"] * 4,
        "effusion": [1.0, 0.0, np.nan, -1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
        "meta_view": ["PA", "AP"] * 5,
    }
    return read_manifest(write_manifest(tmp_path / "m.csv", cols))


SPECS = {"cls": ArraySpec((8,)), "pooled": ArraySpec((8,)), "patch": ArraySpec((2, 2, 8), "float16")}


def _fill(fs, rng):
    data = {}
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        shard = {k: rng.standard_normal((hi - lo, *v.shape)).astype(v.dtype) for k, v in SPECS.items()}
        fs.write_shard(s, shard, {})
        for k, v in shard.items():
            data.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in data.items()}


def test_create_write_read(tmp_path, manifest):
    store = FeatureStore(tmp_path / "cache", mode="a")
    fs = store.create_set("m/model/64", manifest, SPECS, {"config": {"model": "x"}}, shard_rows=4)
    assert fs.n_shards == 3 and fs.shard_range(2) == (8, 10)
    assert (fs.status == PENDING).all()
    truth = _fill(fs, np.random.default_rng(0))
    fs2 = FeatureStore(tmp_path / "cache").open_set()  # the only set: name optional
    assert fs2.name == "m/model/64"
    assert fs2.ids.tolist() == manifest.ids.tolist()
    assert fs2.patient_ids.tolist() == manifest.patient_ids.tolist()
    assert fs2.splits.tolist() == manifest.splits.tolist()
    np.testing.assert_array_equal(fs2.labels, manifest.labels)
    assert fs2.label_names == ["effusion"] and fs2.task == "multilabel"
    assert fs2.meta("view").tolist() == ["PA", "AP"] * 5
    assert fs2.ok.all()
    for k in SPECS:
        np.testing.assert_array_equal(fs2.read(k), truth[k])
    np.testing.assert_array_equal(fs2.read("cls", slice(3, 9)), truth["cls"][3:9])  # straddles shards
    np.testing.assert_array_equal(fs2.read("patch", slice(3, 9)), truth["patch"][3:9])
    np.testing.assert_array_equal(fs2.read("cls", slice(1, 10, 3)), truth["cls"][1:10:3])
    rows = np.array([9, 0, 5, 4])
    np.testing.assert_array_equal(fs2.read("cls", rows), truth["cls"][rows])
    np.testing.assert_array_equal(fs2.read("patch", rows), truth["patch"][rows])
    np.testing.assert_array_equal(fs2.read("pooled", fs2.splits == "test"), truth["pooled"][6:])
    blocks = list(fs2.iter_blocks("patch", rows=np.array([1, 2, 9])))
    assert [b[0].tolist() for b in blocks] == [[1, 2], [9]]
    np.testing.assert_array_equal(blocks[1][1], truth["patch"][[9]])
    assert fs2.manifest_digest() == fs2.attrs["manifest_digest"] == manifest.digest()


def test_failures_and_retry(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {}, shard_rows=4)
    zeros = {k: np.zeros((4, *v.shape), v.dtype) for k, v in SPECS.items()}
    fs.write_shard(0, zeros, {2: "2.png: truncated file"})
    assert fs.status[:4].tolist() == [OK, OK, FAILED, OK]
    assert not fs.read("cls", slice(4, 10)).any()  # unwritten shards read as zeros
    assert fs.failures() == [{"index": 2, "id": "2.png", "reason": "2.png: truncated file"}]
    assert fs.shard_done().tolist() == [True, False, False]
    fs.write_shard(1, zeros, {5: "5.png: truncated file"})
    assert fs.reset_failed(shards=[1]) == 1  # a worker resets only its own shards
    assert fs.status[:8].tolist() == [OK, OK, FAILED, OK, OK, PENDING, OK, OK]
    assert fs.reset_failed() == 1 and fs.shard_done().tolist() == [False, False, False]


def test_write_shard_checks_rows(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {}, shard_rows=4)
    with pytest.raises(StoreError, match="has 3 rows, not 4"):
        fs.write_shard(0, {k: np.zeros((3, *v.shape), v.dtype) for k, v in SPECS.items()}, {})
    with pytest.raises(StoreError, match="missing array 'patch'"):
        fs.write_shard(0, {"cls": np.zeros((4, 8)), "pooled": np.zeros((4, 8))}, {})
    assert (fs.status == PENDING).all()


def test_reopen_same_settings_and_refuse_other(tmp_path, manifest):
    store = FeatureStore(tmp_path / "c", mode="a")
    cfg = {"model": "a", "res": 64, "device": "cpu", "settings": ["model", "res"]}
    fs = store.create_set("s", manifest, SPECS, cfg, shard_rows=4)
    assert "config" not in fs.attrs and fs.attrs["settings"] == ["model", "res"]
    # a value that is not a setting (the device) may differ on resume
    assert store.create_set("s", manifest, SPECS, {**cfg, "device": "cuda:0"}).shard_rows == fs.shard_rows
    with pytest.raises(StoreError, match="other settings.*res: stored 64 vs now 128"):
        store.create_set("s", manifest, SPECS, {**cfg, "res": 128})
    other = read_manifest(write_manifest(tmp_path / "o.csv", {"path": ["0.png"]}))
    with pytest.raises(StoreError, match="manifest with other images"):
        store.create_set("s", other, SPECS, cfg)


def test_a_set_made_before_is_resumed_on_the_settings_it_kept_under_config(tmp_path, manifest):
    store = FeatureStore(tmp_path / "c", mode="a")
    prep = {"res": 64, "resize": "squash", "interpolation": "bicubic"}  # res inside, no pipeline
    old = {
        "config": {"model": "a", "res": 64, "weights": "w", "preprocessing": prep},
        "model": "a",
        "res": 64,
    }
    store.create_set("s", manifest, SPECS, old, shard_rows=4)
    now = {
        "model": "a", "res": 64, "weights": "w", "compute_dtype": "float32",
        "preprocessing": {"resize": "squash", "interpolation": "bicubic", "pipeline": {"clamp": "to [0, 1]"}},
        "settings": ["model", "res", "weights", "preprocessing", "compute_dtype"],
    }  # fmt: skip
    assert store.create_set("s", manifest, SPECS, now).attrs["config"] == old["config"]
    with pytest.raises(StoreError, match="weights: stored 'w' vs now 'v'"):
        store.create_set("s", manifest, SPECS, {**now, "weights": "v"})


def test_open_errors(tmp_path, manifest):
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore(tmp_path / "none")
    store = FeatureStore(tmp_path / "c", mode="a")
    with pytest.raises(StoreError, match="holds no feature set"):
        store.open_set()
    store.create_set("a/x/1", manifest, SPECS, {})
    store.create_set("b/x/1", manifest, SPECS, {})
    assert store.list_sets() == ["a/x/1", "b/x/1"]
    with pytest.raises(StoreError, match="holds 2 feature sets"):
        store.open_set()
    with pytest.raises(StoreError, match="no feature set 'c'"):
        store.open_set("c")
    with pytest.raises(StoreError, match="no array 'registers'"):
        store.open_set("a/x/1").read("registers")


def test_fsspec_url_opens(tmp_path, manifest):
    FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {})
    fs = FeatureStore(f"file://{tmp_path / 'c'}").open_set("s")
    assert fs.n == 10 and fs.ids[0] == "0.png"


def test_default_shard_rows():
    assert default_shard_rows({"cls": ArraySpec((768,))}) == 4096
    assert (
        default_shard_rows({"patch": ArraySpec((32, 32, 4096), "float16")}) == 32
    )  # 7B at 512 px: 8 MiB rows
    assert default_shard_rows({"patch": ArraySpec((64, 64, 4096), "float16")}) == 16  # 32 MiB rows: the floor
    mid = default_shard_rows({"patch": ArraySpec((32, 32, 768), "float16")})
    assert mid == 128 and mid * 32 * 32 * 768 * 2 <= 256 * 2**20


def test_lock_refuses_second_writer(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {})
    code = (
        "import sys; from featcache.store.feature_store import FeatureStore, extraction_lock\n"
        f"fs = FeatureStore({str(tmp_path / 'c')!r}).open_set('s')\n"
        "n, i = int(sys.argv[1]), int(sys.argv[2])\n"
        "try:\n    with extraction_lock(fs, i, n): print('ok')\nexcept Exception as e: print(type(e).__name__)\n"
    )

    def other(n, i):
        return subprocess.run(
            [sys.executable, "-c", code, str(n), str(i)], capture_output=True, text=True
        ).stdout.strip()

    with extraction_lock(fs):
        assert other(1, 0) == "StoreError"
        assert other(2, 1) == "StoreError"
    with extraction_lock(fs, 0, 2):
        assert other(2, 1) == "ok"  # another worker of the same run
        assert other(2, 0) == "StoreError"  # the same worker twice
        assert other(1, 0) == "StoreError"  # a plain run while workers run
    assert other(1, 0) == "ok"  # released


def test_store_does_not_import_torch():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import featcache.store.feature_store, featcache.store.manifest, sys; print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "False", out.stderr


def test_attrs_are_json(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {"config": {"model": "m"}})
    meta = json.loads((tmp_path / "c" / "s" / "zarr.json").read_text())
    assert meta["attributes"]["config"] == {"model": "m"}
    assert meta["attributes"]["n"] == fs.n


def test_verify_reports_problems(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, SPECS, {}, shard_rows=4)
    assert any("10 of 10 row(s) pending" in p for p in verify(fs))
    rng = np.random.default_rng(0)
    _fill(fs, rng)
    assert verify(fs) == []
    raw, stored = fs.bytes_per_row()["patch"]
    assert raw == 2 * 2 * 8 * 2 and stored is not None and stored > 0
    bad = {k: rng.standard_normal((4, *v.shape)).astype(v.dtype) for k, v in SPECS.items()}
    bad["cls"][1, 3] = np.nan
    fs.write_shard(1, bad, {6: "6.png: unreadable"})
    problems = verify(fs)
    assert any("1 row(s) failed (first: 6.png: 6.png: unreadable)" in p for p in problems)
    assert any("'cls' has NaN or Inf in 1 rows" in p for p in problems)
    fs.group["labels"][0, 0] = 0.0  # tampering with the stored manifest is detected
    assert any("manifest digest" in p for p in verify(FeatureStore(tmp_path / "c").open_set("s")))


def test_small_sets_are_not_padded_to_a_full_shard(tmp_path, manifest):
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("s", manifest, {"cls": ArraySpec((768,))}, {})
    assert fs.shard_rows == 10  # not the 4096 rows a large set would get
    fs.write_shard(0, {"cls": np.ones((10, 768), np.float32)}, {})
    raw, stored = fs.bytes_per_row()["cls"]
    assert stored == pytest.approx(raw, rel=0.05)  # plus the array metadata document


def test_new_splits_and_labels_for_the_same_images_need_no_re_embedding(tmp_path, manifest):
    store = FeatureStore(tmp_path / "c", mode="a")
    fs = store.create_set("s", manifest, SPECS, {"config": {"model": "a"}}, shard_rows=4)
    truth = _fill(fs, np.random.default_rng(0))
    cols = {
        "path": manifest.paths.tolist(),
        "patient_id": manifest.patient_ids.tolist(),
        "split": ["test"] * 4 + ["train"] * 6,  # re-split
        "mass": [1.0, 0.0] * 5,  # relabelled
    }
    resplit = read_manifest(write_manifest(tmp_path / "m2.csv", cols), root=manifest.root)
    again = store.create_set("s", resplit, SPECS, {"config": {"model": "a"}})
    assert again.ok.all() and again.needs_manifest(resplit)  # nothing to redo, columns to take
    assert again.replace_manifest(resplit) and not again.replace_manifest(resplit)  # the second is a no-op
    reopened = FeatureStore(tmp_path / "c").open_set("s")
    assert reopened.splits.tolist() == cols["split"] and reopened.label_names == ["mass"]
    assert reopened.meta_names() == []  # the dropped meta column is gone
    assert reopened.attrs["manifest_digest"] == resplit.digest() == reopened.manifest_digest()
    np.testing.assert_array_equal(reopened.read("cls"), truth["cls"])
    assert verify(reopened) == []


def test_refused_run_leaves_the_manifest_alone_and_meta_changes_count(tmp_path, manifest):
    store = FeatureStore(tmp_path / "c", mode="a")
    store.create_set("s", manifest, SPECS, {"config": {"model": "a"}}, shard_rows=4)
    cols = {"path": manifest.paths.tolist(), "split": ["test"] * 10, "meta_site": ["x"] * 10}
    other = read_manifest(write_manifest(tmp_path / "m2.csv", cols), root=manifest.root)
    with pytest.raises(StoreError, match="other settings"):
        store.create_set("s", other, SPECS, {"config": {"model": "b"}})
    assert FeatureStore(tmp_path / "c").open_set("s").splits.tolist() == manifest.splits.tolist()
    only_meta = {"path": manifest.paths.tolist(), "patient_id": manifest.patient_ids.tolist(),
                 "split": manifest.splits.tolist(), "effusion": manifest.labels[:, 0].tolist(),
                 "meta_view": ["PA", "AP"] * 5, "meta_site": ["x"] * 10}  # fmt: skip
    m3 = read_manifest(write_manifest(tmp_path / "m3.csv", only_meta), root=manifest.root)
    fs = store.create_set("s", m3, SPECS, {"config": {"model": "a"}})
    assert fs.needs_manifest(m3) and fs.replace_manifest(m3)
    assert FeatureStore(tmp_path / "c").open_set("s").meta_names() == ["site", "view"]


def test_interrupted_replacement_is_refused_then_finished(tmp_path, manifest, monkeypatch):
    import featcache.store.layout as layout
    import featcache.store.write as writer
    from probes.data import load_probe_data

    store = FeatureStore(tmp_path / "c", mode="a")
    fs = store.create_set(
        "s", manifest, SPECS, {"config": {"model": "a"}, "model": "m", "res": 8}, shard_rows=4
    )
    _fill(fs, np.random.default_rng(0))
    cols = {"path": manifest.paths.tolist(), "patient_id": manifest.patient_ids.tolist(),
            "split": ["test"] * 4 + ["train"] * 6, "effusion": [1.0, 0.0] * 5}  # fmt: skip
    new = read_manifest(write_manifest(tmp_path / "m2.csv", cols), root=manifest.root)

    def killed(group, m):  # the process dies after the old columns are deleted
        for key in layout._MANIFEST_COLUMNS:
            if key in group:
                del group[key]
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "_write_manifest_columns", killed)
    with pytest.raises(KeyboardInterrupt):
        fs.replace_manifest(new)
    monkeypatch.undo()
    half = FeatureStore(tmp_path / "c").open_set("s")
    assert half.replacing and "interrupted" in verify(half)[0]
    with pytest.raises(FeatcacheError, match="interrupted"):
        load_probe_data(tmp_path / "c", "s")
    assert half.needs_manifest(manifest)  # even the old manifest must finish the replacement
    assert FeatureStore(tmp_path / "c", mode="a").open_set("s").replace_manifest(new)
    done = FeatureStore(tmp_path / "c").open_set("s")
    assert not done.replacing and verify(done) == [] and done.splits.tolist() == cols["split"]


def test_workers_replacing_at_once_do_not_collide(tmp_path, manifest):
    store = FeatureStore(tmp_path / "c", mode="a")
    store.create_set("s", manifest, SPECS, {"config": {"model": "a"}}, shard_rows=4)
    cols = {"path": manifest.paths.tolist(), "split": ["test", "train"] * 5, "effusion": [1.0, 0.0] * 5}
    write_manifest(tmp_path / "m2.csv", cols)
    code = (
        "from featcache.store.feature_store import FeatureStore; from featcache.store.manifest import read_manifest\n"
        f"m = read_manifest({str(tmp_path / 'm2.csv')!r}, root={str(manifest.root)!r})\n"
        f"fs = FeatureStore({str(tmp_path / 'c')!r}, mode='a').open_set('s')\n"
        "print(fs.replace_manifest(m))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and sorted(outs) == ["False", "False", "True"]
    done = FeatureStore(tmp_path / "c").open_set("s")
    assert not done.replacing and done.splits.tolist() == cols["split"]
