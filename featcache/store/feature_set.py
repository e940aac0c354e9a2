"""One feature set of a store (``FeatureSet``): its manifest columns, status and arrays.

The layout is described in :mod:`featcache.store.feature_store`. This module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from featcache.errors import StoreError
from featcache.store import io as store_io
from featcache.store.layout import FAILED, OK, PENDING, _unicode
from featcache.store.manifest import Manifest
from featcache.store.read import ChunkReader, _codecs, _reason
from featcache.store.write import ShardWriter
from featcache.urls import UrlPath, is_url


class FeatureSet(ChunkReader, ShardWriter):
    """One feature set of a ``FeatureStore`` (see the module docstring for the layout).

    Attributes:
        name: the set's name.
        attrs: provenance attributes (dict).
        n: number of rows.
        shard_rows: rows per shard.
    """

    def __init__(self, store: store_io.StoreLocation, name: str, group: zarr.Group):
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
    def root(self) -> Path | UrlPath:
        """Folder (or ``UrlPath``, with the store's storage options) the manifest's paths were relative to."""
        root = str(self.attrs.get("root", "."))
        if is_url(root):
            return UrlPath(root, self.store.storage_options)
        return Path(root)

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

    @property
    def record(self):
        """How the set was made (:class:`featcache.store.provenance.SetRecord`), read from its attributes."""
        from featcache.store.provenance import SetRecord

        return SetRecord.from_attrs(self.attrs)

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

    # ---- integrity and size ----

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
