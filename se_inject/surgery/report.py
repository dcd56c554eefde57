"""The overhead report: what the units cost, predicted by Eq. 5 (or a unit's own closed form) and measured.

Eq. 5 of Hu et al. gives the weights added by the FC layers of all units,
``(2 / r) * sum_s N_s * C_s**2``; with bias each unit adds ``C/r + C`` more. Here it is summed
unit by unit (``2 * C**2 / r``), which is Eq. 5 when a stage's units share C and also covers the
``pre`` position, whose first unit of a stage sees the previous stage's width. The weights
actually added are counted on the injected model; the two agree exactly whenever r divides C.
Every other unit type predicts its own weights the same way (``ChannelUnit.expected_params``: ECA's
kernel, GC's attention conv and LayerNorm, CBAM's spatial conv); the fields keep the name ``eq5``.

FLOPs are counted by torch.utils.flop_counter on abstract tensors at batch 1: one multiply-add
is 2 FLOPs, and se_inject adds one FLOP per element for pooling and for the channel scaling, which
the counter leaves out. The paper's "GFLOPs" are multiply-adds of conv and FC layers only; they are
reported apart (``macs``), as is the elementwise rest, which is most of what SE adds (its pooling and
scaling touch every element of a feature map, its FC layers only C x C/r weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction

from torch import nn

from se_inject.config import InjectConfig
from se_inject.graph.flops import FlopCount
from se_inject.placement.plan import Plan, PlannedUnit
from se_inject.placement.sites import Analysis
from se_inject.units.base import ChannelUnit
from se_inject.units.se import eq5_params  # noqa: F401 - part of this module's public names


def _number(value: Fraction) -> int | float:
    return int(value) if value.denominator == 1 else float(value)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class UnitReport:
    name: str  # qualified name of the unit in the injected model
    owner: str  # the module that holds it
    rule: str  # the placement rule that put it there
    stage: int
    block: int
    channels: int
    hidden: int
    r: int
    size: tuple[int, int]
    params: int
    flops: int
    macs: int = 0  # multiply-adds of its FC/conv layers; the rest of its FLOPs is elementwise


@dataclass(frozen=True)
class StageReport:
    stage: int
    size: tuple[int, ...]  # (height, width) of the stage's feature maps
    blocks: int  # N_s: blocks of the stage that carry a unit
    sites: int  # residual blocks in the stage
    channels: int | list[int]  # C_s (a list where the units of a stage differ, as with "pre")
    r: int | None
    eq5_params: int | float
    added_params: int
    flops_before: int
    flops_after: int


@dataclass(frozen=True)
class Totals:
    params_before: int
    params_after: int
    params_added: int
    eq5_params: int | float
    flops_before: int
    flops_after: int
    macs_before: int = 0  # multiply-adds of conv and FC layers: the paper's "GFLOPs"
    macs_after: int = 0

    @property
    def elementwise_before(self) -> int:
        """FLOPs that are no multiply-add: pooling, scaling, gating (1 per element), softmax."""
        return self.flops_before - 2 * self.macs_before

    @property
    def elementwise_after(self) -> int:
        return self.flops_after - 2 * self.macs_after

    @property
    def macs_increase(self) -> float:
        return (self.macs_after - self.macs_before) / self.macs_before if self.macs_before else 0.0

    @property
    def params_increase(self) -> float:
        return self.params_added / self.params_before if self.params_before else 0.0

    @property
    def flops_increase(self) -> float:
        return (self.flops_after - self.flops_before) / self.flops_before if self.flops_before else 0.0


@dataclass(frozen=True)
class OverheadReport:
    """Cost of the inserted units, per stage and in total. ``to_dict()`` is the JSON form."""

    model: str
    position: str
    r: int | list[int]
    input_size: tuple[int, int]
    sites: tuple[UnitReport, ...]
    stages: tuple[StageReport, ...]
    totals: Totals
    existing_gates: tuple[str, ...] = ()  # SE-like gates the model already had
    notes: tuple[str, ...] = ()
    unit: str = "se"  # the unit type inserted (its closed form is Eq. 5 for se)

    @property
    def formula(self) -> str:
        """The name of the closed form the weights are predicted by: Eq. 5 for SE, the unit's own otherwise."""
        return "Eq. 5" if self.unit == "se" else f"{self.unit}'s closed form"

    @property
    def eq5_agrees(self) -> bool:
        """Whether the weights actually added equal Eq. 5's prediction, stage by stage."""
        return all(s.eq5_params == s.added_params for s in self.stages)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["totals"]["params_increase"] = self.totals.params_increase
        data["totals"]["flops_increase"] = self.totals.flops_increase
        data["totals"]["macs_increase"] = self.totals.macs_increase
        data["totals"]["elementwise_before"] = self.totals.elementwise_before
        data["totals"]["elementwise_after"] = self.totals.elementwise_after
        data["eq5_agrees"] = self.eq5_agrees
        return data

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def build_report(
    model_name: str,
    config: InjectConfig,
    analysis: Analysis,
    plan: Plan,
    original: nn.Module,
    injected: nn.Module,
    flops_after: FlopCount,
    unit_flops: dict[str, FlopCount],
    notes: Sequence[str] = (),
) -> OverheadReport:
    """Assemble the report from the plan and what was measured on both models."""
    expected = {u.qualified_name: _unit(injected, u.qualified_name).expected_params() for u in plan.units}
    units = [
        UnitReport(
            name=u.qualified_name,
            owner=u.owner,
            rule=u.site.rule.name,
            stage=u.stage,
            block=u.block,
            channels=u.channels,
            hidden=u.hidden,
            r=u.r,
            size=u.insertion.size,
            params=count_params(injected.get_submodule(u.qualified_name)),
            flops=unit_flops[u.qualified_name].total,
            macs=unit_flops[u.qualified_name].macs,
        )
        for u in plan.units
    ]
    stages = tuple(
        _stage_report(stage, analysis, plan, units, config, expected) for stage in range(1, plan.stage_count + 1)
    )
    params_before, params_after = count_params(original), count_params(injected)
    totals = Totals(
        params_before=params_before,
        params_after=params_after,
        params_added=params_after - params_before,
        eq5_params=_number(sum(expected.values(), Fraction(0))),
        flops_before=analysis.flops,
        flops_after=flops_after.total,
        macs_before=analysis.macs,
        macs_after=flops_after.macs,
    )
    return OverheadReport(
        model=model_name,
        position=config.position,
        r=list(config.r) if isinstance(config.r, tuple) else config.r,
        input_size=(analysis.input_shape[2], analysis.input_shape[3]),
        sites=tuple(units),
        stages=stages,
        totals=totals,
        existing_gates=tuple(g.name for g in plan.search.gates),
        notes=tuple(notes),
        unit=config.unit,
    )


