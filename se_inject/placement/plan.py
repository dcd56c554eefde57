"""Turning found sites and an InjectConfig into a checked list of units to insert.

Every check happens here, before anything is built (peft's inject_adapter habit: prepare,
match, check everything, then mutate): stages in range, r per stage, r not wider than the
channels, the position applicable, the module that will hold each unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.config import Group, InjectConfig, parse_block_range, style
from se_inject.errors import ConfigError, NoSitesError, RewriteError
from se_inject.graph.ops import is_activation, module_of, tensor_shape
from se_inject.graph.trace import module_scope
from se_inject.placement.patterns.base import Insertion
from se_inject.placement.sites import Analysis, Site, SiteSearch
from se_inject.units.base import unit_class


@dataclass(frozen=True)
class PlannedUnit:
    """One SE unit to insert: where, how wide, and which module will hold it."""

    site: Site
    insertion: Insertion
    r: int
    hidden: int
    owner: str  # qualified name of the module rewritten to hold the unit ("" is the root)
    name: str  # child name of the unit in ``owner``: UNIT_stage_block (se_2_3), SE_stage_block as in the paper
    reduced: int | None = None  # what r divides when not the unit's channels (reduce_from="block_input")
    config: InjectConfig | None = None  # the unit's own options where a group gives them (else the call's)
    module: str = ""  # the block module the site is in (what include/exclude match), before any widening

    @property
    def stage(self) -> int:
        return self.site.stage

    @property
    def block(self) -> int:
        return self.site.block

    @property
    def channels(self) -> int:
        return self.insertion.channels

    @property
    def qualified_name(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name


@dataclass(frozen=True)
class Plan:
    """What will be inserted, plus the stages and sites left out."""

    units: tuple[PlannedUnit, ...]
    stage_count: int
    selected_stages: tuple[int, ...]
    skipped: tuple[tuple[Site, str], ...]  # sites of selected stages without a unit, and why
    search: SiteSearch
    selection: tuple[tuple[str, str, int], ...] = ()  # (include|exclude, pattern, blocks it matched)

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.owner for u in self.units))


def stage_ratio(config: InjectConfig, stage: int, stage_count: int, selected: tuple[int, ...]) -> int:
    """The reduction ratio of ``stage``: one r for all, or a list over all stages or the selected ones."""
    if isinstance(config.r, int):
        return config.r
    if len(config.r) == stage_count:
        return config.r[stage - 1]
    if len(config.r) == len(selected):
        return config.r[selected.index(stage)]
    per_selected = f", or one per selected stage ({len(selected)})" if config.stages else ""
    raise ConfigError(f"r: got {len(config.r)} ratios; give one or one per stage ({stage_count}){per_selected}")


def _common_scope(nodes: tuple) -> str:
    scopes = [module_scope(n) for n in nodes]
    common: tuple[str, ...] = ()
    for depth in range(min(len(s) for s in scopes)):
        if len({s[depth] for s in scopes}) != 1:
            break
        common = scopes[0][: depth + 1]
    return common[-1] if common else ""


def _outermost_owners(owners: set[str]) -> dict[str, str]:
    """Map each owner to the outermost owner containing it, so no rewritten module nests another."""

    def contains(outer: str, inner: str) -> bool:
        return outer == "" or inner == outer or inner.startswith(outer + ".")

    return {o: min((p for p in owners if contains(p, o)), key=len) for o in owners}


def _no_sites(search: SiteSearch, config: InjectConfig, family: bool = False) -> NoSitesError:
    if not search.supporting_rules:
        return NoSitesError(f"no placement rule supports position '{config.position}'")
    if search.sites and len(search.skipped) == len(search.sites) and search.gates:
        return NoSitesError(
            f"every block for position '{config.position}' already has an SE-like gate: {search.describe()}; "
            "pass existing='stack' (CLI: --existing stack) to add units anyway"
        )
    if search.sites:
        return NoSitesError(
            f"position '{config.position}' applies to none of the {len(search.sites)} sites found: "
            f"{search.skipped[0][1]}"
        )
    own = f"; the style '{config.style}' places units by its own rules alone" if family else ""
    return NoSitesError(
        f"no place for an SE unit at position '{config.position}' (rules: {', '.join(search.supporting_rules)}): "
        f"{search.describe()}{own}"
    )


def _repeated_call(scope: str) -> str | None:
    """The module of ``scope`` that torch.fx saw called a second time or more (it names such a
    call ``name@1``, ``name@2``, ...), as its qualified name; None for a first call."""
    parts = scope.split(".")
    for i, part in enumerate(parts):
        if "@" in part:
            return ".".join([*parts[:i], part.split("@")[0]])
    return None


def _block_module(site: Site) -> str:
    """The module that holds the site (a residual block, usually): what include and exclude match. A site
    without the rule's anchor (skipped, with its reason) is named by the structure's output."""
    return _common_scope(site.insertion.anchors if site.insertion is not None else (site.candidate.output,))


def _chosen(site: Site, module: str, config: InjectConfig) -> bool:
    included = not config.include or any(fnmatchcase(module, pattern) for pattern in config.include)
    in_range = not config.blocks or any(_in_range(site, text) for text in config.blocks)
    return included and in_range and not any(fnmatchcase(module, pattern) for pattern in config.exclude)


def _in_range(site: Site, text: str) -> bool:
    stage, first, last = parse_block_range(text)
    return site.stage == stage and first <= site.block <= last


def _group_config(module: str, config: InjectConfig, site: Site) -> InjectConfig:
    """The options of the units in ``module``: the first group matching it, else the call's, under
    the options the style's groups (MixNet's ratio per stage) or else the site's rule (a family's widths
    per kind of block) give its units, where the call does not set them."""
    for group in config.groups:
        if any(fnmatchcase(module, pattern) for pattern in group.blocks):
            return config.for_group(group)
    styled = next((g for g in style(config.style).groups if any(fnmatchcase(module, p) for p in g.blocks)), None)
    given = {**site.rule.options, **(styled.options if styled is not None else {})}
    from_rule = {k: v for k, v in given.items() if not config.set_options([k])}
    return config.for_group(Group(("*",), from_rule)) if from_rule else config


def _check_selection(
    config: InjectConfig, sites: list[Site], stages: tuple[int, ...]
) -> tuple[tuple[str, str, int], ...]:
    """How many blocks each include/exclude/group pattern and each block range matched; one that
    matches none is an error."""
    counts = []
    blocks = list(dict.fromkeys(_block_module(site) for site in sites))
    selections = [("include", p) for p in config.include] + [("exclude", p) for p in config.exclude]
    selections += [(f"groups[{i}]", p) for i, g in enumerate(config.groups) for p in g.blocks]
    for option, pattern in selections:
        matched = sum(fnmatchcase(m, pattern) for m in blocks)
        if not matched:
            raise ConfigError(
                f"{option}: {pattern!r} matches none of the {len(blocks)} blocks with a site "
                f"(e.g. {', '.join(blocks[:6])}); patterns are fnmatch globs over these module names"
            )
        counts.append((option, pattern, matched))
    for text in config.blocks:
        matched = sum(_in_range(site, text) for site in sites)
        if not matched:
            raise ConfigError(f"blocks: {text!r} matches none of the sites of stages {list(stages)}")
        counts.append(("blocks", text, matched))
    return tuple(counts)


def _reduced(site: Site, config: InjectConfig) -> int | None:
    """What r divides for this site when it is not the unit's channels: the block's input channels."""
    if config.reduce_from == "channels":
        return None
    if config.reduce_from == "block_output":
        return tensor_shape(site.candidate.block_output or site.candidate.output)[1]
    if site.candidate.block_input is None:
        raise ConfigError(
            f"reduce_from: the blocks of rule '{site.rule.name}' have no input se_inject can identify; "
            "use reduce_from='channels'"
        )
    return tensor_shape(site.candidate.block_input)[1]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _alone(owner: str) -> str | None:
    return None


def _rewritable_owner(owner: str, obstacle: Callable[[str], str | None]) -> str:
    """``owner`` or its nearest ancestor that can be rewritten on its own."""
    first, first_reason = owner, obstacle(owner)
    reason = first_reason
    while reason is not None:
        if not owner:
            hint = (
                f"; nor can a module holding it: pass '{first}' in leaf_modules to leave it as it is" if first else ""
            )
            raise RewriteError(f"{first_reason}{hint}", first)
        owner = _parent(owner)
        reason = obstacle(owner)
    return owner


def _check_stages(selected: Sequence[int], stage_count: int, sites: int, config: InjectConfig) -> None:
    out_of_range = [s for s in selected if s > stage_count]
    if out_of_range:
        whose = (
            f"the {sites} sites at= names lie in stages 1-{stage_count} (stages are counted over them)"
            if config.at
            else f"this model has stages 1-{stage_count}"
        )
        raise ConfigError(f"stages: stage {out_of_range[0]} does not exist; {whose}")


# activation functions a block may apply, by the name of the act option that builds the same
_ACT_FUNCTIONS: dict[object, str] = {
    torch.relu: "relu",
    F.relu: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hard_swish",
    F.leaky_relu: "leaky_relu",
}


def _block_activation(gm: fx.GraphModule, site: Site, module: str, fallback: str | type | None) -> str | type:
    """The activation the block applies last before the unit's place (``act="block"``): the module's class,
    or the act name of a function; walking back along the first input, never before the block's input.
    One with weights of its own (EvoNorm's, inside the norm) is not one a unit can build: ``fallback`` (the
    call's act where a rule asked for the block's), else an error."""
    assert site.insertion is not None
    node: fx.Node | None = site.insertion.value
    for _ in range(64):  # a block's tail is a few nodes; far more means there is no activation to find
        if node is None or node is site.candidate.block_input:
            break
        if is_activation(gm, node):
            found = module_of(gm, node)
            found = getattr(found, "act", found)  # timm's norm + activation layers hold theirs as .act
            weightless = isinstance(found, nn.Module) and next(found.parameters(), None) is None
            if weightless and not isinstance(found, nn.Identity):
                return type(found)  # an activation of its own: a unit builds another of the class
            name = _ACT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
            if name is not None:
                return name
        node = node.all_input_nodes[0] if node.all_input_nodes else None
    if fallback is not None:
        return fallback
    raise ConfigError(
        f"act: 'block' found no activation before the unit in {module or 'the root'}; name one (e.g. act='relu')"
    )


def _planned_unit(
    site: Site,
    module: str,
    config: InjectConfig,
    stage_count: int,
    selected: tuple[int, ...],
    obstacle: Callable[[str], str | None],
    gm: fx.GraphModule,
) -> PlannedUnit:
    """The unit for ``site`` in block ``module``, with its group's options, checked."""
    insertion = site.insertion
    assert insertion is not None  # a site without one is among search.skipped, handled before
    unit_type = unit_class(config.unit)
    own = _group_config(module, config, site)
    if own.act == "block":
        fallback = config.act if config.act != "block" else None
        own = own.for_group(Group(("*",), {"act": _block_activation(gm, site, module, fallback)}))
    r = stage_ratio(own, site.stage, stage_count, selected)
    reduced = _reduced(site, own)
    divided = reduced or insertion.channels
    if own is not config:
        unit_type.check_config(own)
    if r > divided and own.hidden is None and unit_type.uses_r:
        raise ConfigError(
            f"r: r={r} is wider than the {divided} channels it divides in stage "
            f"{site.stage}, block {site.block}; use r <= {divided}"
        )
    return PlannedUnit(
        site=site,
        insertion=insertion,
        r=r,
        hidden=unit_type.hidden_width(insertion.channels, r, own, reduced=reduced),
        owner=_rewritable_owner(module, obstacle),
        name=f"{config.unit}_{site.stage}_{site.block}",
        reduced=reduced,
        module=module,
        config=own if own is not config else None,
    )


