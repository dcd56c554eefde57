"""Tracing with torch.fx.

The tracer honours timm's own lists of modules and functions that must not be traced
(``timm.layers.get_notrace_modules/functions``), those of ``rules/tracing/`` (Hugging Face
transformers' models), the SE unit itself, and the user's ``leaf_modules``. When tracing fails,
the error names the innermost module being traced, which is the one to mark as a leaf.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from se_inject.errors import UntraceableModelError, first_line
from se_inject.graph.untraceable import loaded_functions, qualified_name, traced_classes, untraceable_classes
from se_inject.units.base import ChannelUnit

try:  # timm is a dependency, but a user's own model must not need it to be traced
    from timm.layers import get_notrace_functions, get_notrace_modules
except ImportError:  # pragma: no cover

    def get_notrace_functions() -> list:  # type: ignore[misc]
        return []

    def get_notrace_modules() -> list:  # type: ignore[misc]
        return []


_VARIADIC = inspect.CO_VARARGS | inspect.CO_VARKEYWORDS

# Modules se_inject never traces into, each with the reason (the habit of timm/layers/_fx.py).
_LEAF_MODULES: dict[type[nn.Module], str] = {
    ChannelUnit: "a unit se_inject inserted: a node of its own, so later passes can find it",
}
try:  # torchvision comes with timm; a user's own model must not need it
    from torchvision.ops.misc import FrozenBatchNorm2d

    # the norm of torchvision's pretrained detection backbones: one node, as BatchNorm2d is, which the
    # placement's anchors and optimize_for_inference's fold recognise
    _LEAF_MODULES[FrozenBatchNorm2d] = "torchvision's FrozenBatchNorm2d: a norm layer, one node as BatchNorm2d"
except ImportError:  # pragma: no cover
    pass


def register_leaf_module(cls: type[nn.Module], reason: str) -> type[nn.Module]:
    """Never trace into ``cls`` (``reason`` says why); refuses a class registered twice."""
    covering = _leaf_entry(cls)
    if covering is not None:
        raise ValueError(f"{cls.__name__} is already a leaf module: {_LEAF_MODULES[covering]}")
    _LEAF_MODULES[cls] = reason
    return cls


def _leaf_entry(cls: type) -> type | None:
    """The registered leaf class that ``cls`` is or derives from (a unit type derives from ChannelUnit)."""
    return next((leaf for leaf in _LEAF_MODULES if issubclass(cls, leaf)), None)


def is_leaf_module_class(cls: type) -> bool:
    return _leaf_entry(cls) is not None


class SETracer(fx.Tracer):
    """fx.Tracer with timm's leaves, se_inject's leaves and the user's ``leaf_modules``.

    ``leaf_modules`` entries are class names (``"MyAttention"``) or qualified module names
    (``"layer3.1"``).
    """

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__(autowrap_functions=(*get_notrace_functions(), *loaded_functions()))
        self._timm_leaves = tuple(get_notrace_modules())
        self._user_leaves = frozenset(leaf_modules)
        self._path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        cls = type(m)
        if is_leaf_module_class(cls):
            return True
        if isinstance(m, self._timm_leaves) and qualified_name(cls) not in traced_classes():
            return True
        if qualified_name(cls) in untraceable_classes():  # rules/tracing: a library's model code
            return True
        if isinstance(m, nn.modules.conv._ConvNd):  # conv subclasses (StdConv2d, ...) stay convolutions
            return True
        if cls.__name__ in self._user_leaves or cls.__qualname__ in self._user_leaves:
            return True
        if module_qualified_name in self._user_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        """The root's placeholders, with the root forward's ``*args`` and ``**kwargs`` traced as empty.

        se_inject calls a model as ``model(x)``, so they are empty; as proxies they fail where the forward
        passes them on (``self.encoder(x, **kwargs)``, as every Hugging Face transformers model does). The
        forward is called through its decorators (transformers' ``@can_return_tuple``), whose own
        ``(*args, **kwargs)`` fx would otherwise fill with the inner signature's arguments in order.
        """
        inner = inspect.unwrap(root_fn)
        code = inner.__code__
        if not is_module or not code.co_flags & _VARIADIC:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        _, args = super().create_args_for_root(inner, is_module, concrete_args)
        named = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if len(args) != len(named) + bool(code.co_flags & inspect.CO_VARARGS) + bool(
            code.co_flags & inspect.CO_VARKEYWORDS
        ):
            return super().create_args_for_root(root_fn, is_module, concrete_args)  # pytree-flattened concrete_args
        for variadic in args[len(named) :]:
            if isinstance(variadic, fx.Proxy):
                self.graph.erase_node(variadic.node)
        positional = code.co_argcount

        def call(*values: Any) -> Any:
            keywords = dict(zip(named[positional:], values[positional:], strict=True))
            return root_fn(*values[:positional], **keywords)

        return call, args[: len(named)]

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
    reason = first_line(err)
    cls = type(module).__name__
    if not path:
        return UntraceableModelError(
            f"torch.fx cannot trace the forward of {cls} itself ({reason}); move the untraceable "
            "code into a submodule and pass its class name in leaf_modules (CLI: --leaf NAME)",
            path,
        )
    return UntraceableModelError(
        f"torch.fx cannot trace module '{path}' ({cls}): {reason}; mark it as a leaf with "
        f"leaf_modules=['{cls}'] (CLI: --leaf {cls}); SE sites inside it are then skipped",
        path,
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
    # lint() and call_module() check targets against it; any module serves, fx types it as a GraphModule
    graph.owning_module = module  # type: ignore[assignment]
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