def _unit(model: nn.Module, name: str) -> ChannelUnit:
    unit = model.get_submodule(name)
    assert isinstance(unit, ChannelUnit), name  # the rewrite put one there
    return unit


def _stage_report(
    stage: int,
    analysis: Analysis,
    plan: Plan,
    units: list[UnitReport],
    config: InjectConfig,
    expected: dict[str, Fraction],
) -> StageReport:
    sites = [s for s in plan.search.sites if s.stage == stage]
    planned: list[PlannedUnit] = [u for u in plan.units if u.stage == stage]
    measured = [u for u in units if u.stage == stage]
    widths = [u.channels for u in planned] or [s.insertion.channels for s in sites if s.insertion is not None] or [0]
    region = frozenset().union(*(s.region for s in sites))
    flops_before = sum(n.meta.get("flops", 0) for n in region)
    return StageReport(
        stage=stage,
        size=sites[0].size,
        blocks=len(planned),
        sites=len(sites),
        channels=widths[0] if len(set(widths)) == 1 else widths,
        r=planned[0].r if planned and len({u.r for u in planned}) == 1 else None,
        eq5_params=_number(sum((expected[u.qualified_name] for u in planned), Fraction(0))),
        added_params=sum(u.params for u in measured),
        flops_before=flops_before,
        flops_after=flops_before + sum(u.flops for u in measured),
    )
