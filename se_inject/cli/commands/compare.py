"""``se-inject compare MODEL``: measure candidate retrofits against the original, interleaved."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from se_inject.cli import options as opt
from se_inject.cli.commands.bench import (
    TIMED_SIZE_HELP,
    batch_option,
    compile_option,
    repeats_option,
    threads_option,
    warmup_option,
)
from se_inject.cli.render import show_then_plot, table, timing_progress


def axis_option(flag: str, what: str, example: str) -> Any:
    return typer.Option(None, flag, help=f"{what}, e.g. {example}")


def candidate_option(what: str) -> Any:
    help = f"one more {what} as OPTION=VALUE,... (e.g. 'include=layer4.*,r=8'; repeatable)"
    return typer.Option([], "--candidate", help=help)


def plot_option(help: str) -> Any:
    return typer.Option(None, "--plot", help=help)


@opt.takes_injection_options
def command(
    ctx: typer.Context,
    injection: dict[str, Any],
    model: str = typer.Argument(..., help=opt.MODEL_HELP),
    positions: str | None = axis_option("--positions", "positions to compare", "standard,pre,post"),
    ratios: str | None = axis_option("--ratios", "reduction ratios to compare", "8,16,32"),
    units: str | None = axis_option("--units", "unit types to compare", "se,eca,gc"),
    styles: str | None = axis_option("--styles", "styles to compare", "paper,timm"),
    candidate: list[str] = candidate_option("candidate"),
    batch: str | None = batch_option(),
    input_size: int | None = opt.input_size_option(TIMED_SIZE_HELP),
    repeats: int | None = repeats_option(),
    warmup: int = warmup_option(),
    threads: int | None = threads_option(),
    device: str = opt.device_option(),
    train: bool = typer.Option(False, "--train", help="also time a training step"),
    optimize: bool = typer.Option(
        False, "--optimize", help="measure each candidate after optimize_for_inference, where its units can fold"
    ),
    compile: bool = compile_option(),
    as_json: bool = opt.json_option("comparison"),
    plot_file: str | None = plot_option("write added latency against added weights (PNG)"),
) -> None:
    """Measure candidate retrofits of MODEL (positions x ratios x units x styles, and --candidate, each on
    top of the injection options given) against the original, interleaved: weights, FLOPs, latency with
    its spread, throughput, memory."""
    import torch

    from se_inject.io.models import load_model
    from se_inject.measure.compare import Candidate, candidates, check_plot_target, compare, plot
    from se_inject.runtime import resolve_device

    chosen = candidates(
        positions=opt.parse_names(positions, "--positions"),
        rs=opt.parse_ratios(ratios),
        units=opt.parse_names(units, "--units"),
        styles=opt.parse_names(styles, "--styles"),
        base=injection,
    )
    chosen += [Candidate(text, {**injection, **opt.parse_candidate(text)}) for text in candidate]
    if plot_file is not None:
        check_plot_target(plot_file)  # before any work is done
    if threads:
        torch.set_num_threads(threads)
    target = resolve_device(device)
    network = load_model(model, device="cpu")
    with timing_progress(as_json) as advance:
        result = compare(
            network,
            chosen,
            model_name=model,
            batches=opt.parse_batches(batch),
            size=input_size,
            repeats=repeats,
            warmup=warmup,
            train=train,
            device=target,
            optimize=optimize,
            compile=compile,
            progress=advance,
        )
    show_then_plot(result, as_json, render, plot, plot_file)


def render(result: Any, out: Console) -> None:
    """The comparison as two rich tables (what each candidate adds; how long it takes, as ratios to the
    original with their interquartile range), then the verdicts."""
    out.print(_cost_table(result))
    out.print(_time_table(result))
    measured = result.measured()
    for r in result.results:
        if r.error is not None:
            out.print(f"[red]not built[/]: {r.label}: {r.error}")
    if result.optimized:
        folded = ", ".join(f"{r.label} {r.optimized_units}/{r.units}" for r in measured)
        out.print(f"optimized for inference (units that squeeze before the last 1x1 conv): {folded}")
    out.print(f"memory: ratio of {result.memory_kind}")
    for b in result.batches:
        out.print(result.verdict(b))
    if any(r.train for r in measured):
        for b in result.batches:
            out.print("training step, " + result.verdict(b, "train"))


def _cost_table(result: Any) -> Any:
    columns = ["candidate", "units", "params", "MACs", "FLOPs", *[f"memory b{b}" for b in result.batches]]
    cost = table(f"{result.model}: what each candidate adds", columns, left=("candidate",))
    memory = [f"{result.original_memory[b] / 2**20:.1f} MiB" for b in result.batches]
    cost.add_row("original", "-", "-", "-", "-", *memory, style="bold")
    for r in result.measured():
        added = f"+{r.params_added:,} ({r.params_increase:+.2%})"
        cells = [r.label, str(r.units), added, f"{r.macs_increase:+.2%}", f"{r.flops_increase:+.2%}"]
        cost.add_row(*cells, *[f"{r.memory[b]:.3f}" for b in result.batches])
    return cost


def _time_table(result: Any) -> Any:
    measured = result.measured()
    training = any(r.train for r in measured)
    columns = ["candidate"]
    for b in result.batches:
        columns += [f"b{b} inference", f"b{b} img/s"] + ([f"b{b} train step"] if training else [])
    title = (
        f"time on {result.device} ({result.threads} threads, {result.size}x{result.size}"
        + (", all compiled" if result.compiled else "")
        + "): ratio to the original, median [25%, 75%] over interleaved rounds; images/s"
    )
    timed = table(title, columns, left=("candidate",))
    for column in timed.columns[1:]:
        column.no_wrap = True
    original = ["original"]
    for b in result.batches:
        original += [f"{result.original_ms[b]:.1f} ms", f"{result.original_images_per_s[b]:.1f}"]
        original += [""] if training else []
    timed.add_row(*original, style="bold")
    for r in measured:
        cells = [r.label]
        for b in result.batches:
            cells += [str(r.latency[b]), f"{r.images_per_s[b]:.1f}"] + ([str(r.train[b])] if training else [])
        timed.add_row(*cells)
    return timed
