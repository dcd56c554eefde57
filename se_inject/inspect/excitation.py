"""What the SE units learned: excitation statistics, the paper's plots, and units to prune.

Following the paper's section on the role of excitation: the gate of every unit is recorded over a
dataset, per channel, for all images and per class. A unit whose gate hardly varies from image to
image (the paper's last-stage units, saturated near 1) adds weights but no input-dependent
recalibration: it can be replaced by its mean per-channel scale, a fixed buffer with no weights,
at a small cost in the outputs, which :func:`prune_units` measures.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader

from se_inject.errors import ConfigError
from se_inject.graph.shadow import eval_mode
from se_inject.io.recipe import attach_recipe, attached_recipe
from se_inject.train.data import DataSplits
from se_inject.train.movement import MovementReport, movement_from_start, probe_images, stage_block
from se_inject.units.base import UNITS, ChannelUnit
from se_inject.units.se import ChannelScale


@dataclass
class UnitStats:
    """Gate statistics of one unit over a dataset (channels C, classes K)."""

    name: str
    stage: int
    block: int
    channels: int
    gate_range: float  # 1 for a sigmoid gate, 2 for the preserve init's 2*sigmoid
    mean: list[float]  # per channel, over all images
    class_mean: list[list[float]]  # K x C
    class_std: list[list[float]]  # K x C: spread within each class
    image_std: float  # mean over channels of the std over all images
    saturation: float  # 1 - image_std / (gate_range / 2): 1 means the gate is a constant
    kind: str = "se"  # the unit type
    shows: str = "the channel gate"  # what of the unit these statistics describe
    prunable: bool = True  # whether a fixed per-channel scale can stand in for the whole unit


@dataclass
class ExcitationReport:
    classes: list[str]
    images: int
    units: list[UnitStats] = field(default_factory=list)

    def suggestions(self, threshold: float = 0.95) -> list[str]:
        """Units whose gate is nearly constant (saturation at or above ``threshold``) and that a fixed
        scale can replace (not CBAM, whose spatial gate follows)."""
        return [u.name for u in self.units if u.prunable and u.saturation >= threshold]

    def to_dict(self, threshold: float = 0.95) -> dict:
        return {
            "classes": self.classes,
            "images": self.images,
            "threshold": threshold,
            "suggested_for_pruning": self.suggestions(threshold),
            "units": [u.__dict__ for u in self.units],
        }


@contextlib.contextmanager
def evaluated_on(model: nn.Module, device: str | torch.device) -> Iterator[None]:
    """``model`` in eval mode on ``device`` for the duration; its flags and device restored afterwards."""
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else None
    with eval_mode(model):
        model.to(device)
        try:
            yield
        finally:
            if home is not None:
                model.to(home)


@runtime_checkable
class ReadableGate(Protocol):
    """A unit whose gate can be read: ``excitation(x)`` is the per-channel scale it applies to ``x``."""

    channels: int

    def excitation(self, x: torch.Tensor) -> torch.Tensor: ...


def se_units(model: nn.Module) -> list[tuple[str, ChannelUnit]]:
    """The model's units whose gate can be read (see :class:`ReadableGate`; a GC block that only adds
    its context has none)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, ChannelUnit) and isinstance(m, ReadableGate) and m.excitation_shows
    ]


def _kind(unit: ChannelUnit) -> str:
    """The registered name of ``unit``'s type (its class name if it was never registered)."""
    return next((name for name, cls in UNITS.items() if cls is type(unit)), type(unit).__name__)


def collect(
    model: nn.Module,
    loader: DataLoader,
    classes: list[str],
    device: str | torch.device = "cpu",
    max_images: int | None = None,
) -> ExcitationReport:
    """Run ``model`` (eval mode) over ``loader`` and record every unit's gate, per channel and class."""
    units = se_units(model)
    if not units:
        raise ConfigError(
            "the model holds no units with a readable gate to inspect; inject or load an injected model "
            "(a GC block with fusion='add' has no gate)"
        )
    k = len(classes)
    sums = {n: torch.zeros(k, u.channels, dtype=torch.float64) for n, u in units}
    squares = {n: torch.zeros(k, u.channels, dtype=torch.float64) for n, u in units}
    counts = torch.zeros(k, dtype=torch.float64)
    labels_now: list[torch.Tensor] = []

    def hook(name: str):
        def record(module: ReadableGate, args: tuple) -> None:
            gate = module.excitation(args[0]).detach().double()
            gate = gate.mean((2, 3)) if gate.dim() == 4 else gate  # NoSqueeze: per-position gates, averaged
            one_hot = torch.nn.functional.one_hot(labels_now[0], k).double().cpu()
            sums[name] += one_hot.T @ gate.cpu()
            squares[name] += one_hot.T @ gate.cpu().square()

        return record

    handles = [u.register_forward_pre_hook(hook(n)) for n, u in units]
    seen = 0
    try:
        with evaluated_on(model, device), torch.no_grad():
            for images, labels in loader:
                if max_images is not None and seen >= max_images:
                    break
                labels_now[:] = [labels.to(device)]
                model(images.to(device))
                counts += torch.bincount(labels, minlength=k).double()
                seen += labels.numel()
    finally:
        for handle in handles:
            handle.remove()
    report = ExcitationReport(classes, seen)
    report.units.extend(_unit_stats(name, unit, sums[name], squares[name], counts) for name, unit in units)
    return report


