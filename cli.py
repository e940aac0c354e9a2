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

from featcache.errors import ExtractionInterrupted, FeatcacheError


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
        return fn(**kwargs)

    return wrapper


@click.group()
@click.version_option(package_name="featcache")
@_verbosity_options
def featcache() -> None:
    """Embed a dataset once with a frozen vision backbone into a feature store.

    Start with `featcache demo`, then `featcache extract --help`.
    """


@click.group()
@click.version_option(package_name="featcache")
@_verbosity_options
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


_LABELS_HELP = (
    "Label columns, comma-separated; other columns are kept as metadata "
    "[default: inferred: columns whose values are all 1/0/-1/blank]."
)


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
@_one_line_errors
def extract(**kw) -> None:
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
            labels=tuple(_csv_list(kw["labels"])) or None, threads=kw["threads"],
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
            f"({r.images_per_s:.1f} img/s); set so far {done}/{r.n} rows done, {r.failed} failed, "
            f"{r.pending} pending (complete when all {r.world} workers finish)"
        )
    else:
        click.echo(
            f"{r.set_name}: {done}/{r.n} rows done, {r.failed} failed, {r.pending} pending "
            f"({r.processed} processed in {r.seconds:.1f} s, {r.images_per_s:.1f} img/s; {r.shards_skipped} shards already done)"
        )
    for f in r.failures:
        _echo_err(f"failed: {f['id']}: {f['reason']}")
    if r.failed:
        sys.exit(3)


def _submit(cfg, spec: str, folder: str) -> None:
    from featcache.launch import parse_slurm_spec, slurm_layout, submit_slurm

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
@_one_line_errors
def ls_cmd(cache: str) -> None:
    """List the feature sets of a store: rows done/failed/pending and bytes per image.

    A set that cannot be read is listed with what is wrong instead of its counts.

    Example: featcache ls cache/
    """
    from featcache.errors import StoreError
    from featcache.store import FAILED, OK, PENDING, FeatureStore

    store = FeatureStore(cache)
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
@_one_line_errors
def verify(cache: str, set_name: str | None, repair: bool) -> None:
    """Read every chunk of every feature set (or one) and check it; one line per problem, exit 1 on any.

    Checks checksums, chunks of rows marked done, status values, attributes against the
    arrays and the manifest digest against the stored columns. Exit codes: 0 all well, 1 a
    problem (or an unreadable store). See docs/RELIABILITY.md.

    Example: featcache verify cache/ ; featcache verify --repair cache/ && featcache extract ...
    """
    from featcache.errors import StoreError
    from featcache.store import FeatureStore
    from featcache.store_check import verify_set

    store = FeatureStore(cache, mode="a" if repair else "r")
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


# ---- featcache dataset commands (manifest, split, check, export, import) ----


@featcache.group()
def manifest() -> None:
    """Build a manifest CSV from a public dataset's official files (labels renamed to one vocabulary).

    Example: featcache manifest nih --root /data/nih --out nih.csv
    """


def _adapter_options(fn):
    """--root, --out and --no-check-files, shared by every `featcache manifest` command."""
    fn = click.option(
        "--no-check-files",
        is_flag=True,
        help="Do not look for the images on disk (documented paths are used).",
    )(fn)
    fn = click.option("--out", required=True, help="Manifest CSV to write.")(fn)
    return click.option(
        "--root", required=True, help="The dataset's folder (its official files and images)."
    )(fn)


def _build(dataset: str, root: str, out: str, no_check_files: bool, **options) -> None:
    from featcache.datasets import build_manifest

    built = build_manifest(dataset, root, out, check_files=not no_check_files, **options)
    click.echo(f"wrote {built.out}: {built.summary()}")
    for note in built.notes:
        _echo_err(f"note: {note}")
    click.echo(
        f"paths are relative to {built.root}: pass --root {built.root} to `featcache extract` and `check`"
    )


