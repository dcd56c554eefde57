"""The public API: retrofit SE units into a model and report what they cost.

>>> import torch, timm, se_inject
>>> model = timm.create_model("resnet18")
>>> se_model = se_inject.inject(model, position="standard", r=16)
>>> rep = se_inject.report(model, position="standard", r=16)
>>> rep.totals.params_added == rep.totals.eq5_params
True
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from se_inject.config import MAX_IN_CHANS, STYLED_FIELDS, InjectConfig, style
from se_inject.errors import (
    AlreadyInjectedError,
    ConfigError,
    InvalidModelError,
    NoSitesError,
    SEInjectError,
    UntraceableModelError,
)
from se_inject.graph.channels import input_channels, recorded_input_size
from se_inject.graph.shadow import eval_mode, on_meta, shadow
from se_inject.io.base_weights import base_record
from se_inject.io.heads import head_of
from se_inject.io.models import recorded_source
from se_inject.io.recipe import SITE_KEYS, Recipe, attach_recipe, attach_report, versions
from se_inject.placement.plan import Plan, plan_units
from se_inject.placement.rules import load_rules
from se_inject.placement.sites import Analysis, analyse, input_shape_for
from se_inject.surgery.report import OverheadReport, build_report
from se_inject.surgery.rewrite import LocalTraces, build_injected, dry_run
from se_inject.surgery.targets import AUTO, merge_reports, resolve_targets, target_inputs, traceable_parts
from se_inject.units.base import ChannelUnit

MAX_INPUT_SIZE = 16384  # pixels per side: far above any model's input, far below what would exhaust memory


@dataclass(frozen=True)
class Retrofit:
    """The result of :func:`retrofit`: the new model, its report, and the plan behind both."""

    model: nn.Module
    report: OverheadReport
    plan: Plan  # with ``target``: the first part's (``parts`` has each part's)
    config: InjectConfig
    parts: dict[str, Plan] = field(default_factory=dict)  # with ``target``: each retrofitted part's plan


def make_config(config: InjectConfig | None = None, **options: Any) -> InjectConfig:
    """An InjectConfig from an existing one and/or keyword options (unknown names are refused)."""
    known = {f.name for f in fields(InjectConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not an injection option; options are {', '.join(sorted(known))}")
    if config is None:
        return InjectConfig.from_dict(options)
    if "excitation" in options:  # gate's former name: on top of a config it replaces the gate
        options["gate"] = options.pop("excitation")
    if "style" in options or "unit" in options:
        # the config's own values are resolved already: a new style (or a unit with conventions of its own)
        # starts from the options
        return InjectConfig.from_dict({**_unstyled(config), **options})
    changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return replace(config, **changes)


def _unstyled(config: InjectConfig) -> dict[str, Any]:
    """``config``'s options without those a style decides (they come from the new style)."""
    return {f.name: getattr(config, f.name) for f in fields(InjectConfig) if f.name not in STYLED_FIELDS}


def retrofit(
    model: nn.Module,
    config: InjectConfig | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    model_name: str | None = None,
    head: str | None = None,
    in_chans: int | None = None,
    **options: Any,
) -> Retrofit:
    """Insert SE units into a copy of ``model`` and measure what they cost, from one trace.

    ``options`` are :class:`InjectConfig` fields (``position``, ``r``, ``stages``, ``squeeze``,
    ``excitation``, ``bias``, ``rounding``, ``init``, ``leaf_modules``, ``existing``, ``rules``, ``target``).
    ``input_size`` is the spatial size FLOPs are counted at (default: the model's own, from timm's
    pretrained_cfg, else 224); ``in_chans`` the input's channels (default: the model's, see
    :func:`~se_inject.graph.channels.input_channels`). ``target`` retrofits only those submodules, inside
    a copy of the whole model (a detector's ``backbone.body``; ``"auto"`` finds them).
    ``head`` names the model's classifier (a Linear) where it is not one the model declares (timm's
    ``get_classifier``, a Linear named ``fc``, ``classifier`` or ``head``); the recipe records the
    head, or that the model has none. ``model`` is never modified; on any error it is exactly
    as it was. A model on the meta device is analysed without allocating weights. A ``torch.compile``d
    model is retrofitted through the module it wraps (the report says so).

    Example::

        result = se_inject.retrofit(my_model, position="post", r=8, stages=[3, 4])
        result.model(images)            # the retrofitted nn.Module
        print(result.report.to_json())  # Eq. 5 vs. added weights, FLOPs per stage
    """
    _check_model(model)
    model, unwrapped = unwrap_compiled(model)
    config = make_config(config, **options)
    _refuse_reinjection(model, config)
    declared = head_of(model, head)  # before any work: a wrong name is one ConfigError
    size = _resolve_input_size(model, input_size)
    channels = _check_in_chans(in_chans)
    name = model_name or type(model).__name__
    if config.target:
        result = _retrofit_parts(model, config, size, channels, name)
    else:
        try:
            result = _rewrite(model, config, size, channels, name)
        except UntraceableModelError as err:
            raise _with_parts_hint(err, model, config, input_shape_for(model, None, size, channels)) from err
    if unwrapped:
        result = replace(result, report=replace(result.report, notes=(unwrapped, *result.report.notes)))
    source, source_file = recorded_source(model_name)
    recipe = Recipe(
        source=source,
        source_file=source_file,
        options=_recordable(config),
        input_size=result.report.input_size,
        sites=tuple({k: getattr(u, k) for k in SITE_KEYS} for u in result.report.sites),
        versions=versions(),
        head=declared,  # what the model declares, never a layer of the units just inserted
        in_chans=channels,
        base=base_record(model.state_dict()),  # before any training: what a units-only save is relative to
    )
    attach_recipe(result.model, recipe)  # lets later tools see what was injected, and how
    attach_report(result.model, result.report)  # what it cost, for a model card
    return result


