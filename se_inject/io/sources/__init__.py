"""Model sources: where a model comes from, one registered kind per form of spec.

``se-inject sources`` lists them; :mod:`se_inject.io.sources.base` holds the interface. A spec is
matched against the kinds with a prefix first, then against the others in the order registered here
(a file spec would also read as a malformed module spec, so the file kind comes first).
"""

from se_inject.io.sources.base import (
    SOURCES,
    ModelSource,
    SourceInfo,
    describe_sources,
    register_source,
    source_of,
    syntaxes,
)
from se_inject.io.sources.python_code import FileSource, ModuleSource
from se_inject.io.sources.timm_models import TimmHubSource, TimmSource
from se_inject.io.sources.torchvision_models import TorchvisionSource
from se_inject.io.sources.transformers_models import TransformersSource

for _kind in (TimmSource(), TimmHubSource(), TorchvisionSource(), TransformersSource(), FileSource(), ModuleSource()):
    register_source(_kind)

__all__ = ["SOURCES", "ModelSource", "SourceInfo", "describe_sources", "register_source", "source_of", "syntaxes"]
