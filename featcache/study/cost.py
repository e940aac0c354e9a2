"""The GPU cost of a study plan and the text of ``featcache study plan --dry-run``.

Cost model: forward FLOPs per image from :func:`featcache.models.model_flops` (closed form for
transformers; CNNs and SAM counted on the meta device, which imports torch) times the images of
each feature set, divided by the GPU's peak throughput times an assumed model FLOP utilisation.
Decoding, model loading and the CPU probes are not counted.
"""

from __future__ import annotations

from typing import Any

from featcache.errors import FeatcacheError
from featcache.study.plan import Extraction, ProbeStep, StudyPlan

__all__ = ["DEFAULT_MFU", "DEFAULT_TFLOPS", "estimate_cost", "render_plan"]

# An H100 SXM's dense bf16 peak, and a model FLOP utilisation typical of inference of frozen
# ViTs with decoding overlapped.
DEFAULT_TFLOPS = 989.0
DEFAULT_MFU = 0.4


def estimate_cost(
    extractions: list[Extraction], *, tflops: float = DEFAULT_TFLOPS, mfu: float = DEFAULT_MFU
) -> dict[str, Any]:
    """GPU cost of extracting ``extractions`` under the FLOP model.

    Args:
        extractions: the feature sets to make.
        tflops: peak dense throughput of the GPU in TFLOP/s (default: H100 SXM bf16, 989).
        mfu: model FLOP utilisation assumed (default 0.4).

    Returns:
        ``{"gflops": total GFLOP of the known models, "gpu_seconds": gflops / (tflops * 1e3 * mfu),
        "unknown": set names whose cost is unknown, "images": images in all}``.
    """
    if tflops <= 0 or not 0 < mfu <= 1:
        raise FeatcacheError(f"--tflops must be positive and --mfu in (0, 1]; got {tflops}, {mfu}")
    known = [e for e in extractions if e.gflops is not None]
    total = sum(e.gflops for e in known)
    return {
        "gflops": total,
        "gpu_seconds": total / (tflops * 1e3 * mfu),
        "unknown": [e.set_name for e in extractions if e.gflops is None],
        "images": sum(e.n_images for e in extractions),
        "tflops": tflops,
        "mfu": mfu,
    }


def _hours(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 3600:.2f} GPU-h"


def render_plan(
    plan: StudyPlan,
    extractions: list[Extraction],
    steps: list[ProbeStep],
    *,
    extracted: set[str] | frozenset[str] = frozenset(),
    done: set[str] | frozenset[str] = frozenset(),
    tflops: float = DEFAULT_TFLOPS,
    mfu: float = DEFAULT_MFU,
) -> str:
    """The dry-run text: every extraction with its GFLOP, every probe run, and the cost totals.

    Args:
        plan, extractions, steps: from :func:`load_plan` and :func:`plan_steps`.
        extracted: set names already complete in the cache (marked ``done``, not costed as to run).
        done: step keys already in the results file (marked ``done``).
        tflops, mfu: the cost model's assumptions (see :func:`estimate_cost`).
    """
    lines = [f"study {plan.source} -> {plan.out}", "", f"extractions ({len(extractions)}):"]
    for e in extractions:
        cost = (
            "cost unknown"
            if e.gflops is None
            else f"{e.gflops_per_image:.3f} GFLOP x {e.n_images} = {e.gflops:.3f} GFLOP"
        )
        state = "done" if e.set_name in extracted else "to run"
        lines.append(f"  [{state}] {e.set_name}  {cost}")
    lines += ["", f"probe runs ({len(steps)}):"]
    for s in steps:
        lines.append(f"  [{'done' if s.key in done else 'to run'}] {s.describe()}  key={s.key}")
    everything = estimate_cost(extractions, tflops=tflops, mfu=mfu)
    todo = estimate_cost([e for e in extractions if e.set_name not in extracted], tflops=tflops, mfu=mfu)
    lines += [
        "",
        f"total: {everything['gflops']:.3f} GFLOP over {everything['images']} images "
        f"({_hours(everything['gpu_seconds'])}); still to extract: {todo['gflops']:.3f} GFLOP "
        f"({_hours(todo['gpu_seconds'])})",
        f"assumptions: forward FLOPs from featcache.models.model_flops, {tflops:g} TFLOP/s peak at "
        f"{mfu:.0%} MFU; decode, loading and probes (CPU) not counted",
        f"to run: {sum(e.set_name not in extracted for e in extractions)} extractions, "
        f"{sum(s.key not in done for s in steps)} probe runs",
    ]
    if everything["unknown"]:
        lines.append(f"cost unknown (not in the registry): {', '.join(everything['unknown'])}")
    return "\n".join(lines) + "\n"
