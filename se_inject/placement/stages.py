"""Where a network's stages begin: a change of resolution, or a stage the network declares.

Stages are numbered along the sites in graph order: a new stage starts where the output resolution
changes, or where the sites move from one declared stage to the next. Networks declare their stages
in timm's ``feature_info`` (read first) or by the names of their modules (``rules/stages/names.toml``:
torchvision's ``layerN``, transformers' ``stages.N``). Dilated networks need the declaration: layer2
to layer4 of a DeepLabV3 backbone run at one resolution, and are still three stages.

>>> [p.name for p in load_stage_names()]
['layer_n', 'stages_n']
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from se_inject.config import builtin_data_dir
from se_inject.datafiles import read_tables, table_error
from se_inject.errors import RuleError

_FIELDS = {"name", "pattern", "description"}
MAX_PATTERN_LENGTH = 200


@dataclass(frozen=True)
class StageNames:
    """One naming convention of stage modules: a regular expression over qualified module names."""

    name: str
    pattern: re.Pattern[str]
    description: str


def parse_stage_names(text: str, source: str) -> list[StageNames]:
    """The ``[[stage_names]]`` tables of one TOML document; errors name the file, the entry and the field."""
    parsed = []
    for entry in read_tables(text, source, "stage_names", _FIELDS, RuleError):
        name, pattern, description = entry["name"], entry.get("pattern"), entry.get("description", "")
        if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN_LENGTH:
            raise table_error(
                RuleError, source, "stage_names", name, "pattern", f"expected a regular expression, got {pattern!r}"
            )
        if not isinstance(description, str):
            raise table_error(RuleError, source, "stage_names", name, "description", "expected a string")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise table_error(
                RuleError, source, "stage_names", name, "pattern", f"not a regular expression: {err}"
            ) from None
        parsed.append(StageNames(name, compiled, description))
    return parsed


@functools.cache
def load_stage_names() -> tuple[StageNames, ...]:
    """The shipped conventions (``rules/stages/names.toml``), read once per process."""
    path = builtin_data_dir() / "stages" / "names.toml"
    return tuple(parse_stage_names(path.read_text(encoding="utf-8"), str(path)))


def feature_info_modules(model: nn.Module) -> list[str]:
    """The modules timm's ``feature_info`` lists, in its order (a list of dicts, or a FeatureInfo)."""
    info: Any = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info)
    if not isinstance(entries, (list, tuple)):
        return []
    return [e["module"] for e in entries if isinstance(e, dict) and isinstance(e.get("module"), str)]


def declared_stage_modules(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """The modules that hold ``model``'s declared stages: timm's ``feature_info``, else the modules whose
    qualified names follow a convention of ``rules/stages/names.toml`` (the outermost, where they nest)."""
    listed = feature_info_modules(model)
    if listed:
        return listed
    names = list(dict.fromkeys(name for node in gm.graph.nodes for name in (node.meta.get("nn_module_stack") or {})))
    conventions = load_stage_names()
    matched = [n for n in names if any(c.pattern.search(n) for c in conventions)]
    return [n for n in matched if not any(n.startswith(m + ".") for m in matched)]


def stage_ends(model: nn.Module, gm: fx.GraphModule) -> tuple[int, ...]:
    """The graph positions at which ``model``'s declared stages end (the last node each one runs), sorted."""
    ends = []
    for name in declared_stage_modules(model, gm):
        last = [i for i, node in enumerate(gm.graph.nodes) if name in (node.meta.get("nn_module_stack") or {})]
        if last:
            ends.append(last[-1])
    return tuple(sorted(set(ends)))


def declared_stage(ends: Sequence[int], position: int) -> int:
    """The declared stage of the node at graph ``position``: how many declared stages end before it."""
    return bisect.bisect_left(ends, position)
