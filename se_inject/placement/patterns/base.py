"""Candidates, insertions and the registry of pattern kinds (a name registered twice is refused)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from se_inject.errors import RuleError
from se_inject.graph.ops import tensor_shape

# --- candidates and the registry ------------------------------------------------------------------


@dataclass(frozen=True)
class Insertion:
    """Where one unit goes: it recalibrates ``value`` as seen by ``consumers`` (None: by all)."""

    value: fx.Node
    consumers: tuple[fx.Node, ...] | None
    anchors: tuple[fx.Node, ...]  # nodes the rewritten module must contain

    @property
    def channels(self) -> int:
        return tensor_shape(self.value)[1]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the feature map the unit recalibrates."""
        _, _, height, width = tensor_shape(self.value)  # units go on NCHW feature maps only
        return height, width


@dataclass(eq=False)
class Candidate:
    """A structure a pattern kind found: its nodes, where units can go, and what was measured."""

    kind: str
    output: fx.Node  # the structure's output: its spatial size decides the stage
    region: frozenset[fx.Node]
    anchors: dict[str, Insertion | None]
    facts: dict[str, int | bool]
    parts: dict[str, fx.Node] = field(default_factory=dict)  # named nodes, for tests and messages
    # the value entering the block (what EfficientNet's and RegNetY's SE widths are computed from)
    block_input: fx.Node | None = None
    # the value the block produces (what MaxViT's and CoAtNet's SE widths are computed from); None: output
    block_output: fx.Node | None = None

    @property
    def size(self) -> tuple[int, ...]:  # (height, width) of a feature map
        return tensor_shape(self.output)[2:4]


Finder = Callable[[fx.GraphModule, dict[fx.Node, int]], list[Candidate]]


@dataclass(frozen=True)
class PatternKind:
    name: str
    find: Finder
    anchors: tuple[str, ...]
    facts: dict[str, type]  # fact name -> int or bool: what rule conditions may test
    doc: str


PATTERNS: dict[str, PatternKind] = {}


def register_pattern(name: str, anchors: tuple[str, ...], facts: dict[str, type]) -> Callable[[Finder], Finder]:
    """Register a pattern kind under ``name``; a name registered twice is refused."""

    def register(find: Finder) -> Finder:
        if name in PATTERNS:
            raise ValueError(f"pattern kind '{name}' is already registered")
        PATTERNS[name] = PatternKind(name, find, anchors, facts, ((find.__doc__ or "").strip().splitlines() or [""])[0])
        return find

    return register


def find_candidates(kind: PatternKind, gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Run one pattern kind's finder and check what it found against what the kind declares.

    A rule's conditions and anchors are validated against the declared facts and anchors; a
    finder that emits others would make a valid rule fail at match time, so it is refused here,
    naming the kind.
    """
    found = kind.find(gm, order)
    for candidate in found:
        facts, anchors = set(candidate.facts), set(candidate.anchors)
        if facts != set(kind.facts) or anchors != set(kind.anchors):
            raise RuleError(
                f"pattern kind '{kind.name}': its finder emitted facts {sorted(facts)} and anchors {sorted(anchors)}, "
                f"but the kind declares facts {sorted(kind.facts)} and anchors {sorted(kind.anchors)}"
            )
    return found
