"""Finding the sites of SE units: pattern kinds matched in the traced graph, filtered by rules.

:func:`analyse` traces a model once, annotates every node with its shape and FLOPs, and matches
every rule against the candidates of its pattern kind. :meth:`Analysis.select` then picks the
sites for one position: rules that support the position, higher priority first; a candidate
that overlaps a site already taken is dropped (an Inception module inside a residual branch,
the residual branch of a mobile block whose depthwise conv has a unit). Fallback rules (plain
conv stacks) are used only when no other rule matched anything. Blocks that already hold an
SE-like gate are skipped unless ``existing="stack"``.

Stages are runs of consecutive sites whose output has the same spatial size and that lie in one stage
the model declares (:mod:`se_inject.placement.stages`), numbered from 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch.fx as fx
from torch import nn

from se_inject.errors import ConfigError
from se_inject.graph.channels import input_channels
from se_inject.graph.flops import propagate
from se_inject.graph.ops import add_operands, is_conv, is_feature_map, module_of, normalize_inplace_adds
from se_inject.graph.shadow import eval_mode
from se_inject.graph.trace import module_scope, trace
from se_inject.placement.existing_gates import ChannelGate, find_channel_gates
from se_inject.placement.patterns.base import PATTERNS, Candidate, Insertion, find_candidates
from se_inject.placement.rules import Rule, load_rules
from se_inject.placement.stages import declared_stage, stage_ends


@dataclass(eq=False)
class Site:
    """A candidate a rule accepted, and where the unit goes in it for the chosen position."""

    rule: Rule
    candidate: Candidate
    insertion: Insertion | None  # None: the rule's anchor for this position does not exist here
    stage: int = 0
    block: int = 0

    @property
    def size(self) -> tuple[int, ...]:
        return self.candidate.size

    @property
    def region(self) -> frozenset[fx.Node]:
        return self.candidate.region

    @property
    def scope(self) -> str:
        """The innermost module the site's output was computed in ("" for the root)."""
        scope = module_scope(self.candidate.output)
        return scope[-1] if scope else ""


@dataclass
class SiteSearch:
    """The sites for one position in graph order, those skipped (and why), and what the graph holds."""

    position: str
    sites: list[Site]
    skipped: list[tuple[Site, str]] = field(default_factory=list)
    gates: list[ChannelGate] = field(default_factory=list)
    census: Counter = field(default_factory=Counter)
    supporting_rules: tuple[str, ...] = ()

    @property
    def stage_count(self) -> int:
        return max((s.stage for s in self.sites), default=0)

    @property
    def placeable(self) -> list[Site]:
        return [s for s in self.sites if s.insertion is not None and all(s is not k for k, _ in self.skipped)]

    def describe(self) -> str:
        """A one-line account of what the graph holds, for "no site" errors."""
        kinds = ("convolutions", "depthwise convolutions", "additions", "concatenations")
        text = "found " + ", ".join(f"{self.census[k]} {k}" for k in kinds)
        matched = Counter(s.rule.name for s in self.sites)
        if matched:
            text += "; rules matched: " + ", ".join(f"{n} {name}" for name, n in matched.items())
        leaves = {k[5:]: n for k, n in self.census.items() if k.startswith("leaf:")}
        if leaves:
            listed = ", ".join(f"{name} x{n}" for name, n in leaves.items())
            text += f"; modules kept whole as fx leaves, not searched inside: {listed}"
        if self.gates:
            names = ", ".join(g.name for g in self.gates[:3]) + (", ..." if len(self.gates) > 3 else "")
            text += f"; {len(self.gates)} SE-like gates already in the model ({names})"
        return text


