"""Integrity of a feature set: a full check (``verify``), its repair, and the readers' gate.

``verify_set`` reads every chunk of every array: a chunk that fails its crc32c
checksum, is truncated or empty, or is missing although its rows are marked done,
a status value outside {0, 1, 2}, a column or attribute that disagrees with the
arrays, or manifest columns that no longer hash to the recorded digest: each is
one line. ``repair`` marks the shards holding damage pending, so the next
``featcache extract`` redoes exactly them. ``check_usable`` is the gate every
reader goes through before using a set's numbers. This module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from featcache.errors import StoreError
from featcache.store.layout import attrs_digest

if TYPE_CHECKING:
    from featcache.store.feature_set import FeatureSet

FORMAT_VERSIONS = (1, 2, 3)  # 1: no checksums; 2: crc32c on every chunk, atomic creation; 3: attributes once
_VALID_STATUS = (0, 1, 2)


def _fix(fs: FeatureSet) -> str:
    return f"`featcache verify --repair {fs.store.url}` then `featcache extract`"


def attribute_problems(fs: FeatureSet) -> list[str]:
    """Problems with the attributes, array metadata and columns (cheap: reads no feature chunk)."""
    a, url = fs.attrs, fs.store.url
    out: list[str] = []
    fv = a.get("format_version")
    if fv not in FORMAT_VERSIONS:
        return [
            f"format_version {fv!r} is unknown to this featcache (knows {list(FORMAT_VERSIONS)}); upgrade featcache"
        ]
    if fs.replacing:
        return [
            "a replacement of the manifest columns was interrupted; re-run `featcache extract` with the new manifest"
        ]
    for key in ("ids", "paths", "patient_ids", "splits", "status", "failure", *fs.arrays()):
        if key not in fs.group:
            out.append(
                f"array '{key}' is missing ({url}/{fs.name}/{key}/zarr.json); delete the set and re-extract"
            )
    if out:
        return out
    for key, spec in a.get("arrays", {}).items():
        arr = fs.group[key]
        want = (fs.n, *spec["shape"])
        if tuple(arr.shape) != want or str(arr.dtype) != spec["dtype"]:
            out.append(
                f"array '{key}' is {tuple(arr.shape)} {arr.dtype} but the attributes say {want} {spec['dtype']}; "
                "the set was edited: re-extract it"
            )
    for key in ("ids", "paths", "patient_ids", "splits", "status", "failure", "labels", "classes", "masks"):
        if key in fs.group and fs.group[key].shape[0] != fs.n:
            out.append(
                f"array '{key}' has {fs.group[key].shape[0]} rows but attribute n is {fs.n}; re-extract"
            )
    if out:
        return out
    try:
        digest = fs.manifest_digest()
    except StoreError as e:
        return [str(e)]
    if digest != a.get("manifest_digest"):
        out.append(
            "stored manifest columns (ids, paths, patients, splits, labels, label_names) do not match the "
            "recorded manifest digest; re-run `featcache extract` with the right manifest"
        )
    if len(set(fs.ids.tolist())) != fs.n:
        out.append("ids are not unique")
    recorded = a.get("attrs_digest")
    if recorded and recorded != attrs_digest(a):
        out.append(
            "attributes were edited after extraction (attrs_digest mismatch: model, res, labels, arrays or "
            "settings); restore them or re-extract into a new set"
        )
    return out


def verify(fs: FeatureSet, repair: bool = False) -> list[str]:
    """Read every chunk of every array and check it; returns the problems found (empty when all is well).

    Checks the attributes against the arrays, the recorded manifest digest against the stored
    columns, every chunk's checksum, that every row marked done has its chunks, status values
    in {0, 1, 2}, no NaN/Inf in rows marked ok, no pending and no failed rows. With
    ``repair``, shards holding damage are marked pending so the next extraction redoes them.
    """
    return verify_set(fs, repair=repair)[0]


def verify_set(fs: FeatureSet, repair: bool = False) -> tuple[list[str], list[int]]:
    """Read every chunk of every array of the set and check it.

    Args:
        fs: the set.
        repair: mark the shards holding damage pending (status rewritten), so the next extraction
            redoes exactly them.

    Returns:
        ``(problems, damaged_shards)``: one line per problem, and the shards found damaged.
    """
    problems = attribute_problems(fs)
    if problems:
        return problems, []
    damaged: set[int] = set()
    status = np.zeros(fs.n, np.uint8)
    for s in range(fs.n_shards):  # status first: which rows are done decides what must exist
        lo, hi = fs.shard_range(s)
        try:
            status[lo:hi] = fs.read_shard_checked("status", s)
        except StoreError as e:
            problems.append(_short(e, fs))
            damaged.add(s)
            status[lo:hi] = 255
    bad = np.flatnonzero(~np.isin(status, _VALID_STATUS) & (status != 255))
    if len(bad):
        problems.append(
            f"{len(bad)} row(s) have a status outside {{0, 1, 2}} (first row {int(bad[0])}: {int(status[bad[0]])})"
        )
        damaged.update(int(i) // fs.shard_rows for i in bad)
    for key in ("failure", *fs.arrays()):
        nonfinite = 0
        for s in range(fs.n_shards):
            lo, hi = fs.shard_range(s)
            try:
                block = fs.read_shard_checked(key, s, status=status)
            except StoreError as e:
                problems.append(_short(e, fs))
                damaged.add(s)
                continue
            if key != "failure":
                ok = status[lo:hi] == 1
                finite = np.isfinite(block.reshape(hi - lo, -1)).all(axis=1)
                nonfinite += int((~finite & ok).sum())  # the model's output, not damage: not repaired
        if nonfinite:
            problems.append(f"array '{key}' has NaN or Inf in {nonfinite} rows marked ok")
    for key in _column_keys(fs):
        try:
            fs.read_column_checked(key)
        except StoreError as e:
            problems.append(str(e).split(": ", 1)[-1])
    pending = int((status == 0).sum())
    if pending:
        problems.append(f"{pending} of {fs.n} row(s) pending (re-run the extraction to finish)")
    failed = int((status == 2).sum())
    if failed:
        try:
            first = fs.failures()[0]
        except (StoreError, IndexError):
            first = {"id": "?", "reason": "unreadable"}
        problems.append(f"{failed} row(s) failed (first: {first['id']}: {first['reason']})")
    if repair and damaged:
        fs.mark_pending(sorted(damaged))
    return problems, sorted(damaged)


def _short(e: StoreError, fs: FeatureSet) -> str:
    msg = str(e)
    prefix = f"{fs.store.url}: feature set '{fs.name}', "
    return msg[len(prefix) :] if msg.startswith(prefix) else msg


def _column_keys(fs: FeatureSet) -> list[str]:
    keys = [
        k for k in ("ids", "paths", "patient_ids", "splits", "labels", "classes", "masks") if k in fs.group
    ]
    return keys + [f"meta/{m}" for m in fs.meta_names()]


def check_usable(fs: FeatureSet, allow_partial: bool = False) -> dict[str, int]:
    """Refuse a set whose numbers cannot be trusted; the readers' gate.

    Checks (no feature chunk is read; reads check their own checksums): a known format
    version, not mid-replacement, attributes unedited and consistent with the arrays, the
    manifest digest recomputed from the stored columns, status values in {0, 1, 2}, and
    no pending row unless ``allow_partial``.

    Returns:
        ``{"n", "ok", "failed", "pending"}`` row counts.

    Raises:
        StoreError: one line saying what is wrong and the command that fixes it.
    """
    where = f"{fs.store.url}: feature set '{fs.name}'"
    problems = attribute_problems(fs)
    if problems:
        raise StoreError(f"{where}: {problems[0]}")
    status = fs.status
    bad = np.flatnonzero(~np.isin(status, _VALID_STATUS))
    if len(bad):
        raise StoreError(
            f"{where}: {len(bad)} row(s) have a status outside {{0, 1, 2}} (first row {int(bad[0])}); run {_fix(fs)}"
        )
    counts = {
        "n": fs.n,
        "ok": int((status == 1).sum()),
        "failed": int((status == 2).sum()),
        "pending": int((status == 0).sum()),
    }
    if counts["pending"] and not allow_partial:
        raise StoreError(
            f"{where}: {counts['pending']} of {fs.n} row(s) are still pending (an extraction is running or was "
            "interrupted); re-run `featcache extract` to finish, or pass --allow-partial to probe the finished rows only"
        )
    return counts
