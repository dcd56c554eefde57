"""Turning a model specification into an nn.Module, and loading trained weights into it.

A spec's kind (a timm model name, ``torchvision:NAME``, ``package.module:callable``,
``path/to/file.py:callable``, or a kind registered since) is found in the registry of model sources
(:mod:`se_inject.io.sources`), which builds it. Models are built without pretrained weights unless
asked; on ``device="meta"`` no real weight memory is allocated, which is all the overhead report needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from se_inject.errors import CheckpointError, ConfigError, ModelSpecError, NeedsValuesError, first_line, one_line
from se_inject.graph.shadow import RefuseMetaValues
from se_inject.io.sources import source_of

# Constructor arguments a recipe may pass to the model it rebuilds: anything else (pretrained,
# checkpoint, file paths, arbitrary keywords) would let a saved directory choose what runs or is read.
RECIPE_MODEL_KWARGS = {"num_classes": (0, 1_000_000), "in_chans": (1, 64)}


def spec_kind(spec: object) -> str:
    """The name of ``spec``'s source kind (``"timm"``, ``"torchvision"``, ``"module"``, ``"file"``, or one
    registered), checked for form only: a malformed spec raises ModelSpecError.

    >>> spec_kind("resnet50"), spec_kind("torchvision:resnet50"), spec_kind("nets/mine.py:build")
    ('timm', 'torchvision', 'file')
    """
    return source_of(spec).name


def recorded_source(spec: str | None) -> tuple[str | None, dict[str, str] | None]:
    """How a recipe records ``spec``: None when it names nothing load_model can build again (a
    display name); else what its source kind records (a file: its absolute path, digest)."""
    if not spec:
        return None, None
    try:
        source = source_of(spec)
    except ModelSpecError:
        return None, None
    return source.record(spec)


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
            model = source_of(spec).build_pretrained(spec, {**(optional_kwargs or {}), **model_kwargs})
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


def head_kwargs(num_classes: int | None) -> dict[str, Any]:
    """``num_classes=N`` for the model's constructor (None: its own head); a negative count is refused."""
    if num_classes is None:
        return {}
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ConfigError(f"num_classes: expected 0 (no head) or more classes, got {num_classes!r}")
    return {"num_classes": num_classes}


def load_model_for_data(
    spec: str,
    classes: int,
    *,
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """``spec`` built on the CPU to be fine-tuned on data with ``classes`` classes.

    ``num_classes`` is the head that ``checkpoint`` holds. Without trained weights (no checkpoint, not
    pretrained) the model is built with the dataset's classes where its constructor takes them; a head
    of another width is refitted by finetune.
    """
    given = head_kwargs(num_classes)
    untrained_head = {} if (given or checkpoint or pretrained) else {"num_classes": classes}
    return load_model(
        spec, device="cpu", pretrained=pretrained, checkpoint=checkpoint, optional_kwargs=untrained_head, **given
    )


def _build(spec: str, device: str | torch.device | None, kwargs: dict, optional: dict) -> nn.Module:
    """Build on ``device``; on the meta device an operation that reads values raises NeedsValuesError."""
    on_meta = device is not None and torch.device(device).type == "meta"
    with (
        torch.device(device) if device is not None else contextlib.nullcontext(),
        RefuseMetaValues() if on_meta else contextlib.nullcontext(),
    ):
        return source_of(spec).build(spec, kwargs, optional)


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
    unwrapped, and the prefix a wrapper puts on every key (DistributedDataParallel's ``module.``,
    ``torch.compile``'s ``_orig_mod.``) is dropped.
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
    if state and all(k.startswith(_WRAPPER_PREFIXES) for k in state):
        from timm.models import clean_state_dict

        state = clean_state_dict(state)  # timm's: DDP's and torch.compile's prefixes, in either order
    return state


# the prefixes a wrapper puts before every key: DistributedDataParallel, torch.compile's OptimizedModule
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
