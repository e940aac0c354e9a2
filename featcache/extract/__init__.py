"""The extraction half (torch): a manifest through a backbone into a feature set.

``pipeline`` (``extract``: decode workers, micro-batches, the writer, resume), ``device`` (device,
dtype, the forward pass and its out-of-memory back-off), ``io`` (the decode dataset and the shard
writer thread), ``launch`` (worker slices from torchrun / SLURM, threads, CPU bf16), ``slurm``
(submitting workers with submitit).
"""

from featcache.extract.config import ExtractConfig, ExtractResult, default_set_name
from featcache.extract.pipeline import extract

__all__ = ["ExtractConfig", "ExtractResult", "default_set_name", "extract"]
