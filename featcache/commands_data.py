"""The ``featcache`` dataset commands: manifest (one per public dataset), split, check, export, import, volumes, pca.

Plain click commands; ``featcache.commands`` registers ``DATA_COMMANDS`` onto the
``featcache`` group.
"""

from __future__ import annotations

import click

from featcache.cli_util import _LABELS_HELP, _csv_list, _echo_err, _one_line_errors, storage_options_option


@click.group()
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


@click.command()
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


@click.command()
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


@click.command()
@click.argument("cache")
@click.argument("set_name", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["h5", "npz"]), help="[default: from --out, h5 unless .npz]"
)
@click.option("--out", required=True, help="File to write.")
@click.option("--patch", is_flag=True, help="Also export the patch tokens (large).")
@storage_options_option
@_one_line_errors
def export(cache, set_name, fmt, out, patch) -> None:
    """Export a feature set (features, ids, patients, splits, labels, provenance) to HDF5 or npz.

    Example: featcache export cache/ nih/dinov3-vitb16/512 --format h5 --out nih-vitb16.h5
    """
    from featcache.interop import export_set

    path = export_set(cache, set_name, out, fmt, patch=patch)
    click.echo(f"wrote {path}")


@click.command(name="import")
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


@click.command()
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
    from featcache.datasets.volumes import expand_volumes

    result = expand_volumes(manifest_csv, out, root=root, axis=axis, window=window, every=every, frame=frame)
    click.echo(result.summary())


@click.command()
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
@storage_options_option
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


DATA_COMMANDS = (manifest, split, check, export, import_cmd, volumes, pca)
