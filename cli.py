"""Command-line interface: the ``featcache`` and ``probes`` click groups.

Each command parses its options, makes one library call, renders the outcome,
and turns library errors (``FeatcacheError``) into one clear line with a
non-zero exit code. Heavy modules (torch, transformers) are imported inside the
commands that need them, so ``probes --help`` and the probes never load torch.
"""

from __future__ import annotations

import functools
import sys

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


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


@click.group()
@click.version_option(package_name="featcache")
def featcache() -> None:
    """Embed a dataset once with a frozen vision backbone into a feature store.

    Start with `featcache demo`, then `featcache extract --help`.
    """


@click.group()
@click.version_option(package_name="featcache")
def probes() -> None:
    """Run CPU probes (kNN, logistic regression, few-shot) on a feature store and report.

    Example: probes knn --cache cache/ --out results.jsonl
    """


# ---- featcache core commands (extract, ls, info, verify, models, demo) ----


# ---- featcache dataset commands (manifest, split, check, export, import) ----


# ---- probes commands ----


if __name__ == "__main__":  # pragma: no cover
    sys.exit(featcache())
