"""The ``featcache`` click group and its core commands (extract, ls, info, verify, models).

The dataset commands (manifest, split, check, export, import, volumes, pca) live
in ``featcache.commands_data`` and are registered here. Commands that drive the
probes too (``featcache demo``, ``featcache study``) are added by ``cli.py``, so
this module never imports probes. torch is imported only inside ``extract``.
"""

from __future__ import annotations

import sys

import click

from featcache.cli_util import (
    _LABELS_HELP,
    _csv_list,
    _echo_err,
    _one_line_errors,
    _verbosity_options,
    storage_options_option,
)
from featcache.commands_data import DATA_COMMANDS
from featcache.errors import ExtractionInterrupted


@click.group()
@click.version_option(package_name="featcache")
@_verbosity_options
def featcache() -> None:
    """Embed a dataset once with a frozen vision backbone into a feature store.

    Start with `featcache demo`, then `featcache extract --help`.
    """


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@featcache.command()
@click.option("--labels", help=_LABELS_HELP)
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
    type=click.IntRange(min=1),
    help="Images per batch [default: 64 on CUDA, 16 on CPU; halves on GPU out-of-memory].",
)
@click.option(
    "--workers", type=click.IntRange(min=0), help="Decode worker processes [default: cores - 1, at most 8]."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "bf16", "float16"]),
    help="Compute dtype; bf16 on CPU only where it has AVX512-BF16/AMX (never the default there).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch threads of the model [default: cores - decode workers, at least 1].",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of a random: model.")