@manifest.command(name="nih")
@_adapter_options
@click.option(
    "--val", default=0.1, show_default=True, type=float, help="Share of train_val images carved into val."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the val carve.")
@click.option("--no-official-split", is_flag=True, help="Ignore train_val_list.txt / test_list.txt.")
@_one_line_errors
def manifest_nih(root, out, no_check_files, val, seed, no_official_split) -> None:
    """NIH ChestX-ray14 (entry file, official split lists).

    Reads Data_Entry_2017(_v2020).csv, train_val_list.txt / test_list.txt and the images*/ folders.

    Example: featcache manifest nih --root /data/nih --out nih.csv
    """
    _build("nih", root, out, no_check_files, val=val, seed=seed, official_split=not no_official_split)


@manifest.command(name="chexpert")
@_adapter_options
@click.option("--views", type=click.Choice(["frontal", "all"]), default="frontal", show_default=True)
@click.option(
    "--valid-as",
    type=click.Choice(["test", "val"]),
    default="test",
    show_default=True,
    help="Split of the official valid.csv (radiologist consensus).",
)
@click.option(
    "--val", default=0.1, show_default=True, type=float, help="With --valid-as test: val share of train."
)
@click.option("--seed", default=0, show_default=True, type=int)
@_one_line_errors
def manifest_chexpert(root, out, no_check_files, views, valid_as, val, seed) -> None:
    """CheXpert (train.csv and valid.csv).

    Uncertain labels are kept as -1, unmentioned ones blank; valid.csv is the test split by default.

    Example: featcache manifest chexpert --root /data/chexpert --out chexpert.csv --views frontal
    """
    _build("chexpert", root, out, no_check_files, views=views, valid_as=valid_as, val=val, seed=seed)


@manifest.command(name="mimic-cxr-jpg")
@_adapter_options
@click.option("--views", type=click.Choice(["frontal", "all"]), default="frontal", show_default=True)
@click.option("--labeler", type=click.Choice(["chexpert", "negbio"]), default="chexpert", show_default=True)
@_one_line_errors
def manifest_mimic(root, out, no_check_files, views, labeler) -> None:
    """MIMIC-CXR-JPG (metadata, labels, official split).

    Reads mimic-cxr-2.0.0-{metadata,chexpert,split}.csv and the files/p*/ images.

    Example: featcache manifest mimic-cxr-jpg --root /data/mimic-cxr-jpg/2.0.0 --out mimic.csv
    """
    _build("mimic-cxr-jpg", root, out, no_check_files, views=views, labeler=labeler)


@manifest.command(name="vindr-cxr")
@_adapter_options
@click.option(
    "--aggregate",
    type=click.Choice(["majority", "any"]),
    default="majority",
    show_default=True,
    help="How the 3 training radiologists are combined (the test set is a consensus).",
)
@_one_line_errors
def manifest_vindr(root, out, no_check_files, aggregate) -> None:
    """VinDr-CXR (image labels of train and test).

    Reads annotations/image_labels_{train,test}.csv and the train/ and test/ images.

    Example: featcache manifest vindr-cxr --root /data/vindr-cxr/1.0.0 --out vindr.csv
    """
    _build("vindr-cxr", root, out, no_check_files, aggregate=aggregate)


@manifest.command(name="rsna-pneumonia")
@_adapter_options
@_one_line_errors
def manifest_rsna(root, out, no_check_files) -> None:
    """RSNA Pneumonia challenge (stage 2 train labels).

    Reads stage_2_train_labels.csv (one row per box) and the stage_2_train_images/ files.

    Example: featcache manifest rsna-pneumonia --root /data/rsna --out rsna.csv
    """
    _build("rsna-pneumonia", root, out, no_check_files)


@manifest.command(name="padchest")
@_adapter_options
@click.option("--views", type=click.Choice(["frontal", "all"]), default="frontal", show_default=True)
@_one_line_errors
def manifest_padchest(root, out, no_check_files, views) -> None:
    """PadChest (the PADCHEST labels CSV).

    Reads PADCHEST_chest_x_ray_images_labels_*.csv (Labels as a list literal) and its images.

    Example: featcache manifest padchest --root /data/padchest --out padchest.csv
    """
    _build("padchest", root, out, no_check_files, views=views)


@manifest.command(name="pediatric-pneumonia")
@_adapter_options
@click.option("--classes", type=click.Choice(["binary", "pathogen"]), default="binary", show_default=True)
@click.option("--no-official-split", is_flag=True, help="Leave the split blank instead of using the folders.")
@_one_line_errors
def manifest_pediatric(root, out, no_check_files, classes, no_official_split) -> None:
    """Kermany pediatric pneumonia (chest_xray folders).

    Lists chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg; patient ids from file names.

    Example: featcache manifest pediatric-pneumonia --root /data/chest_xray --out kermany.csv
    """
    _build(
        "pediatric-pneumonia",
        root,
        out,
        no_check_files,
        classes=classes,
        official_split=not no_official_split,
    )


@manifest.command(name="folder")
@_adapter_options
@_one_line_errors
def manifest_folder(root, out, no_check_files) -> None:
    """One folder per class (ROOT/<class>/*.png).

    ROOT/<split>/<class>/*.png also works: the split folders become the splits.

    Example: featcache manifest folder --root /data/tb --out tb.csv
    """
    _build("folder", root, out, no_check_files)


@manifest.command(name="medmnist")
@_adapter_options
@click.option("--class-names", help="Comma-separated names of the class indices (default: MedMNIST's own).")
@_one_line_errors
def manifest_medmnist(root, out, no_check_files, class_names) -> None:
    """MedMNIST .npz: writes PNGs and a manifest.

    --root is the .npz file; the PNGs go to a folder named after the manifest, beside it.

    Example: featcache manifest medmnist --root pneumoniamnist.npz --out pmnist/pneumoniamnist.csv
    """
    names = [c.strip() for c in class_names.split(",")] if class_names else None
    _build("medmnist", root, out, no_check_files, class_names=names)


@featcache.command()
@click.argument("manifest_csv")
@click.option("--out", required=True, help="Manifest CSV to write (may be the input).")
@click.option(
    "--by", default="patient", show_default=True, help="patient, or a meta_* column kept whole too."
)
@click.option("--val", default=0.1, show_default=True, type=float, help="Share of all images for val.")
@click.option("--test", default=0.2, show_default=True, type=float, help="Share of all images for test.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--stratify", help="Label columns to stratify on (comma-separated), 'all', or 'label'.")
@click.option("--overwrite", is_flag=True, help="Re-assign rows that already have a split.")
@_one_line_errors
def split(manifest_csv, out, by, val, test, seed, stratify, overwrite) -> None:
    """Assign patient-level train/val/test splits (seeded, optionally stratified); set splits are kept.

    Example: featcache split nih.csv --val 0.1 --test 0.2 --seed 0 --stratify all --out nih.split.csv
    """
    from featcache.datasets import split_manifest

    result = split_manifest(
        manifest_csv, out, val=val, test=test, seed=seed, stratify=stratify, by=by, overwrite=overwrite
    )
    click.echo(result.summary())
    for label, shares in result.prevalence.items():
        click.echo(f"  {label:28} " + "  ".join(f"{s} {100 * v:5.2f}%" for s, v in shares.items()))
    total = sum(c["images"] for c in result.counts.values()) or 1
    for name, want in (("val", val), ("test", test)):
        got = result.counts.get(name, {}).get("images", 0) / total
        if abs(got - want) > 0.05:
            why = (
                "rows that already had a split kept it (--overwrite re-assigns them)"
                if result.kept
                else (f"whole groups ({by}) cannot be cut finer")
            )
            _echo_err(f"warning: {name} holds {100 * got:.1f}% of the images, not {100 * want:.0f}%: {why}")


@featcache.command()
@click.argument("manifest_csv")
@click.option("--root", help="Folder the paths are relative to [default: the manifest's folder].")
@click.option("--no-check-files", is_flag=True, help="Do not check that the image files exist.")
@click.option("--labels", help=_LABELS_HELP)
@_one_line_errors
def check(manifest_csv, root, no_check_files, labels) -> None:
    """Check a manifest (leakage, duplicate ids, label values, missing files) and count each split.

    Example: featcache check nih.split.csv --root /data/nih
    """
    from featcache.datasets import check_manifest

    report = check_manifest(
        manifest_csv, root, check_files=not no_check_files, labels=_csv_list(labels) or None
    )
    click.echo(report.render())
    for w in report.warnings:
        _echo_err(f"warning: {w}")
    click.echo(f"ok: {report.source} passes every check")


@featcache.command()
@click.argument("cache")
@click.argument("set_name", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["h5", "npz"]), help="[default: from --out, h5 unless .npz]"
)
@click.option("--out", required=True, help="File to write.")
@click.option("--patch", is_flag=True, help="Also export the patch tokens (large).")
@_one_line_errors
def export(cache, set_name, fmt, out, patch) -> None:
    """Export a feature set (features, ids, patients, splits, labels, provenance) to HDF5 or npz.

    Example: featcache export cache/ nih/dinov3-vitb16/512 --format h5 --out nih-vitb16.h5
    """
    from featcache.interop import export_set

    path = export_set(cache, set_name, out, fmt, patch=patch)
    click.echo(f"wrote {path}")


