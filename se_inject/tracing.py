"""Tracing with torch.fx, and shapes and FLOPs of every node without real compute.

The tracer honours timm's own lists of modules and functions that must not be traced
(``timm.layers.get_notrace_modules/functions``), the SE unit itself, and the user's
``leaf_modules``. When tracing fails, the error names the innermost module being traced, which
is the one to mark as a leaf.

Shapes and FLOPs come from one run of the graph on meta tensors (when the model lives on the
meta device) or fake tensors (FakeTensorMode: real parameters, no real arithmetic), counted by
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from se_inject.errors import ShapePropagationError, UntraceableModelError
from se_inject.unit import SqueezeExcite

try:  # timm is a dependency, but a user's own model must not need it to be traced
    from timm.layers import get_notrace_functions, get_notrace_modules
except ImportError:  # pragma: no cover
    def get_notrace_functions() -> list:  # type: ignore[misc]
        return []

    def get_notrace_modules() -> list:  # type: ignore[misc]
        return []


# Modules se_inject never traces into, each with the reason (the habit of timm/layers/_fx.py).
_LEAF_MODULES: dict[type[nn.Module], str] = {
    SqueezeExcite: "the unit se_inject inserts: a node of its own, so later passes can find it",
}


def register_leaf_module(cls: type[nn.Module], reason: str) -> type[nn.Module]:
    """Never trace into ``cls`` (``reason`` says why); refuses a class registered twice."""
    if cls in _LEAF_MODULES:
        raise ValueError(f"{cls.__name__} is already a leaf module: {_LEAF_MODULES[cls]}")
    _LEAF_MODULES[cls] = reason
    return cls


def is_leaf_module_class(cls: type) -> bool:
    return cls in _LEAF_MODULES


class SETracer(fx.Tracer):
    """fx.Tracer with timm's leaves, se_inject's leaves and the user's ``leaf_modules``.

    ``leaf_modules`` entries are class names (``"MyAttention"``) or qualified module names
    (``"layer3.1"``).
    """

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._timm_leaves = tuple(get_notrace_modules())
        self._user_leaves = frozenset(leaf_modules)
        self._path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        cls = type(m)
        if cls in _LEAF_MODULES or isinstance(m, self._timm_leaves):
            return True
        if isinstance(m, nn.modules.conv._ConvNd):  # conv subclasses (StdConv2d, ...) stay convolutions
            return True
        if cls.__name__ in self._user_leaves or cls.__qualname__ in self._user_leaves:
            return True
        if module_qualified_name in self._user_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self._path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except UntraceableModelError:
            raise
        except Exception as err:
            raise _untraceable(self._path[-1], m, err) from err
        finally:
            self._path.pop()


def _untraceable(path: str, module: nn.Module, err: Exception) -> UntraceableModelError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cls = type(module).__name__
    if not path:
        return UntraceableModelError(
            f"torch.fx cannot trace the forward of {cls} itself ({reason}); move the untraceable "
            "code into a submodule and pass its class name in leaf_modules (CLI: --leaf NAME)"
        )
    return UntraceableModelError(
        f"torch.fx cannot trace module '{path}' ({cls}): {reason}; mark it as a leaf with "
        f"leaf_modules=['{cls}'] (CLI: --leaf {cls}); SE sites inside it are then skipped"
    )


def trace(module: nn.Module, leaf_modules: Sequence[str] = (), fix_defaults: bool = True) -> fx.GraphModule:
    """Trace ``module`` into a GraphModule whose nodes carry ``meta['nn_module_stack']``.

    If the plain trace fails, ``fix_defaults`` is set and ``forward`` has defaulted parameters,
    they are fixed to their defaults and the trace is tried again (a model called as ``model(x)``).
    """
    return fx.GraphModule(module, trace_graph(module, leaf_modules, fix_defaults), type(module).__name__)


def trace_graph(module: nn.Module, leaf_modules: Sequence[str] = (), fix_defaults: bool = True) -> fx.Graph:
    """The graph :func:`trace` builds, without compiling a GraphModule around it.

    Its ``call_module`` targets name submodules of ``module``, its owning module.
    """
    try:
        graph = _trace(module, leaf_modules)
    except UntraceableModelError as first:
        concrete = _default_args(module) if fix_defaults else None
        if not concrete:
            raise
        try:
            graph = _trace(module, leaf_modules, concrete)
        except UntraceableModelError:
            raise first from None
    graph.owning_module = module  # lint() and call_module() check targets against it
    return graph


def _trace(module: nn.Module, leaf_modules: Sequence[str], concrete_args: dict | None = None) -> fx.Graph:
    tracer = SETracer(leaf_modules)
    try:
        return tracer.trace(module, concrete_args=concrete_args)
    except UntraceableModelError:
        raise
    except Exception as err:  # raised by the root forward itself, outside any submodule
        raise _untraceable("", module, err) from err


def _default_args(module: nn.Module) -> dict[str, Any]:
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def module_scope(node: fx.Node) -> tuple[str, ...]:
    """Qualified names of the modules whose forward created ``node``, outermost first.

    A ``call_module`` node's own (leaf) module is not part of its scope.
    """
    stack = node.meta.get("nn_module_stack") or {}
    paths = tuple(stack.keys())
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths


# --- FLOPs ---------------------------------------------------------------------------------
# FlopCounterMode counts 2 per multiply-add for conv/matmul and nothing for pooling and
# elementwise products; the SE unit is mostly those, so they are registered here: one FLOP per
# element read by a reduction, one per element written by a product.

def _reduction_flops(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return math.prod(x_shape)


def _elementwise_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return math.prod(out_shape) if out_shape is not None else 0


def _no_flops(*args: Any, **kwargs: Any) -> int:
    return 0


aten = torch.ops.aten
FLOP_FORMULAS: dict[Any, Any] = {
    aten.mean: _reduction_flops,
    aten.amax: _reduction_flops,
    aten._adaptive_avg_pool2d: _reduction_flops,
    aten.adaptive_max_pool2d: _reduction_flops,
    aten.mul: _elementwise_flops,
    aten.mul_: _elementwise_flops,  # the unit's scale written over its input (inference)
    aten.addcmul: _elementwise_flops,  # the unit's scale fused with a residual add: the add is not counted, as elsewhere
    # FlopCounterMode decomposes every op without a formula, looking for matmuls inside; its check
    # compares the op's overload, so only an overload key stops it. Batch norm holds no matmul and
    # counts 0 either way, but decomposing it on meta tensors was 40% of a ResNet-152 report.
    aten.native_batch_norm.default: _no_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with se_inject's extra formulas (see FLOP_FORMULAS)."""
    return FlopCounterMode(display=False, depth=None, custom_mapping=FLOP_FORMULAS)


