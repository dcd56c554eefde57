"""``se-inject bench MODEL``: time MODEL, its retrofit and timm's SE twin, interleaved."""

from __future__ import annotations

from typing import Any

import typer
from rich.console import Console

from se_inject.cli import options as opt
from se_inject.cli.render import console, print_json, table, timing_progress


def batch_option() -> Any:
    return typer.Option(None, "--batch", help="batch sizes, e.g. 1,16 (default: 1,16 on the CPU, 256 on CUDA)")


def repeats_option() -> Any:
    help = "timed rounds per batch size, each model once per round (default: 50 at batch 1, 30 above)"
    return typer.Option(None, "--repeats", min=2, help=help)


def warmup_option() -> Any:
    return typer.Option(3, "--warmup", min=0, help="untimed calls per model first")


def threads_option() -> Any:
    return typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)")


def compile_option() -> Any:
    return typer.Option(False, "--compile", help="time every model under torch.compile (inductor)")


TIMED_SIZE_HELP = "spatial size of the timed input (default: 224)"


@opt.takes_injection_options
def command(
    ctx: typer.Context,
    injection: dict[str, Any],
    model: str = typer.Argument(..., help=opt.MODEL_HELP),
    batch: str | None = batch_option(),
    input_size: int | None = opt.input_size_option(TIMED_SIZE_HELP),
    repeats: int | None = repeats_option(),
    warmup: int = warmup_option(),
    threads: int | None = threads_option(),
    device: str = opt.device_option(),
    compile: bool = compile_option(),
    optimize: bool = typer.Option(
        False,
        "--optimize",
        help="also time the retrofit after optimize_for_inference (squeeze before the last 1x1 conv)",
    ),
    train: bool | None = typer.Option(None, "--train/--no-train", help="also time a training step (CUDA default)"),
    as_json: bool = opt.json_option("timings"),
) -> None:
    """Time MODEL, its retrofit and timm's hand-built SE twin, interleaved; report medians and ratios."""
    import torch

    from se_inject.config import InjectConfig
    from se_inject.io.models import load_model
    from se_inject.measure.bench import bench, twin_of
    from se_inject.runtime import resolve_device

    config = InjectConfig.from_dict(injection)
    batches = opt.parse_batches(batch)
    if threads:
        torch.set_num_threads(threads)
    twin_name = twin_of(model)
    with timing_progress(as_json) as progress:
        report = bench(
            load_model(model),
            config,
            twin=load_model(twin_name) if twin_name else None,
            batches=batches,
            size=input_size,
            repeats=repeats,
            warmup=warmup,
            train=train,
            device=resolve_device(device),
            compile=compile,
            optimize=optimize,
            progress=progress,
        )
    if as_json:
        print_json({"model": model, "twin": twin_name, **report.to_dict()})
        return
    render(model, twin_name, report, console())


def render(model: str, twin_name: str | None, report: Any, out: Console) -> None:
    out.print(
        f"[bold]{model}[/] vs its retrofit{' and ' + twin_name if twin_name else ''}: {report.device}, "
        f"{report.threads} threads, {report.size}x{report.size}, medians of interleaved runs"
        + (", all compiled (inductor)" if report.compiled else "")
    )
    timings = table(None, ("mode", "batch", "model", "median ms", "images/s"), left=("mode", "model"))
    for t in report.timings:
        timings.add_row(t.mode, str(t.batch), t.model, f"{t.median_ms:.2f}", f"{t.images_per_s:,.1f}")
    out.print(timings)
    for (mode, batch, name), spread in report.spreads.items():
        out.print(f"{mode}, batch {batch}: {name} {spread} (median of per-round ratios [25%, 75%])")