@featcache.command(name="import")
@click.argument("file")
@click.option(
    "--format", "fmt", type=click.Choice(["h5", "npz"]), help="[default: from FILE, h5 unless .npz]"
)
@click.option("--out", required=True, help="Feature store to write into (created if absent).")
@click.option("--name", required=True, help="Feature set name, e.g. nih/other-model/224.")
@click.option("--manifest", "manifest_csv", required=True, help="Manifest whose ids the file's ids refer to.")
@click.option("--root", help="The manifest's root [default: its folder].")
@click.option(
    "--features-key", default="features", show_default=True, help="Dataset(s) of features, comma-separated."
)
@click.option("--ids-key", default="ids", show_default=True, help="Dataset of ids.")
@click.option("--as", "as_array", default="cls", show_default=True, help="Array name for a features key.")
@click.option(
    "--missing",
    type=click.Choice(["fail", "error"]),
    default="fail",
    show_default=True,
    help="Manifest ids not in the file: failed rows, or an error.",
)
@click.option(
    "--model", default="imported", show_default=True, help="Model name to record (non-featcache files)."
)
@_one_line_errors
def import_cmd(
    file, fmt, out, name, manifest_csv, root, features_key, ids_key, as_array, missing, model
) -> None:
    """Import features computed elsewhere (HDF5/npz: features + ids) as a feature set the probes accept.

    Example: featcache import feats.h5 --format h5 --out cache/ --name nih/other/224 --manifest nih.csv
    """
    from featcache.interop import import_h5

    result = import_h5(
        file,
        out,
        name,
        manifest=manifest_csv,
        root=root,
        features_key=features_key,
        ids_key=ids_key,
        as_array=as_array,
        format=fmt,
        missing=missing,
        model=model,
    )
    click.echo(result.summary())