@dataclass
class Analysis:
    """A model traced, annotated with shapes and FLOPs, and matched against the placement rules."""

    gm: fx.GraphModule
    rules: tuple[Rule, ...]
    matches: list[tuple[Rule, Candidate]]
    gates: list[ChannelGate]
    census: Counter
    input_shape: tuple[int, ...]
    flops: int
    macs: int = 0  # multiply-adds of convolutions and matrix products (the paper's "FLOPs")
    stage_ends: tuple[int, ...] = ()  # graph positions where the model's declared stages end

    def select(self, position: str, existing: str = "skip") -> SiteSearch:
        """The sites for ``position`` (see the module docstring for how overlaps are settled)."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        primary = [(r, c) for r, c in self.matches if not r.fallback]
        pool = primary or [(r, c) for r, c in self.matches if r.fallback]
        pool = [(r, c) for r, c in pool if position in r.positions]
        pool.sort(key=lambda rc: (-rc[0].priority, -len(rc[1].region), order[rc[1].output]))
        taken: set[fx.Node] = set()
        sites: list[Site] = []
        for rule, candidate in pool:
            if taken & candidate.region:
                continue
            taken |= candidate.region
            sites.append(Site(rule, candidate, candidate.anchors[rule.positions[position]]))
        sites.sort(key=lambda s: order[s.candidate.output])
        _number_stages(sites, order, self.stage_ends)
        skipped = []
        for site in sites:
            if existing == "skip" and (gate := _gate_of(site, self.gates)) is not None:
                skipped.append((site, f"already recalibrated by the SE-like gate '{gate.name}'"))
            elif site.insertion is None:
                skipped.append((site, f"no '{site.rule.positions[position]}' in this {site.rule.name} block"))
        supporting = tuple(r.name for r in self.rules if position in r.positions)
        return SiteSearch(position, sites, skipped, self.gates, self.census, supporting)

    def select_modules(self, patterns: Sequence[str], existing: str = "skip") -> SiteSearch:
        """Sites on the outputs of the modules ``patterns`` name (fnmatch globs over qualified names):
        the general "insert after X" of ``at=``, outside the rules. A module whose output is not one
        feature map (several values leave it, or a flat vector) is skipped with the reason."""
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        names = list(dict.fromkeys(name for n in self.gm.graph.nodes for name in (n.meta.get("nn_module_stack") or {})))
        sites: list[Site] = []
        skipped: list[tuple[Site, str]] = []
        seen: set[fx.Node] = set()
        for pattern in patterns:
            matched = [name for name in names if fnmatchcase(name, pattern) and "@" not in name]
            if not matched:
                raise ConfigError(
                    f"at: {pattern!r} names no module the forward runs (e.g. {', '.join(names[1:5])}); "
                    "give qualified module names or fnmatch globs over them"
                )
            # a glob's * crosses dots: of the modules one pattern matches, the outermost are meant
            outermost = [name for name in matched if not any(name.startswith(m + ".") for m in matched)]
            for name in outermost:
                output = module_output(self.gm, name)
                if output is None or output in seen or not is_feature_map(output):
                    continue
                seen.add(output)
                parent = name.rpartition(".")[0]
                users = tuple(u for u in output.users if u.op != "output" and node_in_scope(u, parent))
                candidate = Candidate(
                    kind="module_output",
                    output=output,
                    region=frozenset({output}),
                    # with its users in the caller: the module that calls the named one holds the unit
                    # (where nothing there reads it, the named module does, at its end)
                    anchors={"output": Insertion(output, None, (output, *users))},
                    facts={},
                    parts={"module": output},
                    block_input=output.all_input_nodes[0] if output.all_input_nodes else None,
                )
                sites.append(Site(AT_RULE, candidate, candidate.anchors["output"]))
        if not sites:
            raise ConfigError(f"at: none of the modules {list(patterns)} names outputs a feature map to recalibrate")
        sites.sort(key=lambda s: order[s.candidate.output])
        _number_stages(sites, order, self.stage_ends)
        if existing == "skip":
            for site in sites:
                if (gate := _gate_of(site, self.gates)) is not None:
                    skipped.append((site, f"already recalibrated by the SE-like gate '{gate.name}'"))
        return SiteSearch("at", sites, skipped, self.gates, self.census, ("at",))


# the sites of at=: not a rule read from a file, but a Site needs one to say where it came from
AT_RULE = Rule("at", "module_output", {}, description="the output of a module named in at=", source="at=")


def module_output(gm: fx.GraphModule, name: str) -> fx.Node | None:
    """The one value that leaves module ``name`` in ``gm`` (its output); None if several do."""
    inside = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and node_in_scope(n, name)]
    members = set(inside)
    leaving = [n for n in inside if any(user not in members for user in n.users)]
    return leaving[0] if len(leaving) == 1 else None


def _gate_of(site: Site, gates: list[ChannelGate]) -> ChannelGate | None:
    """The existing gate inside the site's block (its innermost module), or inside its region."""
    for gate in gates:
        if gate.node in site.region or (site.scope and site.scope in gate.scope):
            return gate
    return None


