"""Turning a model specification into an nn.Module.

Forms: a timm model name (``resnet50``), ``torchvision:NAME``, ``package.module:callable`` or
``path/to/file.py:callable`` (called with no arguments). Models are built without pretrained
weights; on ``device="meta"`` no real weight memory is allocated, which is all the overhead
report needs.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from se_inject.errors import ModelSpecError


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm_model(name: str) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False)


def _torchvision_model(name: str) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelSpecError(f"unknown torchvision classification model '{name}'{_suggest(name, names)}")
    return torchvision.models.get_model(name, weights=None)


def _load_python_module(source: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ModelSpecError(f"no such file: '{source}'")
        module_name = f"se_inject_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise ModelSpecError(f"importing '{source}' failed: {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(source)
    except ImportError as err:
        raise ModelSpecError(f"cannot import module '{source}': {err}") from err


def _callable_model(spec: str) -> nn.Module:
    source, _, attr = spec.rpartition(":")
    module = _load_python_module(source)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ModelSpecError(f"'{source}' has no callable '{attr}'{_suggest(attr, public)}")
    try:
        model = factory()
    except Exception as err:
        raise ModelSpecError(f"calling {spec}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(spec: str, device: str | torch.device | None = None) -> nn.Module:
    """Build the model ``spec`` names, on ``device`` (``"meta"``: shapes only, no weight memory).

    >>> load_model("resnet18", device="meta").fc.weight.is_meta
    True
    """
    if not spec or not isinstance(spec, str):
        raise ModelSpecError("empty model name: give a timm name, torchvision:NAME, or module:callable")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if spec.startswith("torchvision:"):
            return _torchvision_model(spec.split(":", 1)[1])
        if ":" in spec:
            return _callable_model(spec)
        return _timm_model(spec)

