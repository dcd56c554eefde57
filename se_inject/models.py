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
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from se_inject.errors import CheckpointError, ModelSpecError


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    return timm.create_model(name, pretrained=False, **kwargs)


def _torchvision_model(name: str, **kwargs) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelSpecError(f"unknown torchvision classification model '{name}'{_suggest(name, names)}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


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


def _callable_model(spec: str, **kwargs) -> nn.Module:
    source, _, attr = spec.rpartition(":")
    module = _load_python_module(source)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ModelSpecError(f"'{source}' has no callable '{attr}'{_suggest(attr, public)}")
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise ModelSpecError(f"calling {spec}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **model_kwargs: object,
) -> nn.Module:
    """Build the model ``spec`` names, on ``device`` (``"meta"``: shapes only, no weight memory).

    ``pretrained`` uses timm's own pretrained weights (needs a network); ``checkpoint`` loads a
    local .safetensors or .pth file into the model (see :func:`load_checkpoint`). ``model_kwargs``
    (``num_classes=10``) go to the model's constructor.

    >>> load_model("resnet18", device="meta").fc.weight.is_meta
    True
    """
    if pretrained or checkpoint is not None:
        if pretrained and checkpoint is not None:
            raise ModelSpecError("pretrained and checkpoint both give weights: choose one")
        if str(device) == "meta":
            raise ModelSpecError("weights cannot be loaded on the meta device")
        if pretrained:
            if ":" in spec:
                raise ModelSpecError("pretrained applies to timm model names; pass the weights with checkpoint instead")
            model = _pretrained_model(spec, **model_kwargs)
        else:
            model = load_checkpoint(load_model(spec, **model_kwargs), checkpoint)
        return model.to(device) if device is not None else model
    if not spec or not isinstance(spec, str):
        raise ModelSpecError("empty model name: give a timm name, torchvision:NAME, or module:callable")
    try:
        return _build(spec, device, model_kwargs)
    except (NotImplementedError, RuntimeError) as err:
        if str(device) != "meta" or "meta" not in str(err):
            raise
        # some constructors read their own initial weights (.item(), copies): build for real, then drop them
        return _build(spec, "cpu", model_kwargs).to("meta")


def _build(spec: str, device: str | torch.device | None, kwargs: dict) -> nn.Module:
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if spec.startswith("torchvision:"):
            return _torchvision_model(spec.split(":", 1)[1], **kwargs)
        if ":" in spec:
            return _callable_model(spec, **kwargs)
        return _timm_model(spec, **kwargs)



def _pretrained_model(name: str, **kwargs) -> nn.Module:
    """timm's own pretrained loading; without a network, one line pointing to --checkpoint."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    unreachable = _hub_unreachable()
    with _hub_session(offline=unreachable is not None):
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:
            if unreachable or _hub_offline():
                why = f"{unreachable or 'HF_HUB_OFFLINE is set'} and they are not in the local Hugging Face cache"
            else:
                why = f"{type(err).__name__}: {_first_sentence(err)}"
    raise ModelSpecError(
        f"cannot fetch pretrained weights for '{name}': {why}; download them on a machine with a network "
        "and pass the file with --checkpoint FILE"
    )


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found at once; None when it may be.

    A failed name lookup is certain and immediate, where a download would retry for about a
    minute; behind a proxy the proxy resolves names, so nothing is concluded.
    """
    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"no network ({host} cannot be resolved)"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hub_session(offline: bool) -> Iterator[None]:
    """The hub in offline mode if asked (the local cache still serves), its warnings silenced:
    the user gets se_inject's one line, not the hub's retries."""
    from huggingface_hub import constants

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm")]
    levels, was_offline = [lg.level for lg in loggers], constants.HF_HUB_OFFLINE
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = was_offline or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_sentence(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def describe_mismatch(missing: list[str], unexpected: list[str], wrong: list[str], expected: dict, given: dict) -> str:
    """One line naming the keys that differ, a few of each kind."""

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
        parts.append(f"{len(wrong)} of another shape: {few(shapes)}")
    return "; ".join(parts)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or .pth/.pt file, read without running any code.

    ``.pth`` files go through ``torch.load(weights_only=True)``: a pickle that needs code to load
    is refused. A checkpoint wrapping its weights (``{"state_dict": ...}``, ``{"model": ...}``) is
    unwrapped, and DistributedDataParallel's ``module.`` prefix is dropped.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); is it damaged or truncated?") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()[0][:200]
            raise CheckpointError(
                f"{path}: refused: loading it would run code, not just read tensors ({first}); "
                "only plain weights are loaded (torch.load weights_only=True): save a state_dict or use safetensors"
            ) from None
        except Exception as err:
            raise CheckpointError(f"{path}: cannot be read by torch.load ({type(err).__name__}: {err}); is it damaged?") from None
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str, error: type[Exception] = CheckpointError) -> None:
    """Load ``state`` into ``model`` in place; unless every key and shape fits, raise ``error`` naming them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise error(
            f"{source}: does not fit {type(model).__name__}: {describe_mismatch(missing, unexpected, wrong, expected, state)}"
        )
    model.load_state_dict(state, strict=True, assign=any(t.is_meta for t in expected.values()))


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights of ``path`` into ``model`` (in place; every key must fit) and return it."""
    load_state(model, read_checkpoint(path), str(path))
    return model
