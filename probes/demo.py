"""The probes half of ``featcache demo``: kNN, logistic regression and few-shot on the demo's set, then the report.

This module does not import torch.
"""

from __future__ import annotations

from pathlib import Path


def demo_probes(out: str | Path, set_name: str):
    """Run the demo's probes on the set that :func:`featcache.demo.demo_extract` wrote under ``out/cache``.

    Args:
        out: the demo folder (``results.jsonl``, ``report.md`` and ``fewshot.png`` are written there).
        set_name: the feature set.

    Yields:
        Lines of text describing each step and where its output went.
    """
    out = Path(out)
    from probes.results import read_jsonl
    from probes.run import run_fewshot, run_knn, run_logreg, run_report

    results = out / "results.jsonl"
    for stale in out.glob("results.jsonl*"):
        stale.unlink()
    cache = str(out / "cache")
    run_knn(cache, set_name, out=results)  # the commands' defaults: a rerun gives the same rows
    run_logreg(cache, set_name, out=results)
    run_fewshot(cache, set_name, shots=[1, 2, 4, 8], seeds=5, out=results)
    yield f"probes:   kNN, logistic regression, few-shot 1..8 shots x 5 seeds -> {results} ({len(read_jsonl(results))} rows)"
    try:
        md = run_report(
            results,
            by=("model", "res"),
            columns="dataset",
            plot=out / "fewshot.png",
            html=out / "report.html",
        )
        plot_lines = [
            f"plot:     {out / 'fewshot.png'}",
            f"html:     {out / 'report.html'} (open it in a browser)",
        ]
    except ImportError as e:  # matplotlib is an optional extra
        md = run_report(results, by=("model", "res"), columns="dataset")
        plot_lines = [f"plot:     skipped ({e})"]
    (out / "report.md").write_text(md)
    yield f"report:   {out / 'report.md'}"
    yield from plot_lines
    yield ""
    yield md.rstrip()
    yield ""
    yield f"next: featcache info {cache} ; probes report {results} --table per-label ; featcache extract --help"
