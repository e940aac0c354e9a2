"""Scaling an extraction out: which slice of the shards this worker takes, threads, CPU bf16.

Rank and world size (``resolve_slice``), first match wins:

1. ``--num-shards N --shard-index I`` given on the command line;
2. torchrun (``RANK``, ``WORLD_SIZE``; ``LOCAL_RANK`` picks the GPU);
3. SLURM tasks ``SLURM_PROCID``/``SLURM_NTASKS`` (``srun``), combined with a job array
   (``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``, over ``SLURM_ARRAY_TASK_COUNT``):
   world = ntasks x array tasks, rank = array index x ntasks + procid;
4. one worker.

Worker ``r`` of ``w`` takes shards ``r, r + w, r + 2w, ...``. A set smaller than the
workers' shards is given smaller shards (``balance_shard_rows``), recorded in the set.
Submitting a job array through submitit is :mod:`featcache.extract.slurm`.
This module does not import torch at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from featcache.errors import FeatcacheError

MIN_SHARD_ROWS = 16  # the floor when shards are made smaller so that every worker gets some


@dataclass(frozen=True)
class WorkerSlice:
    """This worker's place among those writing one set.

    Attributes:
        world: number of workers.
        rank: this worker's index in ``[0, world)``.
        source: where they came from: ``options``, ``torchrun``, ``slurm``, ``slurm-array`` or ``single``.
    """

    world: int
    rank: int
    source: str

    def shards(self, n_shards: int) -> list[int]:
        """The shards this worker writes: ``rank, rank + world, ...`` below ``n_shards``."""
        return list(range(self.rank, n_shards, self.world))


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise FeatcacheError(f"environment variable {key}={env[key]!r} is not an integer") from None


def env_slice(env: dict[str, str] | None = None) -> WorkerSlice | None:
    """Rank and world size from torchrun or SLURM variables, None when neither launched this process."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorkerSlice(_env_int(env, "WORLD_SIZE"), _env_int(env, "RANK"), "torchrun")
    has_tasks = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    has_array = "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env
    if not (has_tasks or has_array):
        return None
    ntasks = _env_int(env, "SLURM_NTASKS") if has_tasks else 1
    procid = _env_int(env, "SLURM_PROCID") if has_tasks else 0
    if not has_array:
        return WorkerSlice(ntasks, procid, "slurm")
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    index = (_env_int(env, "SLURM_ARRAY_TASK_ID") - first) // max(1, step)
    return WorkerSlice(ntasks * count, index * ntasks + procid, "slurm-array")


def resolve_slice(
    num_shards: int | None, shard_index: int | None, env: dict[str, str] | None = None
) -> WorkerSlice:
    """This worker's slice: the options when given, else torchrun, else SLURM, else a single worker.

    Args:
        num_shards: ``--num-shards`` (None: not given).
        shard_index: ``--shard-index`` (None: not given). With ``num_shards`` alone, the index comes
            from the launcher when its world size equals ``num_shards``.
        env: the environment (default ``os.environ``).

    Raises:
        FeatcacheError: an index outside ``[0, world)``, ``--shard-index`` without ``--num-shards``,
            or ``--num-shards`` alone without a launcher of that size.
    """
    launched = env_slice(env)
    if num_shards is None and shard_index is not None:
        raise FeatcacheError(f"--shard-index {shard_index} needs --num-shards (the number of workers)")
    if num_shards is not None and shard_index is None:
        if launched is not None and launched.world == num_shards:
            ws = WorkerSlice(num_shards, launched.rank, launched.source)
        elif num_shards == 1:
            ws = WorkerSlice(1, 0, "options")
        else:
            raise FeatcacheError(
                f"--num-shards {num_shards} without --shard-index: pass --shard-index (0 to {num_shards - 1})"
                + (f"; the launcher says {launched.world} workers" if launched else "")
            )
    elif num_shards is not None:
        ws = WorkerSlice(num_shards, shard_index, "options")
    else:
        ws = launched or WorkerSlice(1, 0, "single")
    if ws.source == "options" and (ws.world < 1 or not 0 <= ws.rank < ws.world):
        raise FeatcacheError(f"--shard-index {ws.rank} must be in [0, --num-shards {ws.world})")
    if ws.world < 1 or not 0 <= ws.rank < ws.world:
        raise FeatcacheError(
            f"worker index {ws.rank} must be in [0, {ws.world}) (from {ws.source}); "
            "check --shard-index/--num-shards or the launcher's RANK/WORLD_SIZE"
        )
    return ws


