"""Run a study plan: extract what is missing, run every probe once, end with the report.

:func:`run_study` walks the steps of :func:`featcache.study.plan.plan_steps` in order. Before the
first pending probe run of a feature set it makes sure the set is extracted and current (a
missing or unfinished set is extracted, resuming, through :func:`featcache.extract.pipeline.extract`;
with ``extract=False`` the study refuses and names the ``featcache extract`` commands). Each
probe run's rows carry ``params.study_step`` (the step key) and are appended to the results file
in one write, so a run killed at any point leaves whole steps; the next run skips every step
whose key is already there and ends with the same results file (row timestamps aside). Last,
``report.md`` and the self-contained ``report.html`` are written from the results file.

This module does not import torch (extraction imports it, only when a set must be made).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache.errors import FeatcacheError
from featcache.progress import VERBOSE, Progress, get_verbosity
from featcache.study.plan import Extraction, ProbeStep, StudyError, StudyPlan, plan_steps
from probes.results import append_jsonl, read_jsonl

__all__ = ["StudyOutcome", "complete_sets", "done_steps", "run_study"]


@dataclass
class StudyOutcome:
    """What :func:`run_study` did.

    Attributes:
        steps: probe runs in the plan.
        ran: probe runs executed by this call.
        skipped: probe runs already in the results file.
        extracted: set names extracted (or resumed) by this call.
        rows: result rows written by this call.
        results: the results file.
        report: the HTML report (None when not asked for).
        notes: what was decided along the way (each said once).
    """

    steps: int
    ran: int
    skipped: int
    extracted: list[str] = field(default_factory=list)
    rows: int = 0
    results: Path | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)


def done_steps(results: str | os.PathLike, notes: list[str] | None = None) -> set[str]:
    """Step keys (``params.study_step``) present in a results file (empty when it does not exist).

    A last line cut short by a kill during a write (no newline at the end, not valid JSON) is
    removed first, and said in ``notes``: that step had not finished and runs again.
    """
    path = Path(results)
    if not path.is_file():
        return set()
    _drop_torn_tail(path, notes)
    return {
        str(r["params"]["study_step"])
        for r in read_jsonl(path)
        if isinstance(r.get("params"), dict) and "study_step" in r["params"]
    }


def _drop_torn_tail(path: Path, notes: list[str] | None) -> None:
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
        return  # a whole row without its newline: keep it
    except ValueError:
        pass
    with open(path, "r+b") as f:
        f.truncate(cut)
    if notes is not None:
        notes.append(
            f"{path}: removed a last line cut short by an interrupted write ({len(data) - cut} bytes)"
        )


def complete_sets(plan: StudyPlan, extractions: list[Extraction]) -> set[str]:
    """Names of the plan's sets that exist in its cache, hold no pending rows and the current manifest."""
    from featcache.store.feature_store import FeatureStore

    if not (plan.cache / "zarr.json").is_file():
        return set()
    store = FeatureStore(plan.cache)
    done = set()
    for e in extractions:
        if not store.has_set(e.set_name):
            continue
        fs = store.open_set(e.set_name)
        if int((fs.status == 0).sum()) == 0 and fs.attrs.get("manifest_digest") in e.digests:
            done.add(e.set_name)
    return done


def _extract(plan: StudyPlan, e: Extraction, quiet: bool) -> None:
    from dataclasses import fields

    from featcache.extract import ExtractConfig, extract

    d = next(d for d in plan.datasets if d.name == e.dataset)
    x = plan.extract
    kw: dict[str, Any] = dict(
        model=e.model, data=str(d.manifest), out=str(plan.cache), res=e.res, name=e.set_name,
        root=None if d.root is None else str(d.root), tokens=tuple(x["tokens"]), seed=int(x["seed"]),
    )  # fmt: skip
    for key in ("layers", "device", "dtype", "batch_size", "workers", "patch_pool", "resize"):
        if key in x:
            kw[key] = x[key]
    if d.labels is not None and "labels" in {f.name for f in fields(ExtractConfig)}:
        kw["labels"] = tuple(d.labels)
    extract(ExtractConfig(**kw), progress=not quiet)


