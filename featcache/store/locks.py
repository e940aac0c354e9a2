"""File locks of a feature set: one extraction at a time, disjoint worker slices, manifest updates.

Locks are ``flock`` locks on files released by the kernel when the process dies (even by
SIGKILL). They live outside the Zarr hierarchy, in a sibling folder of the store,
``<store>.locks/<set name>/``: any file inside a Zarr v3 group that is not a Zarr node makes
zarr (and xarray) warn when listing it, hidden or not. Lock files left inside a set by older
versions (``.extract.lock*``, ``.manifest.lock``) are removed when free, and refused while an
older featcache still holds them.

Remote stores (fsspec URLs) have no flock: there a lock is an object ``<store>.locks/<set>/<name>``
created with a conditional put (S3 ``If-None-Match: *``, which fails when the object exists), so of
two writers exactly one creates it. It holds the writer's id and a heartbeat time that a thread
refreshes every ``FEATCACHE_LOCK_TIMEOUT / 4`` seconds (timeout default 600); it is deleted when
the writer ends. A lock whose heartbeat is older than the timeout was left by a killed writer: it
is reported with the command that deletes it, never taken over silently. This module does not
import torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from featcache.errors import StoreError
from featcache.store.io import StoreLocation


class LockedSet(Protocol):
    """What a lock needs of a feature set: its name and its store's location."""

    name: str
    store: StoreLocation


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
def file_lock(fs: LockedSet, name: str) -> Iterator[None]:
    """An exclusive, blocking flock on ``<store>.locks/<set>/<name>`` (no-op for remote stores)."""
    base = fs.store.local_path
    if base is None:
        with remote_lock(fs, name, wait=True):
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
def extraction_lock(fs: LockedSet, shard_index: int = 0, num_shards: int = 1) -> Iterator[None]:
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
        with remote_extraction_lock(fs, shard_index, num_shards):
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


# ---- remote stores: lock objects created with a conditional put ----


def lock_timeout() -> float:
    """Seconds after which a remote lock's heartbeat is stale (``FEATCACHE_LOCK_TIMEOUT``, default 600)."""
    try:
        return max(1.0, float(os.environ.get("FEATCACHE_LOCK_TIMEOUT", "600")))
    except ValueError:
        return 600.0


def remote_lock_url(fs: LockedSet, name: str) -> str:
    """``<store URL>.locks/<set>/<name>``: beside the store, outside its Zarr hierarchy."""
    return f"{fs.store.url.rstrip('/')}{LOCKS_SUFFIX}/{fs.name}/{name}"