def balance_shard_rows(n: int, default_rows: int, world: int) -> tuple[int, str | None]:
    """Rows per shard for a new set of ``n`` rows written by ``world`` workers.

    The default shard size holds when it already gives every worker a shard; otherwise shards
    shrink to ``ceil(n / world)`` rows, not below ``MIN_SHARD_ROWS``.

    Returns:
        ``(rows, note)``: ``note`` is None when the default was kept, else one line saying what
        was chosen and why (and when some workers still get nothing).
    """
    default_rows = max(1, min(default_rows, max(1, n)))
    shards = -(-n // default_rows) if n else 0
    if world <= 1 or shards >= world or default_rows <= MIN_SHARD_ROWS:
        rows = default_rows
        if world > 1 and shards < world:
            return rows, idle_note(n, rows, world)
        return rows, None
    rows = max(MIN_SHARD_ROWS, -(-n // world))
    rows = min(rows, default_rows)
    note = f"{n} rows in {-(-n // rows)} shards of {rows} (default {default_rows}) so that {world} workers share them"
    if -(-n // rows) < world:
        note += "; " + idle_note(n, rows, world)
    return rows, note


def idle_note(n: int, rows: int, world: int) -> str:
    """The warning for workers that get no shard."""
    shards = -(-n // rows) if n else 0
    return (
        f"{n} rows make {shards} shard(s) of {rows} rows for {world} workers: {world - shards} worker(s) "
        f"have nothing to do (shards are not made smaller than {MIN_SHARD_ROWS} rows); use fewer workers"
    )


# ---- threads ----


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM allocation), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """Decode workers by default: one core left for the model, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def default_threads(workers: int, cores: int | None = None) -> int:
    """Model threads that do not oversubscribe the cores: cores minus decode workers, at least 1."""
    cores = available_cores() if cores is None else cores
    return max(1, cores - max(0, workers))


def set_threads(threads: int | None, workers: int) -> dict[str, Any]:
    """Set torch's intra-op (and, when still possible, inter-op) threads for this process.

    Args:
        threads: ``--threads`` (None: ``default_threads(workers)``).
        workers: decode worker processes of the run.

    Returns:
        What was set, for the set's attributes: ``{"intra", "interop", "source", "previous"}``.

    Raises:
        FeatcacheError: ``threads`` below 1.
    """
    import torch

    if threads is not None and threads < 1:
        raise FeatcacheError(f"--threads {threads}: must be 1 or more")
    cores = available_cores()
    chosen = threads if threads is not None else default_threads(workers, cores)
    source = "--threads" if threads is not None else f"default: {cores} cores - {workers} decode workers"
    previous = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:  # only possible before the process's first inter-op parallel work
        torch.set_num_interop_threads(chosen)
    except RuntimeError:
        pass
    return {
        "intra": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "source": source,
        "previous": previous,
    }


# ---- CPU bfloat16 ----


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU has bfloat16 matmul instructions (AVX512-BF16 or AMX-BF16) that oneDNN uses.

    Returns:
        ``(supported, detail)``: detail names the flags found, or what is missing.
    """
    import torch

    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN (mkldnn)"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not found:
        return False, "no avx512_bf16 or amx_bf16 CPU flag"
    return True, ",".join(found)


# ---- SLURM job arrays through submitit ----
