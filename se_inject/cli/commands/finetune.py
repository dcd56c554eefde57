"""``se-inject finetune SOURCE``: fine-tune a retrofit (a saved one, or MODEL injected first)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import typer
from rich.console import Console

from se_inject.cli import options as opt
from se_inject.cli.launch import is_first_process, launch_torchrun
from se_inject.cli.render import console, percent, warn
from se_inject.errors import ConfigError


@opt.takes_injection_options
def command(
    ctx: typer.Context,
    injection: dict[str, Any],
    source: str = typer.Argument(
        ..., help=f"a directory written by --save, or a model to inject first: {opt.MODEL_HELP}"
    ),
    data: str = typer.Option(
        ..., "--data", help="'digits', 'textures' (generated) or an image folder with train/ and val/ class folders"
    ),
    out: str = typer.Option(..., "--out", help="run directory: checkpoint.pt, metrics.jsonl and the final model"),
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
    seed: int = opt.finetune_option("seed"),
    workers: int = opt.finetune_option("workers"),
    head: str | None = opt.finetune_option("head"),
    save_weights: str = opt.finetune_option("save_weights"),
    input_size: int | None = opt.input_size_option(
        "training image size (digits: 32, textures: 64, folders: the model's)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    force: bool = typer.Option(False, "--force", help="start over in an --out that holds a saved model or run"),
    nproc: int = opt.nproc_option("launch N processes with torchrun (DistributedDataParallel)"),
    checkpoint: str | None = opt.checkpoint_option(),
    pretrained: bool = opt.pretrained_option(),
    num_classes: int | None = opt.num_classes_option(
        "classes of SOURCE's head as --checkpoint has it (default: the dataset's)"
    ),
    trust_code: bool = opt.trust_code_option(),
    base: str | None = opt.base_option(),
) -> None:
    """Fine-tune a retrofitted model: SE units first (--se-epochs), then everything."""
    from se_inject.train.data import check_image_size, data_classes

    config = opt.finetune_config(locals())
    if input_size is not None:
        check_image_size(input_size)
    saved = Path(source).is_dir()
    if saved and injection:
        first = next(iter(injection)).replace("_", "-")
        raise ConfigError(f"--{first}: {source} is a saved retrofit; injection options apply to a model to inject")
    if base is not None and not saved:
        raise ConfigError("--base: the base of a units-only save; for a model to inject, give --checkpoint")
    if not saved:
        from se_inject.io.models import spec_kind

        spec_kind(source)
    classes = len(data_classes(data))  # the data is checked completely before any model is built
    if nproc > 1:  # everything that can be checked once is checked before the workers start
        raise typer.Exit(launch_torchrun(nproc, device))
    import torch

    from se_inject.train.finetune import finetune

    torch.manual_seed(seed)
    model, original, splits = _model_and_data(
        source, data, input_size, classes, injection, head, num_classes, checkpoint, pretrained, trust_code, base
    )
    output = console()
    with _start_said_at_once() as said:
        result = finetune(
            model,
            splits,
            out,
            config,
            original=original,
            resume=resume,
            force=force,
            show_progress=True,
            console=output,
        )
    if is_first_process():
        for message in result.warnings:
            if message not in said:
                warn(message)
        render(result, output)


@contextlib.contextmanager
def _start_said_at_once() -> Iterator[list[str]]:
    """What the start says (an untrained backbone, a start that broke a trained one) is said as soon as it is
    decided, before training, as se-inject's one line; the messages said. Other warnings as Python shows
    them; that the units did not learn is said with the result."""
    from se_inject.train.finetune import StartChangedModelWarning, UnitsDidNotLearnWarning, UntrainedModelWarning

    said: list[str] = []
    shown = warnings.showwarning

    def say_now(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not issubclass(category, (UntrainedModelWarning, StartChangedModelWarning)):
            shown(message, category, filename, lineno, file, line)
            return
        if is_first_process():
            warn(str(message))
        said.append(str(message))

    with warnings.catch_warnings():
        warnings.simplefilter("always", UntrainedModelWarning)
        warnings.simplefilter("always", StartChangedModelWarning)
        warnings.simplefilter("ignore", UnitsDidNotLearnWarning)
        warnings.showwarning = say_now
        yield said


def _model_and_data(
    source: str,
    data: str,
    input_size: int | None,
    classes: int,
    injection: dict[str, Any],
    head: str | None,
    num_classes: int | None,
    checkpoint: str | None,
    pretrained: bool,
    trust_code: bool,
    base: str | None,
) -> tuple[Any, Any, Any]:
    """(model to fine-tune, the original it was injected into or None for a saved one, the data)."""
    from se_inject.api import retrofit
    from se_inject.config import InjectConfig
    from se_inject.io.models import load_model_for_data
    from se_inject.io.saving import load
    from se_inject.train.data import load_data, model_data_config

    if Path(source).is_dir():
        model = load(source, base=base, trust_code=trust_code)
        return model, None, load_data(data, input_size, model_data_config(model), check=False)
    original = load_model_for_data(
        source, classes, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained
    )
    splits = load_data(data, input_size, model_data_config(original), check=False)
    plan = InjectConfig.from_dict(injection)
    model = retrofit(original, plan, input_size=splits.image_size, model_name=source, head=head).model
    return model, original, splits


def render(result: Any, out: Console) -> None:
    from se_inject.cli.render import table

    accuracy = table("Validation accuracy", ("before retrofit", "after injection", "after fine-tuning"))
    accuracy.add_row(*(percent(v) for v in result.accuracy.values()))
    out.print(accuracy)
    if result.movement is not None:
        out.print(result.movement.summary())
    last = result.history[-1] if result.history else {}
    out.print(
        f"{len(result.history)} epochs, {last.get('world_size', 1)} process(es) on {last.get('device', '?')}; "
        f"metrics in {result.out}/metrics.jsonl; model in {result.out}/ (se_inject.load('{result.out}'))"
    )
