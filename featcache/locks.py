"""File locks of a feature set: one extraction at a time, disjoint worker slices, manifest updates.

Locks are ``flock`` locks on files in the set's folder, released by the kernel when
the process dies (even by SIGKILL). Remote stores (fsspec URLs) are not locked:
there, start one worker per slice and never two runs of the same slice.
This module does not import torch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
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


@contextlib.contextmanager
def file_lock(fs: FeatureSet, name: str) -> Iterator[None]:
    """An exclusive, blocking flock on a file in the set's folder (no-op for remote stores)."""
    base = fs.store.local_path
    if base is None:
        yield
        return
    import fcntl

    with open(base / fs.name / name, "a+") as fh:
        _HELD.append(fh)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
        finally:
            _HELD.remove(fh)


_SLICE_LOCK = re.compile(r"\.extract\.lock\.(\d+)-of-(\d+)$")


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

    folder = base / fs.name
    handles = []
    try:
        plan = [(folder / ".extract.lock", fcntl.LOCK_EX if num_shards == 1 else fcntl.LOCK_SH)]
        if num_shards > 1:
            plan.append((folder / f".extract.lock.{shard_index}-of-{num_shards}", fcntl.LOCK_EX))
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
        yield
    finally:
        for fh in handles:
            if fh in _HELD:
                _HELD.remove(fh)
            fh.close()


def _refuse_other_slicing(folder, num_shards: int, name: str) -> None:
    import fcntl

    for path in folder.glob(".extract.lock.*-of-*"):
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
