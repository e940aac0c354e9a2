"""Command-line entry point: assembles the ``featcache`` and ``probes`` click groups.

Each half keeps its commands beside the code it drives: ``featcache.commands``
(and ``featcache.commands_data``) for the feature store, ``probes.commands`` for
the probes. The commands that span both halves, ``featcache demo`` and the
``featcache study`` group, are defined here and added to the ``featcache`` group,
so ``featcache/`` never imports ``probes``. Each command parses its options,
makes one library call, renders the outcome, and turns library errors
(``FeatcacheError``) into one clear line with a non-zero exit code. Heavy
modules (torch, transformers) are imported inside the commands that need them,
so ``probes --help`` and the probes never load torch.
"""

from __future__ import annotations

import sys

import click

from featcache.cli_util import _echo_err, _int_list, _one_line_errors
from featcache.commands import featcache
from probes.commands import probes

__all__ = ["_int_list", "featcache", "probes"]


@click.command()
@click.option(
    "--out", default="demo", show_default=True, help="Folder for the generated data, store and results."
)
@click.option(
    "--model", default="random:dinov3-vits16", show_default=True, help="Backbone (offline: a random: model)."
)
@click.option("--res", default=112, show_default=True, type=int)
@click.option("--patients", default=48, show_default=True, type=int)
@_one_line_errors
def demo(out: str, model: str, res: int, patients: int) -> None:
    """Run the whole job offline on generated chest-like images: data, extraction, probes, report.

    Example: featcache demo --out demo/
    """
    from featcache.demo import demo_extract
    from probes.demo import demo_probes

    result = None
    for item in demo_extract(out, model=model, res=res, n_patients=patients):
        if isinstance(item, str):
            click.echo(item)
        else:
            result = item
    for line in demo_probes(out, result.set_name):
        click.echo(line)


# ---- featcache study (a plan of datasets x backbones x resolutions x probes) ----


@click.group()
def study() -> None:
    """Run a whole study from one TOML plan: extraction, every probe, the report (docs/STUDY.md).

    Example: featcache study plan plan.toml --dry-run && featcache study run plan.toml
    """


@study.command(name="run")
@click.argument("plan_toml", type=click.Path(dir_okay=False))
@click.option(
    "--no-extract", is_flag=True, help="Refuse (printing the extract commands) instead of extracting."
)
@click.option("--no-report", is_flag=True, help="Do not write report.md / report.html at the end.")
@_one_line_errors
def study_run(plan_toml: str, no_extract: bool, no_report: bool) -> None:
    """Extract what is missing, run every probe not yet in the results file, write the report.

    A killed run resumes: finished probe runs are skipped, unfinished extractions resume.

    Example: featcache study run plan.toml
    """
    from featcache.study.plan import StudyError, load_plan
    from probes.study_run import run_study

    plan = load_plan(plan_toml)
    try:
        out = run_study(plan, extract=not no_extract, report=not no_report)
    except StudyError as e:
        for command in e.commands:
            click.echo(command)
        raise
    for note in out.notes:
        _echo_err(f"note: {note}")
    click.echo(
        f"{out.steps} probe runs: {out.ran} ran, {out.skipped} already done; "
        f"{len(out.extracted)} feature sets extracted; {out.rows} rows appended to {out.results}"
    )
    if out.report is not None:
        click.echo(f"report: {out.report} and {out.report.with_suffix('.md')}")


@study.command(name="plan")
@click.argument("plan_toml", type=click.Path(dir_okay=False))
@click.option(
    "--dry-run", is_flag=True, help="List the steps and their cost (the only mode: nothing is run)."
)
@click.option(
    "--tflops", default=989.0, show_default=True, type=float, help="GPU peak TFLOP/s of the cost model."
)
@click.option("--mfu", default=0.4, show_default=True, type=float, help="Model FLOP utilisation assumed.")
@_one_line_errors
def study_plan(plan_toml: str, dry_run: bool, tflops: float, mfu: float) -> None:
    """Print every extraction and probe run of a plan, what is already done, and the GPU cost.

    Cost: model_flops(backbone, res) x images, at --tflops peak and --mfu utilisation.

    Example: featcache study plan plan.toml --dry-run
    """
    from featcache.study.cost import render_plan
    from featcache.study.plan import load_plan, plan_steps
    from probes.study_run import complete_sets, done_steps

    plan = load_plan(plan_toml)
    extractions, steps = plan_steps(plan)
    text = render_plan(
        plan, extractions, steps, extracted=complete_sets(plan, extractions), done=done_steps(plan.results),
        tflops=tflops, mfu=mfu,
    )  # fmt: skip
    click.echo(text.rstrip("\n"))


featcache.add_command(demo)
featcache.add_command(study)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(featcache())
