"""``se-inject experiment MODEL``: a control and retrofit arms over several seeds, on the same batches."""

from __future__ import annotations

import warnings
from typing import Any

import typer
from rich.console import Console

from se_inject.cli import options as opt
from se_inject.cli.commands.compare import axis_option, candidate_option, plot_option
from se_inject.cli.launch import is_first_process, launch_torchrun
from se_inject.cli.render import console, percent, points, show_then_plot, table, warn


@opt.takes_injection_options
def command(
    ctx: typer.Context,
    injection: dict[str, Any],
    model: str = typer.Argument(..., help=opt.MODEL_HELP),
    data: str = typer.Option(
        ..., "--data", help="digits, textures (generated), or a folder with train/ and val/ class folders"
    ),
    out: str = typer.Option(
        ..., "--out", help="experiment directory: experiment.json, base/ and one run per arm and seed"
    ),
    seeds: str = typer.Option("5", "--seeds", help="seeds per arm: a count (5: seeds 0-4) or a list (0,3,7 or 0-2)"),
    positions: str | None = axis_option("--positions", "positions to try", "standard,post"),
    ratios: str | None = axis_option("--ratios", "reduction ratios to try", "8,16"),
    units: str | None = axis_option("--units", "unit types to try", "se,eca"),
    inits: str | None = axis_option("--inits", "starts to try", "preserve,paper,zero"),
    styles: str | None = axis_option("--styles", "styles to try", "paper,timm"),
    unit_lr_scales: str | None = axis_option(
        "--unit-lr-scales", "the units' learning rates to try, times the phase's (--unit-lr-scale's axis)", "1,30,100"
    ),
    se_phases: str | None = axis_option(
        "--se-phases", "SE-only epochs to try, each before the same full phase (--se-epochs' axis)", "0,1,2"
    ),
    candidate: list[str] = candidate_option("arm (it may also set unit_lr_scale, se_epochs and the units' own)"),
    reference_data: str | None = typer.Option(
        None, "--reference-data", help="the original task's data: each arm's final model is scored on it (forgetting)"
    ),
    base_epochs: int = opt.experiment_option("base_epochs"),
    base_lr: float = opt.experiment_option("base_lr"),
    base_seed: int = opt.experiment_option("base_seed"),
    latency_batch: int = opt.experiment_option("latency_batch"),
    latency_repeats: int = opt.experiment_option("latency_repeats"),
    epochs: int = opt.finetune_option("epochs"),
    se_epochs: int = opt.finetune_option("se_epochs"),
    batch_size: int = opt.finetune_option("batch_size"),
    lr: float = opt.finetune_option("lr"),
    full_lr_scale: float = opt.finetune_option("full_lr_scale"),
    optimizer: str = opt.finetune_option("optimizer"),
    schedule: str = opt.finetune_option("schedule"),
    label_smoothing: float = opt.finetune_option("label_smoothing"),
    weight_decay: float = opt.finetune_option("weight_decay"),
    unit_lr_scale: float = opt.finetune_option("unit_lr_scale"),
    unit_optimizer: str = opt.finetune_option("unit_optimizer"),
    unit_weight_decay: float | None = opt.finetune_option("unit_weight_decay"),
    unit_warmup_steps: int = opt.finetune_option("unit_warmup_steps"),
    momentum: float = opt.finetune_option("momentum"),
    device: str = opt.device_option(),
    amp: bool = opt.finetune_option("amp"),
    channels_last: bool = opt.finetune_option("channels_last"),
    workers: int = opt.finetune_option("workers"),
    head: str | None = opt.finetune_option("head"),
    input_size: int | None = opt.input_size_option("image size (digits: 32, textures: 64, folders: the model's)"),
    resume: bool = typer.Option(False, "--resume", help="continue the experiment in --out where it stopped"),
    force: bool = typer.Option(False, "--force", help="start over in an --out that holds an experiment"),
    nproc: int = opt.nproc_option("launch N processes with torchrun; each trains every N-th run alone (one GPU each)"),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="trained weights of MODEL (.safetensors, .pth)"),
    pretrained: bool = opt.pretrained_option(),
    num_classes: int | None = opt.num_classes_option(
        "classes of MODEL's head as --checkpoint has it (default: the dataset's)"
    ),
    as_json: bool = opt.json_option("result"),
    plot_file: str | None = plot_option("write accuracy vs added latency, with intervals (PNG)"),
) -> None:
    """Fine-tune a control (no units) and retrofit arms of MODEL over several seeds, on the same
    batches; report accuracy, its difference to the control with an interval, cost and speed. The arms
    vary the axes given (--positions, --ratios, --units, --inits, --styles; --candidate adds one) on top
    of the injection options given, and how the units are fine-tuned (--unit-lr-scales, --se-phases)."""
    from se_inject.measure.compare import check_plot_target
    from se_inject.train.config import ExperimentConfig
    from se_inject.train.data import check_image_size, data_classes
    from se_inject.train.experiment import arms

    tuning = opt.finetune_config(locals())  # each run's seed is one of --seeds
    config = ExperimentConfig(
        seeds=opt.parse_seeds(seeds),
        base_epochs=base_epochs,
        base_lr=base_lr,
        base_seed=base_seed,
        latency_batch=latency_batch,
        latency_repeats=latency_repeats,
    )
    chosen = arms(
        positions=opt.parse_names(positions, "--positions"),
        rs=opt.parse_ratios(ratios),
        units=opt.parse_names(units, "--units"),
        inits=opt.parse_names(inits, "--inits"),
        styles=opt.parse_names(styles, "--styles"),
        unit_lr_scales=opt.parse_number_list(unit_lr_scales, "--unit-lr-scales"),
        se_epochs=opt.parse_number_list(se_phases, "--se-phases", int),
        candidates=[opt.parse_candidate(text, tuning=True) for text in candidate],
        base=injection,
    )
    if plot_file is not None:
        check_plot_target(plot_file)
    if input_size is not None:
        check_image_size(input_size)
    classes = len(data_classes(data))  # checked completely before any model is built
    if reference_data is not None:
        data_classes(reference_data)
    if nproc > 1:  # everything that can be checked once is checked before the workers start
        raise typer.Exit(launch_torchrun(nproc, device))
    network, splits, reference = _model_and_data(
        model, data, reference_data, input_size, classes, num_classes, checkpoint, pretrained, config.base_seed
    )
    result = _run(network, splits, reference, out, chosen, tuning, config, model, resume, force, quiet=as_json)
    if result is None:  # under torchrun the first process reports
        return
    from se_inject.train.experiment import plot

    show_then_plot(result, as_json, render, plot, plot_file)