def _number_stages(sites: list[Site], order: dict[fx.Node, int], ends: Sequence[int]) -> None:
    """Number ``sites`` (in graph order) by stage and block: a new stage where the resolution changes or
    the sites enter the next stage the model declares (see :mod:`se_inject.placement.stages`)."""
    stage, block, previous = 0, 0, None
    for site in sites:
        key = (site.size, declared_stage(ends, order[site.candidate.output]))
        if key != previous:
            stage, block, previous = stage + 1, 0, key
        block += 1
        site.stage, site.block = stage, block


def _census(gm: fx.GraphModule) -> Counter:
    census: Counter = Counter()
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is not None and not type(mod).__module__.startswith("torch.") and any(True for _ in mod.children()):
            census[f"leaf:{type(mod).__name__}"] += 1  # kept whole by a leaf list: not searched inside
        if is_conv(gm, node):
            census["convolutions"] += 1
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels:
                census["depthwise convolutions"] += 1
        elif add_operands(node) is not None:
            census["additions"] += 1
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in ("cat", "concat", "concatenate"):
            census["concatenations"] += 1
    return census


def input_shape_for(
    model: nn.Module, gm: fx.GraphModule | None, input_size: int | Sequence[int], channels: int | None = None
) -> tuple[int, int, int, int]:
    """Batch 1 at ``input_size`` with ``channels``, else the channels the model takes (:func:`input_channels`,
    from ``gm`` where the model has been traced)."""
    if isinstance(input_size, int):
        height = width = input_size
    else:
        height, width = input_size
    return (1, channels or input_channels(model, gm), height, width)


def analyse(
    model: nn.Module,
    input_size: int | Sequence[int] = 224,
    leaf_modules: Sequence[str] = (),
    rules: Sequence[Rule] | None = None,
    channels: int | None = None,
) -> Analysis:
    """Trace ``model``, annotate shapes and FLOPs at ``input_size``, and match the placement rules.

    ``rules`` defaults to the built-in ones; ``channels`` are the input's (default: the model's own, see
    :func:`~se_inject.graph.channels.input_channels`). Nothing of ``model`` is changed.
    """
    rules = tuple(load_rules() if rules is None else rules)
    with eval_mode(model):  # the inference graph: no auxiliary heads, no training-only branches
        gm = trace(model, leaf_modules)
    normalize_inplace_adds(gm.graph)
    gm.recompile()
    shape = input_shape_for(model, gm, input_size, channels)
    count = propagate(gm, shape)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    candidates = {kind: find_candidates(PATTERNS[kind], gm, order) for kind in {r.pattern for r in rules}}
    matches = [(rule, c) for rule in rules for c in candidates[rule.pattern] if rule.matches(c)]
    gates, census = find_channel_gates(gm), _census(gm)
    return Analysis(gm, rules, matches, gates, census, shape, count.total, count.macs, stage_ends(model, gm))


def node_in_scope(node: fx.Node, owner: str) -> bool:
    """Whether ``node`` was created while tracing module ``owner`` ("" is the root)."""
    return owner == "" or owner in (node.meta.get("nn_module_stack") or {})