# --- running without real compute -------------------------------------------------------------

def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for tensor in module.parameters():
        return tensor
    for tensor in module.buffers():
        return tensor
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
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)


def shadow(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to trace and run during analysis, so that nothing of the user's model changes.

    Tracing runs a model's Python ``forward`` with fx proxies: a forward that counts its calls or
    caches a tensor, a forward hook that stores its output, a ``train()`` override that changes
    ``requires_grad``, would otherwise do it to the user's model. The shadow has its own module
    objects without hooks; its parameters are new Parameter objects over the user's storage (no
    weight memory is copied) and its buffers are copies (a forward may write a buffer).
    """
    from se_inject.errors import InvalidModelError

    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    try:
        copy = deepcopy(model, memo)
    except Exception as err:
        raise InvalidModelError(
            f"model: {type(model).__name__} cannot be copied ({type(err).__name__}: {' '.join(str(err).split())[:160]}); "
            "se_inject works on copies so that your model is never changed: keep such state (locks, open files, "
            "generators) outside the module or give it a __deepcopy__"
        ) from None
    for m in copy.modules():
        for attribute in _HOOK_DICTS:
            hooks = getattr(m, attribute, None)
            if isinstance(hooks, dict):
                hooks.clear()
    return copy


class ShapeOnlyBatchNorm(TorchDispatchMode):
    """Answers eval-mode batch norm on meta/fake tensors with its output shapes, without its kernel.

    The meta kernel of batch norm is a Python decomposition of a dozen elementwise ops: about 1 ms a
    call, three quarters of a ResNet-152 meta forward. The output is the input's shape, dtype and
    memory format, and batch norm counts no FLOPs, so nothing measured changes. A channel count
    that does not fit is left to the real kernel, which raises as before.
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
        return func(*args, **kwargs)


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


