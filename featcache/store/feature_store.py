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

import os
import time
import warnings
from pathlib import Path
from typing import Any

import zarr

from featcache.errors import StoreError
from featcache.store import io as store_io
from featcache.store.feature_set import FeatureSet  # noqa: F401  (re-exported)
from featcache.store.io import check_set_name, write_errors
from featcache.store.layout import (  # noqa: F401  (re-exported: the store's public names)
    _LARGE_ARRAYS,
    FAILED,
    FORMAT_VERSION,
    OK,
    PENDING,
    SET_MARKER,
    ArraySpec,
    _build_set,
    _jsonable,
    _now,
    _set_attrs,
    _unicode,
    consolidate,
    default_shard_rows,
)
from featcache.store.locks import extraction_lock, file_lock  # noqa: F401  (extraction_lock re-exported)
from featcache.store.manifest import Manifest


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def _open_root(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    """The store's root group. Several workers starting together may all find no root and create it
    at once: the losers of that race (zarr raises as another process's zarr.json appears) open the
    winner's root instead."""
    kw = {"storage_options": storage_options} if storage_options and not _is_local(url) else {}
    for attempt in range(5):
        try:
            return zarr.open_group(url, mode=mode, zarr_format=3, use_consolidated=False, **kw)
        except Exception:
            if mode != "a" or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


class FeatureStore:
    """A Zarr v3 group holding feature sets.

    Args:
        url: a local folder or any fsspec URL (``s3://bucket/cache``, ``file:///...``).
        mode: ``r`` to read (the store must exist) or ``a`` to read and write (created if absent).
        storage_options: options of the fsspec file system of a URL store (credentials,
            ``{"client_kwargs": {"endpoint_url": ...}}``, ``{"anon": True}``...); ignored for local
            folders. Remote writers take lock objects beside the store (``featcache.store.locks``).

    Example:
        >>> store = FeatureStore("cache/")
        >>> fs = store.open_set()          # the only set
        >>> X = fs.read("cls", rows=np.flatnonzero(fs.ok))
    """

    def __init__(self, url: str | os.PathLike, mode: str = "r", storage_options: dict | None = None):
        self.url = str(url).rstrip("/") if "://" in str(url) else str(url)
        if mode not in ("r", "a"):
            raise ValueError("mode must be 'r' or 'a'")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise StoreError(
                f"{self.url}: storage options must be a JSON object such as "
                '{"anon": true}, not ' + type(storage_options).__name__
            )
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        if mode == "r" and _is_local(self.url) and not (_local_path(self.url) / "zarr.json").is_file():
            raise StoreError(
                f"{self.url}: no feature store here; run `featcache extract --out {self.url}` first"
            )
        try:
            with write_errors(f"{self.url}: opening the feature store"):
                # featcache reads each node's own metadata: consolidated copies are for other readers
                self.root = _open_root(self.url, mode, self.storage_options)
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
        return FeatureSet(self, name, self._group(name))

    def _group(self, name: str) -> zarr.Group:
        """The set's group read from its own ``zarr.json`` (never from consolidated metadata)."""
        return zarr.open_group(
            self.root.store, path=name, mode=self.mode, zarr_format=3, use_consolidated=False
        )

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
        from featcache.store.check import check_usable

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
            attrs: provenance attributes, each written once. ``attrs["settings"]`` names those
                that define the set's content (model, weights, resolution, preprocessing,
                tokens...); reopening with different values of any is refused.
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
        if shard_rows is not None and int(shard_rows) <= 0:
            raise StoreError("shard rows must be positive")
        if self.has_set(name):
            return self._open_compatible(name, manifest, attrs, arrays, shard_rows)
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
                if self.has_set(name):  # another worker published it since the check above
                    return self._open_compatible(name, manifest, attrs, arrays, shard_rows)
                raise StoreError(
                    f"{final}: a folder that is not a complete feature set is in the way (left by an older "
                    f"featcache killed while creating it?); delete {final} and re-run"
                )
            tmp = store_io.new_tmp_folder(final)
            try:
                g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
                _build_set(g, manifest, arrays, full_attrs, rows)
                consolidate(str(tmp), "")
                store_io.publish(tmp, final)
            finally:
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)
        return self._open_compatible(name, manifest, attrs, arrays, shard_rows)

    def _open_compatible(self, name, manifest, attrs, arrays, shard_rows) -> FeatureSet:
        fs = self.open_set(name)
        fs._check_compatible(manifest, attrs, arrays, shard_rows)
        return fs

    def _create_in_place(self, name, manifest, arrays, full_attrs, rows, shard_rows) -> FeatureSet:
        try:
            g = self.root.create_group(name)
        except Exception:  # another worker created it first: wait until it is ready, then check it
            return self._wait_for_set(name, manifest, full_attrs, arrays, shard_rows)
        _build_set(g, manifest, arrays, full_attrs, rows)
        consolidate(self.root.store, name)
        return FeatureSet(self, name, self._group(name))

    def _wait_for_set(self, name, manifest, attrs, arrays, shard_rows, timeout: float = 120.0) -> FeatureSet:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.has_set(name):
                return self._open_compatible(name, manifest, attrs, arrays, shard_rows)
            time.sleep(0.5)
        raise StoreError(
            f"{self.url}: feature set '{name}' exists but is incomplete (its creation on this remote store "
            f"was interrupted); delete {name} and re-run"
        )
