"""The feature store: a Zarr v3 group of feature sets, the only I/O both halves share.

One feature set per (dataset, model, resolution), addressed by a path-like name
such as ``nih/dinov3-vitb16/512``. Layout of a set (N rows, manifest order):

* ``cls``, ``pooled``: float32 [N, D]; ``layer_cls``, ``layer_pooled``: float32 [N, L, D].
* ``registers``: float16 [N, R, D]; ``patch``: float16 [N, h, w, D].
* ``status``: uint8 [N] (0 pending, 1 ok, 2 failed); ``failure``: str [N] (reason, '' if none).
* the manifest's columns: ``ids``, ``patient_ids``, ``splits``, ``paths``, ``labels`` (float32 [N, L]),
  ``classes``, ``masks`` and ``meta/<name>``.

Writes happen in whole shards of ``shard_rows`` rows (a partial write into a Zarr
shard reads, merges and rewrites it, and two writers on one shard lose updates).
Within a shard, data arrays are written first, then the failure reasons, then
``status``: a crash at any point leaves the shard pending, and the next run
rewrites it whole, so a resumed run is identical to an uninterrupted one.

Chunking (measured, see benchmarks/RESULTS.md): the small per-image arrays
(``cls``, ``pooled``, ``layer_*``, ``status``) use one chunk per shard, which
reads at full speed and keeps one file per shard; the large ones (``patch``,
``registers``) use Zarr v3 sharding with one image per inner chunk, so a single
image's tokens can be read without reading its shard. Float16 arrays use
Blosc-zstd with bit-shuffle: lossless, and when the model ran in bfloat16 the
three always-zero mantissa bits compress away (about 1.5x); plain zstd on
float16 gains little. This module does not import torch.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from featcache import store_io
from featcache.errors import StoreError
from featcache.locks import extraction_lock, file_lock  # noqa: F401  (extraction_lock re-exported)
from featcache.manifest import Manifest
from featcache.store_io import check_set_name, damaged, write_errors

PENDING, OK, FAILED = 0, 1, 2
SET_MARKER = "featcache_set"
FORMAT_VERSION = 2  # 2: crc32c checksums on every chunk; 1 (no checksums) is still read
_LARGE_ARRAYS = ("patch", "registers")
_TARGET_SHARD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one feature array, per row.

    Attributes:
        shape: the shape of one row, e.g. ``(768,)`` for ``cls`` or ``(32, 32, 768)`` for ``patch``.
        dtype: numpy dtype name, ``float32`` or ``float16``.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def default_shard_rows(arrays: dict[str, ArraySpec]) -> int:
    """Rows per shard: a power of two so that one shard of all arrays is about 256 MiB (16 to 4096 rows)."""
    row_bytes = sum(a.row_bytes for a in arrays.values()) or 1
    rows = max(16, min(4096, _TARGET_SHARD_BYTES // row_bytes))
    return 1 << (int(rows).bit_length() - 1)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


class FeatureStore:
    """A Zarr v3 group holding feature sets.

    Args:
        url: a local folder or any fsspec URL (``s3://bucket/cache``, ``file:///...``).
        mode: ``r`` to read (the store must exist) or ``a`` to read and write (created if absent).

    Example:
        >>> store = FeatureStore("cache/")
        >>> fs = store.open_set()          # the only set
        >>> X = fs.read("cls", rows=np.flatnonzero(fs.ok))
    """

    def __init__(self, url: str | os.PathLike, mode: str = "r"):
        self.url = str(url)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        self.mode = mode
        if mode == "r" and _is_local(self.url) and not (_local_path(self.url) / "zarr.json").is_file():
            raise StoreError(
                f"{self.url}: no feature store here; run `featcache extract --out {self.url}` first"
            )
        try:
            with write_errors(f"{self.url}: opening the feature store"):
                self.root = zarr.open_group(self.url, mode=mode, zarr_format=3)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: no feature store here; run `featcache extract` first") from None
        except StoreError:
            raise
        except Exception as e:  # zarr raises several types for a folder that is not a store
            raise StoreError(
                f"{self.url}: not a readable Zarr v3 feature store ({type(e).__name__}: {e})"
            ) from None

    @property
    def local_path(self) -> Path | None:
        """The store's folder when it is local, else None."""
        return _local_path(self.url) if _is_local(self.url) else None

    def list_sets(self) -> list[str]:
        """Names of the feature sets in the store, sorted (sets still being built are not listed)."""
        found: list[str] = []

        def walk(group: zarr.Group, prefix: str) -> None:
            for name, sub in group.groups():
                if name.startswith("."):  # a set being built (TMP_PREFIX), never a set name
                    continue
                path = f"{prefix}{name}"
                if sub.attrs.get(SET_MARKER):
                    found.append(path)
                else:
                    walk(sub, path + "/")

        with warnings.catch_warnings():  # temp files of a write killed mid-way are not store objects
            warnings.simplefilter("ignore")
            walk(self.root, "")
        return sorted(found)

    def has_set(self, name: str) -> bool:
        """Whether a feature set of that name exists."""
        try:
            return bool(self.root[check_set_name(name, self.url)].attrs.get(SET_MARKER))
        except (KeyError, StoreError):
            return False

    def open_set(self, name: str | None = None) -> FeatureSet:
        """Open a feature set; ``name`` may be omitted when the store holds exactly one.

        Opening checks nothing beyond existence; readers of numbers use ``open_checked``.

        Raises:
            StoreError: the set does not exist (the message lists those that do).
        """
        sets = self.list_sets()
        if name is None:
            if len(sets) != 1:
                if not sets:
                    raise StoreError(
                        f"{self.url}: the store holds no feature set yet; run `featcache extract`"
                    )
                raise StoreError(
                    f"{self.url}: the store holds {len(sets)} feature sets {sets}; choose one with --set"
                )
            name = sets[0]
        name = check_set_name(name, self.url)
        if name not in sets:
            base = self.local_path
            if base is not None and (base / name).is_dir() and not (base / name / "zarr.json").is_file():
                raise StoreError(
                    f"{base / name / 'zarr.json'}: the feature set's metadata file is missing; the set is "
                    f"damaged: delete {base / name} and re-run `featcache extract`"
                )
            raise StoreError(f"{self.url}: no feature set '{name}'; sets here: {sets or 'none'}")
        return FeatureSet(self, name, self.root[name])

    def open_checked(self, name: str | None = None, *, allow_partial: bool = False) -> FeatureSet:
        """Open a set for reading numbers from it, refusing one that cannot be trusted.

        Refuses (one-line ``StoreError`` naming the fix) unless: the format version is known, no
        manifest replacement is under way, the attributes are unedited (``attrs_digest``) and agree
        with the arrays (``n``, ``arrays``), the manifest digest recomputed from the stored ids,
        paths, patients, splits, labels and label names matches the recorded one, every status is
        0/1/2, and no row is pending (unless ``allow_partial``). Feature reads then check each
        chunk's checksum themselves (``FeatureSet.read``).

        Args:
            name: the set (None: the only one).
            allow_partial: accept pending rows; their count is in ``fs.usable["pending"]``.

        Returns:
            The ``FeatureSet``, with ``usable = {"n", "ok", "failed", "pending"}`` row counts.
        """
        from featcache.store_check import check_usable

        fs = self.open_set(name)
        fs.usable = check_usable(fs, allow_partial=allow_partial)
        return fs

    def create_set(
        self,
        name: str,
        manifest: Manifest,
        arrays: dict[str, ArraySpec],
        attrs: dict[str, Any],
        shard_rows: int | None = None,
    ) -> FeatureSet:
        """Create a feature set, or open it when one with the same manifest and settings exists.

        On a local store the whole set (group, arrays, columns, attributes) is built in a private
        sibling folder and renamed into place in one step: a kill at any instant leaves either no
        set or a complete one, and of several workers creating it at once, one rename wins and the
        others open that set (after the same compatibility check). On a remote (fsspec) store,
        which has no atomic rename, the set is written in place with its marker attribute last:
        start one worker first there (see docs/RELIABILITY.md).

        Args:
            name: set name, e.g. ``nih/dinov3-vitb16/512``.
            manifest: the validated manifest; its columns are copied into the set.
            arrays: feature array name -> per-row ``ArraySpec``.
            attrs: provenance attributes. The keys in ``attrs["config"]`` are the settings that
                define the set's content (model, weights, resolution, preprocessing, tokens...);
                reopening with different ones is refused.
            shard_rows: rows per shard (default: ``default_shard_rows(arrays)``; at most N). Asking
                for another value than an existing set's is refused.

        Returns:
            The (new or existing) ``FeatureSet``.

        Raises:
            StoreError: a bad name, or a set of that name exists with another manifest, other
                settings or another shard size; a full disk or read-only file system.
        """
        if self.mode != "a":
            raise StoreError(f"{self.url}: store opened read-only")
        name = check_set_name(name, self.url)
        config = attrs.get("config", {})
        if shard_rows is not None and int(shard_rows) <= 0:
            raise StoreError("shard rows must be positive")
        if self.has_set(name):
            return self._open_compatible(name, manifest, config, arrays, shard_rows)
        n = len(manifest)
        rows = min(int(shard_rows or default_shard_rows(arrays)), max(1, n))  # edge chunks are full size
        full_attrs = _set_attrs(attrs, manifest, arrays, n, rows)
        with write_errors(f"{self.url}: creating feature set '{name}'"):
            base = self.local_path
            if base is None:
                return self._create_in_place(name, manifest, arrays, full_attrs, rows, shard_rows)
            store_io.ensure_groups(base, name.split("/")[:-1])
            final = base / name
            if final.is_dir() and any(final.iterdir()):
                raise StoreError(
                    f"{final}: a folder that is not a complete feature set is in the way (left by an older "
                    f"featcache killed while creating it?); delete {final} and re-run"
                )
            tmp = store_io.new_tmp_folder(final)
            try:
                g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                _build_set(g, manifest, arrays, full_attrs, rows)
                store_io.publish(tmp, final)
            finally:
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
        return self._open_compatible(name, manifest, config, arrays, shard_rows)

    def _open_compatible(self, name, manifest, config, arrays, shard_rows) -> FeatureSet:
        fs = self.open_set(name)
        fs._check_compatible(manifest, config, arrays, shard_rows)
        return fs

    def _create_in_place(self, name, manifest, arrays, full_attrs, rows, shard_rows) -> FeatureSet:
        try:
            g = self.root.create_group(name)
        except Exception:  # another worker created it first: wait until it is ready, then check it
            return self._wait_for_set(name, manifest, full_attrs.get("config", {}), arrays, shard_rows)
        _build_set(g, manifest, arrays, full_attrs, rows)
        return FeatureSet(self, name, g)

    def _wait_for_set(self, name, manifest, config, arrays, shard_rows, timeout: float = 120.0) -> FeatureSet:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has_set(name):
                return self._open_compatible(name, manifest, config, arrays, shard_rows)
            time.sleep(0.5)
        raise StoreError(
            f"{self.url}: feature set '{name}' exists but is incomplete (its creation on this remote store "
            f"was interrupted); delete {name} and re-run"
        )


def _set_attrs(attrs, manifest: Manifest, arrays: dict[str, ArraySpec], n: int, rows: int) -> dict[str, Any]:
    from featcache.store_check import attrs_digest

    full = {
        **attrs,
        "n": n,
        "shard_rows": rows,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in arrays.items()},
        **_manifest_attrs(manifest),
        "rows_digest": manifest.rows_digest(),
        "created": _now(),
        "format_version": FORMAT_VERSION,
    }
    full = _jsonable(full)
    full["attrs_digest"] = attrs_digest(full)
    full[SET_MARKER] = True
    return full