def _unit_stats(
    name: str, unit: ChannelUnit, sums: torch.Tensor, squares: torch.Tensor, counts: torch.Tensor
) -> UnitStats:
    """One unit's statistics from its per-class sums of gates and of squared gates over ``counts`` images."""
    total = counts.sum()
    mean = sums.sum(0) / total
    var_all = (squares.sum(0) / total - mean.square()).clamp_min(0)
    class_mean = sums / counts.clamp_min(1)[:, None]
    class_var = (squares / counts.clamp_min(1)[:, None] - class_mean.square()).clamp_min(0)
    class_mean[~(counts > 0)] = float("nan")
    gate_range = unit.gate_range
    image_std = float(var_all.sqrt().mean())
    stage, block = stage_block(name)
    return UnitStats(
        name,
        stage,
        block,
        unit.channels,
        gate_range,
        mean.tolist(),
        class_mean.tolist(),
        class_var.sqrt().tolist(),
        image_std,
        max(0.0, 1.0 - image_std / (gate_range / 2)),
        kind=_kind(unit),
        shows=unit.excitation_shows,
        prunable=unit.channel_gate,
    )


@dataclass
class PruneResult:
    model: nn.Module
    removed: list[str]
    params_saved: int
    eq5_saved: float  # Eq. 5 for the removed units (2 C^2 / r each, plus C/r + C with bias)
    max_output_change: float | None = None
    accuracy_before: float | None = None  # validation accuracy of the model given to prune()
    accuracy_after: float | None = None
    report: ExcitationReport | None = None  # the excitation statistics the choice was made from


def prune_units(
    model: nn.Module, report: ExcitationReport, names: list[str] | None = None, threshold: float = 0.95
) -> PruneResult:
    """Replace units (``names``, default: the suggestions) by their mean per-channel scale, in place."""
    names = report.suggestions(threshold) if names is None else names
    stats = {u.name: u for u in report.units}
    unknown = [n for n in names if n not in stats]
    if unknown:
        raise ConfigError(f"units: {unknown[0]!r} is not an SE unit of the model; units are {', '.join(stats)}")
    frozen = [n for n in names if not stats[n].prunable]
    if frozen:
        raise ConfigError(
            f"units: {frozen[0]!r} ({stats[frozen[0]].kind}) is not a channel gate alone, so no fixed per-channel "
            "scale can stand in for it; prune units whose whole effect is x * gate (se, ese, eca, ceca, ge, gc "
            "with fusion='scale')"
        )
    saved, eq5 = 0, 0.0
    for name in names:
        unit = model.get_submodule(name)
        assert isinstance(unit, ChannelUnit)  # in stats: se_units found it
        saved += sum(p.numel() for p in unit.parameters())
        eq5 += unit.expected_params()  # the unit's own closed form, as the report uses it
        mean = torch.tensor(stats[name].mean, dtype=next(unit.parameters()).dtype)
        model.set_submodule(name, ChannelScale(mean))
    recipe = attached_recipe(model)
    if recipe is not None:  # so that se_inject.load rebuilds the pruned model
        attach_recipe(model, replace(recipe, pruned=sorted({*recipe.pruned, *names})))
    return PruneResult(model, list(names), saved, eq5)


def max_output_change(
    before: nn.Module, after: nn.Module, loader: DataLoader, device: str | torch.device = "cpu"
) -> float:
    """The largest |after - before| over the outputs on ``loader``."""
    worst = 0.0
    with evaluated_on(before, device), evaluated_on(after, device), torch.no_grad():
        for images, _ in loader:
            images = images.to(device)
            worst = max(worst, (after(images) - before(images)).abs().max().item())
    return worst


