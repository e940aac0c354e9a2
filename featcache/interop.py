"""HDF5 / npz export and import of feature sets, to share features with other tools.

Export (``export_set``) writes one file per feature set:

* every feature array of the set (``cls``, ``pooled``, ``layer_cls``, ``layer_pooled``,
  ``registers``), in its stored dtype, ``[N, ...]``; ``patch`` only when asked (it is large);
* ``ids``, ``patient_ids``, ``splits``, ``paths`` (UTF-8 strings [N]), ``status`` (uint8 [N]: 0
  pending, 1 ok, 2 failed), ``failure`` (reasons [N]);
* ``labels`` (float32 [N, L], 1/0/-1, NaN missing) and ``label_names`` [L] for a multi-label set,
  ``classes`` [N] for a multi-class one, ``masks`` [N] when present, ``meta/<name>`` (HDF5) or
  ``meta_<name>`` (npz) for the metadata columns;
* provenance: HDF5 file attributes (``featcache_export`` = 1, ``set_name``, ``model``, ``res``,
  ``manifest_digest`` and ``attrs_json``, the set's full attributes as JSON); in npz, the 0-d string
  arrays ``attrs_json`` and ``set_name`` and ``featcache_export``. Strings are stored without pickle.

Import (``import_h5``) reads features computed by another tool (or an export of this one): a
features dataset ``[M, ...]`` and an ids dataset ``[M]`` (as TRIDENT / THUNDER-style files hold
them; bytes, strings or integers), and writes a feature set the probes accept, with the rows of a
manifest:

* rows are matched to the manifest by ``id``; file rows not in the manifest are ignored (counted);
* a manifest row whose id is not in the file is marked **failed** with the reason ``id not in
  <file>`` (the probes skip failed rows, ``featcache info`` lists them); ``missing="error"`` refuses
  instead;
* a file holding ``status`` / ``failure`` (an export) keeps its failed rows failed, with their reason;
* each features key becomes the array of the same name when it is one of the store's array names
  (``cls``, ``pooled``, ...), else ``as_array`` (default ``cls``, what the probes read first);
  float64 features are stored as float32, float16 / float32 as they are;
* provenance: ``source: imported`` with the file's path, format, keys and SHA-256 (also in
  ``config``, so re-importing another file into the same set name is refused); the model and
  resolution come from the file's own featcache attributes when present, else ``model`` / ``res``.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import FeatcacheError, StoreError
from featcache.store.feature_store import OK, PENDING, ArraySpec, FeatureSet, FeatureStore
from featcache.store.manifest import read_manifest

FORMATS = ("h5", "npz")
ARRAY_NAMES = ("cls", "pooled", "layer_cls", "layer_pooled", "registers", "patch")
_BLOCK_ROWS = 4096


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or ("npz" if path.suffix.lower() == ".npz" else "h5")
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: use one of {list(FORMATS)}")
    return fmt


def _strings(values: Any) -> np.ndarray:
    """str [N] from bytes, str, integer or object arrays."""
    a = np.asarray(values)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    if a.dtype.kind in "OT":  # object, or numpy's variable-width StringDType (zarr's strings)
        return np.array(
            [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a.tolist()], dtype=np.str_
        )
    return a.astype(np.str_)


# ---- export ----


def _columns(fs: FeatureSet) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {
        "ids": fs.ids,
        "patient_ids": fs.patient_ids,
        "splits": fs.splits,
        "paths": fs.paths,
        "status": fs.status.astype(np.uint8),
        "failure": _strings(fs.group["failure"][:]) if "failure" in fs.group else np.full(fs.n, "", np.str_),
    }
    if fs.task == "multilabel":
        cols["labels"] = fs.labels
        cols["label_names"] = np.asarray(fs.label_names, dtype=np.str_)
    if fs.classes is not None:
        cols["classes"] = fs.classes
    if fs.masks is not None:
        cols["masks"] = fs.masks
    return cols


def _write_h5(fs: FeatureSet, out: Path, arrays: list[str], source: str) -> None:
    import h5py

    text = h5py.string_dtype("utf-8")
    with h5py.File(out, "w") as f:
        for key, values in _columns(fs).items():
            if values.dtype.kind == "U":
                f.create_dataset(key, data=values.astype(object), dtype=text)
            else:
                f.create_dataset(key, data=values)
        for name in fs.meta_names():
            f.create_dataset(f"meta/{name}", data=fs.meta(name).astype(object), dtype=text)
        for name in arrays:
            shape = fs.shape(name)
            chunk_rows = max(1, min(shape[0], _BLOCK_ROWS, (1 << 22) // max(1, int(np.prod(shape[1:])))))
            dtype = fs.attrs["arrays"][name]["dtype"]
            d = f.create_dataset(name, shape=shape, dtype=dtype, chunks=(chunk_rows, *shape[1:]))
            for rows, block in fs.iter_blocks(name):
                d[rows[0] : rows[-1] + 1] = block
        f.attrs["featcache_export"] = 1
        f.attrs["set_name"] = fs.name
        f.attrs["store"] = source
        for key in ("model", "res", "manifest_digest", "task"):
            if isinstance(fs.attrs.get(key), str | int | float):
                f.attrs[key] = fs.attrs[key]
        f.attrs["attrs_json"] = json.dumps(fs.attrs, sort_keys=True, default=str)


def _write_npz(fs: FeatureSet, out: Path, arrays: list[str], source: str) -> None:
    # One array at a time into the zip (np.savez would need them all in memory at once).
    entries: dict[str, Any] = dict(_columns(fs))
    for name in fs.meta_names():
        entries[f"meta_{name}"] = fs.meta(name)
    entries["featcache_export"] = np.array(1)
    entries["set_name"] = np.array(fs.name)
    entries["store"] = np.array(source)
    entries["attrs_json"] = np.array(json.dumps(fs.attrs, sort_keys=True, default=str))
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, values in entries.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(values), allow_pickle=False)
        for name in arrays:
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, fs.read(name), allow_pickle=False)


def export_set(
    store_url: str | Path,
    set_name: str | None,
    out: str | Path,
    format: str | None = None,
    *,
    patch: bool = False,
) -> Path:
    """Write a feature set's arrays, manifest columns and provenance to one HDF5 or npz file.

    Args:
        store_url: the feature store (folder or fsspec URL).
        set_name: the set (None when the store holds exactly one).
        out: the file to write.
        format: ``h5`` or ``npz`` (default: from the file name, ``h5`` unless it ends in ``.npz``).
        patch: also export the ``patch`` tokens (float16 [N, h, w, D]; large).

    Returns:
        The path written.

    Raises:
        StoreError: no such store or set.
    """
    out = Path(out)
    fmt = _format_of(out, format)
    fs = FeatureStore(store_url).open_checked(set_name)  # never export a damaged or partial set
    arrays = [a for a in fs.arrays() if a != "patch" or patch]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        (_write_h5 if fmt == "h5" else _write_npz)(fs, tmp, arrays, str(store_url))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ---- import ----


@contextmanager
def _open_source(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """Arrays of the file by key (h5py datasets are read lazily) plus its attributes under ``__attrs__``."""
    if not path.is_file():
        raise FeatcacheError(f"{path}: file not found")
    if fmt == "h5":
        import h5py

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise FeatcacheError(
                f"{path}: not a readable HDF5 file ({e}); pass --format npz for .npz files"
            ) from None
        try:
            found: dict[str, Any] = {}
            f.visititems(lambda k, v: found.__setitem__(k, v) if isinstance(v, h5py.Dataset) else None)
            found["__attrs__"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            yield found
        finally:
            f.close()
    else:
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise FeatcacheError(
                f"{path}: not a readable .npz file ({e}); pass --format h5 for HDF5 files"
            ) from None
        with data:
            found = {}
            for k in data.files:
                try:
                    found[k] = data[k]
                except ValueError:  # object arrays need pickle, which is never enabled on a foreign file
                    raise FeatcacheError(
                        f"{path}: array '{k}' is stored as Python objects (pickle), which is not loaded for "
                        f"safety; save it as strings, e.g. np.savez(..., {k}=ids.astype(str))"
                    ) from None
            found["__attrs__"] = {}
            if "attrs_json" in found:
                found["__attrs__"]["attrs_json"] = str(found["attrs_json"])
            yield found


@dataclass
class ImportResult:
    """What ``import_h5`` did.

    Attributes:
        set_name: the feature set written.
        n: manifest rows.
        matched: rows whose id was found in the file.
        missing: manifest ids not in the file (rows marked failed), first few.
        n_missing: how many.
        extra: file rows whose id is not in the manifest (ignored).
        failed_in_source: rows the file itself marks failed.
        arrays: feature arrays written.
        sha256: the file's SHA-256.
    """

    set_name: str
    n: int
    matched: int
    missing: list[str]
    n_missing: int
    extra: int
    failed_in_source: int
    arrays: list[str]
    sha256: str

    def summary(self) -> str:
        """One line for the CLI."""
        text = f"imported {self.matched} of {self.n} rows into '{self.set_name}' ({', '.join(self.arrays)})"
        if self.n_missing:
            text += f"; {self.n_missing} manifest ids not in the file marked failed (first: {', '.join(self.missing)})"
        if self.failed_in_source:
            text += f"; {self.failed_in_source} rows failed in the source"
        if self.extra:
            text += f"; {self.extra} file rows not in the manifest ignored"
        return text


def _targets(keys: list[str], as_array: str) -> dict[str, str]:
    """File key -> store array name."""
    if as_array not in ARRAY_NAMES:
        raise FeatcacheError(f"--as {as_array!r}: use one of {list(ARRAY_NAMES)}")
    out: dict[str, str] = {}
    for key in keys:
        leaf = key.rsplit("/", 1)[-1]
        name = leaf if leaf in ARRAY_NAMES else as_array
        if name in out.values():
            raise FeatcacheError(
                f"features keys {keys} would all become the array '{name}'; import one at a time with --as"
            )
        out[key] = name
    return out


def import_h5(
    path: str | Path,
    store_url: str | Path,
    set_name: str,
    *,
    manifest: str | Path,
    root: str | Path | None = None,
    features_key: str | list[str] = "features",
    ids_key: str = "ids",
    as_array: str = "cls",
    format: str | None = None,
    missing: str = "fail",
    model: str = "imported",
    res: int | None = None,
) -> ImportResult:
    """Import features computed elsewhere into a feature set, rows matched to a manifest by id.

    Args:
        path: the HDF5 (or npz) file.
        store_url: the feature store to write into (created if absent).
        set_name: the feature set to create, e.g. ``nih/other-tool/224``.
        manifest: the manifest CSV whose ``id`` column the file's ids refer to.
        root: the manifest's root (default: its folder); images are not read.
        features_key: dataset(s) holding the features [M, ...] (a list or comma-separated); for a file
            written by ``export_set`` the default takes all its feature arrays.
        ids_key: dataset holding the ids [M].
        as_array: store array name for a features key that is not one (``cls`` by default).
        format: ``h5`` or ``npz`` (default: from the file name).
        missing: ``fail`` (manifest ids absent from the file become failed rows) or ``error``.
        model: model name recorded when the file has no featcache provenance.
        res: resolution recorded when the file has no featcache provenance.

    Returns:
        An ``ImportResult``.

    Raises:
        FeatcacheError: missing keys, length mismatch, duplicate ids, no id in common, ids missing
            with ``missing="error"``; StoreError: the set exists with another manifest or file.
    """
    path = Path(path)
    fmt = _format_of(path, format)
    if missing not in ("fail", "error"):
        raise FeatcacheError(f"--missing {missing!r}: use fail or error")
    keys = (
        [k.strip() for k in features_key.split(",")] if isinstance(features_key, str) else list(features_key)
    )
    m = read_manifest(manifest, root, check_files=False)
    digest = _sha256(path)
    with _open_source(path, fmt) as src:
        exported = bool(src["__attrs__"].get("featcache_export")) or "featcache_export" in src
        if keys == ["features"] and "features" not in src and exported:  # our own export: take its arrays
            keys = [
                k for k in ("cls", "pooled", "layer_cls", "layer_pooled", "registers", "patch") if k in src
            ]
        file_ids = _checked_ids(src, path, keys, ids_key)
        pos, hit = _match_rows(file_ids, m, path, manifest, ids_key)
        absent_ids = m.ids[~hit].tolist()
        if absent_ids and missing == "error":
            raise FeatcacheError(
                f"{path}: {len(absent_ids)} manifest ids are not in the file (first: {absent_ids[:5]}); "
                "pass --missing fail to import them as failed rows"
            )
        attrs_json = src["__attrs__"].get("attrs_json")
        origin = json.loads(attrs_json) if isinstance(attrs_json, str) else {}
        targets = _targets(keys, as_array)
        specs = {}
        for k, name in targets.items():
            dt = np.dtype(src[k].dtype)
            specs[name] = ArraySpec(
                tuple(int(s) for s in src[k].shape[1:]), "float32" if dt.itemsize > 4 else dt.name
            )
        info = {
            "file": str(path),
            "format": fmt,
            "sha256": digest,
            "features_key": keys,
            "ids_key": ids_key,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        store = FeatureStore(store_url, mode="a")
        fs = store.create_set(set_name, m, specs, _import_attrs(origin, info, targets, model, res))
        if fs.needs_manifest(m):  # the same file again with a re-split or relabelled manifest
            fs.replace_manifest(m)
        # only a featcache export's status column is known to mean pending / ok / failed
        status = np.asarray(src["status"][()]) if exported and "status" in src else None
        failure = _strings(src["failure"][()]) if exported and "failure" in src else None
        n_src_failed = _copy_rows(fs, src, pos, specs, targets, status, failure, path.name)
    if np.any(fs.status == PENDING):
        raise StoreError(f"{store_url}: feature set '{set_name}' still has pending rows after the import")
    return ImportResult(
        set_name=fs.name,
        n=len(m),
        matched=int(hit.sum()),
        missing=absent_ids[:5],
        n_missing=len(absent_ids),
        extra=int(len(file_ids) - hit.sum()),
        failed_in_source=n_src_failed,
        arrays=list(specs),
        sha256=digest,
    )


def _checked_ids(src: dict[str, Any], path: Path, keys: list[str], ids_key: str) -> np.ndarray:
    """The file's ids [M] (str), once every features key is there as [M, ...] floating point."""
    absent = [k for k in [*keys, ids_key] if k not in src]
    if absent:
        found = sorted(k for k in src if k != "__attrs__")
        raise FeatcacheError(
            f"{path}: no dataset {absent} (datasets: {found[:20]}); choose them with --features-key / --ids-key"
        )
    file_ids = _strings(src[ids_key][()])
    if file_ids.ndim != 1:
        raise FeatcacheError(f"{path}: '{ids_key}' has shape {file_ids.shape}; ids must be one-dimensional")
    for k in keys:
        if src[k].shape[0] != len(file_ids) or len(src[k].shape) < 2:
            raise FeatcacheError(
                f"{path}: '{k}' has shape {tuple(src[k].shape)} but '{ids_key}' holds {len(file_ids)} ids; "
                "features must be [N, ...] with one row per id"
            )
        if np.dtype(src[k].dtype).kind != "f":
            raise FeatcacheError(f"{path}: '{k}' holds {src[k].dtype}, not floating-point features")
    uniq, counts = np.unique(file_ids, return_counts=True)
    if np.any(counts > 1):
        raise FeatcacheError(
            f"{path}: ids {uniq[counts > 1][:5].tolist()} occur more than once in '{ids_key}'"
        )
    return file_ids


