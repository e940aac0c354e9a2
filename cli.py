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


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _csv_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@featcache.command()
@click.option(
    "--model",
    required=True,
    help="Registry name (see `featcache models`), random:NAME, or a checkpoint folder.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Manifest CSV (see README: manifest format).",
)
@click.option("--out", required=True, help="Feature store folder or fsspec URL (created if absent).")
@click.option("--res", default=224, show_default=True, type=int, help="Input resolution in pixels.")
@click.option(
    "--root", type=click.Path(file_okay=False), help="Image root folder [default: the manifest's folder]."
)
@click.option("--name", help="Feature set name [default: <manifest stem>/<model>/<res>].")
@click.option(
    "--tokens",
    default="cls,pooled",
    show_default=True,
    help="Tokens to store: cls,pooled always; registers, patch opt-in.",
)
@click.option("--layers", help="Intermediate layers too: last4, lastN, or indices like 3,6,9.")
@click.option(
    "--patch-pool",
    default=1,
    show_default=True,
    type=int,
    help="Average-pool stored patch tokens by this factor.",
)
@click.option(
    "--resize", default="squash", show_default=True, type=click.Choice(["squash", "letterbox", "crop"])
)
@click.option(
    "--interpolation",
    default="bicubic",
    show_default=True,
    type=click.Choice(["bicubic", "bilinear", "area", "nearest"]),
)
@click.option(
    "--batch-size",
    type=int,
    help="Images per batch [default: 64 on CUDA, 16 on CPU; halves on GPU out-of-memory].",
)
@click.option("--workers", type=int, help="Decode worker processes [default: cores - 1, at most 8].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of a random: model.")
@click.option("--shard-size", type=int, help="Rows per shard [default: about 256 MiB of features per shard].")
@click.option(
    "--num-shards",
    default=1,
    show_default=True,
    type=int,
    help="Workers sharing this store (also from torchrun's WORLD_SIZE).",
)
@click.option(
    "--shard-index", default=0, show_default=True, type=int, help="This worker's index (also from RANK)."
)
@click.option(
    "--on-error",
    default="skip",
    show_default=True,
    type=click.Choice(["skip", "fail"]),
    help="Undecodable file: record and go on, or stop.",
)
@click.option("--retry-failed", is_flag=True, help="Re-process rows that failed in an earlier run.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (GPU).")
@click.option("--revision", help="Hub revision (branch, tag or commit) of the weights.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_one_line_errors
def extract(**kw) -> None:
    """Embed every image of a manifest into a feature set (re-run to resume).

    Exit code 0 when every row is done, 3 when some rows failed to decode
    (they are listed in `featcache info`), 1 on an error.

    Example: featcache extract --model dinov3-vitb16 --res 512 --data nih.csv --root /data/nih --out cache/
    """
    from featcache.extract import ExtractConfig
    from featcache.extract import extract as run_extract

    quiet = kw.pop("quiet")
    cfg = ExtractConfig(
        model=kw["model"], data=kw["data"], out=kw["out"], res=kw["res"], root=kw["root"], name=kw["name"],
        tokens=_csv_list(kw["tokens"]), layers=kw["layers"], patch_pool=kw["patch_pool"], resize=kw["resize"],
        interpolation=kw["interpolation"], batch_size=kw["batch_size"], workers=kw["workers"], device=kw["device"],
        dtype=kw["dtype"], seed=kw["seed"], shard_rows=kw["shard_size"], num_shards=kw["num_shards"],
        shard_index=kw["shard_index"], on_error=kw["on_error"], retry_failed=kw["retry_failed"],
        compile=kw["compile_"], revision=kw["revision"],
    )  # fmt: skip
    try:
        r = run_extract(cfg, progress=not quiet)
    except KeyboardInterrupt:  # pragma: no cover - extract turns Ctrl-C into ExtractionInterrupted
        raise click.ClickException("interrupted; re-run the same command to resume") from None
    done = r.n - r.failed - r.pending
    click.echo(
        f"{r.set_name}: {done}/{r.n} rows done, {r.failed} failed, {r.pending} pending "
        f"({r.processed} processed in {r.seconds:.1f} s, {r.images_per_s:.1f} img/s; {r.shards_skipped} shards already done)"
    )
    for f in r.failures:
        _echo_err(f"failed: {f['id']}: {f['reason']}")
    if r.failed:
        sys.exit(3)


@featcache.command(name="ls")
@click.argument("cache")
@_one_line_errors
def ls_cmd(cache: str) -> None:
    """List the feature sets of a store: rows done/failed and bytes per image.

    Example: featcache ls cache/
    """
    from featcache.store import FAILED, OK, FeatureStore

    store = FeatureStore(cache)
    sets = store.list_sets()
    if not sets:
        click.echo(f"{cache}: no feature sets")
        return
    click.echo(f"{'set':40} {'rows':>7} {'done':>7} {'failed':>7} {'bytes/img':>10}  arrays")
    for name in sets:
        fs = store.open_set(name)
        st = fs.status
        stored = sum(s or 0 for _, s in fs.bytes_per_row().values())
        click.echo(
            f"{name:40} {fs.n:>7} {int((st == OK).sum()):>7} {int((st == FAILED).sum()):>7} "
            f"{_fmt_bytes(stored):>10}  {','.join(fs.arrays())}"
        )


@featcache.command()
@click.argument("cache")
@click.argument("set_name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the attributes as JSON.")
@_one_line_errors
def info(cache: str, set_name: str | None, as_json: bool) -> None:
    """Show a feature set's provenance, arrays, bytes per image and failures.

    Example: featcache info cache/ nih/dinov3-vitb16/512
    """
    import json

    from featcache.store import FeatureStore

    fs = FeatureStore(cache).open_set(set_name)
    if as_json:
        click.echo(json.dumps(fs.attrs, indent=2, sort_keys=True, default=str))
        return
    a = fs.attrs
    prov = a.get("provenance", {})
    click.echo(f"set:            {fs.name}")
    click.echo(
        f"model:          {a.get('model')} ({prov.get('source', '?')}: {prov.get('weights', prov.get('model_id', '?'))})"
    )
    click.echo(f"resolution:     {a.get('res')} px; preprocessing {a.get('preprocessing')}")
    click.echo(
        f"tokens:         {','.join(a.get('tokens', []))}; layers {a.get('layers') or '-'}; patch pool {a.get('patch_pool', 1)}"
    )
    click.echo(f"manifest:       {a.get('manifest')} (sha256 {str(a.get('manifest_digest'))[:16]}...)")
    click.echo(f"task:           {fs.task}; labels {fs.label_names or fs.class_names or '-'}")
    click.echo(
        f"rows:           {fs.n} ({int(fs.ok.sum())} ok, {len(fs.failures())} failed); shard rows {fs.shard_rows}"
    )
    click.echo(f"device:         {a.get('device')}; versions {a.get('versions')}")
    click.echo(f"created:        {a.get('created')}; updated {a.get('updated', '-')}")
    total_raw = total_stored = 0.0
    for key, (raw, stored) in fs.bytes_per_row().items():
        total_raw += raw
        total_stored += stored or 0
        ratio = f" ({raw / stored:.2f}x)" if stored else ""
        click.echo(
            f"  {key:14} {str(fs.shape(key)):22} {_fmt_bytes(raw):>10} raw/img -> {_fmt_bytes(stored):>10} stored/img{ratio}"
        )
    click.echo(f"bytes per image: {_fmt_bytes(total_raw)} raw, {_fmt_bytes(total_stored)} stored")
    for f in fs.failures()[:20]:
        click.echo(f"failed: {f['id']}: {f['reason']}")


@featcache.command()
@click.argument("cache")
@click.argument("set_name", required=False)
@_one_line_errors
def verify(cache: str, set_name: str | None) -> None:
    """Check every feature set (or one) for completeness and integrity; exit 1 on any problem.

    Example: featcache verify cache/
    """
    from featcache.store import FeatureStore

    store = FeatureStore(cache)
    names = [set_name] if set_name else store.list_sets()
    if not names:
        raise click.ClickException(f"{cache}: no feature sets to verify")
    bad = 0
    for name in names:
        problems = store.open_set(name).verify()
        bad += bool(problems)
        click.echo(f"{name}: " + ("ok" if not problems else "; ".join(problems)))
    if bad:
        raise click.ClickException(f"{bad} of {len(names)} feature sets have problems")


@featcache.command()
@click.argument("pattern", default="*")
@_one_line_errors
def models(pattern: str) -> None:
    """List the model registry (wildcards allowed).

    Example: featcache models 'dinov3-*'
    """
    from featcache.models import REGISTRY

    specs = [REGISTRY.get(n) for n in REGISTRY.list(pattern)]
    if not specs:
        raise click.ClickException(f"no model matches '{pattern}'; try `featcache models`")
    click.echo(f"{'name':22} {'dim':>5} {'params':>8} {'patch':>5} {'regs':>4} {'native':>6}  hub id")
    for s in specs:
        gated = " (gated)" if getattr(s, "gated", False) else ""
        click.echo(
            f"{s.name:22} {s.embed_dim:>5} {s.params / 1e6:>7.1f}M {s.patch_size or '-':>5} {s.num_registers:>4} "
            f"{s.native_res:>6}  {s.hub_id}{gated}"
        )


@featcache.command()
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
    from featcache.demo import run_demo

    for line in run_demo(out, model=model, res=res, n_patients=patients):
        click.echo(line)


# ---- featcache dataset commands (manifest, split, check, export, import) ----


# ---- probes commands ----


if __name__ == "__main__":  # pragma: no cover
    sys.exit(featcache())