def _probe(plan: StudyPlan, step: ProbeStep, episodes: Path) -> list[dict]:
    from probes.run import run_fewshot, run_knn, run_logreg

    d = next(d for d in plan.datasets if d.name == step.extraction.dataset)
    s = step.settings
    common = dict(
        features=step.features, labels=None if d.labels is None else list(d.labels), uncertain=plan.uncertain
    )
    name = step.extraction.set_name
    if step.probe == "knn":
        return run_knn(
            plan.cache,
            name,
            k=s["k"],
            temperature=s["temperature"],
            n_boot=plan.n_boot,
            seed=plan.seed,
            **common,
        )
    if step.probe == "logreg":
        extra = {k: s[k] for k in ("C", "C_grid", "val_fraction") if k in s}
        return run_logreg(plan.cache, name, n_boot=plan.n_boot, seed=plan.seed, **extra, **common)
    return run_fewshot(
        plan.cache, name, shots=s["shots"], seeds=s["seeds"], head=s["head"], C=s["C"], k=s["k"],
        temperature=s["temperature"], episodes_out=episodes, **common,
    )  # fmt: skip


def run_study(
    plan: StudyPlan,
    *,
    extract: bool = True,
    report: bool = True,
    after_step: Callable[[ProbeStep, int], None] | None = None,
) -> StudyOutcome:
    """Run every step of a plan that is not in its results file yet, then write the report.

    Args:
        plan: from :func:`featcache.study.plan.load_plan`.
        extract: make missing feature sets; False refuses instead (``StudyError.commands`` holds
            the ``featcache extract`` lines).
        report: write ``<out>/report.md`` and ``<out>/report.html`` at the end.
        after_step: called with each finished step and its row count, after its rows are written.

    Returns:
        A :class:`StudyOutcome` (counts of runs executed and skipped, sets extracted, notes).

    Raises:
        StudyError: with ``extract=False``, sets the pending steps need are not extracted.
        FeatcacheError: a probe or an extraction refused (the set is named).
    """
    from probes.report.run import run_report

    quiet = get_verbosity() < 0
    verbose = get_verbosity() >= VERBOSE
    notes: list[str] = []
    extractions, steps = plan_steps(plan)
    done = done_steps(plan.results, notes)
    pending = [s for s in steps if s.key not in done]
    ready = complete_sets(plan, extractions) if pending else set()
    needed = [e for e in extractions if e.set_name not in ready and any(s.extraction is e for s in pending)]
    if needed and not extract:
        raise StudyError(
            f"{len(needed)} feature sets are not extracted (or unfinished) and extraction is off; run "
            f"the {len(needed)} `featcache extract` commands printed above, or drop --no-extract",
            commands=[e.command for e in needed],
        )
    out = StudyOutcome(
        steps=len(steps), ran=0, skipped=len(steps) - len(pending), results=plan.results, notes=notes
    )
    if out.skipped:
        notes.append(f"{out.skipped} of {len(steps)} probe runs already in {plan.results}: skipped")
    episodes = plan.out / "episodes"
    with Progress(len(pending), "study", unit="runs", enabled=not quiet) as bar:
        for step in pending:
            e = step.extraction
            if e.set_name not in ready:
                bar.write(f"extract  {e.set_name} ({e.n_images} images)")
                _extract(plan, e, quiet)
                ready.add(e.set_name)
                out.extracted.append(e.set_name)
            t0 = time.monotonic()
            try:
                rows = _probe(plan, step, episodes / f"{e.dataset}.episodes.json")
            except StudyError:
                raise
            except FeatcacheError as err:  # a probe refused: say which step, keep what is done
                raise StudyError(
                    f"{step.probe} on {e.set_name} (features={step.features}) refused: {err}; "
                    f"{out.ran} probe runs of this call are saved, fix the plan and re-run to resume"
                ) from None
            for r in rows:
                r["params"] = {**(r.get("params") or {}), "study_step": step.key}
            out.rows += append_jsonl(plan.results, rows)
            out.ran += 1
            if verbose:
                bar.write(f"{step.describe()}: {len(rows)} rows in {time.monotonic() - t0:.1f} s")
            bar.update(1)
            if after_step is not None:
                after_step(step, len(rows))
    if report and plan.results.is_file():
        html = plan.out / "report.html"
        text = run_report(plan.results, table="both", html=html, notes=notes)
        (plan.out / "report.md").write_text(text, encoding="utf-8")
        out.report = html
    return out
