"""Helpers shared by the ``featcache`` and ``probes`` commands (featcache.commands, probes.commands).

Errors as one line, the groups' ``--quiet/--verbose``, option-value parsers
(comma lists, int ranges, floats) and the rendering of result rows. Imports
only click and ``featcache.errors``: no torch, no probes.
"""

from __future__ import annotations

import contextlib
import functools

import click

from featcache.errors import FeatcacheError


def _one_line_errors(fn):
    """Turn a FeatcacheError into a one-line ClickException (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatcacheError as e:
            raise click.ClickException(str(e).replace("\n", " ")) from None

    return wrapper


def parse_storage_options(text: str | None) -> dict | None:
    """The ``--storage-options`` JSON object as a dict (None when not given).

    Raises:
        click.BadParameter: not valid JSON, or not an object.
    """
    if text is None or not text.strip():
        return None
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.BadParameter(
            f"not valid JSON ({e.msg} at character {e.pos}); pass an object such as "
            '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'',
            param_hint="--storage-options",
        ) from None
    if not isinstance(value, dict):
        raise click.BadParameter(
            f"must be a JSON object, not {type(value).__name__}", param_hint="--storage-options"
        )
    return value


def storage_options_option(fn):
    """``--storage-options JSON``: fsspec options of the remote stores and image roots a command opens.

    While the command runs, the options are the fsspec defaults of the protocols of its URL
    arguments (``s3`` for ``--cache s3://...``), so every file system it opens (the store, image
    roots, decode workers it forks) gets them; a command with a ``storage_options`` parameter
    also receives the dict.
    """
    import inspect

    wants = "storage_options" in inspect.signature(fn).parameters

    @click.option(
        "--storage-options",
        "storage_options",
        help="fsspec options of remote stores and image roots, as JSON, e.g. "
        '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\' or \'{"anon": true}\'.',
    )
    @functools.wraps(fn)
    def wrapper(*args, storage_options: str | None = None, **kwargs):
        options = parse_storage_options(storage_options)
        if wants:
            kwargs["storage_options"] = options
        if not options:
            return fn(*args, **kwargs)
        with fsspec_defaults(options, [v for v in (*args, *kwargs.values()) if isinstance(v, str)]):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def fsspec_defaults(options: dict, values: list[str]):
    """Make ``options`` the fsspec defaults of the protocols of the URLs among ``values``, then restore."""
    import fsspec.config

    protocols = sorted({v.split("://", 1)[0] for v in values if "://" in v and not v.startswith("file://")})
    saved = {p: fsspec.config.conf.get(p) for p in protocols}
    for p in protocols:
        fsspec.config.conf[p] = {**(saved[p] or {}), **options}
    try:
        yield
    finally:
        for p, old in saved.items():
            if old is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = old


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def _one_line_warnings() -> None:
    """Warnings of a command (a logreg fit at max_iter, ...) as one ``warning:`` line on stderr, not
    Python's file:line form with the source line under it."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        click.echo(
            f"warning: {str(message).splitlines()[0] if str(message) else category.__name__}", err=True
        )

    warnings.showwarning = show


def _verbosity_options(fn):
    """``--quiet/--verbose`` of a command group, kept in ``ctx.obj["verbosity"]`` (-1, 0, 1)."""

    @click.option(
        "--quiet", "-q", is_flag=True, help="No progress bars (the libraries' own too), no step lines."
    )
    @click.option("--verbose", "-v", is_flag=True, help="One line per step (probe runs of a study).")
    @click.pass_context
    @functools.wraps(fn)
    def wrapper(ctx, quiet: bool, verbose: bool, **kwargs):
        from featcache.progress import set_verbosity

        if quiet and verbose:
            raise click.UsageError("--quiet and --verbose exclude each other")
        level = -1 if quiet else 1 if verbose else 0
        ctx.ensure_object(dict)["verbosity"] = level
        set_verbosity(level)
        _one_line_warnings()
        return fn(**kwargs)

    return wrapper


def _csv_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


_LABELS_HELP = (
    "Label columns, comma-separated; other columns are kept as metadata "
    "[default: inferred: columns whose values are all 1/0/-1/blank]."
)


def _int_list(value: str, option: str) -> list[int]:
    """``1..16`` (inclusive range), ``1,2,4,8`` or a mix such as ``1..4,8,16`` -> sorted distinct ints."""
    out: set[int] = set()
    for item in (v.strip() for v in str(value).split(",")):
        lo, sep, hi = item.partition("..")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(item))
        except ValueError:
            raise FeatcacheError(
                f"{option} {value!r}: use an inclusive range such as 1..16 or a list such as 1,2,4,8,16"
            ) from None
    return sorted(out)


def _float_list(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in _csv_list(value)]
    except ValueError:
        raise FeatcacheError(
            f"{option} {value!r}: use comma-separated numbers such as 1e-4,1e-2,1,100"
        ) from None


def _fmt_ci(row: dict) -> str:
    v = row.get("value")
    if v is None:
        return "n/a"
    ci = f" [{row['ci_low']:.3f}, {row['ci_high']:.3f}]" if row.get("ci_low") is not None else ""
    return f"{v:.3f}{ci}"


def _echo_written(rows: list[dict], out: str | None) -> None:
    if out:
        click.echo(f"{len(rows)} rows appended to {out}")
    else:
        click.echo(f"{len(rows)} rows (not saved: pass --out results.jsonl)")


def _echo_notes(rows: list[dict]) -> None:
    """Why a label has no value or no CI (skipped labels, too few test patients), once per label."""
    seen = set()
    for r in rows:
        if r.get("metric") not in ("auroc", "auroc_diff") or r.get("shots") is not None:
            continue
        for key in ("skipped", "ci"):
            why = (r.get("params") or {}).get(key)
            if why and (r["label"], why) not in seen:
                seen.add((r["label"], why))
                click.echo(f"note: {r['label']}: {'no result, ' if key == 'skipped' else ''}{why}")


def _echo_protocol(rows: list[dict]) -> None:
    """What was fitted on which rows, and every choice made on the user's behalf, once per run."""
    if not rows:
        return
    p = rows[0].get("params") or {}
    parts = []
    if p.get("fit_rows"):
        parts.append(f"fitted on {p['fit_rows']} ({rows[0].get('n_train')} rows)")
    if p.get("val_carved"):
        parts.append(
            f"no val split: {p.get('val_fraction'):g} of the train patients carved off to select C "
            f"(seed {p.get('split_seed')}), then refit on all of them"
        )
    if p.get("threshold_from"):
        parts.append(f"Youden thresholds from {p['threshold_from']} scores")
    if p.get("pending_rows"):
        parts.append(f"--allow-partial: {p['pending_rows']} rows not extracted yet are left out")
    if p.get("k_requested"):
        parts.append(f"k {p['k_requested']} capped at the {rows[0].get('n_train')} indexed rows")
    if parts:
        click.echo("protocol: " + "; ".join(parts))
    filled = {}
    for r in rows:
        why = (r.get("params") or {}).get("filled")
        if why and r.get("metric") == "auroc":
            filled.setdefault(r["label"], why)
    for label, why in filled.items():
        click.echo(f"note: {label}: {why}")


def _echo_header(rows: list[dict], what: str) -> None:
    r = next((r for r in rows if r.get("label") == "mean"), rows[0])
    click.echo(
        f"{r.get('store_set')}  {what}  features={r.get('features')}  "
        f"test: {r.get('n_test')} images, {r.get('n_patients_test')} patients"
    )
