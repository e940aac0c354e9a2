"""The extraction pipeline: one pass of a frozen backbone over a manifest into a feature set.

Decode workers (a torch DataLoader) read and preprocess images while the main
thread runs the model in inference mode, and a writer thread buffers results
by shard and commits each shard whole once all its rows are in (see
``featcache.store.feature_store``). Batches never straddle a shard, so a resumed run sees the
same batches as an uninterrupted one and writes identical arrays.

On CUDA the model runs in bfloat16 (float16 where bf16 is not supported) with
SDPA attention; features are cast to their stored dtype on the GPU and copied
asynchronously to pinned host memory while the next batch computes; the
micro-batch starts at ``batch_size``, halves on out-of-memory instead of
crashing and grows back (see ``featcache.extract.device``). On CPU everything is
float32 unless bfloat16 is asked for (``--dtype bf16``, only where the CPU has bf16 matmul
instructions), and the model's threads default to the cores left beside the decode workers
(``featcache.extract.launch.set_threads``). Several workers (torchrun, SLURM, ``--num-shards``) share a
set: see ``featcache.extract.launch``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from featcache.datasets.dedup import refuse_cross_split_duplicates
from featcache.errors import ExtractionAborted, ExtractionInterrupted, FeatcacheError, ImageReadError
from featcache.extract.config import SETTINGS, TOKENS, ExtractConfig, ExtractResult, default_set_name
from featcache.extract.device import (
    BatchRunner,
    MicroBatch,
    Pending,
    array_specs,
    device_name,
    forward,
    resolve_device,
    resolve_dtype,
    versions,
)
from featcache.extract.io import Images, ShardWriter, collate
from featcache.extract.launch import (
    WorkerSlice,
    balance_shard_rows,
    cpu_bf16_support,
    default_workers,
    idle_note,
    resolve_slice,
    set_threads,
)
from featcache.store.feature_store import FeatureStore, default_shard_rows, extraction_lock
from featcache.store.locks import close_inherited_locks
from featcache.store.manifest import read_manifest
from featcache.store.preprocess import Preprocess


def _worker_died(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "DataLoader worker" in str(e)


def _cpu_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e).lower()
    )


def _hash_cache_path(manifest_path: str | os.PathLike) -> Path | None:
    """Where the file digests of a manifest's images are kept between runs (a resumed or repeated
    extraction re-reads only changed files): the user cache folder, or None when it cannot be made."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featcache" / "file-hashes"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    key = hashlib.sha1(str(Path(manifest_path).resolve()).encode()).hexdigest()[:16]
    return base / f"{key}.json"


def _worker_slice(cfg: ExtractConfig) -> WorkerSlice:
    """This worker's slice of the shards (options, then torchrun, then SLURM; see ``featcache.extract.launch``)."""
    return resolve_slice(cfg.num_shards, cfg.shard_index)


def _to_numpy(pending: Pending) -> dict[str, np.ndarray]:
    """The host arrays of a batch in flight, once its copies are done (the one step of the loop that
    allocates host memory per batch on the CPU path)."""
    return pending.numpy()


def extract(cfg: ExtractConfig, *, progress: bool = True) -> ExtractResult:
    """Embed every pending row of a manifest into a feature set (resuming a previous run).

    Args:
        cfg: the run's settings.
        progress: show a progress bar with images/s and ETA on stderr.

    Returns:
        An ``ExtractResult``; rows that failed are recorded in the store with their reason.

    Raises:
        FeatcacheError: bad input (manifest, options, model), a locked or incompatible store;
            with ``on_error="fail"``, the first file that cannot be decoded.
        StoreError: a full disk, a read-only file system, a damaged or incompatible set.
        ExtractionAborted: a decode worker died or memory ran out; finished shards are kept.
        ExtractionInterrupted: Ctrl-C (also during start-up); finished shards are kept.
    """
    threads_before = torch.get_num_threads()
    try:
        return _extract(cfg, progress=progress)
    except KeyboardInterrupt:  # before or after the pass (model loading, set creation)
        raise ExtractionInterrupted(
            "interrupted; finished shards are saved: re-run the same command to resume"
        ) from None
    except (MemoryError, RuntimeError) as e:
        if _cpu_oom(e):
            raise ExtractionAborted(
                f"out of memory (CPU RAM) while extracting into {cfg.out}; finished shards are saved: use a "
                "smaller --batch-size, --shard-size or fewer --workers, then re-run to resume"
            ) from None
        if _worker_died(e):
            raise ExtractionAborted(
                f"a decode worker died ({str(e).splitlines()[0][:160]}): usually out of memory or a file-size "
                "limit (ulimit -f); finished shards are saved: fix that (or use --workers 0 to see the "
                "error), then re-run to resume"
            ) from None
        raise
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process's threads as found


