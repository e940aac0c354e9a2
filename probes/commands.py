"""The ``probes`` click group and its commands (knn, logreg, fewshot, compare, report, external, seg).

Each command parses its options, makes one library call and renders the rows;
``probes seg`` lives in ``probes.commands_seg``. Nothing here imports torch.
"""

from __future__ import annotations

import click

from featcache.cli_util import (
    _csv_list,
    _echo_header,
    _echo_notes,
    _echo_protocol,
    _echo_written,
    _float_list,
    _fmt_ci,
    _int_list,
    _one_line_errors,
    _verbosity_options,
    storage_options_option,
)
from probes.commands_seg import seg


@click.group()
@click.version_option(package_name="featcache")
@_verbosity_options
def probes() -> None:
    """Run CPU probes (kNN, logistic regression, few-shot) on a feature store and report.

    Example: probes knn --cache cache/ --out results.jsonl
    """
    from featcache.progress import set_probe_progress

    set_probe_progress(True)  # long steps show rows/s and ETA on stderr (silenced by --quiet)


def _bytes(text: str | None) -> int | None:
    """``8GiB``, ``500MB``, ``1e9`` -> bytes (None stays None)."""
    if not text:
        return None
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 1e3,
        "mb": 1e6,
        "gb": 1e9,
        "tb": 1e12,
        "b": 1,
    }
    t = text.strip().lower()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            t, scale = t[: -len(u)], units[u]
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use a size such as 8GiB or 500MB", param_hint="--memory-cap"
        ) from None
    if value <= 0:
        raise click.BadParameter(f"{text!r}: must be positive", param_hint="--memory-cap")
    return int(value)