def _model_and_data(
    model: str,
    data: str,
    reference_data: str | None,
    input_size: int | None,
    classes: int,
    num_classes: int | None,
    checkpoint: str | None,
    pretrained: bool,
    seed: int,
) -> tuple[Any, Any, Any]:
    """(MODEL built for the data's classes, the data, the reference data or None)."""
    import torch

    from se_inject.io.models import load_model_for_data
    from se_inject.train.data import load_data, model_data_config

    torch.manual_seed(seed)  # an untrained MODEL is built the same way again when the experiment resumes
    network = load_model_for_data(model, classes, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained)
    splits = load_data(data, input_size, model_data_config(network), check=False)
    reference = None
    if reference_data is not None:
        reference = load_data(reference_data, splits.image_size, model_data_config(network), check=False)
    return network, splits, reference


def _run(
    network: Any,
    splits: Any,
    reference: Any,
    out: str,
    chosen: list,
    tuning: Any,
    config: Any,
    model_name: str,
    resume: bool,
    force: bool,
    quiet: bool,
) -> Any:
    """The experiment's result (None in every process but the first); its warnings are shown once."""
    from se_inject.train.experiment import experiment
    from se_inject.train.finetune import StartChangedModelWarning, UnitsDidNotLearnWarning, UntrainedModelWarning

    ours = (UntrainedModelWarning, StartChangedModelWarning, UnitsDidNotLearnWarning)
    with warnings.catch_warnings(record=True) as caught:  # what the runs say is said once each, below
        for category in ours:
            warnings.simplefilter("always", category)
        result = experiment(
            network,
            splits,
            out,
            chosen,
            tuning,
            config,
            reference=reference,
            model_name=model_name,
            resume=resume,
            force=force,
            show_progress=not quiet,
            console=console(stderr=quiet),
        )
    if not is_first_process():
        return None
    untrained = [w for w in caught if issubclass(w.category, ours)]
    for w in caught:  # every other warning as Python would have shown it
        if w not in untrained:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for message in dict.fromkeys(str(w.message) for w in untrained):
        warn(message)
    return result