# ---- dense and 3D commands (probes seg, featcache volumes, featcache pca) ----


@probes.command()
@click.option("--cache", required=True, help="Feature store folder or fsspec URL.")
@click.option("--set", "set_name", help="Feature set with patch tokens and masks [default: the only set].")
@click.option("--head", default="linear", show_default=True, type=click.Choice(["linear", "conv", "unet"]))
@click.option(
    "--layers",
    default="last",
    show_default=True,
    help="Token layers: last, last4, or model layer indices 8,11 (needs --tokens patch --layers at extraction).",
)
@click.option(
    "--protocol",
    type=click.Choice(["dinov2-radiology-linear"]),
    help="The DINOv2-radiology study's linear decoder (Dice loss, SGD, its learning-rate grid).",
)
@click.option("--stages", default=2, show_default=True, type=int, help="unet head: x2 upsampling stages.")
@click.option("--hidden", default=128, show_default=True, type=int, help="conv/unet head width.")
@click.option("--structures", help="Names of mask labels 1,2,... e.g. lung,heart [default: structure_1...].")
@click.option(
    "--epochs", type=int, help="Maximum epochs, early stopping on val [default: 100; the protocol's 10]."
)
@click.option("--batch-size", type=int, help="Training batch [default: 16; the protocol's 128].")
@click.option("--lr", type=float, help="AdamW learning rate [default: 1e-2 linear, 1e-3 conv].")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Training, bootstrap and carved-val seed."
)
@click.option(
    "--bootstrap",
    "n_boot",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Patient bootstrap draws.",
)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="Train patients carved into val if none.",
)
@click.option(
    "--scored-at",
    default="mask",
    show_default=True,
    type=click.Choice(["mask", "model"]),
    help="Score in each mask's own pixels (mask) or in the model's input frame (model).",
)
@click.option(
    "--scored-per",
    default="slice",
    show_default=True,
    type=click.Choice(["slice", "volume"]),
    help="volume: slices of a `featcache volumes` set stacked back and scored as volumes.",
)
@click.option("--root", type=click.Path(file_okay=False), help="Mask root [default: the extraction's root].")
@click.option("--save-masks", type=click.Path(file_okay=False), help="Write predicted test masks (PNG) here.")
@click.option("--out", type=click.Path(dir_okay=False), help="Append result rows to this JSONL file.")
@_one_line_errors
def seg(
    cache, set_name, head, layers, protocol, stages, hidden, structures, epochs, batch_size, lr, seed, n_boot,
    val_fraction, scored_at, scored_per, root, save_masks, out,
) -> None:  # fmt: skip
    """Segmentation probe on patch tokens vs the mean-training-mask baseline: Dice, Jaccard, HD95 with CIs.

    Example: probes seg --cache cache/ --set demo/random-dinov3-vits16/112 --head linear --out results.jsonl
    """
    from probes.seg import run_seg

    rows = run_seg(
        cache, set_name, head=head, layers=None if layers == "last" else layers, protocol=protocol, stages=stages,
        hidden=hidden, structures=_csv_list(structures) or None, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, n_boot=n_boot, val_fraction=val_fraction, scored_at=scored_at, scored_per=scored_per, root=root,
        save_masks=save_masks, out=out,
    )  # fmt: skip
    _echo_header(rows, f"seg head={head}")
    p0 = rows[0].get("params") or {}
    unit = p0.get("hd95_unit", "px")
    click.echo(f"scored at: {p0.get('scored_at')} frame; HD95 in {unit}")
    if p0.get("hd95_px_because"):
        click.echo(f"note: {p0['hd95_px_because']}")
    click.echo(f"{'probe':13} {'label':16} {'Dice [95% CI]':26} {'Jaccard':>8} {'HD95 ' + unit:>8}")
    by = {(r["probe"], r["label"], r["metric"]): r for r in rows}
    for probe_name, label, _ in [k for k in by if k[2] == "dice"]:
        jac, hd = by[(probe_name, label, "jaccard")], by[(probe_name, label, "hd95")]
        j = f"{jac['value']:.3f}" if jac.get("value") is not None else "n/a"
        h = f"{hd['value']:.1f}" if hd.get("value") is not None else "n/a"
        click.echo(f"{probe_name:13} {label:16} {_fmt_ci(by[(probe_name, label, 'dice')]):26} {j:>8} {h:>8}")
    if save_masks:
        click.echo(f"predicted test masks written to {save_masks}")
    _echo_written(rows, out)


