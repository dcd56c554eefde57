"""Retrofitting a part of a model: the ``target`` option (peft's ``target_modules``, for surgery).

Detectors, segmenters and many Hugging Face models cannot be traced whole: their forward loops over
images, builds anchors, returns dictionaries. Their backbones can. :func:`resolve_targets` turns the
names or globs of ``target`` into the submodules to rewrite (``"auto"``: the largest parts torch.fx
can trace that hold sites), :func:`target_inputs` runs the whole model once (on fake tensors where it
can, on real zeros where its forward reads values) to learn the input each part receives, and the
API retrofits each part on its own and puts the parts into one copy of the whole model.

>>> import torchvision
>>> detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
>>> resolve_targets(detector, ("backbone.body",))
['backbone.body']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from se_inject.errors import ConfigError, SEInjectError, UntraceableModelError
from se_inject.graph.shadow import abstract_tensors, shadow, with_real_fallback
from se_inject.graph.trace import trace_graph
from se_inject.surgery.report import OverheadReport, StageReport, Totals, UnitReport, count_params

AUTO = "auto"
MAX_AUTO_DEPTH = 8  # how deep "auto" looks for traceable parts below an untraceable module


def resolve_targets(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The qualified names of the submodules ``patterns`` name (names or fnmatch globs; of the modules one
    glob matches, the outermost), in registration order; a pattern that names none is a ConfigError."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for pattern in patterns:
        matched = [name for name in names if fnmatchcase(name, pattern)]
        if not matched:
            examples = ", ".join(n for n in names if "." not in n)[:200]
            raise ConfigError(
                f"target: {pattern!r} names no submodule of {type(model).__name__} (its children: {examples}); "
                "give qualified module names or fnmatch globs over them, or 'auto'"
            )
        chosen += [name for name in matched if not any(name.startswith(m + ".") for m in matched)]
    chosen = list(dict.fromkeys(chosen))
    nested = [(a, b) for a in chosen for b in chosen if b.startswith(a + ".")]
    if nested:
        raise ConfigError(f"target: '{nested[0][1]}' lies inside '{nested[0][0]}'; name one of the two")
    return chosen


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def traceable_parts(model: nn.Module, leaf_modules: Sequence[str] = (), prefix: str = "", depth: int = 0) -> list[str]:
    """The largest submodules of ``model`` that torch.fx can trace and that hold a convolution, outermost
    first (the root itself, "", when it traces)."""
    try:
        trace_graph(shadow(model), leaf_modules)
        return [prefix]
    except SEInjectError:
        if depth >= MAX_AUTO_DEPTH:
            return []
    parts: list[str] = []
    for name, child in model.named_children():
        if _has_conv(child):
            parts += traceable_parts(child, leaf_modules, f"{prefix}{name}.", depth + 1)
    return [p.rstrip(".") for p in parts]


class _AllSeen(Exception):
    """Raised by the capture hooks once every part has been called: the rest of the forward is not needed."""


def target_inputs(
    model: nn.Module, names: Sequence[str], input_shape: tuple[int, ...], need_all: bool = True
) -> dict[str, tuple[int, ...]]:
    """The shape of the one feature map each part ``names`` receives when ``model`` runs on a batch of
    ``input_shape`` (the first call of each). A part that is not called, or not with one 4-D tensor, is a
    ConfigError when ``need_all``, else left out."""
    copy = shadow(model)
    seen: dict[str, Any] = {}

    def capture(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in seen:
                seen[name] = args[0] if args else next(iter(kwargs.values()), None)
            if len(seen) == len(names):
                raise _AllSeen

        return hook

    def run(real: bool) -> None:
        seen.clear()
        handles = [copy.get_submodule(n).register_forward_pre_hook(capture(n), with_kwargs=True) for n in names]
        try:
            with abstract_tensors(copy, real) as make:
                copy(make(input_shape))
        except _AllSeen:
            pass
        finally:
            for handle in handles:
                handle.remove()

    try:
        with_real_fallback(copy, run)
    except SEInjectError:
        raise
    except Exception as err:
        if need_all and len(seen) < len(names):
            raise UntraceableModelError(
                f"target: {type(model).__name__} failed on a {tuple(input_shape)} input before it reached "
                f"{', '.join(n for n in names if n not in seen)} ({type(err).__name__}: {str(err)[:160]}); "
                "give the model's input size (input_size=, CLI: --input-size)"
            ) from None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        value = seen.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            shapes[name] = tuple(value.shape)
        elif need_all:
            got = "is never called" if name not in seen else f"takes {type(value).__name__}, not one feature map"
            raise ConfigError(
                f"target: '{name}' {got} when {type(model).__name__} runs on a {tuple(input_shape)} input; "
                "target a module whose input is one (N, C, H, W) tensor"
            )
    return shapes


def merge_reports(
    model_name: str,
    parts: dict[str, OverheadReport],
    original: nn.Module,
    injected: nn.Module,
    input_size: tuple[int, int],
) -> OverheadReport:
    """One report of a model whose parts were retrofitted apart: unit names and owners qualified by the part,
    stages numbered on across parts, parameters counted on the whole models, FLOPs summed over the parts."""
    sites: list[UnitReport] = []
    stages: list[StageReport] = []
    notes: list[str] = []
    offset = 0
    for prefix, part in parts.items():
        sites += [
            replace(u, name=f"{prefix}.{u.name}", owner=f"{prefix}.{u.owner}".rstrip("."), stage=u.stage + offset)
            for u in part.sites
        ]
        stages += [replace(s, stage=s.stage + offset) for s in part.stages]
        offset += len(part.stages)
        notes += [f"{prefix}: {note}" for note in part.notes]
    first = next(iter(parts.values()))
    before, after = count_params(original), count_params(injected)
    totals = Totals(
        params_before=before,
        params_after=after,
        params_added=after - before,
        eq5_params=sum(p.totals.eq5_params for p in parts.values()),
        flops_before=sum(p.totals.flops_before for p in parts.values()),
        flops_after=sum(p.totals.flops_after for p in parts.values()),
        macs_before=sum(p.totals.macs_before for p in parts.values()),
        macs_after=sum(p.totals.macs_after for p in parts.values()),
    )
    sizes = ", ".join(f"{name} at {part.input_size[0]}x{part.input_size[1]}" for name, part in parts.items())
    notes.insert(0, f"target: retrofitted {sizes}; FLOPs are those parts', parameters the whole model's")
    return replace(
        first,
        model=model_name,
        input_size=input_size,
        sites=tuple(sites),
        stages=tuple(stages),
        totals=totals,
        existing_gates=tuple(g for p, part in parts.items() for g in (f"{p}.{n}" for n in part.existing_gates)),
        notes=tuple(notes),
    )
