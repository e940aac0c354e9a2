"""The two ends of the extraction pipeline around the model: decoding manifest rows into model
inputs (a torch ``Dataset`` the decode workers run) and committing shards whole (a writer thread).

Batches never straddle a shard; the writer buffers rows by shard and writes a shard's data, then its
failures, then its status only once every row of it is in (``featcache.store.feature_store`` commit protocol).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from featcache.decode.images import read_image
from featcache.errors import ImageReadError
from featcache.extract.transform import model_input
from featcache.store.feature_store import ArraySpec, FeatureSet
from featcache.store.manifest import Manifest
from featcache.store.preprocess import Preprocess


class Images(torch.utils.data.Dataset):
    """Decodes and preprocesses manifest rows; a failure is returned, not raised."""

    def __init__(self, manifest: Manifest, preprocess: Preprocess):
        self.manifest = manifest
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int):
        path = self.manifest.abspath(i)
        try:
            return i, model_input(self.preprocess, read_image(path)), ""
        except ImageReadError as e:
            return i, None, str(e)
        except Exception as e:  # any decoder bug must not kill the run; it is recorded per row
            # the exception's text could quote header values (patient data): only its type is kept
            return i, None, f"{path}: cannot decode ({type(e).__name__})"


def collate(items):
    idx = [i for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x, _ in items if x is not None]) if idx else None
    errors = {i: err for i, x, err in items if x is None}
    return idx, pixels, errors


class ShardWriter(threading.Thread):
    """Buffers rows by shard and commits each shard whole once every row of it is in."""

    def __init__(self, fs: FeatureSet, specs: dict[str, ArraySpec]):
        super().__init__(daemon=True, name="featcache-writer")
        self.fs, self.specs = fs, specs
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.buffers: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self._add(*item)
            except BaseException as e:  # surfaced to the main thread
                self.error = e

    def _buffer(self, shard: int) -> dict[str, Any]:
        if shard not in self.buffers:
            lo, hi = self.fs.shard_range(shard)
            self.buffers[shard] = {
                "data": {k: np.zeros((hi - lo, *s.shape), s.dtype) for k, s in self.specs.items()},
                "filled": np.zeros(hi - lo, bool),
                "failed": {},
                "lo": lo,
            }
        return self.buffers[shard]

    def _add(self, idx: list[int], outputs: dict[str, np.ndarray], errors: dict[int, str]) -> None:
        rows = sorted(set(idx) | set(errors))
        shard = rows[0] // self.fs.shard_rows
        buf = self._buffer(shard)
        lo = buf["lo"]
        if idx:
            pos = np.asarray(idx) - lo
            for k, v in outputs.items():
                buf["data"][k][pos] = v
            buf["filled"][pos] = True
        for i, reason in errors.items():
            buf["failed"][i] = reason
            buf["filled"][i - lo] = True
        if buf["filled"].all():
            self.fs.write_shard(shard, buf["data"], buf["failed"])
            del self.buffers[shard]

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error
