"""Did the units learn? How far each inserted unit moved from its start during fine-tuning.

A unit that starts as the identity (``init="preserve"``) and ends as the identity added weights and
nothing else. The figure is taken on a probe batch (the first validation images): every unit is run
on the input it receives at the end, once as it is and once as it started, and its movement is the
mean absolute difference of the two outputs over the mean absolute input; its effect is the mean
absolute difference of its output and its input, over the same. Both hold for any unit, a gate or an
added context (GC), and neither depends on how the backbone changed around it.

>>> MovementReport([UnitMovement("layer1.0.se_1_1", 1, 0.0, 0.0)]).learned
0.0
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from se_inject.graph.shadow import eval_mode
from se_inject.units.base import ChannelUnit

# a unit that moved by less than this share of its input's magnitude did not learn (its output changed by
# under 1% of what it recalibrates): the identity band
IDENTITY_BAND = 0.01
PROBE_IMAGES = 64  # the images the figure is taken on: enough for a mean, cheap next to an epoch


@dataclass(frozen=True)
class UnitMovement:
    name: str
    stage: int
    moved: float  # mean |unit(x) - start(x)| / mean |x|, x the unit's input at the end
    effect: float  # mean |unit(x) - x| / mean |x| (a residual the unit adds left out): how far from the identity


@dataclass
class MovementReport:
    """Every unit's movement from its start; ``band``: the identity band."""

    units: list[UnitMovement]
    band: float = IDENTITY_BAND
    images: int = 0
    # True: no start was known, and each unit's figure is its effect (its distance from the identity), which
    # is its movement for a unit that started as the identity (init="preserve")
    from_identity: bool = False

    def figure(self, unit: UnitMovement) -> float:
        """The unit's movement from its start (its effect when measured from the identity)."""
        return unit.effect if self.from_identity else unit.moved

    @property
    def learned(self) -> float:
        """The share of units that moved out of the identity band."""
        return sum(self.figure(u) > self.band for u in self.units) / len(self.units) if self.units else 0.0

    def by_stage(self) -> dict[int, float]:
        """The mean movement of the units of each stage."""
        moved: dict[int, list[float]] = defaultdict(list)
        for unit in self.units:
            moved[unit.stage].append(self.figure(unit))
        return {stage: sum(values) / len(values) for stage, values in sorted(moved.items())}

    def summary(self) -> str:
        """One line: the share of units that learned and the movement per stage."""
        stages = ", ".join(f"stage {s} {m:.2%}" for s, m in self.by_stage().items())
        what = (
            "away from the identity (no start known: their effect)"
            if self.from_identity
            else "out of the identity band"
        )
        return (
            f"units that moved {what} (> {self.band:.0%} of their input): "
            f"{self.learned:.0%} of {len(self.units)}; mean movement {stages}"
        )

    def warning(self) -> str | None:
        """What to do when no unit learned; None when some did."""
        if not self.units or self.learned > 0:
            return None
        return (
            f"no unit moved out of the identity band (the largest moved {max(map(self.figure, self.units)):.2%} of "
            "its input): the units added weights but learned nothing; give them their own optimizer "
            "(--unit-optimizer adamw), a higher learning rate (--unit-lr-scale), more SE-only epochs (--se-epochs) "
            "or a longer run"
        )

    def to_dict(self) -> dict:
        return {
            "band": self.band,
            "images": self.images,
            "learned": self.learned,
            "from_identity": self.from_identity,
            "by_stage": {str(k): v for k, v in self.by_stage().items()},
            "units": [u.__dict__ for u in self.units],
        }


def unit_snapshot(model: nn.Module) -> dict[str, ChannelUnit]:
    """A copy of every unit of ``model`` as it is now, by qualified name: the start to measure from."""
    snapshot = {name: copy.deepcopy(m) for name, m in model.named_modules() if isinstance(m, ChannelUnit)}
    for unit in snapshot.values():
        unit.overwrite_input = False  # run on kept inputs, which must stay as they are
    return snapshot


def stage_block(name: str) -> tuple[int, int]:
    """(stage, block) of a unit named UNIT_stage_block by the planner (``layer1.0.eca_1_1``); else (0, 0)."""
    parts = name.rpartition(".")[2].rsplit("_", 2)
    return (int(parts[1]), int(parts[2])) if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else (0, 0)


def measure_movement(model: nn.Module, start: dict[str, ChannelUnit], images: torch.Tensor) -> MovementReport:
    """Each unit of ``model`` in ``start`` against its start, on the inputs ``images`` give it (eval mode)."""
    units = {name: m for name, m in model.named_modules() if isinstance(m, ChannelUnit) and name in start}
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in units}  # |moved|, |effect|, |x|

    inputs: dict[str, tuple] = {}

    def keep(name: str):
        # a unit may write its result over its input at inference (overwrite_input): keep a copy first
        def record(module: ChannelUnit, args: tuple) -> None:
            inputs[name] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)

        return record

    def compare(name: str):
        def record(module: ChannelUnit, args: tuple, output: torch.Tensor) -> None:
            kept = inputs.pop(name)
            x = kept[0]
            # forward(x, residual) is residual + forward(x): the identity's output is x + residual
            identity = x + kept[1] if len(kept) > 1 and isinstance(kept[1], torch.Tensor) else x
            sums[name][1] += float((output - identity).abs().sum())
            sums[name][2] += float(x.abs().sum())
            before = start[name].to(x.device)(*kept)
            sums[name][0] += float((output - before).abs().sum())

        return record

    handles = [unit.register_forward_pre_hook(keep(name)) for name, unit in units.items()]
    handles += [unit.register_forward_hook(compare(name)) for name, unit in units.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for snapshot in start.values():
                snapshot.eval()
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    found = [
        UnitMovement(name, stage_block(name)[0], moved / max(size, 1e-12), effect / max(size, 1e-12))
        for name, (moved, effect, size) in sums.items()
    ]
    return MovementReport(found, images=len(images))


def movement_from_start(
    model: nn.Module, started: dict[str, dict[str, torch.Tensor]], images: torch.Tensor
) -> MovementReport | None:
    """Each unit of ``model`` against its start, given as each unit's state dict by name (a fine-tuning
    run's ``start_units``), on ``images``; a start that is not these units' (empty, another model's)
    measures each unit's distance from the identity instead. None: ``model`` has no units."""
    start = unit_snapshot(model)
    if not start:
        return None
    known = bool(started) and set(started) == set(start)
    if known:
        for name, unit in start.items():
            unit.load_state_dict(started[name])
    report = measure_movement(model, start, images)
    report.from_identity = not known
    return report


def probe_images(dataset: object, count: int = PROBE_IMAGES) -> torch.Tensor:
    """The first ``count`` images of a dataset of (image, label) pairs, as one batch."""
    size = len(dataset)  # type: ignore[arg-type]
    return torch.stack([dataset[i][0] for i in range(min(count, size))])  # type: ignore[index]
