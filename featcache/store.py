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

import contextlib
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
from zarr.codecs import BloscCodec

from featcache.errors import StoreError
from featcache.manifest import Manifest

PENDING, OK, FAILED = 0, 1, 2
SET_MARKER = "featcache_set"
FORMAT_VERSION = 1
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
            self.root = zarr.open_group(self.url, mode=mode, zarr_format=3)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: no feature store here; run `featcache extract` first") from None
        except Exception as e:  # zarr raises several types for a folder that is not a store
            raise StoreError(
                f"{self.url}: not a readable Zarr v3 feature store ({type(e).__name__}: {e})"
            ) from None

    @property
    def local_path(self) -> Path | None:
        """The store's folder when it is local, else None."""
        return _local_path(self.url) if _is_local(self.url) else None

    def list_sets(self) -> list[str]:
        """Names of the feature sets in the store, sorted."""
        found: list[str] = []

        def walk(group: zarr.Group, prefix: str) -> None:
            for name, sub in group.groups():
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
            return bool(self.root[name].attrs.get(SET_MARKER))
        except KeyError:
            return False

    def open_set(self, name: str | None = None) -> FeatureSet:
        """Open a feature set; ``name`` may be omitted when the store holds exactly one.

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
        name = name.strip("/")
        if name not in sets:
            raise StoreError(f"{self.url}: no feature set '{name}'; sets here: {sets or 'none'}")
        return FeatureSet(self, name, self.root[name])

    def create_set(
        self,
        name: str,
        manifest: Manifest,
        arrays: dict[str, ArraySpec],
        attrs: dict[str, Any],
        shard_rows: int | None = None,
    ) -> FeatureSet:
        """Create a feature set, or open it when one with the same manifest and settings exists.

        Args:
            name: set name, e.g. ``nih/dinov3-vitb16/512``.
            manifest: the validated manifest; its columns are copied into the set.
            arrays: feature array name -> per-row ``ArraySpec``.
            attrs: provenance attributes. The keys in ``attrs["config"]`` are the settings that
                define the set's content (model, weights, resolution, preprocessing, tokens...);
                reopening with different ones is refused.
            shard_rows: rows per shard (default: ``default_shard_rows(arrays)``; at most N).

        Returns:
            The (new or existing) ``FeatureSet``.

        Raises:
            StoreError: a set of that name exists with another manifest or other settings.
        """
        if self.mode != "a":
            raise StoreError(f"{self.url}: store opened read-only")
        name = name.strip("/")
        config = attrs.get("config", {})
        if self.has_set(name):
            fs = self.open_set(name)
            fs._check_compatible(manifest, config, arrays)
            return fs
        n = len(manifest)
        shard_rows = int(shard_rows or default_shard_rows(arrays))
        if shard_rows <= 0:
            raise StoreError("shard rows must be positive")
        shard_rows = min(shard_rows, max(1, n))  # edge chunks are stored full size: no padding past N
        try:
            g = self.root.create_group(name)
        except Exception:  # another worker created it first: wait until it is ready, then check it
            return self._wait_for_set(name, manifest, config, arrays)
        _write_column(g, "ids", manifest.ids)
        _write_column(g, "paths", manifest.paths)
        _write_manifest_columns(g, manifest)
        for key, spec in arrays.items():
            _create_feature_array(g, key, n, spec, shard_rows)
        g.create_array("status", shape=(n,), dtype="uint8", chunks=(shard_rows,), fill_value=PENDING)
        g.create_array("failure", shape=(n,), dtype=str, chunks=(shard_rows,))
        now = _now()
        g.attrs.update(
            {
                **attrs,
                "n": n,
                "shard_rows": shard_rows,
                "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in arrays.items()},
                **_manifest_attrs(manifest),
                "rows_digest": manifest.rows_digest(),
                "columns_digest": manifest.columns_digest(),
                "created": now,
                "format_version": FORMAT_VERSION,
                SET_MARKER: True,  # last: a set is visible only once complete
            }
        )
        return FeatureSet(self, name, g)

    def _wait_for_set(self, name, manifest, config, arrays, timeout: float = 120.0) -> FeatureSet:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has_set(name):
                fs = self.open_set(name)
                fs._check_compatible(manifest, config, arrays)
                return fs
            time.sleep(0.5)
        raise StoreError(
            f"{self.url}: feature set '{name}' exists but is incomplete; delete {name} and re-run"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_column(g: zarr.Group, key: str, values: np.ndarray) -> None:
    a = g.create_array(
        key, shape=values.shape, dtype=str, chunks=(max(1, min(len(values), 65536)),), overwrite=True
    )
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
            "labels", shape=manifest.labels.shape, dtype="float32", chunks=manifest.labels.shape
        )
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
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle") if spec.dtype == "float16" else None
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
        self.n = int(self.attrs["n"])
        self.shard_rows = int(self.attrs["shard_rows"])
        self._cache: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"FeatureSet({self.store.url!r}, {self.name!r}, n={self.n})"

    # ---- the manifest's columns ----

    def _column(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = _unicode(self.group[key][:])
        return self._cache[key]

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
        return np.asarray(self.group["labels"][:], dtype=np.float32)

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
        """uint8 [N]: 0 pending, 1 ok, 2 failed."""
        return np.asarray(self.group["status"][:])

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: rows whose features were written."""
        return self.status == OK

    def failures(self) -> list[dict[str, Any]]:
        """Failed rows: list of ``{"index", "id", "reason"}``."""
        idx = np.flatnonzero(self.status == FAILED)
        if not len(idx):
            return []
        reasons = _unicode(self.group["failure"][:])
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
        """bool [n_shards]: shards with no pending row."""
        status = self.status if status is None else status
        done = np.ones(self.n_shards, bool)
        for s in range(self.n_shards):
            a, b = self.shard_range(s)
            done[s] = bool(np.all(status[a:b] != PENDING))
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
        for key, values in data.items():
            self.group[key][start:stop] = values
        reasons = np.array([failed.get(i, "") for i in range(start, stop)], dtype=np.str_)
        self.group["failure"][start:stop] = reasons
        status = np.full(stop - start, OK, np.uint8)
        for i in failed:
            status[i - start] = FAILED
        self.group["status"][start:stop] = status

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
            status = np.asarray(self.group["status"][lo:hi])
            bad = status == FAILED
            if bad.any():
                status[bad] = PENDING
                self.group["status"][lo:hi] = status
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
        with _file_lock(self, ".manifest.lock"):
            self.refresh()
            if not self.needs_manifest(manifest):
                return False
            self.update_attrs(manifest_digest=_REPLACING + manifest.digest())
            _write_manifest_columns(self.group, manifest)
            self.update_attrs(**_manifest_attrs(manifest), manifest_updated=_now())  # the commit
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
        self.refresh()
        self.group.attrs.update(kv)
        self.attrs = dict(self.group.attrs)

    def _check_compatible(self, manifest: Manifest, config: dict, arrays: dict[str, ArraySpec]) -> None:
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

    def verify(self) -> list[str]:
        """Check completeness and integrity; returns the problems found (empty when all is well).

        Checks: no pending rows, failed rows listed, every column and array has N rows, ids unique,
        the stored manifest columns still hash to the recorded digest, no NaN/Inf in rows marked ok
        (read shard by shard).
        """
        problems: list[str] = []
        if self.replacing:
            return [
                "a replacement of the manifest columns was interrupted; re-run the extraction with the new manifest"
            ]
        status = self.status
        pending = int((status == PENDING).sum())
        if pending:
            problems.append(f"{pending} of {self.n} row(s) pending (re-run the extraction to finish)")
        failed = int((status == FAILED).sum())
        if failed:
            first = self.failures()[0]
            problems.append(f"{failed} row(s) failed (first: {first['id']}: {first['reason']})")
        for key in ("ids", "patient_ids", "splits", "paths", "failure", *self.arrays()):
            if key in self.group and self.group[key].shape[0] != self.n:
                problems.append(f"array '{key}' has {self.group[key].shape[0]} rows, expected {self.n}")
        if len(set(self.ids.tolist())) != self.n:
            problems.append("ids are not unique")
        if self.manifest_digest() != self.attrs.get("manifest_digest"):
            problems.append("stored manifest columns do not match the recorded manifest digest")
        ok = status == OK
        for key in self.arrays():
            bad = 0
            for rows, block in self.iter_blocks(key):
                finite = np.isfinite(block.reshape(len(rows), -1)).all(axis=1)
                bad += int((~finite & ok[rows]).sum())
            if bad:
                problems.append(f"array '{key}' has NaN or Inf in {bad} rows marked ok")
        return problems

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
        if name not in self.arrays():
            raise StoreError(
                f"{self.name}: no array '{name}'; have {self.arrays()} (extract with --tokens/--layers)"
            )
        return self.group[name]

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Read a feature array, shard by shard.

        Args:
            name: array name (``cls``, ``pooled``, ``layer_cls`` ...).
            rows: None (all rows), a slice, or an int/bool index array.

        Returns:
            The rows asked for, in the order asked, in the stored dtype ([n, ...]).
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
                    out[start - lo : stop - lo] = a[start:stop]
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

    def _raw_chunk_folder(self, a: zarr.Array) -> Path | None:
        """The array's folder when its chunks are plain little-endian bytes on local disk, else None.

        Such chunks are read straight into the output buffer (one copy instead of zarr's three),
        which is what lets a full read of ``cls`` keep up with a monolithic ``.npy`` file.
        """
        base = self.store.local_path
        codecs = a.metadata.codecs if hasattr(a.metadata, "codecs") else ()
        if (
            base is None
            or len(codecs) != 1
            or type(codecs[0]).__name__ != "BytesCodec"
            or getattr(codecs[0].endian, "value", "little") != "little"
            or np.little_endian is False
            or a.chunks[0] != self.shard_rows
            or tuple(a.chunks[1:]) != tuple(a.shape[1:])
        ):
            return None
        return base / self.name / a.basename

    def _read_raw_chunk(self, a: zarr.Array, folder: Path, start: int, stop: int, out: np.ndarray) -> None:
        s = start // self.shard_rows
        path = folder / a.metadata.encode_chunk_key((s,) + (0,) * (a.ndim - 1))
        row_bytes = out.itemsize * int(np.prod(out.shape[1:], dtype=np.int64))
        try:
            with open(path, "rb") as f:
                f.seek((start - s * self.shard_rows) * row_bytes)
                got = f.readinto(memoryview(out).cast("B"))
            if got != out.nbytes:
                raise StoreError(f"{path}: chunk file is truncated; run `featcache verify` and re-extract")
        except FileNotFoundError:  # never written: the fill value
            out[...] = a.metadata.fill_value

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
                yield np.arange(lo, hi), np.asarray(a[lo:hi])
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
            return np.stack([np.asarray(a[int(i)]) for i in sel])
        return np.asarray(a[lo:hi])[sel - lo]


