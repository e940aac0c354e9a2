"""File locks of a feature set: one extraction at a time, disjoint worker slices, manifest updates.

Locks are ``flock`` locks on files released by the kernel when the process dies (even by
SIGKILL). They live outside the Zarr hierarchy, in a sibling folder of the store,
``<store>.locks/<set name>/``: any file inside a Zarr v3 group that is not a Zarr node makes
zarr (and xarray) warn when listing it, hidden or not. Lock files left inside a set by older
versions (``.extract.lock*``, ``.manifest.lock``) are removed when free, and refused while an
older featcache still holds them. Remote stores (fsspec URLs) are not locked: there, start
one worker per slice and never two runs of the same slice. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from featcache.errors import StoreError

if TYPE_CHECKING:
    from featcache.store import FeatureSet

_HELD: list = []  # open lock files of this process (closed in forked decode workers)


def close_inherited_locks(*_args) -> None:
    """Close this process's copies of the lock files; call first thing in a forked child.

    A forked decode worker shares the lock's open file: without this, a worker orphaned by a
    killed main process would keep the set locked until it notices and exits.
    """
    for fh in list(_HELD):
        with contextlib.suppress(OSError):
            fh.close()
    _HELD.clear()


LOCKS_SUFFIX = ".locks"
_LEGACY = (".extract.lock", ".extract.lock.*-of-*", ".manifest.lock")


def lock_folder(store_path: Path, set_name: str, create: bool = True) -> Path:
    """``<store>.locks/<set name>/`` beside the store folder (created unless ``create`` is False).

    Raises:
        StoreError: the folder cannot be made (a read-only parent folder).
    """
    base = Path(store_path).resolve()
    folder = base.parent / (base.name + LOCKS_SUFFIX) / set_name
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"{folder}: cannot create the lock folder beside the store ({e.strerror}); make "
                f"{base.parent} writable or put the store (--out) in a writable folder"
            ) from None
    return folder


def _remove_legacy_locks(set_folder: Path) -> None:
    """Delete lock files an older featcache left inside the set (zarr warns on them); refuse if one is held."""
    import fcntl

    for pattern in _LEGACY:
        for path in set_folder.glob(pattern):
            try:
                fh = open(path, "a+")
            except OSError:
                continue
            with fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreError(
                        f"{path}: an older featcache is writing this feature set; wait for it to finish "
                        "(or kill it), then re-run"
                    ) from None
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(fs: FeatureSet, name: str) -> Iterator[None]:
    """An exclusive, blocking flock on ``<store>.locks/<set>/<name>`` (no-op for remote stores)."""
    base = fs.store.local_path
    if base is None:
        yield
        return
    import fcntl

    with open(lock_folder(base, fs.name) / name, "a+") as fh:
        _HELD.append(fh)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        finally:
            _HELD.remove(fh)


_SLICE_LOCK = re.compile(r"extract\.lock\.(\d+)-of-(\d+)$")


@contextlib.contextmanager
def extraction_lock(fs: FeatureSet, shard_index: int = 0, num_shards: int = 1) -> Iterator[None]:
    """Refuse a second extraction into the same set (or the same worker slice) while one runs.

    A single-worker run holds an exclusive lock on the set; each of several workers holds a
    shared lock on the set plus an exclusive lock on its own slice, so workers of one run
    coexist while a duplicate worker, a plain second run, or a worker started with another
    ``--num-shards`` (whose slices would overlap) is refused.

    Raises:
        StoreError: another extraction holds the lock, or runs with another ``--num-shards``.
    """
    base = fs.store.local_path
    if base is None:
        yield
        return
    import fcntl

    folder = lock_folder(base, fs.name)
    handles = []
    try:
        plan = [(folder / "extract.lock", fcntl.LOCK_EX if num_shards == 1 else fcntl.LOCK_SH)]
        if num_shards > 1:
            plan.append((folder / f"extract.lock.{shard_index}-of-{num_shards}", fcntl.LOCK_EX))
        for path, kind in plan:
            fh = open(path, "a+")
            handles.append(fh)
            _HELD.append(fh)
            try:
                fcntl.flock(fh, kind | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{base}: another extraction is writing feature set '{fs.name}' "
                    f"({path.name}); wait for it to finish or kill it, then re-run to resume"
                ) from None
        if num_shards > 1:
            _refuse_other_slicing(folder, num_shards, fs.name)
        _remove_legacy_locks(base / fs.name)
        yield
    finally:
        for fh in handles:
            if fh in _HELD:
                _HELD.remove(fh)
            fh.close()


def _refuse_other_slicing(folder, num_shards: int, name: str) -> None:
    import fcntl

    for path in folder.glob("extract.lock.*-of-*"):
        m = _SLICE_LOCK.search(path.name)
        if not m or int(m.group(2)) == num_shards:
            continue
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{folder}: a worker with --num-shards {m.group(2)} is writing feature set '{name}' "
                    f"and this one has --num-shards {num_shards}: slices would overlap; start every "
                    "worker with the same --num-shards"
                ) from None
