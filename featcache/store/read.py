"""Reading a feature set's arrays shard by shard, every chunk checked.

A chunk that fails its crc32c checksum, is truncated or empty, or is missing while its
rows are marked done raises a one-line ``StoreError`` naming the set, array and shard,
and the fix (``featcache verify --repair`` then ``featcache extract``). The fast path
for plain chunks (``cls``, ``pooled``) copies the file straight into the output and
checks the trailing crc32c itself. This module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from featcache.errors import StoreError
from featcache.store import io as store_io
from featcache.store.io import damaged
from featcache.store.layout import PENDING

# Chunk files this process has checked, by (device, inode, size, mtime): featcache replaces a
# chunk by a rename (new inode), so an unchanged identity is an unchanged file and a second read
# of it skips the checksum. Damage is caught on the first read of each chunk in each process.
_VERIFIED: dict[str, tuple[int, int, int, int]] = {}


class ChunkReader:
    """Read methods of ``FeatureSet`` (a mixin: needs ``store``, ``name``, ``n``, ``shard_rows``, ``_array``)."""

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
                st = os.fstat(f.fileno())
                ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                if not crc or _VERIFIED.get(str(path)) == ident:  # no checksum, or checked already
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
        if len(_VERIFIED) > 100_000:
            _VERIFIED.clear()
        _VERIFIED[str(path)] = ident
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