def plot(report: ExcitationReport, out: str | Path, units: list[str] | None = None, classes: int = 4) -> list[Path]:
    """The paper's pictures as PNGs in ``out``: per chosen unit, the mean gate per channel for a
    few classes against all classes; and saturation per unit over depth. Returns the files."""
    try:
        from matplotlib.figure import (
            Figure,  # a bare Figure draws with Agg: pyplot's global backend is left alone
        )
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'se-inject[plots]'") from None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [u for u in report.units if units is None or u.name in units or f"{u.stage}_{u.block}" in units]
    if units is None:  # first, middle and last unit, as the paper shows several depths
        picks = sorted({0, len(chosen) // 2, len(chosen) - 1})
        chosen = [chosen[i] for i in picks]
    files = []
    for unit in chosen:
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        for k in range(min(classes, len(report.classes))):
            ax.plot(unit.class_mean[k], lw=0.8, label=f"class {report.classes[k]}")
        ax.plot(unit.mean, color="black", lw=1.5, label="all classes")
        ax.set(
            title=f"{unit.name} (stage {unit.stage}, block {unit.block})", xlabel="channel", ylabel="mean excitation"
        )
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = out / f"excitation_{unit.stage}_{unit.block}.png"
        fig.savefig(path, dpi=110)
        files.append(path)
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.plot(range(1, len(report.units) + 1), [u.saturation for u in report.units], marker="o")
    ax.set_xticks(
        range(1, len(report.units) + 1), [f"{u.stage}_{u.block}" for u in report.units], rotation=90, fontsize=7
    )
    ax.set(
        title="saturation per unit (1: the gate is a constant)",
        xlabel="unit (stage_block)",
        ylabel="saturation",
        ylim=(0, 1.05),
    )
    fig.tight_layout()
    path = out / "saturation.png"
    fig.savefig(path, dpi=110)
    files.append(path)
    return files


def write_json(
    report: ExcitationReport, out: str | Path, threshold: float = 0.95, movement: MovementReport | None = None
) -> Path:
    path = Path(out) / "excitation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = report.to_dict(threshold)
    if movement is not None:
        data["movement"] = movement.to_dict()
    path.write_text(json.dumps(data, indent=1))
    return path


def unit_movement(model: nn.Module, data: DataSplits, run: str | Path | None = None) -> MovementReport | None:
    """How far each unit of ``model`` moved from its start, on the first validation images of ``data``: the
    start is the one the fine-tuning run in ``run`` kept in its checkpoint; without one, each unit's
    distance from the identity (its start with ``init="preserve"``). None: no units.

    Example::

        se_inject.unit_movement(se_inject.load("runs/digits"), se_inject.load_data("digits"), "runs/digits").summary()
    """
    from se_inject.io.layout import CHECKPOINT_FILE
    from se_inject.train.finetune import read_checkpoint

    checkpoint = Path(run) / CHECKPOINT_FILE if run is not None else None
    kept = read_checkpoint(checkpoint).get("start_units", {}) if checkpoint and checkpoint.is_file() else {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return movement_from_start(model, kept, probe_images(data.val).to(device))


def prune(
    model: nn.Module,
    data: DataSplits,
    units: list[str] | None = None,
    threshold: float = 0.95,
    *,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> PruneResult:
    """Replace the SE units of ``model`` whose gate is nearly constant on ``data`` by their mean scale.

    Statistics come from ``data``'s validation split; ``units`` names the units to replace
    (default: those whose saturation reaches ``threshold``). ``model`` is not changed: the result
    holds a pruned copy, the parameters saved against Eq. 5, the largest output change on the
    validation split and the accuracy before and after. Save the copy with :func:`se_inject.save`.

    Example::

        result = se_inject.prune(se_inject.load("runs/digits"), se_inject.load_data("digits"), threshold=0.95)
        result.removed, result.params_saved, result.accuracy_before, result.accuracy_after
    """
    from se_inject.train.finetune import evaluate

    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold: a saturation between 0 and 1, got {threshold}")
    loader = DataLoader(data.val, batch_size=batch_size)
    report = collect(model, loader, data.classes, device)
    result = prune_units(copy.deepcopy(model), report, units, threshold)
    result.report = report
    result.max_output_change = max_output_change(model, result.model, loader, device)
    target = torch.device(device)
    with evaluated_on(model, target), evaluated_on(result.model, target):
        result.accuracy_before = evaluate(model, loader, target)[1]
        result.accuracy_after = evaluate(result.model, loader, target)[1]
    return result