class _RemoteLock:
    """One lock object: created exclusively, kept fresh by a heartbeat thread, deleted on release."""

    def __init__(self, fs: LockedSet, name: str):
        import fsspec

        self.url = remote_lock_url(fs, name)
        self.filesystem, self.path = fsspec.core.url_to_fs(self.url, **fs.store.storage_options)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "started": self.started, "heartbeat": time.time()}).encode()

    def try_create(self) -> bool:
        """Create the lock object unless it exists (conditional put); True when this process holds it."""
        try:
            self.filesystem.pipe_file(self.path, self._body(), mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a file system without exclusive create
            if self.filesystem.exists(self.path):
                return False
            self.filesystem.pipe_file(self.path, self._body())
        return True

    def start_heartbeat(self) -> None:
        period = lock_timeout() / 4

        def beat() -> None:
            while not self._stop.wait(period):
                with contextlib.suppress(Exception):  # a missed beat is retried; only staleness counts
                    if read_lock(self.filesystem, self.path).get("owner") == self.owner:
                        self.filesystem.pipe_file(self.path, self._body())

        self._thread = threading.Thread(target=beat, name="featcache-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if read_lock(self.filesystem, self.path).get("owner") == self.owner:
                self.filesystem.rm_file(self.path)


def read_lock(filesystem, path: str) -> dict:
    """A lock object's content (``owner``, ``started``, ``heartbeat``), or {} when absent or unreadable."""
    try:
        return json.loads(filesystem.cat_file(path))
    except Exception:
        return {}


def _held_message(store_url: str, set_name: str, url: str, held: dict) -> str:
    age = time.time() - float(held.get("heartbeat", 0) or 0)
    owner = held.get("owner", "an unknown writer")
    if age > lock_timeout():
        rm = f"aws s3 rm {url}" if url.startswith(("s3://", "s3a://")) else f"delete {url}"
        return (
            f"{store_url}: feature set '{set_name}' is locked by {owner}, whose last heartbeat was "
            f"{age:.0f} s ago (over the {lock_timeout():.0f} s timeout: a killed run?); if no extraction "
            f"is running, clear it with `{rm}`, then re-run to resume"
        )
    return (
        f"{store_url}: another extraction is writing feature set '{set_name}' ({owner}, heartbeat "
        f"{age:.0f} s ago, lock {url}); wait for it to finish or stop it, then re-run to resume"
    )


@contextlib.contextmanager
def remote_lock(
    fs: LockedSet, name: str, wait: bool = False, timeout: float = 120.0
) -> Iterator[_RemoteLock]:
    """Hold the lock object ``name`` of a remote set (``wait``: poll up to ``timeout`` s while it is fresh).

    Raises:
        StoreError: the lock is held (fresh: by whom; stale: with the command that clears it).
    """
    lock = _RemoteLock(fs, name)
    deadline = time.monotonic() + timeout
    while not lock.try_create():
        held = read_lock(lock.filesystem, lock.path)
        fresh = time.time() - float(held.get("heartbeat", 0) or 0) <= lock_timeout()
        if not (wait and fresh and time.monotonic() < deadline):
            raise StoreError(_held_message(fs.store.url, fs.name, lock.url, held))
        time.sleep(0.2)
    lock.start_heartbeat()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def remote_extraction_lock(fs: LockedSet, shard_index: int, num_shards: int) -> Iterator[None]:
    """``extraction_lock`` for a remote set: the set's lock object, or the slice's for ``--num-shards``.

    A single run creates ``extract.lock``; a worker slice creates ``extract.lock.<i>-of-<n>``. Each
    then looks for the other kind (and for slices of another ``--num-shards``) and gives up when
    one exists: of two writers racing, at least one sees the other, so two never both write.

    Raises:
        StoreError: another run, the same slice, or a slice of another ``--num-shards`` holds a lock.
    """
    mine = "extract.lock" if num_shards == 1 else f"extract.lock.{shard_index}-of-{num_shards}"
    with remote_lock(fs, mine) as lock:
        folder = lock.path.rsplit("/", 1)[0]
        with contextlib.suppress(FileNotFoundError):
            lock.filesystem.invalidate_cache(folder)
        try:
            others = [p for p in lock.filesystem.ls(folder, detail=False) if p.rsplit("/", 1)[-1] != mine]
        except FileNotFoundError:
            others = []
        for path in others:
            base = path.rsplit("/", 1)[-1]
            m = _SLICE_LOCK.search(base)
            conflict = (
                base == "extract.lock" if num_shards > 1 else base == "extract.lock" or m is not None
            ) or (num_shards > 1 and m is not None and int(m.group(2)) != num_shards)
            if not conflict:
                continue
            held = read_lock(lock.filesystem, path)
            if not held:  # released between the listing and the read
                continue
            if m is not None and num_shards > 1 and int(m.group(2)) != num_shards:
                raise StoreError(
                    f"{fs.store.url}: a worker with --num-shards {m.group(2)} is writing feature set "
                    f"'{fs.name}' and this one has --num-shards {num_shards}: slices would overlap; start "
                    "every worker with the same --num-shards"
                )
            raise StoreError(
                _held_message(fs.store.url, fs.name, f"{lock.url.rsplit('/', 1)[0]}/{base}", held)
            )
        yield
