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
        name = spec.removeprefix(self.prefix)
        names = _image_model_names()
        if name not in names:
            raise ModelSpecError(f"unknown torchvision image model '{name}'{suggest(name, names)}")
        return _construct(name, {**optional, **kwargs})

    def identify(self, model: nn.Module, own: set[str]) -> str | None:
        """The one torchvision builder that returns the model's class with its tensors' names and shapes
        (built on the meta device; a classifier may differ in its number of classes)."""
        import torch
        import torchvision

        cls = type(model)
        if not cls.__module__.startswith("torchvision.models"):
            return None
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in own}
        found = []
        for name in sorted(_image_model_names()):
            builder = torchvision.models.get_model_builder(name)
            returns = inspect.signature(builder).return_annotation
            if getattr(returns, "__name__", returns) != cls.__name__:
                continue
            with torch.device("meta"):
                candidate = _construct(name, {})
            theirs = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
            if theirs.keys() == shapes.keys() and sum(theirs[k] != shapes[k] for k in theirs) <= 2:  # a head
                found.append(name)
        return f"{self.prefix}{found[0]}" if len(found) == 1 else None


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


def _construct(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """torchvision's model ``name`` without weights: a detector's or segmenter's backbone is ImageNet-pretrained
    by default, so it is asked for none either (nothing is downloaded here)."""
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return builder(weights=None, **{**backbone, **kwargs})


def _image_model_names() -> list[str]:
    """Every torchvision classifier, detector and segmenter by name."""
    import torchvision

    return [n for package in _IMAGE_MODELS for n in torchvision.models.list_models(module=package())]