@featcache.command()
@click.argument("manifest_csv", type=click.Path(dir_okay=False))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Folder for slices and manifest.csv."
)
@click.option(
    "--root", type=click.Path(file_okay=False), help="Volume root [default: the manifest's folder]."
)
@click.option(
    "--axis",
    default=2,
    show_default=True,
    type=click.IntRange(0, 2),
    help="2 axial, 1 coronal, 0 sagittal (RAS).",
)
@click.option(
    "--window",
    default="percentile",
    show_default=True,
    help="lung|mediastinum|abdomen|bone|brain, W,L (e.g. 400,40) or percentile[:LOW,HIGH].",
)
@click.option("--every", default=1, show_default=True, type=int, help="Keep every N-th slice.")
@click.option("--frame", type=int, help="Time point of 4-D files (they are refused without it).")
@_one_line_errors
def volumes(manifest_csv, out, root, axis, window, every, frame) -> None:
    """Expand 3D volumes (NIfTI, DICOM series folders, multi-frame DICOM) into 16-bit PNG slices and a manifest.

    Example: featcache volumes vols.csv --out slices/ --axis 2 --window lung && featcache extract --data slices/manifest.csv ...
    """
    from featcache.volumes import expand_volumes

    result = expand_volumes(manifest_csv, out, root=root, axis=axis, window=window, every=every, frame=frame)
    click.echo(result.summary())


