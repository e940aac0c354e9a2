"""Tampered stores: each kind of damage gets its one-line error, and no probe gets a number from it.

Damage is made by hand on the files (a flipped byte, a deleted, zeroed, truncated or empty chunk,
a status byte of 254, edited attributes, a missing zarr.json), then read through
``FeatureSet.read``, ``FeatureStore.open_checked``, ``verify`` and the probes' loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import featcache.store.layout as store_mod
from featcache.errors import FeatcacheError, StoreError
from featcache.store.check import verify
from featcache.store.feature_store import OK, PENDING, ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.data import load_probe_data

SPECS = {"cls": ArraySpec((8,)), "pooled": ArraySpec((8,)), "patch": ArraySpec((2, 2, 8), "float16")}
N, SHARD = 12, 4


@pytest.fixture
def store(tmp_path):
    """A complete set of 12 rows in 3 shards; returns (store folder, set folder, the data written)."""
    cols = {
        "path": [f"{i}.png" for i in range(N)],
        "patient_id": [f"p{i // 2}" for i in range(N)],
        "split": ["train"] * 8 + ["test"] * 4,
        "effusion": [float(i % 2) for i in range(N)],
        "atelectasis": [float(i % 3 == 0) for i in range(N)],
    }
    for i in range(N):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    manifest = read_manifest(write_manifest(tmp_path / "m.csv", cols))
    fs = FeatureStore(tmp_path / "c", mode="a").create_set("m/x/32", manifest, SPECS, {"config": {}}, SHARD)
    rng = np.random.default_rng(0)
    data = {k: rng.standard_normal((N, *v.shape)).astype(v.dtype) for k, v in SPECS.items()}
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        fs.write_shard(s, {k: v[lo:hi] for k, v in data.items()}, {})
    return tmp_path / "c", tmp_path / "c" / "m/x/32", data


def _flip(path: Path, at: int = 3) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0x10
    path.write_bytes(bytes(b))


def _edit_attrs(set_dir: Path, **kv) -> None:
    meta = json.loads((set_dir / "zarr.json").read_text())
    meta["attributes"].update(kv)
    (set_dir / "zarr.json").write_text(json.dumps(meta))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_clean_set_passes_every_check(store):
    cache, _, data = store
    fs = FeatureStore(cache).open_checked()
    assert fs.usable == {"n": N, "ok": N, "failed": 0, "pending": 0}
    assert fs.checksummed and verify(fs) == []
    for k, v in data.items():
        np.testing.assert_array_equal(fs.read(k), v)
        np.testing.assert_array_equal(fs.read(k, np.array([9, 1, 5])), v[[9, 1, 5]])
    assert fs._raw_chunk_folder(fs.group["cls"]) is not None  # the fast path is the one checked


CHUNK_DAMAGE = {
    "flipped byte": lambda p: _flip(p),
    "flipped byte in the checksum": lambda p: _flip(p, at=p.stat().st_size - 2),
    "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-7]),
    "empty": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("array", ["cls", "patch"])
@pytest.mark.parametrize("damage", list(CHUNK_DAMAGE))
def test_damaged_chunk_fails_every_read_with_one_line(store, array, damage):
    cache, set_dir, data = store
    chunk = set_dir / array / "c" / "1" / "0" / "0"
    chunk = chunk if array == "patch" else chunk.parent
    CHUNK_DAMAGE[damage](chunk / "0" if array == "patch" else chunk)
    fs = FeatureStore(cache).open_set()
    for rows in (None, slice(4, 6), np.array([4]), np.array([0, 4, 11])):  # row 4 is damaged
        with pytest.raises(StoreError) as info:
            fs.read(array, rows)
        msg = _one_line(info.value)
        assert f"array '{array}', shard 1" in msg and "verify --repair" in msg, msg
    np.testing.assert_array_equal(fs.read(array, slice(0, 4)), data[array][:4])  # other shards still read
    problems = verify(fs)
    assert any(p.startswith(f"array '{array}', shard 1") for p in problems), problems
    if array == "cls":
        with pytest.raises(StoreError, match="shard 1"):
            load_probe_data(str(cache), features="cls", val_fraction=0)


def test_status_254_is_refused_and_repaired(store):
    cache, _, _ = store
    fs = FeatureStore(cache, mode="a").open_set()
    st = fs.read_shard_checked("status", 2)
    st[1] = 254
    fs._writable("status")[8:12] = st
    with pytest.raises(StoreError, match="status outside \\{0, 1, 2\\}.*first row 9"):
        FeatureStore(cache).open_checked()
    problems = verify(fs)
    assert any("status outside" in p for p in problems)
    assert not fs.shard_done()[2]  # the next extraction redoes it instead of dropping the row
    verify(fs, repair=True)
    assert (fs.status[8:12] == PENDING).all() and (fs.status[:8] == OK).all()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"label_names": ["atelectasis", "effusion"]}, "manifest digest"),
        ({"format_version": 99}, "format_version 99 is unknown"),
        ({"n": 16}, "attributes say \\(16,"),
        ({"model": "dinov3-vit7b16"}, "attributes were edited"),
        ({"res": 512}, "attributes were edited"),
        ({"arrays": {"cls": {"shape": [8], "dtype": "float32"}}}, "attributes were edited"),
        ({"manifest_digest": "replacing:abc"}, "replacement of the manifest columns was interrupted"),
    ],
)
def test_edited_attributes_are_refused(store, edit, words):
    cache, set_dir, _ = store
    _edit_attrs(set_dir, **edit)
    with pytest.raises(StoreError, match=words) as info:
        FeatureStore(cache).open_checked()
    assert "feature set 'm/x/32'" in _one_line(info.value)
    assert any(pytest.importorskip("re").search(words, p) for p in verify(FeatureStore(cache).open_set()))


def test_swapped_label_names_caught_without_attrs_digest(store):
    """A set from before attrs_digest still has its label names checked against the stored labels."""
    cache, set_dir, _ = store
    meta = json.loads((set_dir / "zarr.json").read_text())
    del meta["attributes"]["attrs_digest"]
    meta["attributes"]["label_names"] = ["atelectasis", "effusion"]
    (set_dir / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="recorded manifest digest"):
        FeatureStore(cache).open_checked()


def test_missing_metadata_files(store):
    cache, set_dir, _ = store
    (set_dir / "pooled" / "zarr.json").unlink()
    with pytest.raises(StoreError, match="array 'pooled' is missing"):
        FeatureStore(cache).open_checked()
    with pytest.raises(StoreError, match="array 'pooled' is missing"):
        FeatureStore(cache).open_set().read("pooled")
    (set_dir / "zarr.json").unlink()
    with pytest.raises(StoreError, match="metadata file is missing.*delete") as info:
        FeatureStore(cache).open_set("m/x/32")
    _one_line(info.value)
    (cache / "zarr.json").unlink()
    with pytest.raises(StoreError, match="no feature store here"):
        FeatureStore(cache)


def test_pending_rows_refused_unless_allowed(tmp_path, store):
    cache, _, _ = store
    fs = FeatureStore(cache, mode="a").open_set()
    fs.mark_pending([1])
    with pytest.raises(StoreError, match="4 of 12 row\\(s\\) are still pending"):
        FeatureStore(cache).open_checked()
    got = FeatureStore(cache).open_checked(allow_partial=True)
    assert got.usable == {"n": N, "ok": 8, "failed": 0, "pending": 4}


def test_damaged_manifest_column_is_one_line(store):
    cache, set_dir, _ = store
    _flip(set_dir / "splits" / "c" / "0", at=2)
    with pytest.raises(StoreError, match="column 'splits' is damaged"):
        FeatureStore(cache).open_checked()
    with pytest.raises(FeatcacheError):
        load_probe_data(str(cache), val_fraction=0)


def test_store_written_without_checksums_still_reads(tmp_path, monkeypatch):
    """Format 1 stores (before checksums) open, read by the fast path, verify, and pass the gate."""
    monkeypatch.setattr(store_mod, "_crc", lambda: [])
    monkeypatch.setattr(store_mod, "FORMAT_VERSION", 1)
    cols = {"path": [f"{i}.png" for i in range(N)], "split": ["train"] * 8 + ["test"] * 4}
    for i in range(N):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    manifest = read_manifest(write_manifest(tmp_path / "m.csv", cols))
    fs = FeatureStore(tmp_path / "old", mode="a").create_set("old", manifest, SPECS, {}, shard_rows=SHARD)
    rng = np.random.default_rng(1)
    data = {k: rng.standard_normal((N, *v.shape)).astype(v.dtype) for k, v in SPECS.items()}
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        fs.write_shard(s, {k: v[lo:hi] for k, v in data.items()}, {})
    monkeypatch.undo()
    old = FeatureStore(tmp_path / "old").open_checked()
    assert not old.checksummed and old.attrs["format_version"] == 1
    assert type(old.group["cls"].metadata.codecs[-1]).__name__ == "BytesCodec"
    assert old._raw_chunk_folder(old.group["cls"]) is not None
    for k, v in data.items():
        np.testing.assert_array_equal(old.read(k), v)
        np.testing.assert_array_equal(old.read(k, slice(5, 11)), v[5:11])
    assert verify(old) == []
    (tmp_path / "old" / "old" / "cls" / "c" / "1" / "0").unlink()  # still caught: rows are marked done
    with pytest.raises(StoreError, match="missing but its rows are marked done"):
        old.read("cls")