def render(result: Any, out: Console) -> None:
    """The arms as a rich table (accuracy over seeds, the difference to the control with its interval,
    cost, speed, forgetting), then one verdict per arm."""
    out.print(_arms_table(result))
    level = f"{result.level:.0%}"
    timed = (
        f"time/train b{result.latency_batch}: inference time / a training step's time over the base's, measured "
        "interleaved, median [25%, 75%]; "
        if result.latency_batch
        else ""
    )
    out.print(
        f"accuracy: mean over seeds, sd in points; vs control: mean of the per-seed differences in points, {level} t "
        f"interval; start: right after injection; {timed}learned: share of units out of the identity band at the "
        "end (mean over seeds)"
    )
    for arm in result.arms:
        if arm.error is not None:
            out.print(f"[red]not built[/]: {arm.label}: {arm.error}")
    for line in result.verdicts():
        out.print(line)
    out.print(f"runs in {result.out}; {result.seconds:.0f} s")


def _arms_table(result: Any) -> Any:
    title = (
        f"{result.model}: {len(result.seeds)} seeds per arm, accuracy on the validation set "
        f"(base {percent(result.base_accuracy)})"
    )
    forgetting = any(a.forgetting is not None for a in result.arms)
    columns = ["arm", "accuracy", "sd", f"vs control [{result.level:.0%}]", "start", "+weights", "+FLOPs"]
    columns += [f"time b{result.latency_batch}", f"train b{result.latency_batch}"] if result.latency_batch else []
    columns += ["learned"] + (["forgetting"] if forgetting else [])
    arms = table(title, columns, left=("arm",), no_wrap=True)
    for arm in result.arms:
        if arm.error is None:
            arms.add_row(
                *_arm_cells(arm, result.latency_batch, forgetting), style="bold" if arm.options is None else None
            )
    return arms


def _arm_cells(arm: Any, latency_batch: int | None, forgetting: bool) -> list[str]:
    d = arm.difference
    interval = "-" if d is None else points(d.mean)
    if d is not None and d.low is not None:
        interval += f" [{points(d.low)}, {points(d.high)}]"
    cells = [
        arm.label,
        f"{arm.accuracy.mean:.2%}",
        "-" if arm.accuracy.std is None else f"{100 * arm.accuracy.std:.2f}",
        interval,
        f"{arm.start_accuracy.mean:.2%}",
        "-" if arm.options is None else f"+{arm.params_added:,}",
        "-" if arm.options is None else f"{arm.flops_increase:+.2%}",
    ]
    if latency_batch:
        cells += ["-" if spread is None else str(spread) for spread in (arm.latency, arm.training)]
    cells.append("-" if arm.units_learned is None else f"{arm.units_learned.mean:.0%}")
    if forgetting:
        cells.append("-" if arm.forgetting is None else points(arm.forgetting.mean))
    return cells
