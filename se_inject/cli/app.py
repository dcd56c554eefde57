"""The ``se-inject`` command: parse, call the public API, render with rich.

A user mistake prints one line on stderr and exits with code 2; there is no traceback for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

# Only what parsing needs is imported here: torch and the pipeline load inside the command that
# runs, so `se-inject --help` and `--version` answer at once.
from se_inject._version import __version__
from se_inject.cli.options import experiment_option, finetune_config, finetune_option, inject_option
from se_inject.config import InjectConfig
from se_inject.errors import ConfigError, SEInjectError, first_line
from se_inject.grammar import as_tuple, field_types, parse_int_list, read_options
from se_inject.io.files import as_path, check_target
from se_inject.io.layout import OWNED_FILES, RECIPE_FILE

if TYPE_CHECKING:
    from torch import nn

    from se_inject.surgery.report import OverheadReport

HELP = InjectConfig.field_help()


def _fail(message: str) -> None:
    typer.echo(f"se-inject: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


class SEInjectGroup(TyperGroup):
    """``se-inject MODEL ...`` runs ``inject``; usage errors and se_inject errors become one line, exit 2.

    typer vendors its own click, so its usage errors are caught by typer's public base class
    (``typer.TyperException``) rather than by click's.
    """

    default_command = "inject"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, **{**kwargs, "standalone_mode": False})
        except SEInjectError as err:
            _fail(str(err))
        except OSError as err:  # the file system said no (permissions, a full disk): not a bug to trace
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}")
        except typer.Abort:
            typer.echo("se-inject: aborted", err=True)
            sys.exit(1)
        except typer.TyperException as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # bare "se-inject": the help, as click prints it
                typer.echo(err.format_message())
                sys.exit(2)
            _fail(f"{err.format_message()} (see 'se-inject --help')")
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result


app = typer.Typer(
    cls=SEInjectGroup,
    help="Retrofit Squeeze-and-Excitation units into existing models. 'se-inject MODEL ...' is 'se-inject inject MODEL ...'.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"se-inject {__version__}")
        raise typer.Exit()


@app.callback()
def _group(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Retrofit Squeeze-and-Excitation units into existing models."""


def parse_group(text: str) -> dict[str, Any]:
    """``"layer4.*:r=32,act=silu"`` -> ``{"blocks": ["layer4.*"], "r": 32, "act": "silu"}`` (globs
    joined with ``|``: ``"layer3.*|layer4.*:r=32"``); the values are read as InjectConfig declares them
    (the one grammar, se_inject.grammar) and checked by it."""
    blocks, colon, settings = text.partition(":")
    if not colon or not blocks.strip() or not settings.strip():
        raise ConfigError(
            f"--group: expected BLOCKS:OPTION=VALUE,... such as 'layer4.*:r=32,act=silu', got {text[:60]!r}"
        )
    options = read_options(settings, field_types(InjectConfig), "--group", "layer4.*:r=32,act=silu")
    return {"blocks": [b.strip() for b in blocks.split("|")], **options}


def parse_candidate(text: str) -> dict[str, Any]:
    """``"position=pre,r=8,include=layer3.*|layer4.*"`` -> injection options, read as InjectConfig declares
    them (lists joined with ``|``) and checked by it now, as a group's are."""
    options = read_options(text, field_types(InjectConfig), "--candidate", "position=pre,r=8")
    unknown = sorted(set(options) - set(field_types(InjectConfig)))
    if unknown:
        raise ConfigError(f"--candidate: {unknown[0]}: not an injection option; see se-inject inject --help")
    InjectConfig.from_dict(options)
    return options


def parse_unit_options(unit: str, texts: list[str]) -> dict[str, Any]:
    """``["kernel_size=5", "fusion=scale"]`` -> ``{"kernel_size": 5, "fusion": "scale"}``, each value read as
    the unit's ``Options`` declares it; the unit checks names, types and bounds."""
    if not texts:
        return {}
    from se_inject.units.base import unit_class

    return read_options(texts, field_types(unit_class(unit).Options), "--unit-option", "kernel_size=5")


def parse_positive_list(text: str, option: str) -> tuple[int, ...]:
    """A list of positive integers (batch sizes and the like)."""
    values = as_tuple(parse_int_list(text, option))
    bad = [v for v in values if v < 1]
    if bad or not values:
        raise ConfigError(f"{option}: expected positive integers, got {text[:40]!r}")
    return values