@click.option("--shard-size", type=int, help="Rows per shard [default: about 256 MiB of features per shard].")
@click.option(
    "--num-shards",
    type=int,
    help="Workers sharing this set [default: torchrun's WORLD_SIZE, else SLURM tasks x array tasks, else 1].",
)
@click.option(
    "--shard-index",
    type=int,
    help="This worker's index [default: torchrun's RANK, else from SLURM_PROCID/SLURM_ARRAY_TASK_ID].",
)
@click.option(
    "--slurm",
    "slurm_spec",
    help="Submit as a SLURM job array via submitit, e.g. partition=gpu,gpus=8,array=32,time=240 "
    "(keys: partition, gpus, tasks, array, time, cpus, mem, parallel, account, qos, constraint).",
)
@click.option(
    "--slurm-folder",
    default="featcache-slurm/%j",
    show_default=True,
    help="Where submitit writes the jobs' scripts and logs.",
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
@storage_options_option
@_one_line_errors
def extract(storage_options: dict | None = None, **kw) -> None:
    """Embed every image of a manifest into a feature set (re-run to resume).

    Exit code 0 when every row is done, 3 when some rows failed to decode
    (they are listed in `featcache info`), 1 on an error.

    Example: featcache extract --model dinov3-vitb16 --res 512 --data nih.csv --root /data/nih --out cache/
    """
    quiet = kw.pop("quiet")
    try:  # Ctrl-C while torch is still importing is an interruption too (exit 130, not "Aborted!")
        from featcache.extract import ExtractConfig
        from featcache.extract import extract as run_extract

        cfg = ExtractConfig(
            model=kw["model"], data=kw["data"], out=kw["out"], res=kw["res"], root=kw["root"], name=kw["name"],
            tokens=_csv_list(kw["tokens"]), layers=kw["layers"], patch_pool=kw["patch_pool"], resize=kw["resize"],
            interpolation=kw["interpolation"], batch_size=kw["batch_size"], workers=kw["workers"],
            device=kw["device"], dtype=kw["dtype"], seed=kw["seed"], shard_rows=kw["shard_size"],
            num_shards=kw["num_shards"], shard_index=kw["shard_index"], on_error=kw["on_error"],
            retry_failed=kw["retry_failed"], compile=kw["compile_"], revision=kw["revision"],
            labels=tuple(_csv_list(kw["labels"])) or None, threads=kw["threads"], storage_options=storage_options,
        )  # fmt: skip
        if kw["slurm_spec"]:
            _submit(cfg, kw["slurm_spec"], kw["slurm_folder"])
            return
        r = run_extract(cfg, progress=not quiet)
    except KeyboardInterrupt:
        _echo_err("Interrupted before extraction started; nothing was written")
        sys.exit(130)
    except ExtractionInterrupted as e:  # Ctrl-C: finished shards are kept; 130 as shells report SIGINT
        _echo_err(f"Interrupted: {e}")
        sys.exit(130)
    done = r.n - r.failed - r.pending
    if r.manifest_replaced:
        click.echo(
            f"{r.set_name}: same images, new splits/labels/metadata taken from the manifest (features kept)"
        )
    if r.world > 1:  # one line per worker; the set is complete only once every worker has finished
        click.echo(
            f"{r.set_name}: worker {r.rank}/{r.world}: {r.shards_mine} of {r.shards} shards "
            f"({r.shards_skipped} already done), {r.processed} rows processed in {r.seconds:.1f} s "
            f"({_rate(r.images_per_s)} img/s); set so far {done}/{r.n} rows done, {r.failed} failed, "
            f"{r.pending} pending (complete when all {r.world} workers finish)"
        )
    else:
        click.echo(
            f"{r.set_name}: {done}/{r.n} rows done, {r.failed} failed, {r.pending} pending "
            f"({r.processed} processed in {r.seconds:.1f} s, {_rate(r.images_per_s)} img/s; {r.shards_skipped} shards already done)"
        )
    for f in r.failures:
        _echo_err(f"failed: {f['id']}: {f['reason']}")
    if r.failed:
        sys.exit(3)


def _submit(cfg, spec: str, folder: str) -> None:
    from featcache.extract.slurm import parse_slurm_spec, slurm_layout, submit_slurm

    parsed = parse_slurm_spec(spec)
    jobs = submit_slurm(cfg, parsed, folder)
    array, tasks = slurm_layout(parsed)
    click.echo(
        f"submitted {len(jobs)} SLURM job(s) ({array} x {tasks} tasks = {array * tasks} workers), first job id "
        f"{jobs[0].job_id if jobs else '-'}; logs in {folder}; re-run the same command without --slurm "
        "(or `featcache ls`) to check the set"
    )


@featcache.command(name="ls")
@click.argument("cache")
@storage_options_option
@_one_line_errors
def ls_cmd(cache: str, storage_options: dict | None = None) -> None:
    """List the feature sets of a store: rows done/failed/pending and bytes per image.

    A set that cannot be read is listed with what is wrong instead of its counts.

    Example: featcache ls cache/
    """
    from featcache.errors import StoreError
    from featcache.store.feature_store import FAILED, OK, PENDING, FeatureStore

    store = FeatureStore(cache, storage_options=storage_options)
    sets = store.list_sets()
    if not sets:
        click.echo(f"{cache}: no feature sets")
        return
    click.echo(f"{'set':40} {'rows':>7} {'done':>7} {'failed':>7} {'pending':>7} {'bytes/img':>10}  arrays")
    for name in sets:
        try:
            fs = store.open_set(name)
            st = fs.status
            stored = sum(s or 0 for _, s in fs.bytes_per_row().values())
        except StoreError as e:
            click.echo(f"{name:40} damaged: {e}")
            continue
        click.echo(
            f"{name:40} {fs.n:>7} {int((st == OK).sum()):>7} {int((st == FAILED).sum()):>7} "
            f"{int((st == PENDING).sum()):>7} {_fmt_bytes(stored):>10}  {','.join(fs.arrays())}"
        )


def _rate(per_s: float) -> str:
    """Images per second with two significant digits (a 7B model on a CPU runs at 0.24 img/s)."""
    return f"{per_s:.2g}" if per_s < 10 else f"{per_s:.0f}"


@featcache.command()
@click.argument("cache")
@click.argument("set_name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the attributes as JSON.")
@storage_options_option
@_one_line_errors
def info(cache: str, set_name: str | None, as_json: bool, storage_options: dict | None = None) -> None:
    """Show a feature set's provenance, arrays, bytes per image and failures.

    Example: featcache info cache/ nih/dinov3-vitb16/512
    """
    import json

    from featcache.store.feature_store import FeatureStore

    fs = FeatureStore(cache, storage_options=storage_options).open_set(set_name)
    if as_json:
        click.echo(json.dumps(fs.attrs, indent=2, sort_keys=True, default=str))
        return
    a, rec = fs.attrs, fs.record
    prov = a.get("provenance", {})
    click.echo(f"set:            {fs.name}")
    click.echo(
        f"model:          {rec.model} ({prov.get('source', a.get('source', '?'))}: {rec.weights or '?'})"
    )
    click.echo(
        f"resolution:     {rec.res} px; preprocessing {rec.preprocessing}; compute {rec.compute_dtype}"
    )
    click.echo(
        f"tokens:         {','.join(rec.tokens)}; layers {list(rec.layers) or '-'}; patch pool {rec.patch_pool}"
    )
    click.echo(f"manifest:       {a.get('manifest')} (sha256 {str(a.get('manifest_digest'))[:16]}...)")
    click.echo(f"task:           {fs.task}; labels {fs.label_names or fs.class_names or '-'}")
    click.echo(
        f"rows:           {fs.n} ({int(fs.ok.sum())} ok, {len(fs.failures())} failed); shard rows {fs.shard_rows}"
    )
    click.echo(f"device:         {a.get('device')}; versions {a.get('versions')}")
    click.echo(f"created:        {a.get('created')}; updated {a.get('updated', '-')}")
    click.echo(
        f"integrity:      format {a.get('format_version')}; "
        + (
            "crc32c checksum on every chunk"
            if fs.checksummed
            else "no checksums (written by an older featcache)"
        )
    )
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
@click.option(
    "--repair",
    is_flag=True,
    help="Mark the shards holding damage pending, so the next `featcache extract` redoes exactly them.",
)
@storage_options_option
@_one_line_errors
def verify(cache: str, set_name: str | None, repair: bool, storage_options: dict | None = None) -> None:
    """Read every chunk of every feature set (or one) and check it; one line per problem, exit 1 on any.

    Checks checksums, chunks of rows marked done, status values, attributes against the
    arrays and the manifest digest against the stored columns. Exit codes: 0 all well, 1 a
    problem (or an unreadable store). See docs/RELIABILITY.md.

    Example: featcache verify cache/ ; featcache verify --repair cache/ && featcache extract ...
    """
    from featcache.errors import StoreError
    from featcache.store.check import verify_set
    from featcache.store.feature_store import FeatureStore

    store = FeatureStore(cache, mode="a" if repair else "r", storage_options=storage_options)
    names = [set_name] if set_name else store.list_sets()
    if not names:
        raise click.ClickException(f"{cache}: no feature sets to verify")
    bad = 0
    for name in names:
        try:
            problems, shards = verify_set(store.open_set(name), repair=repair)
        except StoreError as e:
            problems, shards = [str(e)], []
        bad += bool(problems)
        if not problems:
            click.echo(f"{name}: ok")
        for p in problems:
            click.echo(f"{name}: {p}")
        if repair and shards:
            click.echo(
                f"{name}: repaired: shard(s) {shards} marked pending; re-run `featcache extract` to redo them"
            )
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


for _command in DATA_COMMANDS:
    featcache.add_command(_command)
