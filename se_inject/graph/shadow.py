"""Running a model without real compute, and without touching it.

Meta tensors for a model on the meta device, fake tensors (FakeTensorMode: real parameters, no
real arithmetic) otherwise; eval mode by flag; and the *shadow*, the copy that analysis traces
and runs so that nothing of the user's model changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any, TypeVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode

from se_inject.errors import InvalidModelError, NeedsValuesError, ShapePropagationError, first_line, one_line

aten = torch.ops.aten


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for parameter in module.parameters():
        return parameter
    for buffer in module.buffers():
        return buffer
    return None


def on_meta(module: nn.Module) -> bool:
    tensor = _first_tensor(module)
    return tensor is not None and tensor.is_meta


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration, every submodule's own flag restored afterwards.

    The flags are set directly rather than through ``module.eval()``: a model's own ``train()``
    override may do more than set them (freeze parameters, say), and se_inject runs no user code
    that could change the model.
    """
    flags = [(m, m.training) for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def shadow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to trace and run during analysis, so that nothing of the user's model changes.

    Tracing runs a model's Python ``forward`` with fx proxies: a forward that counts its calls or
    caches a tensor, a forward hook that stores its output, a ``train()`` override that changes
    ``requires_grad``, would otherwise do it to the user's model. The shadow has its own module
    objects without hooks; its parameters are new Parameter objects over the user's storage (no
    weight memory is copied) and its buffers are copies (a forward may write a buffer).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    try:
        copy = deepcopy(model, memo)
    except Exception as err:
        raise InvalidModelError(
            f"model: {type(model).__name__} cannot be copied ({one_line(err, 160)}); "
            "se_inject works on copies so that your model is never changed: keep such state (locks, open files, "
            "generators) outside the module or give it a __deepcopy__"
        ) from None
    for m in copy.modules():
        for attribute in _HOOK_DICTS:
            hooks = getattr(m, attribute, None)
            if isinstance(hooks, dict):
                hooks.clear()
    return copy


# operations whose result depends on tensor values, by torch's own tags (FakeTensorMode raises
# DataDependentOutputException / DynamicOutputShapeException for the same ones)
_VALUE_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


def _reads_values(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` always reads the values of a meta tensor among ``args``: ``.item()`` or a
    copy out of the meta device (``.tolist()``, ``.cpu()``)."""
    if func is aten._local_scalar_dense.default:
        return bool(args) and args[0].is_meta
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return bool(args) and args[0].is_meta and device is not None and torch.device(device).type != "meta"
    return False


def _may_read_values(func: Any, args: tuple) -> bool:
    """Whether ``func`` is one whose result can depend on values (torch's tags; ``index`` with a
    boolean mask, ``nonzero``, ``equal``) and runs on meta tensors: its meta kernel may refuse."""
    return any(tag in func.tags for tag in _VALUE_TAGS) and any(isinstance(a, torch.Tensor) and a.is_meta for a in args)


class RefuseMetaValues(TorchDispatchMode):
    """Raises :class:`NeedsValuesError`, naming the operation, where an operation needs the values of
    meta tensors, instead of the mix of RuntimeError and NotImplementedError messages torch gives.

    ``.item()`` and copies out of meta are refused before they run; an operation tagged as
    value-dependent runs, and only its own failure is converted (``index`` with integer indices
    has a meta kernel, with a boolean mask it has not).
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _reads_values(func, args, kwargs):
            raise NeedsValuesError(f"{func.name()} needs tensor values, which the meta device does not have")
        if not _may_read_values(func, args):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as err:
            raise NeedsValuesError(
                f"{func.name()} needs tensor values, which the meta device does not have ({first_line(err)})"
            ) from err


class ShapeOnlyBatchNorm(RefuseMetaValues):
    """Answers eval-mode batch norm on meta/fake tensors with its output shapes, without its kernel.

    The meta kernel of batch norm is a Python decomposition of a dozen elementwise ops: about 1 ms a
    call, three quarters of a ResNet-152 meta forward. The output is the input's shape, dtype and
    memory format, and batch norm counts no FLOPs, so nothing measured changes. A channel count
    that does not fit is left to the real kernel, which raises as before. Operations that read the
    values of meta tensors are refused as :class:`RefuseMetaValues` does (one mode, one dispatch).
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is aten.native_batch_norm.default and not args[5]:  # args[5]: training
            x, running_mean = args[0], args[3]
            channels = x.shape[1] if x.dim() > 1 else 1
            stats = (args[1], args[2], running_mean, args[4])
            if all(t is None or tuple(t.shape) == (channels,) for t in stats):
                saved = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
                return torch.empty_like(x), x.new_empty((channels,), dtype=saved), x.new_empty((channels,), dtype=saved)
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def abstract_tensors(module: nn.Module, real: bool = False) -> Iterator[Any]:
    """Yield a factory ``make(shape)`` of inputs that run ``module`` without real arithmetic.

    Meta tensors for a model on the meta device, fake tensors otherwise; with ``real``, zeros
    (for forwards that branch on tensor values, which abstract tensors do not have). The model
    runs in eval mode, so BatchNorm statistics and RNG state are untouched.
    """
    tensor = _first_tensor(module)
    device = tensor.device if tensor is not None else torch.device("cpu")
    dtype = tensor.dtype if tensor is not None and tensor.is_floating_point() else torch.float32
    with eval_mode(module), torch.no_grad():
        if real:
            yield lambda shape: torch.zeros(shape, device=device, dtype=dtype)
        elif device.type == "meta":
            with ShapeOnlyBatchNorm():
                yield lambda shape: torch.zeros(shape, device=device, dtype=dtype)
        else:
            with FakeTensorMode(allow_non_fake_inputs=True), ShapeOnlyBatchNorm():
                yield lambda shape: torch.empty(shape, device=device, dtype=dtype)


_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException)


def _value_dependent(err: BaseException) -> bool:
    """Whether ``err``, or what a ShapePropagationError wraps, is an operation that needed tensor values."""
    cause = err.__cause__ if isinstance(err, ShapePropagationError) and not isinstance(err, NeedsValuesError) else err
    return isinstance(cause, (*_DATA_DEPENDENT, NeedsValuesError))


Result = TypeVar("Result")


def with_real_fallback(module: nn.Module, run: Callable[[bool], Result]) -> Result:
    """``run(False)`` on abstract tensors; if the forward reads tensor values, ``run(True)`` on real ones."""
    try:
        return run(False)
    except Exception as err:
        if not _value_dependent(err):
            raise
        if on_meta(module):
            raise ShapePropagationError(
                f"{str(err).split(';')[0] if isinstance(err, ShapePropagationError) else type(err).__name__}: the "
                "forward depends on tensor values, which the meta device does not have; build the model with "
                "real weights (API: pass the model itself) to analyse it"
            ) from err
        return run(True)
