"""What an extraction is asked to do (:class:`ExtractConfig`) and what it did (:class:`ExtractResult`).

Plain data, no torch: the command line and the study runner build an ``ExtractConfig``;
:func:`featcache.extract.pipeline.extract` runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENS = ("cls", "pooled", "registers", "patch")


# the attributes that define a set's content: a resumed run must agree on each
SETTINGS = ("model", "weights", "res", "preprocessing", "tokens", "layers", "patch_pool", "compute_dtype")


@dataclass
class ExtractConfig:
    """Everything that defines one extraction run.

    Attributes:
        model: registry name, ``random:NAME``, or a local Hugging Face checkpoint folder.
        data: manifest CSV path.
        out: feature store folder or URL.
        res: input resolution in pixels (square).
        root: image root (default: the manifest's folder).
        name: feature set name (default ``<manifest stem>/<model>/<res>``).
        tokens: token kinds to store; ``cls`` and ``pooled`` always, ``registers`` and ``patch`` opt-in.
        layers: intermediate layers (``last4``, ``3,6,9``...) stored as ``layer_cls``/``layer_pooled``,
            and with ``patch`` in ``tokens`` also as ``layer_patch`` float16 [N, L, h, w, D].
        patch_pool: spatial average pooling factor of stored patch tokens (1 = none).
        resize, interpolation: preprocessing (see ``featcache.store.preprocess.Preprocess``).
        batch_size: images per batch (None: 64 on CUDA, 16 on CPU); halves on CUDA out-of-memory.
        workers: decode worker processes (None: up to 8, one core left for the model).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        dtype: compute dtype ``auto`` (bf16/fp16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16``
            (``bf16``; on CPU only with AVX512-BF16/AMX), ``float16``.
        threads: torch threads of the model (None: cores minus decode workers, at least 1).
        seed: seed of a ``random:`` model.
        shard_rows: rows per shard (None: about 256 MiB per shard, smaller for a new set when
            workers outnumber its shards, see ``featcache.extract.launch.balance_shard_rows``).
        num_shards, shard_index: this worker's slice of the shards (None: from torchrun or SLURM,
            else a single worker; see ``featcache.extract.launch.resolve_slice`` for the precedence).
        on_error: ``skip`` (record the failure, go on) or ``fail`` (stop, naming the file).
        retry_failed: re-process rows that failed in an earlier run.
        compile: ``torch.compile`` the model.
        revision: hub revision (branch, tag or commit) of the weights.
        storage_options: fsspec options of a remote store and image root (e.g. an S3 endpoint).
        labels: the manifest's label columns (None: inferred: columns whose values are all
            1/0/-1/blank; the other columns are kept as metadata, said once).
    """

    model: str
    data: str
    out: str
    res: int = 224
    root: str | None = None
    name: str | None = None
    tokens: tuple[str, ...] = ("cls", "pooled")
    layers: str | None = None
    patch_pool: int = 1
    resize: str = "squash"
    interpolation: str = "bicubic"
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    shard_rows: int | None = None
    num_shards: int | None = None
    shard_index: int | None = None
    on_error: str = "skip"
    retry_failed: bool = False
    compile: bool = False
    revision: str | None = None
    labels: tuple[str, ...] | None = None
    threads: int | None = None
    storage_options: dict[str, Any] | None = None


@dataclass
class ExtractResult:
    """What a run did.

    Attributes:
        set_name: the feature set written.
        n: rows in the set.
        processed: rows processed by this run.
        failed: rows of the whole set marked failed.
        pending: rows of the whole set still pending (other workers' shards, or an interrupted run).
        shards_skipped: shards already done before this run.
        seconds: wall time of the pass.
        batch_size: the micro-batch size in use at the end.
        micro_batch: what the out-of-memory back-off did (requested, final, smallest, out_of_memory,
            grown_back).
        startup_seconds: from the start of the pass until the first decoded batch arrived.
        failures: the failed rows (index, id, reason), at most 20.
        manifest_replaced: the set existed with the same images and took the manifest's new
            patients, splits, labels or metadata (no re-embedding).
        world, rank: the number of workers writing the set and this one's index.
        shards: shards of the set; shards_mine: those this worker was given.
        threads: the torch threads used (``featcache.extract.launch.set_threads``).
        notes: choices made for the user (smaller shards, idle workers), each one line.
    """

    set_name: str
    n: int
    processed: int
    failed: int
    pending: int
    shards_skipped: int
    seconds: float
    batch_size: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    manifest_replaced: bool = False
    world: int = 1
    rank: int = 0
    shards: int = 0
    shards_mine: int = 0
    threads: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    micro_batch: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Processed rows per second."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def default_set_name(manifest_path: str | os.PathLike, model: str, res: int) -> str:
    """``<manifest stem>/<model>/<res>``, with the model name made path-safe."""
    model_part = Path(model).name if os.path.isdir(model) else model
    model_part = model_part.replace(":", "-").replace("/", "_")
    return f"{Path(manifest_path).stem}/{model_part}/{res}"