def parse_names(text: str | None, option: str) -> list[str] | None:
    """``"a,b"`` -> ["a", "b"]; an empty name is refused."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ConfigError(f"{option}: expected comma-separated names, got {text[:60]!r}")
    return names


def _check_save_target(directory: str | None, force: bool) -> None:
    """Refuse a --save/--out target before any work is done (it is checked again when written)."""
    if directory is not None:
        check_target(as_path(directory, "--save"), force=force, owned=OWNED_FILES, marker=RECIPE_FILE)


def _head_kwargs(num_classes: int | None) -> dict[str, Any]:
    if num_classes is None:
        return {}
    if num_classes < 0:
        raise ConfigError(f"--num-classes: expected 0 (no head) or more classes, got {num_classes}")
    return {"num_classes": num_classes}


def _inject_config(
    position: str | None, r: str | None, stages: str | None, styles: list[str] | None = None, **options: Any
) -> InjectConfig:
    """An InjectConfig from the options every command shares, as typed on the command line (an
    option left out is None: its style's value, or the paper's)."""
    from se_inject.io.styles import load_style_file

    for path in styles or ():
        load_style_file(path)
    given: dict[str, Any] = {name: value for name, value in options.items() if value is not None}
    if position is not None:
        given["position"] = position
    if r is not None:
        given["r"] = parse_int_list(r, "r")
    if stages:
        given["stages"] = parse_int_list(stages, "stages")
    return InjectConfig.from_dict(given)


@app.command("inject")
def inject_command(
    model: str = typer.Argument(..., help="timm name, torchvision:NAME, module.path:callable or file.py:callable"),
    position: str | None = inject_option("position"),
    r: str | None = inject_option("r"),
    stages: str | None = inject_option("stages"),
    style: str = inject_option("style"),
    styles: list[str] = typer.Option(
        [], "--styles", help="a style file (TOML) whose styles --style can name (repeatable)"
    ),
    at: list[str] = inject_option("at"),
    group: list[str] = inject_option("groups", "--group"),
    include: list[str] = inject_option("include"),
    exclude: list[str] = inject_option("exclude"),
    blocks: list[str] = inject_option("blocks"),
    squeeze: str = inject_option("squeeze"),
    gate: str | None = inject_option("gate"),
    excitation: str | None = inject_option("excitation"),
    act: str | None = inject_option("act"),
    bias: bool | None = inject_option("bias"),
    init: str = inject_option("init"),
    rounding: str | None = inject_option("rounding"),
    reduce_from: str | None = inject_option("reduce_from"),
    hidden: int | None = inject_option("hidden"),
    unit: str = inject_option("unit"),
    unit_option: list[str] = inject_option("unit_options", "--unit-option"),
    input_size: int | None = typer.Option(
        None, "--input-size", min=1, help="spatial size FLOPs are counted at (default: the model's own, else 224)"
    ),
    leaf: list[str] = typer.Option(
        [], "--leaf", help="module class or qualified name fx must not trace into (repeatable)"
    ),
    rules: list[str] = typer.Option([], "--rules", help="extra placement rule file, TOML (repeatable)"),
    existing: str = inject_option("existing"),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", help="trained weights (.safetensors, .pth) loaded before injection"
    ),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network)"),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="classes of the model's head (e.g. of a fine-tuned checkpoint)"
    ),
    head: str | None = finetune_option("head"),
    check: bool = typer.Option(
        False, "--check", help="run original and injected on one batch; print the largest output difference"
    ),
    save_dir: str | None = typer.Option(
        None, "--save", help="write the injected model (safetensors + recipe.json) to DIR"
    ),
    force: bool = typer.Option(False, "--force", help="with --save: replace an existing DIR"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    show_sites: bool = typer.Option(False, "--sites", help="list every unit with its stage, block and channels"),
) -> None:
    """Plan SE units for MODEL and print the overhead report.

    The model is built on the meta device (no weights) unless --checkpoint, --pretrained, --check
    or --save need real ones.
    """
    from se_inject.api import check_outputs, retrofit
    from se_inject.io.models import load_model
    from se_inject.io.saving import save

    config = _inject_config(
        position,
        r,
        stages,
        styles,
        style=style,
        at=tuple(at),
        groups=tuple(parse_group(g) for g in group),
        include=tuple(include),
        exclude=tuple(exclude),
        blocks=tuple(blocks),
        squeeze=squeeze,
        gate=gate,
        excitation=excitation,
        act=act,
        bias=bias,
        init=init,
        rounding=rounding,
        reduce_from=reduce_from,
        hidden=hidden,
        unit=unit,
        unit_options=parse_unit_options(unit, unit_option),
        leaf_modules=tuple(leaf),
        existing=existing,
        rules=tuple(rules),
    )
    _check_save_target(save_dir, force)  # before any work is done
    needs_weights = bool(checkpoint or pretrained or check or save_dir)
    network = load_model(
        model,
        device="cpu" if needs_weights else "meta",
        pretrained=pretrained,
        checkpoint=checkpoint,
        **_head_kwargs(num_classes),
    )
    result = retrofit(network, config, input_size=input_size, model_name=model, head=head)
    difference = check_outputs(network, result.model, input_size=input_size) if check else None
    saved = save(result.model, save_dir, force=force) if save_dir else None
    if as_json:
        data = result.report.to_dict()
        data.update({"check_max_abs_diff": difference} if check else {})
        data.update({"saved": str(saved)} if saved else {})
        typer.echo(json.dumps(data, indent=2))
        return
    out = console()
    render_report(result.report, show_sites, out)
    if difference is not None:
        out.print(f"check: max |injected - original| = {difference:.3g} on one batch in eval mode ({config.init} init)")
    if saved is not None:
        out.print(f"saved to {saved}/ (model.safetensors, recipe.json); load with se_inject.load('{saved}')")


def console() -> Console:
    """stdout console; when stdout is no terminal (a pipe, a file, a test) tables get 120 columns."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def _count(n: int | float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.2f}"


def _gflops(n: int) -> str:
    return f"{n / 1e9:.3f}"


