"""se_inject: retrofit Squeeze-and-Excitation units into existing PyTorch models.

>>> import timm, se_inject
>>> result = se_inject.retrofit(timm.create_model("resnet18"), position="standard", r=16)
>>> len(result.report.sites)
8
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from se_inject._version import __version__
from se_inject.config import POSITIONS, InjectConfig, Style, register_style, styles
from se_inject.errors import (
    AlreadyInjectedError,
    ArtifactError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidModelError,
    ModelSpecError,
    NeedsValuesError,
    NoSitesError,
    NotScriptableError,
    RecipeMismatchError,
    ResumeMismatchError,
    RewriteError,
    RuleError,
    SEInjectError,
    ShapePropagationError,
    TrainingDivergedError,
    UntraceableModelError,
    UntrustedCodeError,
)

# Everything that needs torch is imported on first use (PEP 562), so that `se-inject --help`
# and `--version` answer without loading torch; type checkers see the real imports.
_LAZY: dict[str, str] = {
    "BenchReport": "se_inject.measure.bench",
    "FinetuneConfig": "se_inject.train.finetune",
    "FinetuneResult": "se_inject.train.finetune",
    "OverheadReport": "se_inject.surgery.report",
    "PruneResult": "se_inject.inspect.excitation",
    "Recipe": "se_inject.io.recipe",
    "Retrofit": "se_inject.api",
    "SourceChangedWarning": "se_inject.io.saving",
    "SqueezeExcite": "se_inject.units.se",
    "StageReport": "se_inject.surgery.report",
    "Totals": "se_inject.surgery.report",
    "UnitReport": "se_inject.surgery.report",
    "apply": "se_inject.io.saving",
    "bench": "se_inject.measure.bench",
    "check_outputs": "se_inject.api",
    "largest_difference": "se_inject.api",
    "compare": "se_inject.measure.compare",
    "candidates": "se_inject.measure.compare",
    "Comparison": "se_inject.measure.compare",
    "eq5_params": "se_inject.units.se",
    "ChannelUnit": "se_inject.units.base",
    "register_unit": "se_inject.units.base",
    "ModelSource": "se_inject.io.sources",
    "register_source": "se_inject.io.sources",
    "unit_class": "se_inject.units.base",
    "register_pattern": "se_inject.placement.patterns.base",
    "register_leaf_module": "se_inject.graph.trace",
    "finetune": "se_inject.train.finetune",
    "experiment": "se_inject.train.experiment",
    "arms": "se_inject.train.experiment",
    "ExperimentConfig": "se_inject.train.config",
    "ExperimentResult": "se_inject.train.experiment",
    "hidden_width": "se_inject.units.se",
    "inject": "se_inject.api",
    "load": "se_inject.io.saving",
    "load_checkpoint": "se_inject.io.models",
    "load_data": "se_inject.train.data",
    "load_model": "se_inject.io.models",
    "load_style_file": "se_inject.io.styles",
    "make_config": "se_inject.api",
    "prune": "se_inject.inspect.excitation",
    "unit_movement": "se_inject.inspect.excitation",
    "push_to_hub": "se_inject.io.hub",
    "optimize_for_inference": "se_inject.surgery.optimize",
    "optimized_units": "se_inject.surgery.optimize",
    "report": "se_inject.api",
    "reproducible": "se_inject.train.reproducible",
    "retrofit": "se_inject.api",
    "save": "se_inject.io.saving",
    "twin_of": "se_inject.measure.bench",
}

if TYPE_CHECKING:
    from se_inject.api import Retrofit, check_outputs, inject, largest_difference, make_config, report, retrofit
    from se_inject.graph.trace import register_leaf_module
    from se_inject.inspect.excitation import PruneResult, prune, unit_movement
    from se_inject.io.hub import push_to_hub
    from se_inject.io.models import load_checkpoint, load_model
    from se_inject.io.recipe import Recipe
    from se_inject.io.saving import SourceChangedWarning, apply, load, save
    from se_inject.io.sources import ModelSource, register_source
    from se_inject.io.styles import load_style_file
    from se_inject.measure.bench import BenchReport, bench, twin_of
    from se_inject.measure.compare import Comparison, candidates, compare
    from se_inject.placement.patterns.base import register_pattern
    from se_inject.surgery.optimize import optimize_for_inference, optimized_units
    from se_inject.surgery.report import OverheadReport, StageReport, Totals, UnitReport
    from se_inject.train.config import ExperimentConfig
    from se_inject.train.data import load_data
    from se_inject.train.experiment import ExperimentResult, arms, experiment
    from se_inject.train.finetune import FinetuneConfig, FinetuneResult, finetune
    from se_inject.train.reproducible import reproducible
    from se_inject.units.base import ChannelUnit, register_unit, unit_class
    from se_inject.units.se import SqueezeExcite, eq5_params, hidden_width


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'se_inject' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "reproducible",
    "Comparison",
    "candidates",
    "compare",
    "POSITIONS",
    "Style",
    "load_style_file",
    "register_style",
    "styles",
    "ChannelUnit",
    "register_leaf_module",
    "register_pattern",
    "register_unit",
    "ModelSource",
    "register_source",
    "unit_class",
    "__version__",
    "AlreadyInjectedError",
    "BenchReport",
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InvalidModelError",
    "NotScriptableError",
    "largest_difference",
    "FinetuneConfig",
    "FinetuneResult",
    "InjectConfig",
    "ModelSpecError",
    "NoSitesError",
    "OverheadReport",
    "PruneResult",
    "Recipe",
    "RecipeMismatchError",
    "ResumeMismatchError",
    "Retrofit",
    "RewriteError",
    "RuleError",
    "SEInjectError",
    "NeedsValuesError",
    "ShapePropagationError",
    "SourceChangedWarning",
    "TrainingDivergedError",
    "SqueezeExcite",
    "StageReport",
    "Totals",
    "UnitReport",
    "UntraceableModelError",
    "UntrustedCodeError",
    "apply",
    "bench",
    "check_outputs",
    "eq5_params",
    "finetune",
    "hidden_width",
    "inject",
    "load",
    "load_checkpoint",
    "load_data",
    "load_model",
    "make_config",
    "prune",
    "unit_movement",
    "push_to_hub",
    "experiment",
    "arms",
    "ExperimentConfig",
    "ExperimentResult",
    "optimize_for_inference",
    "optimized_units",
    "report",
    "retrofit",
    "save",
    "twin_of",
]
