"""``torchvision:NAME``: torchvision's image models (classification, detection, segmentation), built by
``torchvision.models.get_model`` without weights (a detector's or segmenter's backbone too)."""

from __future__ import annotations

import inspect
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
    description = "a torchvision classifier, detector or segmenter (torchvision.models.get_model), without weights"

    def check(self, spec: str) -> None:
        if not spec.removeprefix(self.prefix).isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: expected torchvision:NAME, e.g. torchvision:resnet50")

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        import torchvision

        name = spec.removeprefix(self.prefix)
        names = [n for package in _IMAGE_MODELS for n in torchvision.models.list_models(module=package())]
        if name not in names:
            raise ModelSpecError(f"unknown torchvision image model '{name}'{suggest(name, names)}")
        builder = torchvision.models.get_model_builder(name)
        # a detector's or segmenter's backbone is ImageNet-pretrained by default: nothing is downloaded here
        backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
        return builder(weights=None, **{**backbone, **optional, **kwargs})


def _classification() -> Any:
    import torchvision

    return torchvision.models


def _detection() -> Any:
    import torchvision.models.detection

    return torchvision.models.detection


def _segmentation() -> Any:
    import torchvision.models.segmentation

    return torchvision.models.segmentation


_IMAGE_MODELS = (_classification, _detection, _segmentation)