def plan_units(analysis: Analysis, config: InjectConfig, obstacle: Callable[[str], str | None] = _alone) -> Plan:
    """Check ``config`` against the sites of ``analysis`` and decide every unit; mutates nothing.

    Units are held by the smallest module containing their site, except that a module for which
    ``obstacle(name)`` gives a reason (one that cannot be rewritten on its own, see
    ``surgery.rewrite.LocalTraces``) hands its units to its parent; the model's root is the last resort.
    """
    unit_type = unit_class(config.unit)
    unit_type.check_config(config)
    search = (
        analysis.select_modules(config.at, config.existing)
        if config.at
        else analysis.select(config.position, config.existing)
    )
    if not search.placeable:
        raise _no_sites(search, config, family=bool(analysis.rules) and all(r.style for r in analysis.rules))
    stage_count = search.stage_count
    selected = config.stages or tuple(range(1, stage_count + 1))
    _check_stages(selected, stage_count, len(search.sites), config)
    reasons = {id(site): reason for site, reason in search.skipped}
    in_stages = [site for site in search.sites if site.stage in selected]
    selection = _check_selection(config, in_stages, selected)
    planned: list[PlannedUnit] = []  # owners before nesting is resolved
    skipped: list[tuple[Site, str]] = []
    for site in in_stages:
        module = _block_module(site)
        if not _chosen(site, module, config):
            continue
        if id(site) in reasons:
            skipped.append((site, reasons[id(site)]))
            continue
        repeated = _repeated_call(module)
        if repeated:  # the same module object called again (shared weights): its first call's unit serves it
            skipped.append(
                (site, f"module '{repeated}' is called more than once; the unit of its first call serves every call")
            )
            continue
        planned.append(_planned_unit(site, module, config, stage_count, selected, obstacle, analysis.gm))
    if not planned:
        raise NoSitesError(
            f"none of the {len(in_stages)} sites of stages {list(selected)} "
            f"takes a unit at position '{config.position}': {skipped[0][1] if skipped else search.describe()}"
        )
    outermost = _outermost_owners({unit.owner for unit in planned})
    units = tuple(replace(unit, owner=outermost[unit.owner]) for unit in planned)
    return Plan(units, stage_count, tuple(selected), tuple(skipped), search, selection)