def _with_real_fallback(module: nn.Module, run: Any) -> int:
    """``run(real=False)``; if the forward branches on tensor values, ``run(real=True)`` on real weights."""
    try:
        return run(real=False)
    except Exception as err:
        cause = err.__cause__ if isinstance(err, ShapePropagationError) else err
        value_dependent = isinstance(cause, _DATA_DEPENDENT) or "cannot be called on meta tensors" in str(cause)
        if not value_dependent:
            raise
        if on_meta(module):
            raise ShapePropagationError(
                f"{str(err).split(';')[0] if isinstance(err, ShapePropagationError) else type(err).__name__}: the "
                "forward depends on tensor values, which the meta device does not have; build the model with "
                "real weights (API: pass the model itself) to analyse it"
            ) from err
        return run(real=True)


class ShapeFlopProp(fx.Interpreter):
    """Run a GraphModule node by node, recording ``meta['shape']`` and ``meta['flops']``.

    Like torch.fx.passes.shape_prop.ShapeProp, a failure is re-raised with the node printed.
    """

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, input_shape: Sequence[int]) -> None:
        super().__init__(gm)
        self.counter = counter
        self.input_shape = input_shape

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        try:
            result = super().run_node(n)
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ShapePropagationError(
                f"running node {n.format_node()} at input {tuple(self.input_shape)} failed: {reason}; "
                "is the input size right for this model (CLI: --input-size)?"
            ) from err
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        n.meta["flops"] = self.counter.get_total_flops() - before
        return result


def propagate(gm: fx.GraphModule, input_shape: Sequence[int]) -> int:
    """Annotate every node of ``gm`` with its output shape and FLOPs; return the total FLOPs."""

    def run(real: bool) -> int:
        with abstract_tensors(gm, real) as make, flop_counter() as counter:
            try:
                ShapeFlopProp(gm, counter, input_shape).run(make(tuple(input_shape)))
            except ShapePropagationError as err:  # drop the "While executing ..." fx appends on the way out
                raise ShapePropagationError(str(err).split("\n")[0]) from err.__cause__
        return counter.get_total_flops()

    return _with_real_fallback(gm, run)


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward of ``module`` on an input of ``input_shape`` (no real arithmetic if it can)."""
    return count_flops_by_module(module, input_shape)[0]


def count_flops_by_module(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward of ``module``, in total and per submodule (qualified name, "" is the root).

    A submodule's count includes its children's; one called twice counts twice.
    """

    def run(real: bool) -> tuple[int, dict[str, int]]:
        with abstract_tensors(module, real) as make, flop_counter() as counter:
            module(make(tuple(input_shape)))
        per_module = {
            key.partition(".")[2]: sum(counts.values())  # keys are "RootClass.qualified.name"
            for key, counts in counter.get_flop_counts().items()
            if key != "Global"
        }
        return counter.get_total_flops(), per_module

    return _with_real_fallback(module, run)


def input_channels(model: nn.Module, gm: fx.GraphModule | None = None) -> int:
    """The channels ``model`` takes as input: the one owner of this decision.

    timm records them (``pretrained_cfg["input_size"]``): that is the truth for stems that
    rearrange their input before the first convolution (TResNet's space-to-depth turns 3
    channels into 48). Otherwise the in_channels of the first convolution the forward calls
    (graph order, not registration order), traced if no graph is given; else 3.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3 and isinstance(size[0], int):
        return size[0]
    if gm is None:
        try:
            gm = fx.GraphModule(model, trace_graph(shadow(model)))
        except Exception:  # an untraceable model: the first convolution it registers
            first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
            return first.in_channels if first is not None else 3
    return _first_conv_channels(gm)


def _first_conv_channels(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.conv._ConvNd):
                return mod.in_channels
        if node.op == "call_function" and node.target in (torch.conv2d, nn.functional.conv2d):
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return _fetch_attr(gm, weight.target).shape[1]
    return 3


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