def render_report(report: OverheadReport, show_sites: bool, console: Console) -> None:
    """The plan and the overhead report as rich tables."""
    r_text = ",".join(map(str, report.r)) if isinstance(report.r, list) else str(report.r)
    kind = report.unit.upper()
    console.print(
        f"[bold]{report.model}[/]: {len(report.sites)} {kind} units at position [bold]{report.position}[/], "
        f"r={r_text}, input {report.input_size[0]}x{report.input_size[1]}"
    )
    if show_sites:
        sites = Table(title="Units", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("unit", "rule", "stage", "block", "C", "hidden", "r", "size", "params", "MFLOPs"):
            sites.add_column(column, justify="left" if column == "unit" else "right", no_wrap=True)
        for u in report.sites:
            sites.add_row(
                u.name,
                u.rule,
                str(u.stage),
                str(u.block),
                str(u.channels),
                str(u.hidden),
                str(u.r),
                f"{u.size[0]}x{u.size[1]}",
                _count(u.params),
                f"{u.flops / 1e6:.3f}",
            )
        console.print(sites)
    table = Table(
        title=f"Overhead: {report.formula} vs. weights added; FLOPs at batch 1 (multiply-add = 2)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    predicted = "Eq.5 params" if report.unit == "se" else "predicted"
    for column in ("stage", "size", "N_s", "C_s", "r", predicted, "added", "GFLOPs", f"GFLOPs+{kind}"):
        table.add_column(column, justify="right", no_wrap=True)
    for s in report.stages:
        channels = str(s.channels) if isinstance(s.channels, int) else ",".join(map(str, sorted(set(s.channels))))
        channels = channels if s.blocks else "-"
        table.add_row(
            str(s.stage),
            f"{s.size[0]}x{s.size[1]}",
            f"{s.blocks}/{s.sites}",
            channels,
            "-" if s.r is None else str(s.r),
            _count(s.eq5_params),
            _count(s.added_params),
            _gflops(s.flops_before),
            _gflops(s.flops_after),
        )
    t = report.totals
    table.add_row(
        "total",
        "",
        str(len(report.sites)),
        "",
        "",
        _count(t.eq5_params),
        _count(t.params_added),
        _gflops(t.flops_before),
        _gflops(t.flops_after),
        style="bold",
    )
    console.print(table)
    console.print(
        f"params {t.params_before:,} -> {t.params_after:,} (+{t.params_increase:.2%}); "
        f"FLOPs {_gflops(t.flops_before)}G -> {_gflops(t.flops_after)}G (+{t.flops_increase:.2%})"
    )
    if t.macs_before:
        console.print(
            f"of which multiply-adds of conv/FC layers (the paper's GFLOPs) {_gflops(t.macs_before)}G -> "
            f"{_gflops(t.macs_after)}G (+{t.macs_increase:.2%}); elementwise FLOPs (pooling, scaling, gating) "
            f"{t.elementwise_before / 1e6:.1f}M -> {t.elementwise_after / 1e6:.1f}M"
        )
    agreement = "[green]agrees exactly[/]" if report.eq5_agrees else "[yellow]differs (hidden widths were rounded)[/]"
    console.print(f"{report.formula} {agreement} with the weights added")
    if report.existing_gates:
        console.print(
            f"the model already has {len(report.existing_gates)} SE-like gates: {', '.join(report.existing_gates[:4])}"
            + (", ..." if len(report.existing_gates) > 4 else "")
        )
    for note in report.notes:
        console.print(f"note: {note}")


@app.command("finetune")
def finetune_command(
    source: str = typer.Argument(..., help="a directory written by --save, or a model spec to inject first"),
    data: str = typer.Option(..., "--data", help="'digits' or an image folder with train/ and val/ class folders"),
    out: str = typer.Option(..., "--out", help="run directory: checkpoint.pt, metrics.jsonl and the final model"),
    epochs: int = finetune_option("epochs"),
    se_epochs: int = finetune_option("se_epochs"),
    batch_size: int = finetune_option("batch_size"),
    lr: float = finetune_option("lr"),
    full_lr_scale: float = finetune_option("full_lr_scale"),
    optimizer: str = finetune_option("optimizer"),
    schedule: str = finetune_option("schedule"),
    label_smoothing: float = finetune_option("label_smoothing"),
    weight_decay: float = finetune_option("weight_decay"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    amp: bool = finetune_option("amp"),
    seed: int = finetune_option("seed"),
    workers: int = finetune_option("workers"),
    momentum: float = finetune_option("momentum"),
    channels_last: bool = finetune_option("channels_last"),
    image_size: int | None = typer.Option(
        None, "--image-size", help="training image size (digits: 32, folders: the model's)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    nproc: int = typer.Option(1, "--nproc", help="launch N processes with torchrun (DistributedDataParallel)"),
    position: str | None = inject_option("position"),
    r: str | None = inject_option("r"),
    stages: str | None = inject_option("stages"),
    style: str = inject_option("style"),
    init: str = inject_option("init"),
    unit: str = inject_option("unit"),
    unit_option: list[str] = inject_option("unit_options", "--unit-option"),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="trained weights for a model spec SOURCE"),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights for SOURCE"),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="classes of SOURCE's head as --checkpoint has it (default: the dataset's)"
    ),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="a saved SOURCE whose recipe names Python code may import and run it"
    ),
    head: str | None = finetune_option("head"),
    force: bool = typer.Option(False, "--force", help="start over in an --out that holds a saved model or run"),
) -> None:
    """Fine-tune a retrofitted model: SE units first (--se-epochs), then everything."""
    import torch

    from se_inject.api import retrofit
    from se_inject.io.models import load_model, spec_kind
    from se_inject.io.saving import load
    from se_inject.train.data import check_image_size, data_classes, load_data, model_data_config
    from se_inject.train.finetune import UntrainedModelWarning, finetune

    if nproc < 1:
        raise ConfigError(f"--nproc: expected 1 or more processes, got {nproc}")
    config = finetune_config(locals())
    if image_size is not None:
        check_image_size(image_size)
    if not Path(source).is_dir():
        spec_kind(source)
    classes = data_classes(data)  # the data is checked completely before any model is built
    if nproc > 1:  # everything that can be checked once is checked before the workers start
        raise typer.Exit(_launch_torchrun(nproc, device))
    torch.manual_seed(seed)
    original = None
    if Path(source).is_dir():
        model = load(source, trust_code=trust_code)
        splits = load_data(data, image_size, model_data_config(model), check=False)
    else:
        given = _head_kwargs(num_classes)
        # without a trained head: the dataset's classes where the constructor takes them (else the head is refitted)
        dataset_head = {} if (given or checkpoint or pretrained) else {"num_classes": len(classes)}
        original = load_model(
            source, device="cpu", pretrained=pretrained, checkpoint=checkpoint, optional_kwargs=dataset_head, **given
        )
        splits = load_data(data, image_size, model_data_config(original), check=False)
        inject_config = _inject_config(
            position, r, stages, style=style, init=init, unit=unit, unit_options=parse_unit_options(unit, unit_option)
        )
        model = retrofit(original, inject_config, input_size=splits.image_size, model_name=source, head=head).model
    out_console = console()
    with warnings.catch_warnings():  # shown below as se-inject's own one-line warnings
        warnings.simplefilter("ignore", UntrainedModelWarning)
        result = finetune(
            model,
            splits,
            out,
            config,
            original=original,
            resume=resume,
            force=force,
            show_progress=True,
            console=out_console,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in result.warnings:
            typer.echo(f"se-inject: warning: {warning}", err=True)
        render_finetune(result, out_console)


def _launch_torchrun(nproc: int, device: str) -> int:
    """Run this same command in ``nproc`` processes through torch's elastic launcher (torchrun's engine).

    The arguments go to the workers untouched: torchrun's own command line would mistake options such
    as ``--r`` for abbreviations of its own. The workers' stderr goes to files: a failing worker's
    one-line error is printed once (not once per worker, not with the launcher's report), and on
    success the first worker's warnings are shown.
    """
    import logging
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    args = []
    skip = False
    for arg in sys.argv[1:]:
        if skip or arg == "--nproc":
            skip = not skip
            continue
        if not arg.startswith("--nproc="):
            args.append(arg)
    if device != "cuda":
        os.environ["SE_INJECT_BACKEND"] = "gloo"
    launcher_log = logging.getLogger("torch.distributed.elastic")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="se_inject_workers_") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,
            monitor_interval=0.2,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.ERR),
        )
        failure: Exception | None = None
        try:
            elastic_launch(config, sys.executable)("-m", "se_inject", *args)
        except Exception as err:
            failure = err
        finally:
            launcher_log.setLevel(level)
        by_rank = {
            int(f.parent.name): f.read_text(errors="replace").splitlines()
            for f in Path(logs).rglob("stderr.log")
            if f.parent.name.isdigit()
        }
    if failure is None:
        for line in by_rank.get(0, []):
            if line.startswith("se-inject: warning: "):
                typer.echo(line, err=True)
        return 0
    errors = [line for rank in sorted(by_rank) for line in by_rank[rank] if line.startswith("se-inject: error: ")]
    if errors:
        typer.echo(errors[0], err=True)
    else:
        typer.echo(f"se-inject: error: a worker process failed ({first_line(failure)})", err=True)
    return 2


