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
import inspect
import logging
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from se_inject.errors import CheckpointError, ConfigError, ModelSpecError, NeedsValuesError, first_line, one_line
from se_inject.graph.shadow import RefuseMetaValues

MAX_SPEC_LENGTH = 1000
# Constructor arguments a recipe may pass to the model it rebuilds: anything else (pretrained,
# checkpoint, file paths, arbitrary keywords) would let a saved directory choose what runs or is read.
RECIPE_MODEL_KWARGS = {"num_classes": (0, 1_000_000), "in_chans": (1, 64)}


def spec_kind(spec: object) -> str:
    """``"timm"``, ``"torchvision"``, ``"module"`` (package.module:callable) or ``"file"`` (file.py:callable).

    The spec is checked for form only (nothing is imported): a malformed one raises ModelSpecError.

    >>> spec_kind("resnet50"), spec_kind("torchvision:resnet50"), spec_kind("nets/mine.py:build")
    ('timm', 'torchvision', 'file')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model name: give a timm name, torchvision:NAME, or module:callable")
    if "\0" in spec or len(spec) > MAX_SPEC_LENGTH or not spec.isprintable():
        raise ModelSpecError(
            f"model spec {spec[:60]!r}: not a model name (control characters or over {MAX_SPEC_LENGTH} characters)"
        )
    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        if not name.isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: expected torchvision:NAME, e.g. torchvision:resnet50")
        return "torchvision"
    if ":" not in spec:
        base = spec.split(".")[0]
        if not base or not all(c.isalnum() or c in "_-." for c in spec):
            raise ModelSpecError(f"model spec {spec!r}: not a timm model name, torchvision:NAME or module:callable")
        return "timm"
    source, _, attr = spec.rpartition(":")
    if not attr.isidentifier() or not source:
        raise ModelSpecError(
            f"model spec {spec!r}: expected module.path:callable or path/to/file.py:callable, with a callable's name after the ':'"
        )
    if source.endswith(".py"):
        return "file"
    if not all(part.isidentifier() for part in source.split(".")):
        raise ModelSpecError(
            f"model spec {spec!r}: '{source}' is not an importable module name (dotted identifiers; relative names "
            "are not allowed); for a file give its path ending in .py"
        )
    return "module"


def recorded_source(spec: str | None) -> tuple[str | None, dict[str, str] | None]:
    """How a recipe records ``spec``: None when it names nothing load_model can build again (a
    display name); a file source with its absolute path, plus that file's path and SHA-256, so
    the model loads from any directory and a changed file is noticed."""
    if not spec:
        return None, None
    try:
        kind = spec_kind(spec)
    except ModelSpecError:
        return None, None
    if kind == "timm":
        import timm

        return (spec, None) if timm.is_model(spec.split(".")[0]) else (None, None)
    if kind != "file":
        return spec, None
    path_text, _, attr = spec.rpartition(":")
    path = Path(path_text).resolve()
    if not path.is_file():
        return None, None
    return f"{path}:{attr}", {"path": str(path), "sha256": file_digest(path)}


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm_model(name: str, **kwargs) -> nn.Module:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model '{name}'{_suggest(name, timm.list_models())}")
    if "." in name:
        base, tag = name.split(".", 1)
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        if tag not in tags:
            known = (
                f"; its tags are {', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}"
                if tags
                else "; it has no tags"
            )
            raise ModelSpecError(f"timm model '{base}' has no pretrained tag '{tag}'{known}")
    return timm.create_model(name, pretrained=False, **kwargs)


def _torchvision_model(name: str, **kwargs) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelSpecError(f"unknown torchvision classification model '{name}'{_suggest(name, names)}")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as recorded for a ``file.py:callable`` source."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def _importable_folder(folder: Path) -> Iterator[None]:
    """``folder`` on sys.path while a model file loads and builds, so it may import its siblings."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _load_python_module(source: str):
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise ModelSpecError(f"no such file: '{source}'")
        module_name = f"se_inject_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"'{source}' cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            with _importable_folder(path.resolve().parent):
                spec.loader.exec_module(module)
        except NeedsValuesError:  # on the meta device: load_model builds for real instead
            del sys.modules[module_name]
            raise
        except (Exception, SystemExit) as err:  # a user file may call sys.exit() at import
            del sys.modules[module_name]
            raise ModelSpecError(f"importing '{source}' failed: {one_line(err)}") from err
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as err:
        raise ModelSpecError(f"cannot import module '{source}': {err}") from err
    except NeedsValuesError:  # on the meta device: load_model builds for real instead
        raise
    except (Exception, SystemExit) as err:
        raise ModelSpecError(f"importing module '{source}' failed: {one_line(err)}") from err


