"""``probes seg``: the segmentation probe on patch tokens (registered by ``probes.commands``).

torch is imported by the heads only when they train, inside ``probes.seg.run``.
"""

from __future__ import annotations

import click

from featcache.cli_util import (
    _csv_list,
    _echo_header,
    _echo_written,
    _fmt_ci,
    _one_line_errors,
    storage_options_option,
)


@click.command()
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
@storage_options_option
@_one_line_errors
def seg(
    cache, set_name, head, layers, protocol, stages, hidden, structures, epochs, batch_size, lr, seed, n_boot,
    val_fraction, scored_at, scored_per, root, save_masks, out,
) -> None:  # fmt: skip
    """Segmentation probe on patch tokens vs the mean-training-mask baseline: Dice, Jaccard, HD95 with CIs.

    Example: probes seg --cache cache/ --set demo/random-dinov3-vits16/112 --head linear --out results.jsonl
    """
    from probes.seg.run import run_seg

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
