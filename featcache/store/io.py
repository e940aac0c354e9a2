"""Low-level pieces of the feature store: safe names, checksums, atomic creation, write errors.

Nothing here knows the layout of a set; ``featcache.store.feature_store`` builds on it. This
module does not import torch.

Fault points: every step that changes a store on disk calls ``fault_point(label)``
first. With ``FEATCACHE_FAULT_AT=N`` in the environment, the process ends with
``os._exit(137)`` (as after SIGKILL) at the N-th such step, which is how the
resume-after-a-kill guarantee is tested at every step (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featcache.errors import StoreError

TMP_PREFIX = ".featcache-new-"  # a set being built; renamed into place when complete
_GROUP_JSON = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


class StoreLocation(Protocol):
    """What a feature set and its locks need of their store (``FeatureStore`` is one)."""

    url: str
    mode: str
    root: Any  # the zarr root group
    storage_options: dict

    @property
    def local_path(self) -> Path | None: ...


_fault_at = int(os.environ.get("FEATCACHE_FAULT_AT", "0") or 0)
_events = 0


def fault_point(label: str) -> None:
    """Count one store event; end the process at the N-th when ``FEATCACHE_FAULT_AT=N`` is set."""
    global _events
    _events += 1
    if _fault_at and _events == _fault_at:
        os._exit(137)


# ---- names ----


def check_set_name(name: str, store_url: str) -> str:
    """The set name without surrounding slashes; refuses names that leave the store or hide.

    Raises:
        StoreError: empty, ``.``/``..`` parts, a part starting with ``.``, a backslash or NUL.
    """
    clean = str(name).strip("/")
    parts = clean.split("/")
    if (
        not clean
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
        or "\\" in clean
        or "\0" in clean
    ):
        raise StoreError(
            f"{store_url}: --name '{name}' is not a valid set name (use parts like nih/dinov3-vitb16/512, "
            "no '..', no empty or dot-leading parts)"
        )
    return clean


# ---- write errors ----


def os_error_message(e: OSError, what: str) -> str:
    """One line for an OSError met while writing: what failed, where, and what to do."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (
            f"{what}: no space left on the device{where}; free space, then re-run the same command to resume"
        )
    if e.errno == errno.EROFS:
        return f"{what}: the file system is read-only{where}; write the store to a writable folder (--out)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: permission denied{where}; make the store writable or use another --out"
    if e.errno == errno.EFBIG:
        return f"{what}: file size limit reached{where} (ulimit -f); raise the limit, then re-run to resume"
    return f"{what}: {e.strerror or e}{where}; fix it, then re-run the same command to resume"


@contextlib.contextmanager
def write_errors(what: str) -> Iterator[None]:
    """Turn OSError (full disk, read-only file system, quota, permissions) into a one-line StoreError."""
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except OSError as e:
        raise StoreError(os_error_message(e, what)) from None


# ---- checksums ----


def has_crc(codecs) -> bool:
    """Whether a codec pipeline ends with a crc32c checksum (for sharding: inner chunks and index both)."""
    if not codecs:
        return False
    last = codecs[-1]
    if type(last).__name__ == "ShardingCodec":
        return has_crc(tuple(last.codecs)) and has_crc(tuple(last.index_codecs))
    return type(last).__name__ == "Crc32cCodec"


def crc32c_ok(payload: np.ndarray, stored: bytes) -> bool:
    """Whether ``stored`` (4 little-endian bytes) is the crc32c of ``payload``'s bytes (any dtype, contiguous)."""
    import google_crc32c  # zarr's own crc32c codec uses it

    view = payload.reshape(-1).view(np.uint8)
    if view.flags.writeable:  # the C extension takes read-only buffers only
        view = view.view()
        view.flags.writeable = False
    return int(google_crc32c.value(view)).to_bytes(4, "little") == bytes(stored)


def damaged(set_name: str, array: str, shard: int, detail: str, store_url: str) -> StoreError:
    """The one-line error for a chunk that fails its check."""
    return StoreError(
        f"{store_url}: feature set '{set_name}', array '{array}', shard {shard}: {detail}; run "
        f"`featcache verify --repair {store_url}` then re-run `featcache extract` to redo the shard"
    )


# ---- atomic creation (local stores) ----


def ensure_groups(base: Path, parts: list[str]) -> None:
    """Create the intermediate groups ``base/p0``, ``base/p0/p1``... if absent, without ever clobbering one.

    Each ``zarr.json`` is linked into place from a private temporary file, so concurrent
    creators never see a half-written file and never overwrite each other.
    """
    folder = base
    for p in parts:
        folder = folder / p
        folder.mkdir(exist_ok=True)
        target = folder / "zarr.json"
        if target.exists():
            continue
        tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}.json"
        tmp.write_bytes(_GROUP_JSON)
        try:
            os.link(tmp, target)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)


def new_tmp_folder(final: Path) -> Path:
    """A private sibling folder of ``final`` to build a set in (removes those of dead processes first)."""
    for old in final.parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        try:
            pid = int(old.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    return final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, final: Path) -> bool:
    """Rename the finished set folder into place; False when another process published it first."""
    fault_point("create:publish")
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    fault_point("create:published")
    return True