def refused_kwargs(factory: object, kwargs: dict) -> list[str]:
    """The names in ``kwargs`` that ``factory``'s signature does not accept (all accepted: [])."""
    try:
        params = inspect.signature(factory).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    names = {
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return sorted(set(kwargs) - names)


def _callable_model(spec: str, kwargs: dict, optional: dict) -> nn.Module:
    source, _, attr = spec.rpartition(":")
    module = _load_python_module(source)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ModelSpecError(f"'{source}' has no callable '{attr}'{_suggest(attr, public)}")
    not_taken = refused_kwargs(factory, optional)
    kwargs = {**{k: v for k, v in optional.items() if k not in not_taken}, **kwargs}
    refused = refused_kwargs(factory, kwargs)
    if refused:
        raise ModelSpecError(
            f"{spec}() does not take {', '.join(refused)}; add the parameter to {attr}() "
            "or build the model yourself and pass it to the API"
        )
    folder = Path(source).resolve().parent if source.endswith(".py") else None
    try:
        with _importable_folder(folder) if folder else contextlib.nullcontext():
            model = factory(**kwargs)
    except NeedsValuesError:  # on the meta device: load_model builds for real instead
        raise
    except (Exception, SystemExit) as err:
        raise ModelSpecError(f"calling {spec}() failed: {one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def check_device(device: object) -> torch.device | None:
    """``device`` as a torch.device (None stays None); a malformed one is a ConfigError."""
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise ConfigError(
            f"device: expected a device name such as 'cpu', 'cuda' or 'meta', got {type(device).__name__}"
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"device: {device!r} is not a device ({one_line(err)}); use cpu, cuda, cuda:N or meta"
        ) from None


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    optional_kwargs: Mapping[str, object] | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build the model ``spec`` names, on ``device`` (``"meta"``: shapes only, no weight memory).

    ``pretrained`` uses timm's own pretrained weights (needs a network); ``checkpoint`` loads a
    local .safetensors or .pth file into the model (see :func:`load_checkpoint`). ``model_kwargs``
    (``num_classes=10``) go to the model's constructor; ``optional_kwargs`` go to it only where its
    signature takes them (timm and torchvision constructors take ``num_classes``; a user's callable
    may not), so a model file is imported once to find out and build.

    >>> load_model("resnet18", device="meta").fc.weight.is_meta
    True
    """
    spec_kind(spec)
    device = check_device(device)
    if pretrained or checkpoint is not None:
        if pretrained and checkpoint is not None:
            raise ModelSpecError("pretrained and checkpoint both give weights: choose one")
        if str(device) == "meta":
            raise ModelSpecError("weights cannot be loaded on the meta device")
        if checkpoint is not None:
            model = load_checkpoint(load_model(spec, optional_kwargs=optional_kwargs, **model_kwargs), checkpoint)
        else:
            if ":" in spec:
                raise ModelSpecError("pretrained applies to timm model names; pass the weights with checkpoint instead")
            model = _pretrained_model(spec, **{**(optional_kwargs or {}), **model_kwargs})
        return model.to(device) if device is not None else model
    try:
        try:
            return _build(spec, device, model_kwargs, dict(optional_kwargs or {}))
        except NeedsValuesError:
            # some constructors read their own initial weights (.item(), .tolist()): build for real, then drop them
            return _build(spec, "cpu", model_kwargs, dict(optional_kwargs or {})).to("meta")
    except ModelSpecError:
        raise
    except Exception as err:  # a timm/torchvision constructor refusing its arguments (num_classes=-1, ...)
        given = f" with {', '.join(f'{k}={v!r}' for k, v in model_kwargs.items())}" if model_kwargs else ""
        raise ModelSpecError(f"building '{spec}'{given} failed: {one_line(err)}") from err


def _build(spec: str, device: str | torch.device | None, kwargs: dict, optional: dict) -> nn.Module:
    """Build on ``device``; on the meta device an operation that reads values raises NeedsValuesError."""
    on_meta = device is not None and torch.device(device).type == "meta"
    with (
        torch.device(device) if device is not None else contextlib.nullcontext(),
        RefuseMetaValues() if on_meta else contextlib.nullcontext(),
    ):
        if spec.startswith("torchvision:"):
            return _torchvision_model(spec.split(":", 1)[1], **{**optional, **kwargs})
        if ":" in spec:
            return _callable_model(spec, kwargs, optional)
        return _timm_model(spec, **{**optional, **kwargs})


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
        for lg, level in zip(loggers, levels, strict=True):
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
            state: Any = load_file(str(path))  # checked below, as torch.load's
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err}); is it damaged or truncated?"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = first_line(err)
            raise CheckpointError(
                f"{path}: refused: loading it would run code, not just read tensors ({first}); "
                "only plain weights are loaded (torch.load weights_only=True): save a state_dict or use safetensors"
            ) from None
        except Exception as err:
            raise CheckpointError(
                f"{path}: cannot be read by torch.load ({type(err).__name__}: {err}); is it damaged?"
            ) from None
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    odd_keys = [k for k in state if not isinstance(k, str)]
    if odd_keys:
        raise CheckpointError(f"{path}: key {odd_keys[0]!r} is not a parameter name (every key must be a string)")
    for key, tensor in state.items():
        if tensor.is_meta:
            raise CheckpointError(
                f"{path}: '{key}' is a meta tensor: it holds no values (was it saved from a meta model?)"
            )
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{path}: '{key}' is a {tensor.layout} tensor; only dense tensors are loaded")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, error: type[Exception] = CheckpointError
) -> None:
    """Load ``state`` into ``model`` in place; unless every key and shape fits, raise ``error`` naming them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise error(
            f"{source}: does not fit {type(model).__name__}: {describe_mismatch(missing, unexpected, wrong, expected, state)}"
        )
    lossy = sorted(k for k in expected if not _holds(state[k].dtype, expected[k].dtype))
    if lossy:
        k = lossy[0]
        raise error(
            f"{source}: '{k}' is {state[k].dtype} but the model holds {expected[k].dtype}: the values cannot be "
            f"carried over without changing them ({len(lossy)} such tensor(s)); save the weights in a floating dtype"
        )
    model.load_state_dict(state, strict=True, assign=any(t.is_meta for t in expected.values()))


def _holds(given: torch.dtype, wanted: torch.dtype) -> bool:
    """Whether values of dtype ``given`` go into a tensor of ``wanted`` as what they are meant to be:
    floats into floats (half precision widens), integers into integers; never floats truncated
    into integers, integers or booleans read as weights, or complex numbers into real tensors."""
    if wanted.is_complex or given.is_complex:
        return given.is_complex == wanted.is_complex
    if wanted.is_floating_point:
        return given.is_floating_point
    return not given.is_floating_point


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights of ``path`` into ``model`` (in place; every key must fit) and return it."""
    load_state(model, read_checkpoint(path), str(path))
    return model