def _match_rows(file_ids: np.ndarray, m, path: Path, manifest, ids_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(position in the file of each manifest row, -1 when absent; bool [N] found)."""
    order = np.argsort(file_ids, kind="stable")
    at = np.searchsorted(file_ids[order], m.ids)
    at = np.clip(at, 0, max(0, len(file_ids) - 1))
    hit = file_ids[order][at] == m.ids if len(file_ids) else np.zeros(len(m), bool)
    if not hit.any():
        raise FeatcacheError(
            f"{path}: none of the {len(file_ids)} ids in '{ids_key}' is an id of {manifest} "
            f"(file: {file_ids[:3].tolist()}, manifest: {m.ids[:3].tolist()}); check --ids-key and the manifest"
        )
    return np.where(hit, order[at], -1), hit


def _import_attrs(origin: dict, info: dict, targets: dict[str, str], model: str, res: int | None) -> dict:
    """The imported set's attributes: the file is its defining setting; a featcache export's provenance is kept."""
    attrs: dict[str, Any] = {
        "source": "imported",
        "imported": info,
        "imported_from": {"sha256": info["sha256"], "arrays": targets},
        "settings": ["source", "imported_from"],
        "model": origin.get("model", model),
        "res": origin.get("res", res),
    }
    for key in ("preprocessing", "layers", "provenance", "model_spec", "tokens"):
        if key in origin:
            attrs[key] = origin[key]
    if origin:
        attrs["origin"] = {
            k: origin.get(k) for k in ("model", "res", "manifest_digest", "created", "versions")
        }
    return attrs


def _copy_rows(fs, src, pos, specs, targets, status, failure, file_name: str) -> int:
    """Write every shard from the file's rows (``pos``: -1 = absent, a failed row); returns the rows the
    source itself marks not ok."""
    n_src_failed = 0
    for s in range(fs.n_shards):
        lo, hi = fs.shard_range(s)
        p = pos[lo:hi]
        found = p >= 0
        data = {name: np.zeros((hi - lo, *spec.shape), dtype=spec.dtype) for name, spec in specs.items()}
        if found.any():
            sel = p[found]
            srt = np.argsort(sel)
            sorted_sel = sel[srt]
            for k, name in targets.items():
                if sorted_sel[-1] - sorted_sel[0] + 1 == len(sorted_sel):  # one contiguous read
                    block = np.asarray(src[k][int(sorted_sel[0]) : int(sorted_sel[-1]) + 1])
                else:
                    block = np.asarray(src[k][sorted_sel])
                rows = np.empty_like(block)
                rows[srt] = block
                data[name][found] = rows.astype(specs[name].dtype, copy=False)
        failed = {int(lo + i): f"id not in {file_name}" for i in np.flatnonzero(~found)}
        if status is not None:
            for i in np.flatnonzero(found):
                if status[p[i]] != OK:
                    reason = failure[p[i]] if failure is not None else ""
                    failed[int(lo + i)] = reason or "not ok in the source file"
                    n_src_failed += 1
        fs.write_shard(s, data, failed)
    return n_src_failed


__all__ = ["ARRAY_NAMES", "FORMATS", "ImportResult", "export_set", "import_h5"]
