"""se_inject: retrofit Squeeze-and-Excitation units into existing PyTorch models.

>>> import timm, se_inject
>>> result = se_inject.retrofit(timm.create_model("resnet18"), position="standard", r=16)
>>> len(result.report.sites)
8
"""

from se_inject._version import __version__
from se_inject.api import Retrofit, check_outputs, inject, make_config, report, retrofit
from se_inject.bench import BenchReport, bench, twin_of
from se_inject.config import POSITIONS, InjectConfig
from se_inject.errors import (
    AlreadyInjectedError,
    ArtifactError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidModelError,
    ModelSpecError,
    NoSitesError,
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
from se_inject.inspect.excitation import PruneResult, prune
from se_inject.io.models import load_checkpoint, load_model
from se_inject.io.recipe import Recipe
from se_inject.saving import SourceChangedWarning, apply, load, save
from se_inject.surgery.report import (
    OverheadReport,
    StageReport,
    Totals,
    UnitReport,
    eq5_params,
)
from se_inject.train.data import load_data
from se_inject.train.finetune import FinetuneConfig, FinetuneResult, finetune
from se_inject.units.se import SqueezeExcite, hidden_width

__all__ = [
    "POSITIONS",
    "AlreadyInjectedError",
    "BenchReport",
    "ArtifactError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "InvalidModelError",
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
    "report",
    "retrofit",
    "save",
    "twin_of",
]
