"""``torchvision:NAME``: torchvision's classification models, built by ``torchvision.models.get_model``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from se_inject.errors import ModelSpecError
from se_inject.io.sources.base import ModelSource, suggest

if TYPE_CHECKING:
    from torch import nn


class TorchvisionSource(ModelSource):
    name = "torchvision"
    prefix = "torchvision:"
    syntax = "torchvision:NAME"
    example = "torchvision:resnet50"
    description = "a torchvision classification model (torchvision.models.get_model), without weights"

    def check(self, spec: str) -> None:
        if not spec.removeprefix(self.prefix).isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: expected torchvision:NAME, e.g. torchvision:resnet50")

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        import torchvision

        name = spec.removeprefix(self.prefix)
        names = torchvision.models.list_models(module=torchvision.models)
        if name not in names:
            raise ModelSpecError(f"unknown torchvision classification model '{name}'{suggest(name, names)}")
        return torchvision.models.get_model(name, weights=None, **{**optional, **kwargs})
