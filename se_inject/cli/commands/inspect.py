"""``se-inject inspect SAVED``: what every unit's gate does over a dataset."""

from __future__ import annotations

from typing import Any

import typer

from se_inject.cli import options as opt
from se_inject.cli.render import console, table

SAVED_HELP = "a directory written by --save or finetune"
VAL_DATA_HELP = "'digits', 'textures' or an image folder (its val/ split is used)"
IMAGE_SIZE_HELP = "image size (digits: 32, textures: 64, folders: the model's)"


def threshold_option(help: str) -> Any:
    return typer.Option(0.95, "--threshold", help=help)


def command(
    saved: str = typer.Argument(..., help=SAVED_HELP),
    data: str = typer.Option(..., "--data", help=VAL_DATA_HELP),
    out: str = typer.Option(..., "--out", help="where excitation.json and the PNG plots go"),
    unit_names: str | None = typer.Option(
        None, "--unit-names", help="units to plot, as stage_block (e.g. 1_1,3_2); default: first, middle, last"
    ),
    classes: int = typer.Option(4, "--classes", min=1, help="classes drawn in the per-unit plots"),
    threshold: float = threshold_option("saturation from which a unit is suggested for pruning"),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="stop after this many images"),
    input_size: int | None = opt.input_size_option(IMAGE_SIZE_HELP),
    trust_code: bool = opt.trust_code_option(),
    base: str | None = opt.base_option(),
) -> None:
    """Record what every unit's gate does over a dataset; write statistics, plots and pruning suggestions.

    SE, ESE, ECA, CECA, GE and GC (scale fusion) show their channel gate; CBAM shows its channel
    gate only (the spatial gate after it is not shown, and it cannot be pruned)."""
    from torch.utils.data import DataLoader

    from se_inject.inspect.excitation import collect, plot, unit_movement, write_json
    from se_inject.io.saving import load
    from se_inject.train.data import load_data, model_data_config

    chosen = opt.parse_names(unit_names, "--unit-names") or None
    model = load(saved, base=base, trust_code=trust_code)
    splits = load_data(data, input_size, model_data_config(model))
    report = collect(model, DataLoader(splits.val, batch_size=128), splits.classes, max_images=max_images)
    movement = unit_movement(model, splits, saved)  # from the start its fine-tuning run kept, if it did
    files = [write_json(report, out, threshold, movement), *plot(report, out, chosen, classes)]
    suggested = set(report.suggestions(threshold))
    output = console()
    output.print(_gates_table(report, suggested, movement))
    if movement is not None:
        output.print(movement.summary())
    for kind, shows in sorted({(u.kind, u.shows) for u in report.units if u.shows != "the channel gate"}):
        output.print(f"{kind} units: the statistics describe {shows}")
    output.print(f"wrote {', '.join(str(f) for f in files)}")
    if suggested:
        output.print(f"suggested: se-inject prune-se {saved} --data {data} --out PRUNED_DIR --threshold {threshold}")


def _gates_table(report: Any, suggested: set[str], movement: Any) -> Any:
    columns = ("unit", "stage", "block", "C", "mean gate", "std over images", "saturation", "moved", "prune?")
    gates = table(f"Excitation over {report.images} images", columns, left=("unit", "prune?"))
    moved = {m.name: f"{movement.figure(m):.2%}" for m in movement.units} if movement is not None else {}
    for u in report.units:
        cells = (u.name, str(u.stage), str(u.block), str(u.channels), f"{sum(u.mean) / len(u.mean):.3f}")
        stats = (f"{u.image_std:.4f}", f"{u.saturation:.3f}", moved.get(u.name, "-"))
        gates.add_row(*cells, *stats, "yes" if u.name in suggested else "")
    return gates