def render_finetune(result, console: Console) -> None:
    table = Table(title="Validation accuracy", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("before retrofit", "after injection", "after fine-tuning"):
        table.add_column(column, justify="right")
    table.add_row(*("-" if v is None else f"{v:.2%}" for v in result.accuracy.values()))
    console.print(table)
    last = result.history[-1] if result.history else {}
    console.print(
        f"{len(result.history)} epochs, {last.get('world_size', 1)} process(es) on {last.get('device', '?')}; "
        f"metrics in {result.out}/metrics.jsonl; model in {result.out}/ (se_inject.load('{result.out}'))"
    )


@app.command("bench")
def bench_command(
    model: str = typer.Argument(..., help="timm name, torchvision:NAME, module.path:callable or file.py:callable"),
    position: str | None = inject_option("position"),
    r: str | None = inject_option("r"),
    stages: str | None = inject_option("stages"),
    style: str = inject_option("style"),
    unit: str = inject_option("unit"),
    unit_option: list[str] = inject_option("unit_options", "--unit-option"),
    batch: str = typer.Option("1,16", "--batch", help="batch sizes, e.g. 1,16 (CUDA default: 256)"),
    size: int = typer.Option(224, "--size", min=8, help="input size"),
    repeats: int | None = typer.Option(
        None,
        "--repeats",
        min=2,
        help="timed rounds per batch size, each model once per round (default: 50 at batch 1, 30 above)",
    ),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed calls per model first"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    compile: bool = typer.Option(False, "--compile", help="run every model under torch.compile (inductor)"),
    optimize: bool = typer.Option(
        False,
        "--optimize",
        help="also time the retrofit after optimize_for_inference (squeeze before the last 1x1 conv)",
    ),
    train: bool | None = typer.Option(None, "--train/--no-train", help="also time a training step (CUDA default)"),
    as_json: bool = typer.Option(False, "--json", help="print the timings as JSON"),
) -> None:
    """Time MODEL, its retrofit and timm's hand-built SE twin, interleaved; report medians and ratios."""
    import torch

    from se_inject.io.models import load_model
    from se_inject.measure.bench import bench, twin_of
    from se_inject.runtime import resolve_device

    if threads:
        torch.set_num_threads(threads)
    target = resolve_device(device)
    config = _inject_config(
        position, r, stages, style=style, unit=unit, unit_options=parse_unit_options(unit, unit_option)
    )
    batches = parse_positive_list(batch, "--batch")
    batches = (256,) if target.type == "cuda" and batch == "1,16" else batches
    twin_name = twin_of(model)
    with timing_progress(as_json) as progress:
        report = bench(
            load_model(model),
            config,
            twin=load_model(twin_name) if twin_name else None,
            batches=batches,
            size=size,
            repeats=repeats,
            warmup=warmup,
            train=train,
            device=target,
            compile=compile,
            optimize=optimize,
            progress=progress,
        )
    if as_json:
        typer.echo(json.dumps({"model": model, "twin": twin_name, **report.to_dict()}, indent=2))
        return
    render_bench(model, twin_name, report, console())


@contextlib.contextmanager
def timing_progress(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar over timed rounds on stderr (none when ``quiet`` or stderr is no terminal);
    yields the ``progress(what, done, total)`` callback the bench and compare APIs take."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=quiet or not err.is_terminal) as bar:
        task = bar.add_task("building the models", total=None)

        def advance(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"timing {what}", completed=done, total=total)

        yield advance


def render_bench(model: str, twin_name: str | None, report, console: Console) -> None:
    console.print(
        f"[bold]{model}[/] vs its retrofit{' and ' + twin_name if twin_name else ''}: {report.device}, "
        f"{report.threads} threads, {report.size}x{report.size}, medians of interleaved runs"
        + (", all compiled (inductor)" if report.compiled else "")
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("mode", "batch", "model", "median ms", "images/s"):
        table.add_column(column, justify="left" if column in ("mode", "model") else "right")
    for t in report.timings:
        table.add_row(t.mode, str(t.batch), t.model, f"{t.median_ms:.2f}", f"{t.images_per_s:,.1f}")
    console.print(table)
    for (mode, batch, name), spread in report.spreads.items():
        console.print(f"{mode}, batch {batch}: {name} {spread} (median of per-round ratios [25%, 75%])")


def _val_loader(data: str, image_size: int | None, model: nn.Module, batch_size: int = 128):
    from torch.utils.data import DataLoader

    from se_inject.train.data import load_data, model_data_config

    splits = load_data(data, image_size, model_data_config(model))
    return splits, DataLoader(splits.val, batch_size=batch_size)


@app.command("compare")
def compare_command(
    model: str = typer.Argument(..., help="timm name, torchvision:NAME, module.path:callable or file.py:callable"),
    positions: str | None = typer.Option(None, "--positions", help="positions to compare, e.g. standard,pre,post"),
    r: str | None = typer.Option(None, "--r", "-r", help="reduction ratios to compare, e.g. 8,16,32"),
    units: str | None = typer.Option(None, "--units", help="units to compare, e.g. se,eca,gc"),
    styles: str | None = typer.Option(None, "--styles", help="styles to compare, e.g. paper,timm"),
    candidate: list[str] = typer.Option(
        [], "--candidate", help="one more candidate as OPTION=VALUE,... (e.g. 'include=layer4.*,r=8'; repeatable)"
    ),
    batch: str = typer.Option("1,16", "--batch", help="batch sizes, e.g. 1,16"),
    size: int = typer.Option(224, "--size", min=8, help="input size"),
    repeats: int | None = typer.Option(
        None, "--repeats", min=2, help="timed rounds per batch size (default: 50 at batch 1, 30 above)"
    ),
    warmup: int = typer.Option(3, "--warmup", min=0, help="untimed calls per model first"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: torch's)"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    train: bool = typer.Option(False, "--train", help="also time a training step"),
    optimize: bool = typer.Option(
        False, "--optimize", help="measure each candidate after optimize_for_inference, where its units can fold"
    ),
    compile: bool = typer.Option(False, "--compile", help="time every model under torch.compile (inductor)"),
    as_json: bool = typer.Option(False, "--json", help="print the comparison as JSON"),
    plot_file: str | None = typer.Option(None, "--plot", help="write added latency against added weights (PNG)"),
) -> None:
    """Measure candidate retrofits of MODEL (positions x r x units x styles, and --candidate) against
    the original, interleaved: weights, FLOPs, latency with its spread, throughput, memory."""
    import torch

    from se_inject.io.models import load_model
    from se_inject.measure.compare import Candidate, candidates, compare
    from se_inject.runtime import resolve_device

    chosen = candidates(
        positions=parse_names(positions, "--positions") or (),
        rs=as_tuple(parse_int_list(r, "--r")) if r else (),
        units=parse_names(units, "--units") or (),
        styles=parse_names(styles, "--styles") or (),
    )
    chosen += [Candidate(text, parse_candidate(text)) for text in candidate]
    if plot_file is not None:
        from se_inject.measure.compare import check_plot_target

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
            batches=parse_positive_list(batch, "--batch"),
            size=size,
            repeats=repeats,
            warmup=warmup,
            train=train,
            device=target,
            optimize=optimize,
            compile=compile,
            progress=advance,
        )
    # the result first: a plot that fails (a full disk) must not lose what was measured
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        render_comparison(result, console())
    if plot_file is not None:
        from se_inject.measure.compare import plot

        plot(result, plot_file)
        if not as_json:
            console().print(f"wrote {plot_file}")


def render_comparison(result: Any, out: Console) -> None:
    """The comparison as two rich tables (what each candidate adds; how long it takes, as ratios to the
    original with their interquartile range), then the verdicts."""
    measured = result.measured()
    cost = Table(title=f"{result.model}: what each candidate adds", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ["candidate", "units", "params", "MACs", "FLOPs", *[f"memory b{b}" for b in result.batches]]:
        cost.add_column(column, justify="left" if column == "candidate" else "right")
    memory = [f"{result.original_memory[b] / 2**20:.1f} MiB" for b in result.batches]
    cost.add_row("original", "-", "-", "-", "-", *memory, style="bold")
    for r in measured:
        cost.add_row(
            r.label,
            str(r.units),
            f"+{r.params_added:,} ({r.params_increase:+.2%})",
            f"{r.macs_increase:+.2%}",
            f"{r.flops_increase:+.2%}",
            *[f"{r.memory[b]:.3f}" for b in result.batches],
        )
    out.print(cost)
    timed = Table(
        title=f"time on {result.device} ({result.threads} threads, {result.size}x{result.size}"
        + (", all compiled" if result.compiled else "")
        + "): ratio to the original, median [25%, 75%] over interleaved rounds; images/s",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    training = any(r.train for r in measured)
    columns = ["candidate"]
    for b in result.batches:
        columns += [f"b{b} inference", f"b{b} img/s"] + ([f"b{b} train step"] if training else [])
    for column in columns:
        timed.add_column(column, justify="left" if column == "candidate" else "right", no_wrap=column != "candidate")
    original = ["original"]
    for b in result.batches:
        original += [f"{result.original_ms[b]:.1f} ms", f"{result.original_images_per_s[b]:.1f}"] + (
            [""] if training else []
        )
    timed.add_row(*original, style="bold")
    for r in measured:
        cells = [r.label]
        for b in result.batches:
            cells += [str(r.latency[b]), f"{r.images_per_s[b]:.1f}"] + ([str(r.train[b])] if training else [])
        timed.add_row(*cells)
    out.print(timed)
    for r in result.results:
        if r.error is not None:
            out.print(f"[red]not built[/]: {r.label}: {r.error}")
    if result.optimized:
        folded = ", ".join(f"{r.label} {r.optimized_units}/{r.units}" for r in measured)
        out.print(f"optimized for inference (units that squeeze before the last 1x1 conv): {folded}")
    out.print(f"memory: ratio of {result.memory_kind}")
    for b in result.batches:
        out.print(result.verdict(b))
    if training:
        for b in result.batches:
            out.print("training step, " + result.verdict(b, "train"))


@app.command("inspect")
def inspect_command(
    saved: str = typer.Argument(..., help="a directory written by --save or finetune"),
    data: str = typer.Option(..., "--data", help="'digits' or an image folder (its val/ split is used)"),
    out: str = typer.Option(..., "--out", help="where excitation.json and the PNG plots go"),
    units: str | None = typer.Option(
        None, "--units", help="units to plot, as stage_block (e.g. 1_1,3_2); default: first, middle, last"
    ),
    classes: int = typer.Option(4, "--classes", min=1, help="classes drawn in the per-unit plots"),
    threshold: float = typer.Option(0.95, "--threshold", help="saturation from which a unit is suggested for pruning"),
    max_images: int | None = typer.Option(None, "--max-images", min=1, help="stop after this many images"),
    image_size: int | None = typer.Option(
        None, "--image-size", min=1, help="image size (digits: 32, folders: the model's)"
    ),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="a recipe that names Python code may import and run it"
    ),
) -> None:
    """Record what every unit's gate does over a dataset; write statistics, plots and pruning suggestions.

    SE, ESE, ECA, CECA, GE and GC (scale fusion) show their channel gate; CBAM shows its channel
    gate only (the spatial gate after it is not shown, and it cannot be pruned)."""
    from se_inject.inspect.excitation import collect, plot, write_json
    from se_inject.io.saving import load

    chosen = parse_names(units, "--units")
    model = load(saved, trust_code=trust_code)
    splits, loader = _val_loader(data, image_size, model)
    report = collect(model, loader, splits.classes, max_images=max_images)
    files = [write_json(report, out, threshold), *plot(report, out, chosen, classes)]
    table = Table(title=f"Excitation over {report.images} images", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("unit", "stage", "block", "C", "mean gate", "std over images", "saturation", "prune?"):
        table.add_column(column, justify="left" if column in ("unit", "prune?") else "right")
    suggested = set(report.suggestions(threshold))
    for u in report.units:
        table.add_row(
            u.name,
            str(u.stage),
            str(u.block),
            str(u.channels),
            f"{sum(u.mean) / len(u.mean):.3f}",
            f"{u.image_std:.4f}",
            f"{u.saturation:.3f}",
            "yes" if u.name in suggested else "",
        )
    out_console = console()
    out_console.print(table)
    for kind, shows in sorted({(u.kind, u.shows) for u in report.units if u.shows != "the channel gate"}):
        out_console.print(f"{kind} units: the statistics describe {shows}")
    out_console.print(f"wrote {', '.join(str(f) for f in files)}")
    if suggested:
        out_console.print(
            f"suggested: se-inject prune-se {saved} --data {data} --out PRUNED_DIR --threshold {threshold}"
        )


@app.command("prune-se")
def prune_command(
    saved: str = typer.Argument(..., help="a directory written by --save or finetune"),
    data: str = typer.Option(..., "--data", help="'digits' or an image folder (its val/ split is used)"),
    out: str = typer.Option(..., "--out", help="where the pruned model is saved"),
    units: str | None = typer.Option(None, "--units", help="unit names to prune (default: those at --threshold)"),
    threshold: float = typer.Option(0.95, "--threshold", help="saturation from which a unit is pruned"),
    image_size: int | None = typer.Option(
        None, "--image-size", min=1, help="image size (digits: 32, folders: the model's)"
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = typer.Option(
        False, "--trust-code", help="a recipe that names Python code may import and run it"
    ),
) -> None:
    """Replace SE units whose gate is nearly constant by their mean per-channel scale; report the cost."""
    from se_inject.inspect.excitation import prune
    from se_inject.io.saving import load, save
    from se_inject.train.data import load_data, model_data_config

    chosen = parse_names(units, "--units")
    _check_save_target(out, force)
    model = load(saved, trust_code=trust_code)
    result = prune(model, load_data(data, image_size, model_data_config(model)), chosen, threshold)
    save(result.model, out, force=force)
    console().print(
        f"removed {len(result.removed)} unit(s): {', '.join(result.removed) or '-'}; params saved {result.params_saved:,} "
        f"(Eq. 5: {result.eq5_saved:,.0f}); max |output change| {result.max_output_change:.3g}; "
        f"val acc {result.accuracy_before:.2%} -> {result.accuracy_after:.2%}; saved to {out}"
    )


@app.command("rules")
def rules_command(
    rules: list[str] = typer.Option(
        [], "--rules", help="extra placement rule files (TOML) to list with the built-in ones"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the registries as JSON"),
) -> None:
    """List the pattern kinds (with their anchors and facts), the placement rules and the styles, from the registries."""
    from se_inject.config import styles
    from se_inject.placement.patterns import PATTERNS
    from se_inject.placement.rules import load_rules

    loaded = load_rules(tuple(rules))
    if as_json:
        kinds = [
            {
                "name": k.name,
                "anchors": list(k.anchors),
                "facts": {f: t.__name__ for f, t in k.facts.items()},
                "description": k.doc,
            }
            for k in PATTERNS.values()
        ]
        listed = [
            {
                "name": r.name,
                "pattern": r.pattern,
                "priority": r.priority,
                "fallback": r.fallback,
                "positions": r.positions,
                "when": r.when,
                "source": r.source,
            }
            for r in loaded
        ]
        named = [
            {"name": s.name, "options": s.options, "description": s.description, "source": s.source}
            for s in styles().values()
        ]
        typer.echo(json.dumps({"patterns": kinds, "rules": listed, "styles": named}, indent=2))
        return
    out = console()
    kinds_table = Table(title="Pattern kinds (placement.patterns)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("kind", "anchors", "facts (conditions: NAME, min_NAME, max_NAME)", "finds"):
        kinds_table.add_column(column)
    for kind in PATTERNS.values():
        facts = ", ".join(f"{name} ({kind_type.__name__})" for name, kind_type in kind.facts.items())
        kinds_table.add_row(kind.name, ", ".join(kind.anchors), facts, kind.doc)
    out.print(kinds_table)
    rules_table = Table(title="Rules", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("rule", "pattern", "priority", "positions -> anchor", "when", "file"):
        rules_table.add_column(column)
    for rule in loaded:
        positions = ", ".join(f"{p}: {a}" for p, a in rule.positions.items())
        when = ", ".join(f"{k}={v}" for k, v in rule.when.items()) or "-"
        priority = f"{rule.priority}{' (fallback)' if rule.fallback else ''}"
        rules_table.add_row(rule.name, rule.pattern, priority, positions, when, Path(rule.source).name)
    out.print(rules_table)
    styles_table = Table(
        title="Styles (style=NAME; options left out are the paper's)", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for column in ("style", "options", "reproduces"):
        styles_table.add_column(column)
    for style in styles().values():
        styles_table.add_row(style.name, ", ".join(f"{k}={v}" for k, v in style.options.items()), style.description)
    out.print(styles_table)


@app.command("units")
def units_command(as_json: bool = typer.Option(False, "--json", help="print the units as JSON")) -> None:
    """List the unit types --unit can name: their paper, their own options (--unit-option NAME=VALUE)
    and the conventions they bring (the style named like them)."""
    from se_inject.units.base import describe_units

    infos = describe_units()
    if as_json:
        typer.echo(json.dumps([asdict(info) for info in infos], indent=2, default=str))
        return
    table = Table(title="Units (--unit NAME)", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("unit", "paper", "uses r", "options (--unit-option NAME=VALUE)", "conventions"):
        table.add_column(column)
    for info in infos:
        options = "\n".join(f"{name}={default!r}: {text}" for name, (default, text) in info.options.items())
        conventions = ", ".join(f"{k}={v}" for k, v in info.conventions.items()) or "the paper's"
        table.add_row(info.name, info.paper, "yes" if info.uses_r else "no", options or "-", conventions)
    console().print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 5`` (seeds 0-4), or a list of seeds as other lists are written: ``0,3,7`` or ``0-2``."""
    if "," in text or "-" in text.strip():
        return as_tuple(parse_int_list(text, "--seeds"))
    return tuple(range(parse_positive_list(text, "--seeds")[0]))


@app.command("experiment")
def experiment_command(
    model: str = typer.Argument(..., help="timm name, torchvision:NAME, module.path:callable or file.py:callable"),
    data: str = typer.Option(..., "--data", help="digits, or a folder with train/ and val/ class folders"),
    out: str = typer.Option(
        ..., "--out", help="experiment directory: experiment.json, base/ and one run per arm and seed"
    ),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="trained weights of MODEL (.safetensors, .pth)"),
    pretrained: bool = typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network)"),
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="classes of MODEL's head as --checkpoint has it (default: the dataset's)"
    ),
    seeds: str = typer.Option("5", "--seeds", help="seeds per arm: a count (5: seeds 0-4) or a list (0,3,7 or 0-2)"),
    base_epochs: int = experiment_option("base_epochs"),
    base_lr: float = experiment_option("base_lr"),
    base_seed: int = experiment_option("base_seed"),
    latency_batch: int = experiment_option("latency_batch"),
    latency_repeats: int = experiment_option("latency_repeats"),
    positions: str | None = typer.Option(None, "--positions", help="positions to try, e.g. standard,post"),
    r: str | None = typer.Option(None, "--r", "-r", help="reduction ratios to try, e.g. 8,16"),
    units: str | None = typer.Option(None, "--units", help="units to try, e.g. se,eca"),
    inits: str | None = typer.Option(None, "--inits", help="starts to try: preserve, paper, zero"),
    styles: str | None = typer.Option(None, "--styles", help="styles to try, e.g. paper,timm"),
    candidate: list[str] = typer.Option(
        [], "--candidate", help="one more arm as OPTION=VALUE,... (e.g. 'include=layer4.*,r=8'; repeatable)"
    ),
    reference_data: str | None = typer.Option(
        None, "--reference-data", help="the original task's data: each arm's final model is scored on it (forgetting)"
    ),
    epochs: int = finetune_option("epochs"),
    se_epochs: int = finetune_option("se_epochs"),
    batch_size: int = finetune_option("batch_size"),
    lr: float = finetune_option("lr"),
    full_lr_scale: float = finetune_option("full_lr_scale"),
    optimizer: str = finetune_option("optimizer"),
    schedule: str = finetune_option("schedule"),
    label_smoothing: float = finetune_option("label_smoothing"),
    weight_decay: float = finetune_option("weight_decay"),
    momentum: float = finetune_option("momentum"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    amp: bool = finetune_option("amp"),
    channels_last: bool = finetune_option("channels_last"),
    workers: int = finetune_option("workers"),
    head: str | None = finetune_option("head"),
    image_size: int | None = typer.Option(None, "--image-size", help="image size (digits: 32, folders: the model's)"),
    resume: bool = typer.Option(False, "--resume", help="continue the experiment in --out where it stopped"),
    force: bool = typer.Option(False, "--force", help="start over in an --out that holds an experiment"),
    nproc: int = typer.Option(
        1, "--nproc", help="launch N processes with torchrun; each trains every N-th run alone (one GPU each)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    plot_file: str | None = typer.Option(None, "--plot", help="write accuracy vs added latency, with intervals (PNG)"),
) -> None:
    """Fine-tune a control (no units) and retrofit arms of MODEL over several seeds, on the same
    batches; report accuracy, its difference to the control with an interval, cost and speed."""
    from se_inject.io.models import load_model
    from se_inject.train.config import ExperimentConfig
    from se_inject.train.data import check_image_size, data_classes, load_data, model_data_config
    from se_inject.train.experiment import arms, experiment
    from se_inject.train.finetune import UntrainedModelWarning

    tuning = finetune_config(locals())  # each run's seed is one of --seeds
    config = ExperimentConfig(
        seeds=parse_seeds(seeds),
        base_epochs=base_epochs,
        base_lr=base_lr,
        base_seed=base_seed,
        latency_batch=latency_batch,
        latency_repeats=latency_repeats,
    )
    chosen = arms(
        positions=parse_names(positions, "--positions") or (),
        rs=as_tuple(parse_int_list(r, "--r")) if r else (),
        units=parse_names(units, "--units") or (),
        inits=parse_names(inits, "--inits") or (),
        styles=parse_names(styles, "--styles") or (),
        candidates=[parse_candidate(text) for text in candidate],
    )
    if plot_file is not None:
        from se_inject.measure.compare import check_plot_target

        check_plot_target(plot_file)
    if image_size is not None:
        check_image_size(image_size)
    if nproc < 1:
        raise ConfigError(f"--nproc: expected 1 or more processes, got {nproc}")
    classes = data_classes(data)  # checked completely before any model is built
    if reference_data is not None:
        data_classes(reference_data)
    if nproc > 1:  # everything that can be checked once is checked before the workers start
        raise typer.Exit(_launch_torchrun(nproc, device))
    given = _head_kwargs(num_classes)
    dataset_head = {} if (given or checkpoint or pretrained) else {"num_classes": len(classes)}
    import torch

    torch.manual_seed(base_seed)  # an untrained MODEL is built the same way again when the experiment resumes
    network = load_model(
        model, device="cpu", pretrained=pretrained, checkpoint=checkpoint, optional_kwargs=dataset_head, **given
    )
    splits = load_data(data, image_size, model_data_config(network), check=False)
    reference = None
    if reference_data is not None:
        reference = load_data(reference_data, splits.image_size, model_data_config(network), check=False)
    out_console = console()
    with warnings.catch_warnings(record=True) as caught:  # an untrained base is said once, below
        warnings.simplefilter("always", UntrainedModelWarning)
        result = experiment(
            network,
            splits,
            out,
            chosen,
            tuning,
            config,
            reference=reference,
            model_name=model,
            resume=resume,
            force=force,
            show_progress=not as_json,
            console=Console(stderr=True) if as_json else out_console,
        )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the first process reports
        return
    untrained = [w for w in caught if issubclass(w.category, UntrainedModelWarning)]
    for w in caught:  # every other warning as Python would have shown it
        if w not in untrained:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for message in dict.fromkeys(str(w.message) for w in untrained):
        typer.echo(f"se-inject: warning: {message}", err=True)
    # the result first: a plot that fails (a full disk) must not lose what the runs measured
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        render_experiment(result, out_console)
    if plot_file is not None:
        from se_inject.train.experiment import plot

        plot(result, plot_file)
        if not as_json:
            out_console.print(f"wrote {plot_file}")


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.2f}"


def render_experiment(result: Any, out: Console) -> None:
    """The arms as a rich table (accuracy over seeds, the difference to the control with its interval,
    cost, speed, forgetting), then one verdict per arm."""
    level = f"{result.level:.0%}"
    table = Table(
        title=f"{result.model}: {len(result.seeds)} seeds per arm, accuracy on the validation set "
        f"(base {'-' if result.base_accuracy is None else f'{result.base_accuracy:.2%}'})",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    forgetting = any(a.forgetting is not None for a in result.arms)
    columns = ["arm", "accuracy", "sd", f"vs control [{level}]", "start", "+weights", "+FLOPs"]
    columns += [f"time b{result.latency_batch}"] if result.latency_batch else []
    columns += ["img/s"] + (["forgetting"] if forgetting else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right", no_wrap=True)
    for arm in result.arms:
        if arm.error is not None:
            continue
        d = arm.difference
        interval = (
            "-"
            if d is None
            else f"{_points(d.mean)} [{_points(d.low)}, {_points(d.high)}]"
            if d.low is not None
            else _points(d.mean)
        )
        cells = [
            arm.label,
            f"{arm.accuracy.mean:.2%}",
            "-" if arm.accuracy.std is None else f"{100 * arm.accuracy.std:.2f}",
            interval,
            f"{arm.start_accuracy.mean:.2%}",
            "-" if arm.options is None else f"+{arm.params_added:,}",
            "-" if arm.options is None else f"{arm.flops_increase:+.2%}",
        ]
        if result.latency_batch:
            cells.append("-" if arm.latency is None else str(arm.latency))
        cells.append("-" if arm.images_per_s is None else f"{arm.images_per_s:,.0f}")
        if forgetting:
            cells.append("-" if arm.forgetting is None else _points(arm.forgetting.mean))
        table.add_row(*cells, style="bold" if arm.options is None else None)
    out.print(table)
    out.print(
        f"accuracy: mean over seeds, sd in points; vs control: mean of the per-seed differences in points, {level} t "
        "interval; start: right after injection; "
        + (
            f"time b{result.latency_batch}: inference time over the base's, median [25%, 75%]; "
            if result.latency_batch
            else ""
        )
        + "img/s: training speed in the epochs that train everything"
    )
    for arm in result.arms:
        if arm.error is not None:
            out.print(f"[red]not built[/]: {arm.label}: {arm.error}")
    for line in result.verdicts():
        out.print(line)
    out.print(f"runs in {result.out}; {result.seconds:.0f} s")