def _extract(cfg: ExtractConfig, *, progress: bool = True) -> ExtractResult:
    from featcache.models import load_backbone, resolve_layers

    if cfg.on_error not in ("skip", "fail"):
        raise FeatcacheError(f"--on-error {cfg.on_error}: choose skip or fail")
    unknown = [t for t in cfg.tokens if t not in TOKENS]
    if unknown:
        raise FeatcacheError(f"--tokens {','.join(unknown)}: unknown; choose from {', '.join(TOKENS)}")
    tokens = tuple(dict.fromkeys(("cls", "pooled", *cfg.tokens)))
    if cfg.patch_pool < 1:
        raise FeatcacheError("--patch-pool must be 1 or more")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise FeatcacheError(f"--batch-size {cfg.batch_size}: must be 1 or more")
    if cfg.workers is not None and cfg.workers < 0:
        raise FeatcacheError(f"--workers {cfg.workers}: must be 0 (decode in the main process) or more")
    if cfg.shard_rows is not None and cfg.shard_rows < 1:
        raise FeatcacheError(f"--shard-size {cfg.shard_rows}: must be 1 or more")
    ws = _worker_slice(cfg)
    num_shards, shard_index = ws.world, ws.rank
    manifest = read_manifest(
        cfg.data, cfg.root, labels=cfg.labels, storage_options=cfg.storage_options
    )  # validated before any model is loaded
    for note in manifest.notes:
        print(f"featcache extract: {note}", file=sys.stderr)
    # the same image in two splits leaks test into train: refused before any GPU work
    dedup = refuse_cross_split_duplicates(manifest, cache=_hash_cache_path(cfg.data))
    for line in dedup.warnings:
        print(f"featcache extract: {line}", file=sys.stderr)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    threads = set_threads(cfg.threads, cfg.workers if cfg.workers is not None else default_workers())

    backbone = load_backbone(cfg.model, seed=cfg.seed, device=device, dtype=dtype, revision=cfg.revision)
    spec = backbone.spec
    layers = resolve_layers(cfg.layers, backbone.num_layers) if cfg.layers else []
    preprocess = Preprocess(
        res=cfg.res,
        resize=cfg.resize,
        interpolation=cfg.interpolation,
        mean=tuple(spec.mean),
        std=tuple(spec.std),
    )
    want_layer_patch = bool(layers) and "patch" in tokens
    probe_out = forward(
        backbone, torch.zeros(1, 3, cfg.res, cfg.res), layers, device, dtype, want_layer_patch
    )
    specs = array_specs(probe_out, tokens, layers, cfg.patch_pool)
    del probe_out
    if "layer_patch" in specs:
        lp = specs["layer_patch"]
        print(
            f"featcache extract: --tokens patch with --layers stores layer_patch float16 {list(lp.shape)} per image "
            f"({lp.row_bytes / 2**20:.2f} MiB/img before compression) for layers {layers}",
            file=sys.stderr,
        )

    name = cfg.name or default_set_name(cfg.data, cfg.model, cfg.res)
    preprocessing = preprocess.to_dict()
    del preprocessing["res"]  # the set's res, recorded once beside it
    attrs = {
        "model": cfg.model,
        "model_spec": spec.name,
        "weights": backbone.provenance.get("weights"),
        "res": cfg.res,
        "preprocessing": preprocessing,
        "tokens": list(tokens),
        "layers": layers,
        "patch_pool": cfg.patch_pool,
        "compute_dtype": str(dtype).replace("torch.", ""),
        "settings": list(SETTINGS),
        "provenance": {k: v for k, v in backbone.provenance.items() if k != "weights"},  # weights: above
        "versions": versions(),
        "device": device_name(device),
        "duplicates": {
            "hash": "blake2b-128 of the file bytes",
            "cross_split": 0,
            "within_split": int(sum(len(g.rows) - 1 for g in dedup.within_split)),
        },
    }
    if dtype == torch.bfloat16 and device.type == "cpu":
        attrs["cpu_bf16"] = cpu_bf16_support()[1]  # the instructions the bf16 matmuls ran on
    store = FeatureStore(cfg.out, mode="a", storage_options=cfg.storage_options)
    shard_rows, notes = cfg.shard_rows, []
    if shard_rows is None and num_shards > 1 and not store.has_set(name):
        shard_rows, note = balance_shard_rows(len(manifest), default_shard_rows(specs), num_shards)
        if note:
            notes.append(note)
            attrs["shard_rows_choice"] = note
    fs = store.create_set(name, manifest, specs, attrs, shard_rows=shard_rows)
    if num_shards > fs.n_shards and not notes:
        notes.append(idle_note(fs.n, fs.shard_rows, num_shards))
    if shard_index == 0:  # said once, not by every worker
        for line in notes:
            print(f"featcache extract: {line}", file=sys.stderr)

    with extraction_lock(fs, shard_index, num_shards):
        # same images, new patients/splits/labels/metadata: take them, keep the features
        replaced = fs.needs_manifest(manifest) and fs.replace_manifest(manifest)
        mine = [s for s in range(fs.n_shards) if s % num_shards == shard_index]
        if cfg.retry_failed:
            fs.reset_failed(shards=mine)  # only this worker's shards: others may be committing theirs
        status = fs.status
        done = fs.shard_done(status)
        todo = [s for s in mine if not done[s]]
        skipped = len(mine) - len(todo)
        batch_size = cfg.batch_size or (64 if device.type == "cuda" else 16)
        batches = []
        for s in todo:
            lo, hi = fs.shard_range(s)
            rows = [i for i in range(lo, hi)]
            batches += [rows[j : j + batch_size] for j in range(0, len(rows), batch_size)]
        n_todo = sum(len(b) for b in batches)
        if cfg.compile and n_todo:
            backbone = torch.compile(backbone)
        workers = cfg.workers if cfg.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
        loader = torch.utils.data.DataLoader(
            Images(manifest, preprocess),
            batch_sampler=batches,
            num_workers=workers if n_todo else 0,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers and n_todo else None,
            persistent_workers=False,
            worker_init_fn=close_inherited_locks,  # an orphaned worker must not keep the set locked
        )
        bar = None
        if progress and n_todo:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()  # in a log file, a line every 30 s instead of a redraw per batch
            bar = tqdm(
                total=n_todo,
                unit="img",
                desc=name,
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.1 if tty else 30,
            )
        writer = ShardWriter(fs, specs)
        writer.start()
        micro = MicroBatch(batch_size)
        runner = BatchRunner(backbone, device, dtype, specs, layers, cfg.patch_pool, micro, cfg.res)
        processed = 0
        pending: Pending | None = None
        startup = None

        def hand_off(p: Pending) -> None:  # wait for its copies, then give its rows to the writer
            nonlocal processed
            writer.put((p.idx, _to_numpy(p), p.errors))
            processed += len(p.idx) + len(p.errors)
            if bar is not None:
                bar.update(len(p.idx) + len(p.errors))

        t0 = time.perf_counter()
        try:
            for idx, pixels, errors in loader:
                if startup is None:
                    startup = time.perf_counter() - t0
                if errors and cfg.on_error == "fail":
                    first = min(errors)
                    raise ImageReadError(
                        f"{errors[first]} (row id '{manifest.ids[first]}'; use --on-error skip to go on)"
                    )
                # batch i+1 is queued on the GPU before batch i's copies are waited for
                current = runner.launch(idx, pixels, errors)
                if pending is not None:
                    done, pending = pending, None
                    hand_off(done)
                pending = current
            if pending is not None:
                done, pending = pending, None
                hand_off(done)
        except KeyboardInterrupt:
            _flush(pending, hand_off)
            _drain_and_close(writer)
            raise ExtractionInterrupted(
                f"interrupted after {processed} images; finished shards are saved: re-run the same command to resume"
            ) from None
        except BaseException:
            _flush(pending, hand_off)
            _drain_and_close(writer)
            raise
        finally:
            if bar is not None:
                bar.close()
        writer.close()
        seconds = time.perf_counter() - t0

    status = fs.status
    fs.update_attrs(
        updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=device_name(device),
        threads={k: v for k, v in threads.items() if k != "previous"},
        micro_batch=micro.record(),  # what the last run's out-of-memory back-off did
    )  # also rewrites the consolidated metadata, so other Zarr readers see the finished set
    failures = fs.failures()
    return ExtractResult(
        set_name=name,
        n=fs.n,
        processed=processed,
        failed=int((status == 2).sum()),
        pending=int((status == 0).sum()),
        shards_skipped=skipped,
        seconds=seconds,
        batch_size=micro.size,
        failures=failures[:20],
        manifest_replaced=replaced,
        world=num_shards,
        rank=shard_index,
        shards=fs.n_shards,
        shards_mine=len(mine),
        threads=threads,
        notes=notes,
        micro_batch=micro.record(),
        startup_seconds=startup or 0.0,
    )


def _flush(pending: Pending | None, hand_off) -> None:
    """Hand the batch still in flight to the writer before stopping (its shard may complete)."""
    if pending is None:
        return
    try:
        hand_off(pending)
    except BaseException:  # the original exception matters more
        pass


def _drain_and_close(writer: ShardWriter) -> None:
    """Let the writer finish the shards already complete in its queue; errors are secondary here."""
    try:
        writer.close()
    except BaseException:  # the original exception matters more
        pass
