"""Writing a feature set: whole-shard commits, repair marks, attributes, manifest replacement.

Within a shard, data arrays are written first, then the failure reasons, then ``status``
(the commit); every chunk is stored even when equal to the fill value, so a missing chunk
means damage. Each write is a fault point (``featcache.store.io.fault_point``) and an
OSError (full disk, read-only file system) becomes a one-line ``StoreError``. This module
does not import torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from featcache.errors import StoreError
from featcache.store import io as store_io
from featcache.store.io import write_errors
from featcache.store.layout import (
    _REPLACING,
    FAILED,
    OK,
    PENDING,
    ArraySpec,
    _jsonable,
    _manifest_attrs,
    _now,
    _write_manifest_columns,
    attrs_digest,
    consolidate,
)
from featcache.store.locks import file_lock
from featcache.store.manifest import Manifest


class ShardWriter:
    """Write methods of ``FeatureSet`` (a mixin: needs ``store``, ``name``, ``group``, ``attrs``...)."""

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
        with file_lock(self, "manifest.lock"):
            self.refresh()
            if not self.needs_manifest(manifest):
                return False
            self.update_attrs(manifest_digest=_REPLACING + manifest.digest())
            _write_manifest_columns(self.group, manifest)
            new = {**self.attrs, **_manifest_attrs(manifest)}
            extra = {"attrs_digest": attrs_digest(_jsonable(new))} if self.attrs.get("attrs_digest") else {}
            self.update_attrs(**_manifest_attrs(manifest), **extra, manifest_updated=_now())  # the commit
            self._cache.clear()
        return True

    def refresh(self) -> None:
        """Re-read the set's attributes from the store (another process may have changed them)."""
        self.group = zarr.open_group(
            self.store.root.store,
            path=self.name,
            mode="a" if self.store.mode == "a" else "r",
            zarr_format=3,
            use_consolidated=False,
        )
        self.attrs = dict(self.group.attrs)

    def update_attrs(self, **kv: Any) -> None:
        """Merge attributes into the set's provenance, on top of what is stored now (not a stale copy).

        The set's consolidated metadata is rewritten after (an attribute write drops it), under a
        lock so that two workers finishing at once leave it valid.
        """
        with (
            write_errors(f"{self.store.url}: writing the attributes of feature set '{self.name}'"),
            file_lock(self, "attrs.lock"),
        ):
            self.refresh()
            store_io.fault_point("attrs")
            self.group.attrs.update(kv)
            self.attrs = dict(self.group.attrs)
            self.consolidate()

    def consolidate(self) -> None:
        """Rewrite the set's consolidated metadata (what ``xarray.open_zarr(consolidated=True)`` reads)."""
        with write_errors(f"{self.store.url}: consolidating the metadata of feature set '{self.name}'"):
            consolidate(self.store.root.store, self.name)

    def _check_compatible(
        self, manifest: Manifest, attrs: dict, arrays: dict[str, ArraySpec], shard_rows: int | None = None
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
        stored, now = defining_settings(self.attrs), defining_settings(attrs)
        if "settings" not in self.attrs:  # an older set: compare on what it kept under "config"
            flat = {**now, **(now.get("imported_from") or {})}
            now = {k: flat.get(k) for k in stored}
        diff = sorted(k for k in set(stored) | set(now) if _jsonable(stored.get(k)) != _jsonable(now.get(k)))
        if diff:
            detail = ", ".join(f"{k}: stored {stored.get(k)!r} vs now {now.get(k)!r}" for k in diff[:4])
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' was extracted with other settings ({detail}); "
                "use another --out or --name"
            )
        want = {k: {"shape": list(v.shape), "dtype": v.dtype} for k, v in arrays.items()}
        if self.attrs.get("arrays") != want:
            raise StoreError(
                f"{self.store.url}: feature set '{self.name}' holds other arrays; use another --name"
            )


def defining_settings(attrs: dict) -> dict:
    """The settings that define a set's content, as compared when a set is reopened to resume.

    ``attrs["settings"]`` names them (each value is written once, at the top level); sets made
    before kept a copy under ``config``. The preprocessing is compared on its settings: its
    resolution is ``res`` and its fixed steps (``pipeline``) are checked when it is read.
    """
    keys = attrs.get("settings")
    values = dict(attrs.get("config") or {}) if keys is None else {k: attrs.get(k) for k in keys}
    if isinstance(values.get("preprocessing"), dict):
        values["preprocessing"] = {
            k: v for k, v in values["preprocessing"].items() if k not in ("res", "pipeline")
        }
    return values