def _rewrite(
    model: nn.Module, config: InjectConfig, size: int | tuple[int, int], channels: int | None, name: str
) -> Retrofit:
    """The retrofit of ``model`` traced whole: analysis, plan, rewrite, dry run and report (no recipe yet)."""
    rules = load_rules(config.rules, config.style)
    analysis: Analysis = analyse(shadow(model), size, config.leaf_modules, rules, channels)
    traces = LocalTraces(model, analysis.gm.graph, config.leaf_modules)
    plan = plan_units(analysis, config, traces.obstacle)
    injected = build_injected(model, plan, traces, config)
    flops_after, unit_flops = dry_run(injected, plan, analysis.input_shape)
    notes = []
    if "" in plan.owners:
        notes.append(
            f"sites live in the forward of {type(model).__name__} itself: the result is a GraphModule, "
            "so methods of that class other than forward are not carried over"
        )
    if plan.skipped:
        notes.append(
            f"{len(plan.skipped)} site(s) skipped, e.g. {plan.skipped[0][0].scope or 'root'}: {plan.skipped[0][1]}"
        )
    if on_meta(model):
        notes.append("built on the meta device: shapes and counts only, no weights")
    if config.style != "paper":
        notes.append(f"style {config.style}: {style(config.style).description}")
    for option, pattern, matched in plan.selection:
        notes.append(f"{option} {pattern!r}: {matched} block(s) matched")
    report = build_report(name, config, analysis, plan, model, injected, flops_after, unit_flops, notes)
    return Retrofit(injected, report, plan, config)


def _retrofit_parts(
    model: nn.Module, config: InjectConfig, size: int | tuple[int, int], channels: int | None, name: str
) -> Retrofit:
    """``config.target``'s submodules retrofitted apart, each at the input it receives in ``model``, and put
    into one copy of the whole model (every other module, and every alias of a part, carried over)."""
    shape = input_shape_for(model, None, size, channels)
    if config.target == (AUTO,):
        names = _auto_targets(model, config, shape)
    else:
        names = resolve_targets(model, config.target)
        if AUTO in config.target:
            raise ConfigError("target: 'auto' chooses the parts itself; give it alone, or give the parts")
    inputs = target_inputs(model, names, shape)
    part_config = replace(config, target=())
    parts: dict[str, Retrofit] = {}
    for part in names:
        try:
            _, part_channels, part_height, part_width = inputs[part]
            parts[part] = _rewrite(
                model.get_submodule(part), part_config, (part_height, part_width), part_channels, part
            )
        except SEInjectError as err:
            raise type(err)(f"target '{part}': {err}") from err
    # one deep copy of the whole model in which each part is its retrofit
    memo: dict[int, Any] = {id(model.get_submodule(p)): r.model for p, r in parts.items()}
    injected = copy.deepcopy(model, memo)
    report = merge_reports(name, {p: r.report for p, r in parts.items()}, model, injected, shape[2:])
    first = next(iter(parts.values()))
    return Retrofit(injected, report, first.plan, config, {p: r.plan for p, r in parts.items()})