def _probe_data_options(fn):
    """Options every probe shares: which store, set, features, labels and what to do with the rows."""
    options = [
        click.option("--cache", required=True, help="Feature store folder or fsspec URL."),
        click.option("--set", "set_name", help="Feature set [default: the store's only set]."),
        click.option(
            "--features", default="cls", show_default=True, help="cls, pooled, cls+pooled, layer_cls:-1 ..."
        ),
        click.option("--labels", help="Comma-separated label columns or class names [default: all]."),
        click.option(
            "--uncertain",
            default="ignore",
            show_default=True,
            type=click.Choice(["ignore", "zeros", "ones"]),
            help="What uncertain (-1) labels become: missing, negative or positive.",
        ),
        click.option(
            "--aggregate",
            type=click.Choice(["mean", "max"]),
            help="Pool slice features per volume (slice manifests from `featcache volumes`).",
        ),
        click.option(
            "--allow-partial",
            is_flag=True,
            help="Probe a set whose extraction has not finished (pending rows are left out and counted).",
        ),
        click.option("--out", type=click.Path(dir_okay=False), help="Append result rows to this JSONL file."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return storage_options_option(fn)


def _bootstrap_options(fn, carve: bool = True):
    fn = click.option(
        "--seed", default=0, show_default=True, type=int, help="Bootstrap, fold (and carved-val) seed."
    )(fn)
    fn = click.option(
        "--bootstrap",
        "n_boot",
        default=1000,
        show_default=True,
        type=click.IntRange(min=1),
        help="Patient bootstrap draws for CIs.",
    )(fn)
    if not carve:
        return fn
    return click.option(
        "--val-fraction",
        default=0.2,
        show_default=True,
        type=float,
        help="Share of train patients carved into validation when C is selected and the store has no val split.",
    )(fn)


def _no_carve_options(fn):
    return _bootstrap_options(fn, carve=False)


_BY_HELP = (
    "Also report every metric per subgroup of meta_* columns, and the gap between groups, e.g. "
    "meta_sex,meta_view or meta_age:0,40,60,80 (numeric columns: given bands, else quartiles)."
)


def _echo_by(rows: list[dict], by: str | None) -> None:
    if by:
        from probes.subgroups import subgroup_lines

        for line in subgroup_lines(rows):
            click.echo(line)


@probes.command()
@_probe_data_options
@click.option("--k", "k", default="10,20,100,200", show_default=True, help="Neighbour counts (one search).")
@click.option(
    "--temperature", default=0.07, show_default=True, type=float, help="Softmax temperature of the votes."
)
@click.option(
    "--method",
    default="dinov2",
    show_default=True,
    type=click.Choice(["dinov2", "renormalized", "mlknn"]),
    help="dinov2: dinov2/eval/knn.py's vote (softmax over the largest k once); renormalized: softmax over "
    "each k's own neighbours; mlknn: ML-kNN (multi-label).",
)
@click.option("--s", "s", default=1.0, show_default=True, type=float, help="ML-kNN Laplace smoothing.")
@click.option(
    "--search",
    default="flat",
    show_default=True,
    type=click.Choice(["flat", "stream", "bf16"]),
    help="flat: exact FAISS float32; stream: the same, train rows streamed from the store (sets larger than "
    "memory); bf16: bf16 candidates + exact float32 re-rank (same neighbours).",
)
@click.option("--memory-cap", help="--search stream: memory the search may use, e.g. 8GiB or 500MB.")
@click.option("--by", help=_BY_HELP)
@_no_carve_options
@_one_line_errors
def knn(
    cache, set_name, features, labels, uncertain, aggregate, allow_partial, out, k, temperature, method, s, search, memory_cap,
    by, n_boot, seed,
) -> None:  # fmt: skip
    """kNN probe (dinov2 knn.py by default, or ML-kNN): AUROC per label and mean, with patient CIs.

    Example: probes knn --cache cache/ --set nih/dinov3-vitb16/512 --k 10,20 --out results.jsonl
    """
    from probes.run import run_knn

    rows = run_knn(
        cache, set_name, features=features, k=_int_list(k, "--k"), temperature=temperature, method=method, s=s,
        search=search, memory_cap=_bytes(memory_cap), labels=_csv_list(labels) or None, uncertain=uncertain, n_boot=n_boot, seed=seed,
        out=out, aggregate=aggregate, allow_partial=allow_partial, by=by,
    )  # fmt: skip
    _echo_header(rows, "mlknn" if method == "mlknn" else f"knn vote={method}")
    _echo_protocol(rows)
    click.echo(f"{'k':>5}  mean AUROC [95% CI]")
    for r in rows:
        if r["label"] == "mean" and r["metric"] == "auroc" and "subgroup" not in r["params"]:
            click.echo(f"{r['k']:>5}  {_fmt_ci(r)}")
    _echo_by(rows, by)
    _echo_notes(rows)
    _echo_written(rows, out)


@probes.command()
@_probe_data_options
@click.option("--C", "C", type=float, help="Fixed inverse regularisation [default: chosen on val per label].")
@click.option("--C-grid", "C_grid", help="Candidate C values, e.g. 1e-4,1e-2,1,100 [default: 1e-6..1e5].")
@click.option(
    "--protocol",
    type=click.Choice(["dinov2"]),
    help="dinov2: log_regression.py's preset (45 C values 1e-6..1e5, features as stored, refit on train+val).",
)
@click.option("--by", help=_BY_HELP)
@_bootstrap_options
@_one_line_errors
def logreg(
    cache, set_name, features, labels, uncertain, aggregate, allow_partial, out, C, C_grid, protocol, by, n_boot,
    seed, val_fraction,
) -> None:  # fmt: skip
    """Logistic-regression probe, C chosen on validation only: AUROC per label and mean, with CIs.

    Example: probes logreg --cache cache/ --set nih/dinov3-vitb16/512 --out results.jsonl
    """
    from probes.run import run_logreg

    grid = _float_list(C_grid, "--C-grid") if C_grid else None
    if protocol == "dinov2" and val_fraction == 0.2 and not C_grid:
        val_fraction = 0.1  # dinov2 selects on 10% of train when there is no val split
    rows = run_logreg(
        cache, set_name, features=features, C=C, C_grid=grid, protocol=protocol, labels=_csv_list(labels) or None,
        uncertain=uncertain, n_boot=n_boot, seed=seed, val_fraction=val_fraction, out=out, aggregate=aggregate,
        allow_partial=allow_partial, by=by,
    )  # fmt: skip
    _echo_header(rows, "logreg")
    _echo_protocol(rows)
    click.echo(f"{'label':24} {'C':>8}  AUROC [95% CI]")
    for r in rows:
        if r["metric"] == "auroc" and "subgroup" not in r["params"]:
            c = f"{r['C']:g}" if r.get("C") is not None else "-"
            click.echo(f"{r['label']:24} {c:>8}  {_fmt_ci(r)}")
    _echo_by(rows, by)
    _echo_notes(rows)
    _echo_written(rows, out)


@probes.command()
@_probe_data_options
@click.option("--shots", help="Shots K: an inclusive range 1..16 or a list 1,2,4,8,16.")
@click.option("--seeds", type=int, help="Episodes per shots value, seeds 0..n-1 [default: 10].")
@click.option(
    "--head", default="logreg", show_default=True, type=click.Choice(["logreg", "knn", "prototype"])
)
@click.option("--C", "C", default=1.0, show_default=True, type=float, help="logreg head regularisation.")
@click.option("--k", "k", default=20, show_default=True, type=int, help="knn head neighbours.")
@click.option(
    "--sampling",
    default="random",
    show_default=True,
    type=click.Choice(["random", "first-patients"]),
    help="random: K positive + K negative patients per label and seed; first-patients: the "
    "DINOv2-radiology protocol (first K patients per label, all their images, no seeds).",
)
@click.option(
    "--mean-labels",
    help="Labels the mean averages at every shots [default: those sampled at the largest shots].",
)
@click.option(
    "--episodes",
    "episodes_out",
    type=click.Path(dir_okay=False),
    help="Save episodes here [default: <out>.episodes.json].",
)
@click.option(
    "--episodes-from",
    type=click.Path(exists=True, dir_okay=False),
    help="Re-run saved episodes (also on another backbone's set of the same manifest).",
)
@_one_line_errors
def fewshot(
    cache, set_name, features, labels, uncertain, aggregate, allow_partial, out, shots, seeds, head, C, k,
    sampling, mean_labels, episodes_out, episodes_from,
) -> None:  # fmt: skip
    """Few-shot probe: K patients per side/class, many seeds, AUROC of every episode on the test split.

    Example: probes fewshot --cache cache/ --set nih/dinov3-vitb16/512 --shots 1..16 --seeds 10 --out results.jsonl
    """
    from probes.episodes import episodes_path
    from probes.fewshot_run import fewshot_notes, run_fewshot, summarize_fewshot

    if shots is None and episodes_from is None:
        raise click.ClickException(
            "--shots is required (e.g. --shots 1..16), unless --episodes-from is given"
        )
    shot_list = _int_list(shots, "--shots") if shots is not None else None
    if shot_list is not None and shot_list[0] < 1:
        raise click.ClickException(f"--shots {shots}: shots must be 1 or more")
    rows = run_fewshot(
        cache, set_name, shots=shot_list, seeds=seeds, head=head, features=features,
        labels=_csv_list(labels) or None, uncertain=uncertain, C=C, k=k, out=out,
        episodes_out=episodes_out, episodes_from=episodes_from, aggregate=aggregate, sampling=sampling,
        mean_labels=_csv_list(mean_labels) or None, allow_partial=allow_partial,
    )  # fmt: skip
    _echo_header(rows, f"fewshot head={head} sampling={sampling}")
    click.echo(f"{'shots':>5}  mean AUROC ± SD over seeds (seeds)")
    for s in summarize_fewshot(rows):
        sd = f" ± {s['sd']:.3f}" if s["sd"] is not None else ""
        click.echo(
            f"{s['shots']:>5}  {s['mean']:.3f}{sd} ({s['n_seeds']})"
            if s["mean"] is not None
            else f"{s['shots']:>5}  n/a"
        )
    for line in fewshot_notes(rows):
        click.echo(f"note: {line}")
    saved = episodes_out or (episodes_path(out) if out and not episodes_from else None)
    if saved:
        click.echo(f"episodes saved to {saved}")
    _echo_written(rows, out)


@probes.command()
@_probe_data_options
@click.option("--sets", required=True, help="Two feature sets A,B of the same manifest (e.g. two backbones).")
@click.option(
    "--probe", "probe_name", default="logreg", show_default=True, type=click.Choice(["logreg", "knn"])
)
@click.option("--k", "k", default=20, show_default=True, type=int, help="kNN neighbours.")
@click.option("--C", "C", type=float, help="Fixed logreg C [default: chosen on val].")
@_bootstrap_options
@_one_line_errors
def compare(
    cache, set_name, features, labels, uncertain, aggregate, allow_partial, out, sets, probe_name, k, C, n_boot,
    seed, val_fraction,
) -> None:  # fmt: skip
    """Paired comparison of two feature sets: AUROC difference with paired CI, DeLong p, Holm-corrected.

    Example: probes compare --cache cache/ --sets nih/dinov3-vitb16/512,nih/rad-dino/518 --probe logreg
    """
    from probes.run import run_compare

    names = _csv_list(sets)
    if len(names) != 2:
        raise click.ClickException(f"--sets {sets!r}: give exactly two set names separated by a comma")
    if set_name:
        raise click.ClickException("compare takes --sets A,B, not --set")
    rows = run_compare(
        cache, names, probe=probe_name, features=features, labels=_csv_list(labels) or None,
        uncertain=uncertain, k=k, C=C, n_boot=n_boot, seed=seed, val_fraction=val_fraction, out=out,
        aggregate=aggregate, allow_partial=allow_partial,
    )  # fmt: skip
    click.echo(f"{names[0]} minus {names[1]} ({probe_name}, features={features})")
    click.echo(f"{'label':24} {'AUROC diff [95% CI]':28} {'p':>8} {'p (Holm)':>9}")
    for r in rows:
        p = f"{r['p']:.3g}" if r.get("p") is not None else "-"
        ph = f"{r['p_holm']:.3g}" if r.get("p_holm") is not None else "-"
        click.echo(f"{r['label']:24} {_fmt_ci(r):28} {p:>8} {ph:>9}")
    click.echo("p: DeLong per label, paired bootstrap for the mean")
    _echo_notes(rows)
    _echo_written(rows, out)


@probes.command()
@click.argument("results", type=click.Path(dir_okay=False))
@click.option("--by", default="model,res", show_default=True, help="Fields naming a summary table line.")
@click.option("--columns", default="dataset", show_default=True, help="Field whose values are the columns.")
@click.option(
    "--table",
    "table_kind",
    default="summary",
    show_default=True,
    type=click.Choice(["summary", "per-label", "both"]),
    help="summary: backbones x datasets; per-label: labels x backbones (the mean last).",
)
@click.option(
    "--format",
    "fmt",
    default="md",
    show_default=True,
    type=click.Choice(["md", "csv", "json"]),
    help="md: formatted cells; csv / json (lines): one numeric record per cell (value, sd, ci_low, ci_high).",
)
@click.option(
    "--metric", default="auroc", show_default=True, help="Metric shown, e.g. auroc, sensitivity@youden."
)
@click.option("--label", default="mean", show_default=True, help="Label shown (mean: mean over labels).")
@click.option("--where", multiple=True, help="Filter FIELD=VALUE (repeatable), e.g. --where k=20.")
@click.option("--k", "k", type=int, help="Keep one kNN k (default: several k are a column group).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Few-shot curves PNG.")
@click.option("--plot-resolution", type=click.Path(dir_okay=False), help="AUROC against resolution PNG.")
@click.option("--plot-forest", type=click.Path(dir_okay=False), help="Per-label forest plot PNG (with CIs).")
@click.option("--plot-compare", type=click.Path(dir_okay=False), help="Paired differences of compare PNG.")
@click.option("--plot-k", type=click.Path(dir_okay=False), help="kNN: metric against k PNG.")
@click.option(
    "--plot-reliability",
    type=click.Path(dir_okay=False),
    help="Reliability diagrams PNG (one per set and probe).",
)
@click.option("--html", type=click.Path(dir_okay=False), help="One self-contained HTML report.")
@click.option(
    "--parquet", type=click.Path(dir_okay=False), help="Numeric records as Parquet (pandas+pyarrow)."
)
@_one_line_errors
def report(
    results, by, columns, table_kind, fmt, metric, label, where, k, plot, plot_resolution, plot_forest,
    plot_compare, plot_k, plot_reliability, html, parquet,
) -> None:  # fmt: skip
    """Paper tables (and plots, and an HTML report) from a results file.

    Re-runs of the same result are dropped (the newest kept, said once on stderr).

    Example: probes report results.jsonl --table both --html report.html
    """
    from probes.run import run_report

    notes: list[str] = []
    text = run_report(
        results, by=_csv_list(by), columns=columns, fmt=fmt, metric=metric, label=label,
        where=list(where), table=table_kind, k=k, plot=plot, plot_resolution=plot_resolution,
        plot_forest=plot_forest, plot_compare=plot_compare, plot_k=plot_k, plot_reliability=plot_reliability,
        html=html, parquet=parquet,
        notes=notes,
    )  # fmt: skip
    click.echo(text.rstrip("\n"))
    for note in notes:
        click.echo(f"note: {note}", err=True)


@probes.command()
@click.option("--cache", required=True, help="Feature store of the train set (and of the test set).")
@click.option("--train-set", required=True, help="Set the probe is fitted on, e.g. nih/dinov3-vitb16/512.")
@click.option("--test-set", required=True, help="External set scored, e.g. chexpert/dinov3-vitb16/512.")
@click.option("--test-cache", help="Store of the test set when it is another one [default: --cache].")
@click.option(
    "--test-split",
    default="test",
    show_default=True,
    type=click.Choice(["test", "all"]),
    help="Score the external set's test split, or all its rows.",
)
@click.option(
    "--probe", "probe_name", default="logreg", show_default=True, type=click.Choice(["logreg", "knn"])
)
@click.option(
    "--features", default="cls", show_default=True, help="cls, pooled, cls+pooled, layer_cls:-1 ..."
)
@click.option("--labels", help="Comma-separated shared labels [default: every label both sets have].")
@click.option(
    "--uncertain", default="ignore", show_default=True, type=click.Choice(["ignore", "zeros", "ones"])
)
@click.option("--k", "k", default="10,20,100,200", show_default=True, help="kNN neighbour counts.")
@click.option(
    "--method", default="dinov2", show_default=True, type=click.Choice(["dinov2", "renormalized", "mlknn"])
)
@click.option("--C", "C", type=float, help="Fixed logreg C [default: chosen on the train set's val].")
@click.option("--C-grid", "C_grid", help="Candidate C values [default: 1e-6..1e5].")
@click.option("--by", help=_BY_HELP)
@click.option("--out", type=click.Path(dir_okay=False), help="Append result rows to this JSONL file.")
@_bootstrap_options
@storage_options_option
@_one_line_errors
def external(
    cache, train_set, test_set, test_cache, test_split, probe_name, features, labels, uncertain, k, method, C,
    C_grid, by, out, n_boot, seed, val_fraction,
) -> None:  # fmt: skip
    """External validation: fit on one set's train (+ val) rows, score another set, shared labels only.

    Example: probes external --cache cache/ --train-set nih/m/512 --test-set chexpert/m/512 --out results.jsonl
    """
    from probes.estimators.logreg import DEFAULT_C_GRID
    from probes.external import external_lines, run_external

    rows = run_external(
        cache, train_set, test_set, probe=probe_name, features=features, labels=_csv_list(labels) or None,
        uncertain=uncertain, k=_int_list(k, "--k"), method=method, C=C,
        C_grid=_float_list(C_grid, "--C-grid") if C_grid else DEFAULT_C_GRID, val_fraction=val_fraction,
        test_split=test_split, test_cache=test_cache, by=by, n_boot=n_boot, seed=seed, out=out,
    )  # fmt: skip
    _echo_header(rows, f"external {probe_name}")
    for line in external_lines(rows):
        click.echo(line)
    _echo_protocol(rows)
    ks = [r["k"] for r in rows if r.get("k") is not None]
    click.echo(
        f"{'label':24} {'AUROC [95% CI]':24} {'AUPRC [95% CI]':24}" + (f"  (k={max(ks)})" if ks else "")
    )
    for r in rows:
        if r["metric"] == "auroc" and "subgroup" not in r["params"] and (not ks or r.get("k") == max(ks)):
            ap = next(
                x for x in rows
                if x["metric"] == "auprc" and x["label"] == r["label"] and x.get("k") == r.get("k")
                and "subgroup" not in x["params"]
            )  # fmt: skip
            click.echo(f"{r['label']:24} {_fmt_ci(r):24} {_fmt_ci(ap):24}")
    _echo_by(rows, by)
    _echo_notes(rows)
    _echo_written(rows, out)


probes.add_command(seg)