def _unicode(values: Any) -> np.ndarray:
    """A numpy fixed-width unicode array from zarr's variable-length strings."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    return np.array(values.tolist(), dtype=np.str_) if values.size else np.zeros(values.shape, np.str_)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))


@contextlib.contextmanager
def _file_lock(fs: FeatureSet, name: str) -> Iterator[None]:
    """An exclusive, blocking flock on a file in the set's folder (no-op for remote stores)."""
    base = fs.store.local_path
    if base is None:
        yield
        return
    import fcntl

    with open(base / fs.name / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def extraction_lock(fs: FeatureSet, shard_index: int = 0, num_shards: int = 1) -> Iterator[None]:
    """Refuse a second extraction into the same set (or the same worker slice) while one runs.

    A single-worker run holds an exclusive lock on the set; each of several workers holds a
    shared lock on the set plus an exclusive lock on its own slice, so workers of one run
    coexist while a duplicate worker or a plain second run is refused. Locks are ``flock``
    locks, released by the kernel when the process dies (even by SIGKILL). Remote stores
    (fsspec URLs) are not locked.

    Raises:
        StoreError: another extraction holds the lock.
    """
    base = fs.store.local_path
    if base is None:
        yield
        return
    import fcntl

    folder = base / fs.name
    folder.mkdir(parents=True, exist_ok=True)
    handles = []
    try:
        plan = [(folder / ".extract.lock", fcntl.LOCK_EX if num_shards == 1 else fcntl.LOCK_SH)]
        if num_shards > 1:
            plan.append((folder / f".extract.lock.{shard_index}-of-{num_shards}", fcntl.LOCK_EX))
        for path, kind in plan:
            fh = open(path, "a+")
            handles.append(fh)
            try:
                fcntl.flock(fh, kind | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{base}: another extraction is writing feature set '{fs.name}' "
                    f"({path.name}); wait for it to finish or kill it, then re-run to resume"
                ) from None
        yield
    finally:
        for fh in handles:
            fh.close()