def _auto_targets(model: nn.Module, config: InjectConfig, shape: tuple[int, ...]) -> list[str]:
    """The largest traceable parts of ``model`` that receive one feature map and hold sites of a primary
    rule (of any rule where none does, as a fallback rule is used only where no other rule matched)."""
    candidates = traceable_parts(model, config.leaf_modules)
    if candidates == [""]:
        raise ConfigError("target: 'auto' is for models torch.fx cannot trace whole; this one traces, leave target out")
    inputs = target_inputs(model, candidates, shape, need_all=False)
    rules = load_rules(config.rules, config.style)
    found: dict[str, bool] = {}  # part -> whether a primary rule matched in it
    for part, part_shape in inputs.items():
        try:
            analysis = analyse(
                shadow(model.get_submodule(part)), part_shape[2:], config.leaf_modules, rules, part_shape[1]
            )
        except SEInjectError:
            continue
        if analysis.matches:
            found[part] = any(not r.fallback for r, _ in analysis.matches)
    chosen = [p for p, primary in found.items() if primary] or list(found)
    if not chosen:
        raise NoSitesError(
            f"target: 'auto' found no traceable part of {type(model).__name__} that holds sites "
            f"(traceable parts: {', '.join(candidates) or 'none'})"
        )
    return chosen


def _with_parts_hint(
    err: UntraceableModelError, model: nn.Module, config: InjectConfig, shape: tuple[int, ...]
) -> UntraceableModelError:
    """``err`` with the parts of ``model`` that trace and hold sites, to retrofit instead: in place of the
    advice to move code out of the model's own forward (which library code cannot follow), after the
    advice to mark an inner module as a leaf."""
    try:
        parts = _auto_targets(model, config, shape)
    except SEInjectError:
        return err
    targets = f"target={parts!r} (CLI: --target {' --target '.join(parts)}), or target='auto'"
    if err.path == "":
        return UntraceableModelError(
            f"{str(err).split(';')[0]}; retrofit the parts that trace and hold sites instead: {targets}", err.path
        )
    return UntraceableModelError(f"{err}; or retrofit the parts that trace and hold sites: {targets}", err.path)


def _check_in_chans(in_chans: object) -> int | None:
    if in_chans is None:
        return None
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or not 1 <= in_chans <= MAX_IN_CHANS:
        raise ConfigError(f"in_chans: expected a channel count from 1 to {MAX_IN_CHANS}, got {in_chans!r}")
    return in_chans