def _build_set(
    g: zarr.Group, manifest: Manifest, arrays: dict[str, ArraySpec], attrs: dict, rows: int
) -> None:
    """Write a whole set into the (new, empty) group ``g``; the marker attribute is written last."""
    n = len(manifest)
    store_io.fault_point("create:columns")
    _write_column(g, "ids", manifest.ids)
    _write_column(g, "paths", manifest.paths)
    _write_manifest_columns(g, manifest)
    for key, spec in arrays.items():
        store_io.fault_point(f"create:{key}")
        _create_feature_array(g, key, n, spec, rows)
    store_io.fault_point("create:status")
    g.create_array(
        "status", shape=(n,), dtype="uint8", chunks=(rows,), fill_value=PENDING, compressors=_crc()
    )
    g.create_array("failure", shape=(n,), dtype=str, chunks=(rows,), compressors=_crc())
    store_io.fault_point("create:attrs")
    g.attrs.update({k: v for k, v in attrs.items() if k != SET_MARKER})
    store_io.fault_point("create:marker")
    g.attrs.update({SET_MARKER: True})  # last: a set is visible only once complete


def _crc() -> list:
    return [Crc32cCodec()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_column(g: zarr.Group, key: str, values: np.ndarray) -> None:
    a = g.create_array(
        key,
        shape=values.shape,
        dtype=str,
        chunks=(max(1, min(len(values), 65536)),),
        overwrite=True,
        compressors=_crc(),
    ).with_config({"write_empty_chunks": True})
    if len(values):
        a[:] = values.astype(str)


_MANIFEST_COLUMNS = ("patient_ids", "splits", "masks", "classes", "labels", "meta")


def _write_manifest_columns(g: zarr.Group, manifest: Manifest) -> None:
    """(Re)write the manifest columns that do not define the images: patients, splits, labels, masks, meta."""
    for key in _MANIFEST_COLUMNS:
        if key in g:
            del g[key]
    _write_column(g, "patient_ids", manifest.patient_ids)
    _write_column(g, "splits", manifest.splits)
    if manifest.masks is not None:
        _write_column(g, "masks", manifest.masks)
    if manifest.classes is not None:
        _write_column(g, "classes", manifest.classes)
    if manifest.label_names:
        a = g.create_array(
            "labels",
            shape=manifest.labels.shape,
            dtype="float32",
            chunks=manifest.labels.shape,
            compressors=_crc(),
        ).with_config({"write_empty_chunks": True})
        a[:] = manifest.labels
    for key, values in manifest.meta.items():
        _write_column(g, f"meta/{key[len('meta_') :]}", values)


def _manifest_attrs(manifest: Manifest) -> dict[str, Any]:
    return {
        "label_names": list(manifest.label_names),
        "task": manifest.task,
        "root": str(manifest.root),
        "manifest": manifest.source,
        "manifest_digest": manifest.digest(),
        "columns_digest": manifest.columns_digest(),
    }


_REPLACING = "replacing:"  # manifest_digest prefix while new manifest columns are being written


def _create_feature_array(g: zarr.Group, key: str, n: int, spec: ArraySpec, shard_rows: int) -> None:
    shape = (n, *spec.shape)
    # float16 tokens: lossless Blosc-zstd + bit-shuffle (about 1.3-1.5x when the model ran in bf16);
    # float32 CLS/pooled: uncompressed, since zstd gains under 1.1x there and costs most of the read time.
    # every chunk ends with its crc32c, so a flipped byte fails the read instead of reaching a probe
    compressor = _crc()
    if spec.dtype == "float16":
        compressor.insert(0, BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"))
    if key in _LARGE_ARRAYS or spec.row_bytes >= 2**18:
        g.create_array(
            key,
            shape=shape,
            dtype=spec.dtype,
            chunks=(1, *spec.shape),
            shards=(shard_rows, *spec.shape),
            compressors=compressor,
            fill_value=0,
        )
    else:
        g.create_array(
            key,
            shape=shape,
            dtype=spec.dtype,
            chunks=(shard_rows, *spec.shape),
            compressors=compressor,
            fill_value=0,
        )


class FeatureSet:
    """One feature set of a ``FeatureStore`` (see the module docstring for the layout).

    Attributes:
        name: the set's name.
        attrs: provenance attributes (dict).
        n: number of rows.
        shard_rows: rows per shard.
    """

    def __init__(self, store: FeatureStore, name: str, group: zarr.Group):
        self.store = store
        self.name = name
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        try:
            self.n = int(self.attrs["n"])
            self.shard_rows = int(self.attrs["shard_rows"])
        except (KeyError, TypeError, ValueError):
            raise StoreError(
                f"{store.url}: feature set '{name}' has no valid 'n'/'shard_rows' attributes (zarr.json edited "
                "or damaged); delete the set and re-run `featcache extract`"
            ) from None
        if self.n < 0 or self.shard_rows < 1:
            raise StoreError(
                f"{store.url}: feature set '{name}' has n={self.n}, shard_rows={self.shard_rows}; re-extract it"
            )
        self._cache: dict[str, np.ndarray] = {}
        self.usable: dict[str, int] | None = None  # row counts, set by FeatureStore.open_checked

    def __repr__(self) -> str:
        return f"FeatureSet({self.store.url!r}, {self.name!r}, n={self.n})"

    # ---- the manifest's columns ----

    def _column(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = _unicode(self.read_column_checked(key))
        return self._cache[key]

    def read_column_checked(self, key: str) -> np.ndarray:
        """A whole manifest column (or ``labels``), raising a one-line StoreError if it is missing or damaged."""
        where = f"{self.store.url}: feature set '{self.name}'"
        try:
            a = self.group[key]
        except KeyError:
            raise StoreError(
                f"{where}: column '{key}' is missing; delete the set and re-run `featcache extract`"
            ) from None
        try:
            return a[:]
        except Exception as e:  # checksum mismatch, truncated or undecodable chunk
            raise StoreError(
                f"{where}: column '{key}' is damaged ({_reason(e)}); re-run `featcache extract` with the "
                "manifest (patients, splits, labels are rewritten) or delete the set (ids, paths)"
            ) from None

    @property
    def ids(self) -> np.ndarray:
        """str [N] row ids."""
        return self._column("ids")

    @property
    def patient_ids(self) -> np.ndarray:
        """str [N] patient ids."""
        return self._column("patient_ids")

    @property
    def splits(self) -> np.ndarray:
        """str [N]: ``train``, ``val``, ``test`` or ''."""
        return self._column("splits")

    @property
    def paths(self) -> np.ndarray:
        """str [N] image paths relative to ``root``."""
        return self._column("paths")

    @property
    def root(self) -> Path:
        """Folder the manifest's paths were relative to at extraction time."""
        return Path(self.attrs.get("root", "."))

    @property
    def task(self) -> str:
        """``multilabel``, ``multiclass`` or ``none``."""
        return self.attrs.get("task", "none")

    @property
    def label_names(self) -> list[str]:
        """Binary label columns (multi-label task), in manifest order."""
        return list(self.attrs.get("label_names", []))

    @property
    def labels(self) -> np.ndarray:
        """float32 [N, L]: 1 / 0 / -1 (uncertain) raw, NaN missing."""
        if "labels" not in self.group:
            return np.zeros((self.n, 0), np.float32)
        return np.asarray(self.read_column_checked("labels"), dtype=np.float32)

    @property
    def classes(self) -> np.ndarray | None:
        """str [N] class names of a multi-class manifest ('' missing), else None."""
        return self._column("classes") if "classes" in self.group else None

    @property
    def class_names(self) -> list[str]:
        """Sorted distinct class names (multi-class task)."""
        c = self.classes
        return sorted({x for x in c.tolist() if x}) if c is not None else []

    @property
    def masks(self) -> np.ndarray | None:
        """str [N] mask paths relative to ``root`` ('' none), or None without a mask column."""
        return self._column("masks") if "masks" in self.group else None

    def meta_names(self) -> list[str]:
        """Names of the stored ``meta_*`` columns (without the prefix)."""
        return sorted(self.group["meta"].array_keys()) if "meta" in self.group else []

    def meta(self, name: str) -> np.ndarray:
        """str [N] of the manifest column ``meta_<name>``."""
        name = name[len("meta_") :] if name.startswith("meta_") else name
        if name not in self.meta_names():
            raise StoreError(f"{self.name}: no metadata column '{name}'; have {self.meta_names()}")
        return self._column(f"meta/{name}")

    def manifest_digest(self) -> str:
        """Recompute the manifest digest from the stored columns (compare with ``attrs['manifest_digest']``)."""
        m = Manifest(
            source="",
            root=self.root,
            paths=self.paths,
            ids=self.ids,
            patient_ids=self.patient_ids,
            splits=self.splits,
            label_names=self.label_names,
            labels=self.labels,
            classes=self.classes,
            masks=self.masks,
        )
        return m.digest()

    # ---- status ----

    @property
    def status(self) -> np.ndarray:
        """uint8 [N]: 0 pending, 1 ok, 2 failed (other values mean damage: ``verify`` reports them)."""
        out = np.empty(self.n, np.uint8)
        for s in range(self.n_shards):
            lo, hi = self.shard_range(s)
            out[lo:hi] = self.read_shard_checked("status", s)
        return out

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: rows whose features were written."""
        return self.status == OK

    def failures(self) -> list[dict[str, Any]]:
        """Failed rows: list of ``{"index", "id", "reason"}``."""
        idx = np.flatnonzero(self.status == FAILED)
        if not len(idx):
            return []
        reasons = _unicode(self.read("failure"))
        ids = self.ids
        return [{"index": int(i), "id": str(ids[i]), "reason": str(reasons[i])} for i in idx]

    # ---- shards ----

    @property
    def n_shards(self) -> int:
        """Number of shards (the last one may be short)."""
        return -(-self.n // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of a shard."""
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.n)

    def shard_done(self, status: np.ndarray | None = None) -> np.ndarray:
        """bool [n_shards]: shards whose every row is ok or failed (a damaged status value is not done)."""
        status = self.status if status is None else status
        done = np.ones(self.n_shards, bool)
        for s in range(self.n_shards):
            a, b = self.shard_range(s)
            done[s] = bool(np.all((status[a:b] == OK) | (status[a:b] == FAILED)))
        return done

    def write_shard(self, shard: int, data: dict[str, np.ndarray], failed: dict[int, str]) -> None:
        """Write one whole shard: data, then failure reasons, then status (the commit).

        Args:
            shard: shard index.
            data: array name -> values for all rows of the shard ([stop - start, ...]); failed rows hold zeros.
            failed: absolute row index -> reason, for rows that could not be processed.

        Raises:
            StoreError: an array is missing or has the wrong number of rows.
        """
        start, stop = self.shard_range(shard)
        for key in self.arrays():
            if key not in data:
                raise StoreError(f"{self.name}: shard {shard} is missing array '{key}'")
            if len(data[key]) != stop - start:
                raise StoreError(
                    f"{self.name}: shard {shard} array '{key}' has {len(data[key])} rows, not {stop - start}"
                )
        reasons = np.array([failed.get(i, "") for i in range(start, stop)], dtype=np.str_)
        status = np.full(stop - start, OK, np.uint8)
        for i in failed:
            status[i - start] = FAILED
        with write_errors(f"{self.store.url}: writing shard {shard} of feature set '{self.name}'"):
            for key, values in data.items():
                store_io.fault_point(f"shard {shard}:{key}")
                self._writable(key)[start:stop] = values
            store_io.fault_point(f"shard {shard}:failure")
            self._writable("failure")[start:stop] = reasons
            store_io.fault_point(f"shard {shard}:status")
            self._writable("status")[start:stop] = status  # the commit
            store_io.fault_point(f"shard {shard}:committed")

    def _writable(self, key: str) -> zarr.Array:
        # every chunk is stored, even one equal to the fill value: a missing chunk then means damage
        return self.group[key].with_config({"write_empty_chunks": True})

    def mark_pending(self, shards: list[int]) -> None:
        """Mark every row of these shards pending (``verify --repair``): the next extraction redoes them."""
        with write_errors(f"{self.store.url}: repairing feature set '{self.name}'"):
            for s in shards:
                lo, hi = self.shard_range(s)
                store_io.fault_point(f"repair {s}")
                self._writable("status")[lo:hi] = np.zeros(hi - lo, np.uint8)

    def reset_failed(self, shards: list[int] | None = None) -> int:
        """Mark failed rows pending again (their shards are redone by the next extraction).

        Args:
            shards: only these shards (default: all); each shard's status is rewritten on its own,
                so workers resetting disjoint shards never undo each other's commits.

        Returns:
            The number of rows reset.
        """
        count = 0
        for s in range(self.n_shards) if shards is None else shards:
            lo, hi = self.shard_range(s)
            status = self.read_shard_checked("status", s)
            bad = status == FAILED
            if bad.any():
                status[bad] = PENDING
                with write_errors(f"{self.store.url}: writing feature set '{self.name}'"):
                    store_io.fault_point(f"retry {s}")
                    self._writable("status")[lo:hi] = status
                count += int(bad.sum())
        return count

    def needs_manifest(self, manifest: Manifest) -> bool:
        """Whether the set holds other patients, splits, labels, masks or metadata than ``manifest``.

        Sets written before column replacement existed (no ``rows_digest``) are never updated.
        """
        if not self.attrs.get("rows_digest"):
            return False
        return self.attrs.get("columns_digest") != manifest.columns_digest() or self.replacing

    @property
    def replacing(self) -> bool:
        """True while (or after an interrupted) replacement of the manifest columns."""
        return str(self.attrs.get("manifest_digest", "")).startswith(_REPLACING)

    def replace_manifest(self, manifest: Manifest) -> bool:
        """Take new patients, splits, labels, masks and metadata for the same images (ids and paths).

        Re-splitting or relabelling a dataset then costs no re-embedding; the features are untouched.
        Safe against kills (the manifest digest is marked ``replacing:`` until every column is written,
        and such a set is refused by the probes and finished by the next extraction) and against
        several workers (an exclusive lock; a worker that finds the work done does nothing).

        Returns:
            True when this call wrote the columns, False when they already matched.

        Raises:
            StoreError: the manifest lists other images (ids or paths differ).
        """
        if self.attrs.get("rows_digest") != manifest.rows_digest():
            raise StoreError(f"{self.name}: the manifest lists other images; extract them into another set")
        with file_lock(self, ".manifest.lock"):
            self.refresh()
            if not self.needs_manifest(manifest):
                return False
            self.update_attrs(manifest_digest=_REPLACING + manifest.digest())
            _write_manifest_columns(self.group, manifest)
            new = {**self.attrs, **_manifest_attrs(manifest)}
            from featcache.store_check import attrs_digest

            extra = {"attrs_digest": attrs_digest(_jsonable(new))} if self.attrs.get("attrs_digest") else {}
            self.update_attrs(**_manifest_attrs(manifest), **extra, manifest_updated=_now())  # the commit
            self._cache.clear()
        return True

    def refresh(self) -> None:
        """Re-read the set's attributes from the store (another process may have changed them)."""
        self.group = zarr.open_group(
            self.store.root.store, path=self.name, mode="a" if self.store.mode == "a" else "r"
        )
        self.attrs = dict(self.group.attrs)

    def update_attrs(self, **kv: Any) -> None:
        """Merge attributes into the set's provenance, on top of what is stored now (not a stale copy)."""
        with write_errors(f"{self.store.url}: writing the attributes of feature set '{self.name}'"):
            self.refresh()
            store_io.fault_point("attrs")
            self.group.attrs.update(kv)
            self.attrs = dict(self.group.attrs)

    def _check_compatible(
        self, manifest: Manifest, config: dict, arrays: dict[str, ArraySpec], shard_rows: int | None = None
    ) -> None:
        if shard_rows is not None and min(int(shard_rows), max(1, self.n)) != self.shard_rows:
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' has {self.shard_rows} rows per shard, not "
                f"--shard-size {shard_rows}; drop --shard-size (or pass {self.shard_rows}) to resume it, "
                "or use another --name"
            )
        same_images = self.attrs.get("rows_digest") == manifest.rows_digest()
        if not same_images and self.attrs.get("manifest_digest") != manifest.digest():
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' was made from a manifest with other images "
                f"({self.attrs.get('manifest')}); use another --out or --name, or delete the set"
            )
        stored = self.attrs.get("config", {})
        diff = sorted(
            k for k in set(stored) | set(config) if _jsonable(stored.get(k)) != _jsonable(config.get(k))
        )
        if diff:
            detail = ", ".join(f"{k}: stored {stored.get(k)!r} vs now {config.get(k)!r}" for k in diff[:4])
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' was extracted with other settings ({detail}); "
                "use another --out or --name"
            )
        want = {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in arrays.items()}
        if self.attrs.get("arrays") != want:
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' holds other arrays; use another --name"
            )

    # ---- integrity and size ----

    def verify(self, repair: bool = False) -> list[str]:
        """Read every chunk of every array and check it; returns the problems found (empty when all is well).

        Checks the attributes against the arrays, the recorded manifest digest against the stored
        columns, every chunk's checksum, that every row marked done has its chunks, status values
        in {0, 1, 2}, no NaN/Inf in rows marked ok, no pending and no failed rows. With
        ``repair``, shards holding damage are marked pending so the next extraction redoes them
        (see ``featcache.store_check``).
        """
        from featcache.store_check import verify_set

        return verify_set(self, repair=repair)[0]

    @property
    def checksummed(self) -> bool:
        """Whether the feature arrays carry crc32c checksums (sets of format 1 do not)."""
        return all(store_io.has_crc(_codecs(self.group[k])) for k in self.arrays() if k in self.group)

    def bytes_per_row(self) -> dict[str, tuple[float, float | None]]:
        """Per array: (uncompressed bytes per image, stored bytes per finished image or None if unknown)."""
        done = max(1, int((self.status != PENDING).sum()))
        out: dict[str, tuple[float, float | None]] = {}
        for key in self.arrays():
            a = self.group[key]
            raw = float(np.prod(a.shape[1:]) * a.dtype.itemsize)
            try:
                stored: float | None = a.nbytes_stored() / done
            except Exception:  # some remote stores cannot list sizes
                stored = None
            out[key] = (raw, stored)
        return out

    # ---- features ----

    def arrays(self) -> list[str]:
        """Names of the feature arrays present (``cls``, ``pooled``, ``patch``, ...)."""
        return list(self.attrs.get("arrays", {}))

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of a feature array."""
        return tuple(self._array(name).shape)

    def _array(self, name: str) -> zarr.Array:
        if name not in (*self.arrays(), "status", "failure"):
            raise StoreError(
                f"{self.name}: no array '{name}'; have {self.arrays()} (extract with --tokens/--layers)"
            )
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}': array '{name}' is missing "
                f"({name}/zarr.json); delete the set and re-run `featcache extract`"
            ) from None

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Read a feature array, shard by shard, checking every chunk read.

        Args:
            name: array name (``cls``, ``pooled``, ``layer_cls`` ..., or ``status``/``failure``).
            rows: None (all rows), a slice, or an int/bool index array.

        Returns:
            The rows asked for, in the order asked, in the stored dtype ([n, ...]).

        Raises:
            StoreError: a chunk fails its checksum, is truncated, or is missing while its rows are
                marked done (naming the set, array and shard, and the fix).
        """
        a = self._array(name)
        if rows is None:
            rows = slice(0, self.n)
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(self.n)
            if step != 1:
                return self.read(name, np.arange(lo, hi, step))
            out = np.empty((max(0, hi - lo), *a.shape[1:]), dtype=a.dtype)
            folder = self._raw_chunk_folder(a)
            start = lo
            while start < hi:  # shard by shard into one preallocated array
                stop = min(hi, (start // self.shard_rows + 1) * self.shard_rows)
                if folder is None:
                    out[start - lo : stop - lo] = self._read_range(a, start, stop)
                else:
                    self._read_raw_chunk(a, folder, start, stop, out[start - lo : stop - lo])
                start = stop
            return out
        idx = np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        out = np.empty((len(idx), *a.shape[1:]), dtype=a.dtype)
        shard_of = idx // self.shard_rows
        for s in np.unique(shard_of):
            pos = np.flatnonzero(shard_of == s)
            out[pos] = self._read_rows(a, idx[pos])
        return out

    def read_shard_checked(self, name: str, shard: int, status: np.ndarray | None = None) -> np.ndarray:
        """All rows of one shard of an array, checked (checksum, truncation, presence when done).

        Args:
            status: the set's status (uint8 [N]) if already read; else read where needed.
        """
        lo, hi = self.shard_range(shard)
        return self._read_range(self._array(name), lo, hi, status=status)

    def _damage(self, a: zarr.Array, shard: int, detail: str) -> StoreError:
        return damaged(self.name, a.basename, shard, detail, self.store.url)

    def _chunk_key(self, a: zarr.Array, shard: int) -> str:
        return a.metadata.encode_chunk_key((shard,) + (0,) * (a.ndim - 1))

    def _chunk_size(self, a: zarr.Array, shard: int) -> int | None:
        """Stored bytes of a shard's chunk file, None when there is none."""
        from zarr.core.sync import sync

        sp = a.store_path
        try:
            return int(sync(sp.store.getsize(f"{sp.path}/{self._chunk_key(a, shard)}".lstrip("/"))))
        except FileNotFoundError:
            return None

    def _check_present(self, a: zarr.Array, shard: int, status: np.ndarray | None) -> None:
        """Raise when a chunk is empty, or missing while its rows are marked done (zarr reads both as fill)."""
        size = self._chunk_size(a, shard)
        key = self._chunk_key(a, shard)
        if size == 0:
            raise self._damage(a, shard, f"chunk {key} is empty")
        if size is None and self._missing_matters(a, shard, status):
            raise self._damage(a, shard, f"chunk {key} is missing but its rows are marked done")

    def _missing_matters(self, a: zarr.Array, shard: int, status: np.ndarray | None) -> bool:
        """A missing chunk is damage when its rows are marked done (zarr would read the fill value).

        A missing status chunk reads as pending, so its shard is simply redone; failure reasons
        equal to the fill value were not stored before checksums came (format 1).
        """
        if a.basename == "status" or (a.basename == "failure" and not store_io.has_crc(_codecs(a))):
            return False
        lo, hi = self.shard_range(shard)
        st = status[lo:hi] if status is not None else self.read_shard_checked("status", shard)
        return bool((st != PENDING).any())

    def _read_range(self, a: zarr.Array, lo: int, hi: int, status: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[lo, hi)`` of one shard through zarr, every error a one-line StoreError."""
        shard = lo // self.shard_rows
        try:
            block = np.asarray(a[lo:hi])
        except Exception as e:  # checksum mismatch, truncated, empty or undecodable chunk
            raise self._damage(
                a, shard, f"chunk {self._chunk_key(a, shard)} is damaged ({_reason(e)})"
            ) from None
        self._check_present(a, shard, status)
        return block

    def _raw_chunk_folder(self, a: zarr.Array) -> Path | None:
        """The array's folder when its chunks are plain little-endian bytes (+ crc32c) on local disk, else None.

        Such chunks are read straight into the output buffer (one copy instead of zarr's three),
        which is what lets a full read of ``cls`` keep up with a monolithic ``.npy`` file; the
        trailing crc32c is checked here as zarr would.
        """
        base = self.store.local_path
        codecs = _codecs(a)
        plain = codecs[:-1] if store_io.has_crc(codecs) else codecs
        if (
            base is None
            or len(plain) != 1
            or type(plain[0]).__name__ != "BytesCodec"
            or getattr(plain[0].endian, "value", "little") != "little"
            or np.little_endian is False
            or a.chunks[0] != self.shard_rows
            or tuple(a.chunks[1:]) != tuple(a.shape[1:])
        ):
            return None
        return base / self.name / a.basename

    def _read_raw_chunk(self, a: zarr.Array, folder: Path, start: int, stop: int, out: np.ndarray) -> None:
        s = start // self.shard_rows
        key = self._chunk_key(a, s)
        path = folder / key
        row_bytes = out.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
        crc = store_io.has_crc(_codecs(a))
        chunk_bytes = self.shard_rows * row_bytes
        try:
            with open(path, "rb") as f:
                if not crc:
                    f.seek((start - s * self.shard_rows) * row_bytes)
                    got = f.readinto(memoryview(out).cast("B"))
                    if got != out.nbytes:
                        raise self._damage(a, s, f"chunk {key} is truncated")
                    return
                whole = out.nbytes == chunk_bytes
                buf = out if whole else np.empty((self.shard_rows, *out.shape[1:]), out.dtype)
                got = f.readinto(memoryview(buf).cast("B"))
                tail = f.read(5)
        except FileNotFoundError:  # never written: the fill value, unless its rows are marked done
            if self._missing_matters(a, s, None):
                raise self._damage(a, s, f"chunk {key} is missing but its rows are marked done") from None
            out[...] = a.metadata.fill_value
            return
        if got != chunk_bytes or len(tail) != 4:
            raise self._damage(a, s, f"chunk {key} is truncated or has the wrong size")
        if not store_io.crc32c_ok(buf, tail):
            raise self._damage(a, s, f"chunk {key} fails its crc32c checksum")
        if not whole:
            lo = start - s * self.shard_rows
            out[...] = buf[lo : lo + len(out)]

    def iter_blocks(
        self, name: str, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate over a feature array shard by shard, never holding more than one shard.

        Args:
            name: array name.
            rows: optional int or bool index array restricting the rows (order kept within a shard).

        Yields:
            ``(row_indices int64 [b], values [b, ...])`` per shard that holds any of the rows.
        """
        a = self._array(name)
        if rows is None:
            for s in range(self.n_shards):
                lo, hi = self.shard_range(s)
                yield np.arange(lo, hi), self.read(name, slice(lo, hi))
            return
        idx = np.asarray(rows)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        shard_of = idx // self.shard_rows
        for s in np.unique(shard_of):
            sel = idx[shard_of == s]
            yield sel, self._read_rows(a, sel)

    def _read_rows(self, a: zarr.Array, sel: np.ndarray) -> np.ndarray:
        lo, hi = int(sel.min()), int(sel.max()) + 1
        # a contiguous range read is far faster than a selection on sharded arrays (PERF_NOTES);
        # for a few rows of a sharded (one image per chunk) array, read the rows one by one.
        if a.chunks[0] == 1 and len(sel) * 4 < hi - lo:
            shard = lo // self.shard_rows
            self._check_present(a, shard, None)
            try:
                return np.stack([np.asarray(a[int(i)]) for i in sel])
            except Exception as e:
                raise self._damage(
                    a, shard, f"chunk {self._chunk_key(a, shard)} is damaged ({_reason(e)})"
                ) from None
        return self.read(a.basename, slice(lo, hi))[sel - lo]


def _codecs(a: zarr.Array) -> tuple:
    return tuple(a.metadata.codecs) if hasattr(a.metadata, "codecs") else ()


def _reason(e: BaseException) -> str:
    msg = str(e).split("\n")[0]
    if "checksum" in msg.lower():
        return "crc32c checksum mismatch"
    return f"{type(e).__name__}: {msg[:120]}"


def _unicode(values: Any) -> np.ndarray:
    """A numpy fixed-width unicode array from zarr's variable-length strings."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    return np.array(values.tolist(), dtype=np.str_) if values.size else np.zeros(values.shape, np.str_)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))