@featcache.command()
@click.option("--cache", required=True, help="Feature store folder or fsspec URL.")
@click.option("--set", "set_name", help="Feature set with patch tokens [default: the store's only set].")
@click.option("--ids", required=True, help="Comma-separated row ids of the images to show.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option(
    "--threshold",
    type=float,
    is_flag=False,
    flag_value=0.5,
    help="Foreground threshold on the scaled first component (alone: 0.5); background black.",
)
@click.option("--root", type=click.Path(file_okay=False), help="Image root [default: the extraction's root].")
@click.option("--cell", type=int, help="Pixels per image side [default: the resolution, 224..512].")
@_one_line_errors
def pca(cache, set_name, ids, out, threshold, root, cell) -> None:
    """Picture of the images and their joint patch-token PCA (3 components as RGB), side by side.

    Example: featcache pca --cache cache/ --set demo/random-dinov3-vits16/112 --ids p000_0,p001_0 --out pca.png --threshold
    """
    from featcache.pca import pca_picture

    r = pca_picture(cache, set_name, ids=_csv_list(ids), out=out, threshold=threshold, root=root, cell=cell)
    shown = ", ".join(f"{v:.1%}" for v in r.explained)
    fg = f", foreground {r.foreground:.0%} of patches" if threshold is not None else ""
    click.echo(
        f"wrote {r.path} ({r.size[0]}x{r.size[1]} px, {len(r.ids)} images; variance explained {shown}{fg})"
    )
    if threshold is not None:
        for rid, f in zip(r.ids, r.foreground_per_image):
            if f == 0.0 or f == 1.0:
                _echo_err(
                    f"warning: {rid}: {'no' if f == 0 else 'every'} patch is foreground at --threshold {threshold}"
                )


# ---- probes commands ----


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
    return fn


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
    type=click.Choice(["flat", "bf16"]),
    help="flat: exact FAISS float32; bf16: bf16 candidates + exact float32 re-rank (same neighbours).",
)
@click.option("--by", help=_BY_HELP)
@_no_carve_options
@_one_line_errors
def knn(
    cache, set_name, features, labels, uncertain, aggregate, allow_partial, out, k, temperature, method, s, search,
    by, n_boot, seed,
) -> None:  # fmt: skip
    """kNN probe (dinov2 knn.py by default, or ML-kNN): AUROC per label and mean, with patient CIs.

    Example: probes knn --cache cache/ --set nih/dinov3-vitb16/512 --k 10,20 --out results.jsonl
    """
    from probes.run import run_knn

    rows = run_knn(
        cache, set_name, features=features, k=_int_list(k, "--k"), temperature=temperature, method=method, s=s,
        search=search, labels=_csv_list(labels) or None, uncertain=uncertain, n_boot=n_boot, seed=seed,
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
@click.option("--html", type=click.Path(dir_okay=False), help="One self-contained HTML report.")
@click.option(
    "--parquet", type=click.Path(dir_okay=False), help="Numeric records as Parquet (pandas+pyarrow)."
)
@_one_line_errors
def report(
    results, by, columns, table_kind, fmt, metric, label, where, k, plot, plot_resolution, plot_forest,
    plot_compare, plot_k, html, parquet,
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
        plot_forest=plot_forest, plot_compare=plot_compare, plot_k=plot_k, html=html, parquet=parquet,
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
@_one_line_errors
def external(
    cache, train_set, test_set, test_cache, test_split, probe_name, features, labels, uncertain, k, method, C,
    C_grid, by, out, n_boot, seed, val_fraction,
) -> None:  # fmt: skip
    """External validation: fit on one set's train (+ val) rows, score another set, shared labels only.

    Example: probes external --cache cache/ --train-set nih/m/512 --test-set chexpert/m/512 --out results.jsonl
    """
    from probes.external import external_lines, run_external
    from probes.logreg import DEFAULT_C_GRID

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


# ---- featcache study (a plan of datasets x backbones x resolutions x probes) ----


@featcache.group()
def study() -> None:
    """Run a whole study from one TOML plan: extraction, every probe, the report (docs/STUDY.md)."""


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
    from featcache.study import StudyError, load_plan
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
    from featcache.study import load_plan, plan_steps, render_plan
    from probes.study_run import complete_sets, done_steps

    plan = load_plan(plan_toml)
    extractions, steps = plan_steps(plan)
    text = render_plan(
        plan, extractions, steps, extracted=complete_sets(plan, extractions), done=done_steps(plan.results),
        tflops=tflops, mfu=mfu,
    )  # fmt: skip
    click.echo(text.rstrip("\n"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(featcache())
