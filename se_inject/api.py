"""The public API: retrofit SE units into a model and report what they cost.

>>> import torch, timm, se_inject
>>> model = timm.create_model("resnet18")
>>> se_model = se_inject.inject(model, position="standard", r=16)
>>> rep = se_inject.report(model, position="standard", r=16)
>>> rep.totals.params_added == rep.totals.eq5_params
True
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from se_inject.config import STYLED_FIELDS, InjectConfig, style
from se_inject.errors import (
    AlreadyInjectedError,
    ConfigError,
    InvalidModelError,
)
from se_inject.graph.channels import input_channels, recorded_input_size
from se_inject.graph.shadow import eval_mode, on_meta, shadow
from se_inject.io.heads import head_of
from se_inject.io.models import recorded_source
from se_inject.io.recipe import SITE_KEYS, Recipe, attach_recipe, versions
from se_inject.placement.plan import Plan, plan_units
from se_inject.placement.rules import load_rules
from se_inject.placement.sites import Analysis, analyse
from se_inject.surgery.report import OverheadReport, build_report
from se_inject.surgery.rewrite import LocalTraces, build_injected, dry_run
from se_inject.units.base import ChannelUnit

MAX_INPUT_SIZE = 16384  # pixels per side: far above any model's input, far below what would exhaust memory


@dataclass(frozen=True)
class Retrofit:
    """The result of :func:`retrofit`: the new model, its report, and the plan behind both."""

    model: nn.Module
    report: OverheadReport
    plan: Plan
    config: InjectConfig


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
    **options: Any,
) -> Retrofit:
    """Insert SE units into a copy of ``model`` and measure what they cost, from one trace.

    ``options`` are :class:`InjectConfig` fields (``position``, ``r``, ``stages``, ``squeeze``,
    ``excitation``, ``bias``, ``rounding``, ``init``, ``leaf_modules``, ``existing``, ``rules``). ``input_size`` is the
    spatial size FLOPs are counted at (default: the model's own, from timm's pretrained_cfg, else 224).
    ``head`` names the model's classifier (a Linear) where it is not one the model declares (timm's
    ``get_classifier``, a Linear named ``fc``, ``classifier`` or ``head``); the recipe records the
    head, or that the model has none. ``model`` is never modified; on any error it is exactly
    as it was. A model on the meta device is analysed without allocating weights.

    Example::

        result = se_inject.retrofit(my_model, position="post", r=8, stages=[3, 4])
        result.model(images)            # the retrofitted nn.Module
        print(result.report.to_json())  # Eq. 5 vs. added weights, FLOPs per stage
    """
    _check_model(model)
    config = make_config(config, **options)
    _refuse_reinjection(model, config)
    declared = head_of(model, head)  # before any work: a wrong name is one ConfigError
    input_size = _resolve_input_size(model, input_size)
    analysis: Analysis = analyse(shadow(model), input_size, config.leaf_modules, load_rules(config.rules))
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
    report = build_report(
        model_name or type(model).__name__, config, analysis, plan, model, injected, flops_after, unit_flops, notes
    )
    source, source_file = recorded_source(model_name)
    recipe = Recipe(
        source=source,
        source_file=source_file,
        options=_recordable(config),
        input_size=report.input_size,
        sites=tuple({k: getattr(u, k) for k in SITE_KEYS} for u in report.sites),
        versions=versions(),
        head=declared,  # what the model declares, never a layer of the units just inserted
    )
    attach_recipe(injected, recipe)  # lets later tools see what was injected, and how
    return Retrofit(injected, report, plan, config)


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
) -> float:
    """The largest |injected - original| over one random batch, both in eval mode (flags restored).

    With ``init="preserve"`` this is 0.0: the function-preservation check on real weights.

    Example::

        se_model = se_inject.inject(model)
        assert se_inject.check_outputs(model, se_model) == 0.0
    """
    size = _resolve_input_size(original, input_size)
    height, width = (size, size) if isinstance(size, int) else size
    reference = next(original.parameters())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, input_channels(original), height, width, generator=generator).to(
        reference.device, reference.dtype
    )
    with eval_mode(original), eval_mode(injected), torch.no_grad():
        expected, got = original(x), injected(x)
    return (got.float() - expected.float()).abs().max().item()


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