def unwrap_compiled(model: nn.Module) -> tuple[nn.Module, str]:
    """The module a ``torch.compile`` wrapper (an OptimizedModule) holds, and a note saying so; ``model``
    and "" for any other module. The rewrite works on the Python module, and the result is an ordinary
    module to compile again (compiled code cannot be rewritten)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ != "OptimizedModule" or not isinstance(inner, nn.Module):
        return model, ""
    note = (
        f"torch.compile wrapper: injected the {type(inner).__name__} it compiles; the result is not compiled, "
        "call torch.compile on it"
    )
    return inner, note


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidModelError(
            f"model: a TorchScript module ({type(model).__name__}) runs compiled code that cannot be rewritten; "
            "inject the nn.Module it was scripted from, then script the result if you need TorchScript"
        )


def _recordable(config: InjectConfig) -> dict[str, Any]:
    """``config`` as JSON data for the recipe; a module class given as act or gate is recorded by its
    import path, which a recipe cannot rebuild (loading such a recipe says so)."""
    options = asdict(config)
    for name in ("act", "gate"):
        if isinstance(options[name], type):
            options[name] = f"{options[name].__module__}:{options[name].__qualname__}"
    return json.loads(json.dumps(options))


def _refuse_reinjection(model: nn.Module, config: InjectConfig) -> None:
    units = [name for name, m in model.named_modules() if isinstance(m, ChannelUnit)]
    if units and config.existing != "stack":
        raise AlreadyInjectedError(
            f"the model already holds {len(units)} SE units inserted by se_inject ({units[0]}, ...); "
            "inject the original model, or pass existing='stack' (CLI: --existing stack) to add more"
        )


def inject(model: nn.Module, config: InjectConfig | None = None, **options: Any) -> nn.Module:
    """Return a copy of ``model`` with SE units inserted; ``model`` itself is never changed.

    Example::

        >>> import torch, timm, se_inject
        >>> se_model = se_inject.inject(timm.create_model("resnet50"), position="standard", r=16)
        >>> se_model.layer1[0].se_1_1
        SqueezeExcite(...)

    With the default ``init="preserve"`` the returned model computes exactly what ``model`` did
    until it is trained. See :func:`retrofit` for the options.
    """
    return retrofit(model, config, **options).model


def report(
    model: nn.Module,
    config: InjectConfig | None = None,
    *,
    input_size: int | Sequence[int] | None = None,
    model_name: str | None = None,
    **options: Any,
) -> OverheadReport:
    """The overhead report of injecting ``model`` with these options (the model is not changed).

    For a large model build it on the meta device first (``with torch.device("meta"): ...``)
    and nothing but shapes is computed.
    """
    return retrofit(model, config, input_size=input_size, model_name=model_name, **options).report


def check_outputs(
    original: nn.Module,
    injected: nn.Module,
    *,
    input_size: int | Sequence[int] | None = None,
    batch: int = 2,
    seed: int = 0,
    in_chans: int | None = None,
) -> float:
    """The largest |injected - original| over one random batch, both in eval mode (flags restored).

    Structured outputs (tuples, lists, dicts, dataclasses such as transformers' ``ModelOutput``: a
    detector's boxes, scores and labels) are compared leaf by leaf; where the two differ in structure or
    in a leaf's shape, or in a value that is not a tensor, the result is ``inf``. With
    ``init="preserve"`` this is 0.0: the function-preservation check on real weights.

    Example::

        se_model = se_inject.inject(model)
        assert se_inject.check_outputs(model, se_model) == 0.0
    """
    original, _ = unwrap_compiled(original)
    size = _resolve_input_size(original, input_size)
    height, width = (size, size) if isinstance(size, int) else size
    reference = next(original.parameters())
    generator = torch.Generator().manual_seed(seed)
    channels = _check_in_chans(in_chans) or input_channels(original)
    x = torch.randn(batch, channels, height, width, generator=generator).to(reference.device, reference.dtype)
    with eval_mode(original), eval_mode(injected), torch.no_grad():
        expected, got = original(x), injected(x)
    return largest_difference(expected, got)


def largest_difference(expected: object, got: object) -> float:
    """The largest absolute difference between two outputs, leaf by leaf; ``inf`` where they differ in
    structure, in a tensor's shape or in a value that is not a tensor.

    >>> largest_difference({"a": torch.ones(2)}, {"a": torch.ones(2) * 3})
    2.0
    """
    expected_leaves, got_leaves = dict(_leaves(expected)), dict(_leaves(got))
    if expected_leaves.keys() != got_leaves.keys():
        return float("inf")
    largest = 0.0
    for path, value in expected_leaves.items():
        other = got_leaves[path]
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            if value.shape != other.shape:
                return float("inf")
            if value.numel():
                largest = max(largest, (other.double() - value.double()).abs().max().item())
        elif value != other:
            return float("inf")
    return largest


def _leaves(value: object, path: str = "") -> list[tuple[str, object]]:
    """(path, leaf) of a nested output: tensors and plain values under tuples, lists, mappings, dataclasses."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, int, float, bool)):
        return [(path, value)]
    if isinstance(value, Mapping):  # transformers' ModelOutput is an ordered mapping too
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value) for leaf in _leaves(getattr(value, f.name), f"{path}.{f.name}")]
    if isinstance(value, (list, tuple)):
        return [(f"{path}#", len(value))] + [
            leaf for i, item in enumerate(value) for leaf in _leaves(item, f"{path}[{i}]")
        ]
    return [(path, type(value).__name__)]


def _resolve_input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> int | tuple[int, int]:
    """``input_size``, checked; if None, the size the model was made for (timm records it), else 224."""
    if input_size is None:
        size = recorded_input_size(model)
        return size[1:] if size is not None else 224
    if isinstance(input_size, (str, bytes)) or not isinstance(input_size, (int, Sequence)):
        raise ConfigError(f"input_size: expected a positive size or (height, width), got {input_size!r}")
    sizes = [input_size] if isinstance(input_size, int) else list(input_size)
    if len(sizes) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"input_size: expected a positive size or (height, width), got {input_size!r}")
    if max(sizes) > MAX_INPUT_SIZE:
        raise ConfigError(
            f"input_size: {max(sizes)} is over the {MAX_INPUT_SIZE} pixels se_inject analyses at; give the size the model runs at"
        )
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])
