"""``se-inject inject MODEL``: plan the units, print the overhead report; optionally check and save."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from se_inject.cli import options as opt
from se_inject.cli.render import console, count, gflops, print_json, table

if TYPE_CHECKING:
    from se_inject.surgery.report import OverheadReport


@opt.takes_injection_options
def command(
    ctx: typer.Context,
    injection: dict[str, Any],
    model: str = typer.Argument(..., help=opt.MODEL_HELP),
    input_size: int | None = opt.input_size_option(
        "spatial size FLOPs are counted at (default: the model's own, else 224)"
    ),
    in_chans: int | None = opt.in_chans_option(),
    checkpoint: str | None = opt.checkpoint_option(),
    pretrained: bool = opt.pretrained_option(),
    num_classes: int | None = opt.num_classes_option("classes of the model's head (e.g. of a fine-tuned checkpoint)"),
    head: str | None = opt.finetune_option("head"),
    check: bool = typer.Option(
        False, "--check", help="run original and injected on one batch; print the largest output difference"
    ),
    save_dir: str | None = typer.Option(
        None, "--save", help="write the injected model (safetensors + recipe.json) to DIR"
    ),
    force: bool = typer.Option(False, "--force", help="with --save: replace an existing DIR"),
    save_weights: str = opt.finetune_option("save_weights"),
    as_json: bool = opt.json_option("report"),
    show_sites: bool = typer.Option(False, "--sites", help="list every unit with its stage, block and channels"),
) -> None:
    """Plan SE units for MODEL and print the overhead report.

    The model is built on the meta device (no weights) unless --checkpoint, --pretrained, --check
    or --save need real ones.
    """
    from se_inject.api import check_outputs, retrofit
    from se_inject.config import InjectConfig
    from se_inject.io.models import head_kwargs, load_model
    from se_inject.io.saving import save

    config = InjectConfig.from_dict(injection)
    opt.check_save_target(save_dir, force)  # before any work is done
    needs_weights = bool(checkpoint or pretrained or check or save_dir)
    network = load_model(
        model,
        device="cpu" if needs_weights else "meta",
        pretrained=pretrained,
        checkpoint=checkpoint,
        **head_kwargs(num_classes),
    )
    result = retrofit(network, config, input_size=input_size, model_name=model, head=head, in_chans=in_chans)
    difference = check_outputs(network, result.model, input_size=input_size, in_chans=in_chans) if check else None
    saved = save(result.model, save_dir, force=force, weights=save_weights) if save_dir else None
    if as_json:
        data = result.report.to_dict()
        data.update({"check_max_abs_diff": difference} if check else {})
        data.update({"saved": str(saved)} if saved else {})
        print_json(data)
        return
    out = console()
    render_report(result.report, show_sites, out)
    if difference is not None:
        out.print(f"check: max |injected - original| = {difference:.3g} on one batch in eval mode ({config.init} init)")
    if saved is not None:
        out.print(f"saved to {saved}/ (model.safetensors, recipe.json); load with se_inject.load('{saved}')")


def render_report(report: OverheadReport, show_sites: bool, out: Console) -> None:
    """The plan and the overhead report as rich tables."""
    r_text = ",".join(map(str, report.r)) if isinstance(report.r, list) else str(report.r)
    out.print(
        f"[bold]{report.model}[/]: {len(report.sites)} {report.unit.upper()} units at position "
        f"[bold]{report.position}[/], r={r_text}, input {report.input_size[0]}x{report.input_size[1]}"
    )
    if show_sites:
        out.print(_sites_table(report))
    out.print(_stages_table(report))
    _print_totals(report, out)


def _sites_table(report: OverheadReport) -> Any:
    columns = ("unit", "rule", "stage", "block", "C", "hidden", "r", "size", "params", "MFLOPs")
    sites = table("Units", columns, left=("unit",), no_wrap=True)
    for u in report.sites:
        cells = (u.name, u.rule, u.stage, u.block, u.channels, u.hidden, u.r, f"{u.size[0]}x{u.size[1]}")
        sites.add_row(*map(str, cells), count(u.params), f"{u.flops / 1e6:.3f}")
    return sites


def _stages_table(report: OverheadReport) -> Any:
    kind = report.unit.upper()
    predicted = "Eq.5 params" if report.unit == "se" else "predicted"
    columns = ("stage", "size", "N_s", "C_s", "r", predicted, "added", "GFLOPs", f"GFLOPs+{kind}")
    title = f"Overhead: {report.formula} vs. weights added; FLOPs at batch 1 (multiply-add = 2)"
    stages = table(title, columns, no_wrap=True)
    for s in report.stages:
        channels = str(s.channels) if isinstance(s.channels, int) else ",".join(map(str, sorted(set(s.channels))))
        stages.add_row(
            str(s.stage),
            f"{s.size[0]}x{s.size[1]}",
            f"{s.blocks}/{s.sites}",
            channels if s.blocks else "-",
            "-" if s.r is None else str(s.r),
            count(s.eq5_params),
            count(s.added_params),
            gflops(s.flops_before),
            gflops(s.flops_after),
        )
    t = report.totals
    totals = ("total", "", str(len(report.sites)), "", "", count(t.eq5_params), count(t.params_added))
    stages.add_row(*totals, gflops(t.flops_before), gflops(t.flops_after), style="bold")
    return stages


def _print_totals(report: OverheadReport, out: Console) -> None:
    t = report.totals
    out.print(
        f"params {t.params_before:,} -> {t.params_after:,} (+{t.params_increase:.2%}); "
        f"FLOPs {gflops(t.flops_before)}G -> {gflops(t.flops_after)}G (+{t.flops_increase:.2%})"
    )
    if t.macs_before:
        out.print(
            f"of which multiply-adds of conv/FC layers (the paper's GFLOPs) {gflops(t.macs_before)}G -> "
            f"{gflops(t.macs_after)}G (+{t.macs_increase:.2%}); elementwise FLOPs (pooling, scaling, gating) "
            f"{t.elementwise_before / 1e6:.1f}M -> {t.elementwise_after / 1e6:.1f}M"
        )
    agreement = "[green]agrees exactly[/]" if report.eq5_agrees else "[yellow]differs (hidden widths were rounded)[/]"
    out.print(f"{report.formula} {agreement} with the weights added")
    if report.existing_gates:
        shown = ", ".join(report.existing_gates[:4]) + (", ..." if len(report.existing_gates) > 4 else "")
        out.print(f"the model already has {len(report.existing_gates)} SE-like gates: {shown}")
    for note in report.notes:
        out.print(f"note: {note}")
