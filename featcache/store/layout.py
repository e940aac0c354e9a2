"""How a feature set is laid out when created: constants, array specs, codecs, columns, attributes.

See ``featcache.store.feature_store`` for the layout itself. Every array gets a crc32c checksum on each
chunk (inside sharding: on each inner chunk and on the shard index). This module does not
import torch.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from featcache.store import io as store_io
from featcache.store.manifest import Manifest

PENDING, OK, FAILED = 0, 1, 2
SET_MARKER = "featcache_set"
FORMAT_VERSION = (
    3  # 3: each attribute once, "settings" named; 2: crc32c checksums on every chunk; 1: neither (read)
)
_LARGE_ARRAYS = ("patch", "registers")
# the string columns also stored as zero-padded UTF-8 bytes (uint8 [N, W]) for readers without
# variable-length strings (tensorstore, most non-Python Zarr libraries): ``<column>_utf8``
BYTE_COLUMNS = ("ids", "paths", "patient_ids", "splits")
BYTES_SUFFIX = "_utf8"
# named dimensions of the feature arrays beyond the first (``row``), for xarray and other readers
_DIMENSIONS = {
    "cls": ("dim",),
    "pooled": ("dim",),
    "registers": ("register", "dim"),
    "patch": ("h", "w", "dim"),
    "layer_cls": ("layer", "layer_dim"),
    "layer_pooled": ("layer", "layer_dim"),
}
_TARGET_SHARD_BYTES = 256 * 2**20

# attributes that define what a set's numbers mean: a hand edit of any is caught by ``attrs_digest``
_DEFINING = (
    "config", "model", "model_spec", "res", "preprocessing", "tokens", "layers", "patch_pool", "provenance",
    "n", "shard_rows", "arrays", "label_names", "task", "manifest_digest", "rows_digest", "columns_digest",
    "format_version",
)  # fmt: skip
# defining too, digested only when present so that the digests of sets made before still hold:
# the settings' names and the values that older sets kept only under "config"
_DEFINING_ADDED = ("settings", "weights", "compute_dtype", "imported_from")


def attrs_digest(attrs: dict[str, Any]) -> str:
    """sha256 of the defining attributes (canonical JSON); recorded at creation as ``attrs_digest``."""
    defining = {k: attrs.get(k) for k in _DEFINING}
    defining.update({k: attrs[k] for k in _DEFINING_ADDED if k in attrs})
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()


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


def _set_attrs(attrs, manifest: Manifest, arrays: dict[str, ArraySpec], n: int, rows: int) -> dict[str, Any]:
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
        "status",
        shape=(n,),
        dtype="uint8",
        chunks=(rows,),
        fill_value=PENDING,
        compressors=_crc(),
        dimension_names=["row"],
    )
    g.create_array(
        "failure", shape=(n,), dtype=str, chunks=(rows,), compressors=_crc(), dimension_names=["row"]
    )
    store_io.fault_point("create:attrs")
    g.attrs.update({k: v for k, v in attrs.items() if k != SET_MARKER})
    store_io.fault_point("create:marker")
    g.attrs.update({SET_MARKER: True})  # last: a set is visible only once complete


def _crc() -> list:
    return [Crc32cCodec()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def dimension_names(key: str, ndim: int) -> list[str]:
    """Names of an array's dimensions: ``row`` first, then e.g. ``dim`` or ``h, w, dim`` (see ``_DIMENSIONS``)."""
    rest = _DIMENSIONS.get(key)
    if rest is None or len(rest) != ndim - 1:
        rest = tuple(f"{key}_{i}" for i in range(1, ndim))
    return ["row", *rest]


def _write_column(g: zarr.Group, key: str, values: np.ndarray) -> None:
    a = g.create_array(
        key,
        shape=values.shape,
        dtype=str,
        chunks=(max(1, min(len(values), 65536)),),
        overwrite=True,
        compressors=_crc(),
        dimension_names=["row"],
    ).with_config({"write_empty_chunks": True})
    if len(values):
        a[:] = values.astype(str)
    if key in BYTE_COLUMNS:
        _write_bytes_column(g, key, values)


def utf8_matrix(values: np.ndarray) -> np.ndarray:
    """uint8 [N, W]: each string's UTF-8 bytes, zero-padded to the longest (W >= 1)."""
    encoded = [str(v).encode("utf-8") for v in np.asarray(values).tolist()]
    width = max([1, *map(len, encoded)])
    out = np.zeros((len(encoded), width), np.uint8)
    for i, b in enumerate(encoded):
        out[i, : len(b)] = np.frombuffer(b, np.uint8)
    return out


def decode_utf8_matrix(m: np.ndarray) -> np.ndarray:
    """The strings of a ``utf8_matrix`` (str [N]); the reference decoder for other languages' readers."""
    return np.array([bytes(r).rstrip(b"\0").decode("utf-8") for r in np.asarray(m, np.uint8)], dtype=np.str_)


def _write_bytes_column(g: zarr.Group, key: str, values: np.ndarray) -> None:
    m = utf8_matrix(values)
    a = g.create_array(
        key + BYTES_SUFFIX,
        shape=m.shape,
        dtype="uint8",
        chunks=(max(1, min(len(m), 65536)), m.shape[1]),
        overwrite=True,
        compressors=[ZstdCodec(level=3), *_crc()],
        dimension_names=["row", f"{key}_byte"],
        attributes={"encoding": "utf-8, zero-padded", "column": key},
    ).with_config({"write_empty_chunks": True})
    if len(m):
        a[:] = m


_MANIFEST_COLUMNS = ("patient_ids", "splits", "masks", "classes", "labels", "meta")
_MANIFEST_COLUMNS += tuple(k + BYTES_SUFFIX for k in ("patient_ids", "splits"))


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
            dimension_names=["row", "label"],
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
            dimension_names=dimension_names(key, len(shape)),
        )
    else:
        g.create_array(
            key,
            shape=shape,
            dtype=spec.dtype,
            chunks=(shard_rows, *spec.shape),
            compressors=compressor,
            fill_value=0,
            dimension_names=dimension_names(key, len(shape)),
        )


def _unicode(values: Any) -> np.ndarray:
    """A numpy fixed-width unicode array from zarr's variable-length strings."""
    values = np.asarray(values)
    if values.dtype.kind == "U":
        return values
    return np.array(values.tolist(), dtype=np.str_) if values.size else np.zeros(values.shape, np.str_)


def consolidate(store: Any, path: str) -> None:
    """Write the consolidated metadata of the group at ``path`` into its ``zarr.json``.

    Readers such as ``xarray.open_zarr(..., consolidated=True)`` then open a set with one read.
    Only metadata is consolidated (no chunk content), so shard writes never make it stale;
    every attribute update or array (re)creation is followed by this call.
    """
    import warnings

    store_io.fault_point("consolidate")
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 specification"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(store, path=path or None, zarr_format=3)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))
