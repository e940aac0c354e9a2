"""Submitting an extraction as a SLURM job array through submitit (optional extra ``featcache[slurm]``).

``featcache extract ... --slurm partition=gpu,gpus=8,array=32``: each task of each array job is one
worker of :func:`featcache.extract.launch.resolve_slice`, taking its slice of the shards.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from featcache.errors import FeatcacheError
from featcache.extract.pipeline import extract

_SLURM_KEYS = {
    "partition": "slurm_partition",
    "gpus": "gpus_per_node",
    "tasks": "tasks_per_node",
    "array": None,
    "time": "timeout_min",
    "cpus": "cpus_per_task",
    "mem": "mem_gb",
    "parallel": "slurm_array_parallelism",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
}
_INT_KEYS = ("gpus", "tasks", "array", "time", "cpus", "mem", "parallel")


def parse_slurm_spec(spec: str) -> dict[str, Any]:
    """``partition=gpu,gpus=8,array=32,time=240`` -> a dict (ints where numeric keys).

    Keys: partition, gpus (per job, one task per GPU), tasks (per job; default gpus or 1),
    array (jobs in the array, default 1), time (minutes), cpus (per task), mem (GB per job),
    parallel (jobs running at once), account, qos, constraint.

    Raises:
        FeatcacheError: an unknown key, a missing ``=``, or a non-integer count.
    """
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise FeatcacheError(
                f"--slurm {spec}: '{part}' is not key=value (e.g. partition=gpu,gpus=8,array=32)"
            )
        key, value = (x.strip() for x in part.split("=", 1))
        if key not in _SLURM_KEYS:
            raise FeatcacheError(f"--slurm: unknown key '{key}'; use {', '.join(_SLURM_KEYS)}")
        if key in _INT_KEYS:
            try:
                out[key] = int(value)
            except ValueError:
                raise FeatcacheError(f"--slurm {key}={value}: must be an integer") from None
            if out[key] < (0 if key == "gpus" else 1):
                raise FeatcacheError(f"--slurm {key}={value}: must be positive")
        else:
            out[key] = value
    return out


def slurm_layout(spec: dict[str, Any]) -> tuple[int, int]:
    """``(array jobs, tasks per job)`` of a parsed spec; the run has their product of workers."""
    tasks = spec.get("tasks") or spec.get("gpus") or 1
    return int(spec.get("array", 1)), int(tasks)


def _run_task(cfg, array_index: int, array_count: int):
    """One SLURM task of a submitted array: its slice is ``array_index x tasks + task rank``."""
    import submitit

    job = submitit.JobEnvironment()
    tasks, rank = job.num_tasks, job.global_rank
    world, index = array_count * tasks, array_index * tasks + rank
    return extract(replace(cfg, num_shards=world, shard_index=index), progress=False)


def submit_slurm(cfg, spec: dict[str, Any], folder: str, cluster: str | None = None) -> list:
    """Submit an extraction as a SLURM job array through submitit, each task one slice of the shards.

    Args:
        cfg: the ``ExtractConfig`` (its ``num_shards``/``shard_index`` are replaced per task).
        spec: from ``parse_slurm_spec``.
        folder: where submitit keeps the jobs' scripts and logs (``%j`` is the job id).
        cluster: submitit's cluster (None: SLURM when ``sbatch`` exists; ``local`` or ``debug`` for tests).

    Returns:
        The submitit jobs, one per array task (``job.result()`` is its ``ExtractResult``).

    Raises:
        FeatcacheError: submitit is not installed, or the spec is unusable.
    """
    try:
        import submitit
    except ImportError:
        raise FeatcacheError("--slurm needs submitit: pip install 'featcache[slurm]'") from None
    array, tasks = slurm_layout(spec)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {"tasks_per_node": tasks, "nodes": 1, "name": "featcache-extract"}
    for key, value in spec.items():
        target = _SLURM_KEYS[key]
        if target and key != "tasks":
            params[target] = value
    if spec.get("gpus"):
        params["slurm_gpus_per_task"] = 1  # one GPU per task: each task is one worker
        params.pop("gpus_per_node", None)
        if executor.cluster != "slurm":
            params["gpus_per_node"] = spec["gpus"]
    executor.update_parameters(**params)
    cfg = replace(cfg, num_shards=None, shard_index=None)
    return executor.map_array(_run_task, [cfg] * array, list(range(array)), [array] * array)
