"""What a node of a traced graph is: additions, products, convolutions, activations, selections.

The operator sets are the one place that says which torch functions, methods and modules count as
each kind of operation; every pattern and walk asks these functions.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.errors import ShapePropagationError
from se_inject.graph.untraceable import norm_classes, qualified_name

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_"}
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv2d}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}

# Layers that keep shape and channels, so a unit placed "after the conv" goes after them too.
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
PASSTHROUGH_TYPES = (nn.Identity, nn.modules.dropout._DropoutNd)
PASSTHROUGH_NAMES = {"droppath", "dropblock2d", "blurpool2d"}
ACTIVATION_NAMES = {
    "relu",
    "relu6",
    "leakyrelu",
    "prelu",
    "elu",
    "selu",
    "celu",
    "gelu",
    "gelutanh",
    "quickgelu",
    "silu",
    "swish",
    "mish",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "tanh",
    "sigmoid",
    "softplus",
}
ACTIVATION_FUNCTIONS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.leaky_relu,
    F.elu,
    F.hardswish,
    F.mish,
    torch.sigmoid,
    torch.tanh,
}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
# Ops that only select or rearrange channels: a concatenation input made of them alone is a
# passthrough (ShuffleNet's split half, DenseNet's earlier features), not a branch.
SELECT_FUNCTIONS = {operator.getitem, torch.chunk, torch.split, torch.narrow}
SELECT_METHODS = {"chunk", "split", "narrow", "contiguous"}


def binary_operands(node: fx.Node, functions: set, methods: set) -> tuple[fx.Node, fx.Node] | None:
    if not (
        (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods)
    ):
        return None
    first = node.args[0] if node.args else node.kwargs.get("input")
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(first, fx.Node) and isinstance(other, fx.Node):
        return first, other
    return None


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an addition node, or None if ``node`` adds no two nodes."""
    return binary_operands(node, ADD_FUNCTIONS, ADD_METHODS)


def is_inplace_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    )


def _inplace_product(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.imul) or (
        node.op == "call_method" and node.target == "mul_"
    )


def _added_to_zero(node: fx.Node) -> fx.Node | None:
    """The tensor ``x`` of ``0 + x`` or ``x + 0`` (MobileOne adds the number 0 for a branch it does not
    have); None for any other node."""
    if not (
        (node.op == "call_function" and node.target in ADD_FUNCTIONS)
        or (node.op == "call_method" and node.target in ADD_METHODS)
    ):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    first, other = node.args
    for tensor, number in ((other, first), (first, other)):
        # only the tensor's one use: what the sum returned cannot alias a tensor read elsewhere
        if isinstance(tensor, fx.Node) and type(number) in (int, float) and number == 0 and len(tensor.users) == 1:
            return tensor
    return None


def normalize_inplace_adds(graph: fx.Graph) -> None:
    """Rewrite ``a += b`` / ``a.add_(b)`` as ``a + b`` (and ``a *= b`` / ``a.mul_(b)`` as ``a * b``),
    pointing later uses of ``a`` at the result.

    In-place adds hide the data flow (``out.add_(x)`` may have no users at all: NFNet's ``out.mul_(gain)``
    too) and a unit inserted before one would be mutated by it. A sum with the number 0 (``out = 0;
    out += conv(x)``: MobileOne's single-branch block) is the tensor itself, and is dropped. Analysis and
    rewrite both run this pass, so their graphs keep the same node sequence.
    """
    renamed: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        for old in [n for n in node.all_input_nodes if n in renamed]:
            node.replace_input_with(old, renamed[old])
        kept = _added_to_zero(node)
        if kept is not None:
            node.replace_all_uses_with(kept)
            graph.erase_node(node)
            continue
        product = _inplace_product(node) and binary_operands(node, {operator.imul}, {"mul_"}) is not None
        if not (product or (is_inplace_add(node) and add_operands(node))):
            continue
        with graph.inserting_after(node):
            if node.op == "call_function":
                new = graph.call_function(operator.mul if product else operator.add, node.args, node.kwargs)
            else:
                new = graph.call_method("mul" if product else "add", node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        first = new.args[0]
        assert isinstance(first, fx.Node)  # the in-place operand, a node as binary_operands checked
        renamed[first] = new


# --- what a node is ----------------------------------------------------------------------------


def module_of(gm: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls; None for any other node."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape shape propagation recorded for ``node``; None for a non-tensor output."""
    return node.meta.get("shape")


def tensor_shape(node: fx.Node) -> tuple[int, ...]:
    """The shape of ``node``'s tensor output, for a node the caller knows outputs a tensor."""
    shape = shape_of(node)
    if shape is None:
        raise ShapePropagationError(f"node {node.format_node()} has no tensor shape where one was expected")
    return shape


def conv_parts(module: nn.Module | None) -> list[nn.modules.conv._ConvNd]:
    """The convolutions a module computes as one: itself; the convs of a mixed conv kept whole (timm's
    MixedConv2d: channel groups, a kernel size each, concatenated); none for any other module."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return [module]
    if isinstance(module, nn.ModuleDict) and hasattr(module, "in_channels") and hasattr(module, "out_channels"):
        parts = list(module.values())
        if parts and all(isinstance(p, nn.modules.conv._ConvNd) for p in parts):
            return parts  # type: ignore[return-value]
    return []


def is_conv_like(module: nn.Module | None) -> bool:
    """A convolution, a mixed conv, or a conditionally parameterised conv (timm's CondConv2d: a
    convolution whose kernel mixes experts by a routing of the input), all kept whole."""
    if conv_parts(module):
        return True
    attributes = ("in_channels", "out_channels", "kernel_size", "groups", "weight")
    return module is not None and all(hasattr(module, a) for a in attributes) and type(module).__name__ == "CondConv2d"


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in CONV_FUNCTIONS
    return is_conv_like(module_of(gm, node))


def kernel_of(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...]:
    module = module_of(gm, node)
    parts = conv_parts(module)
    if parts:
        return max((tuple(p.kernel_size) for p in parts), key=max)
    if module is not None and is_conv_like(module):
        size: Any = module.kernel_size
        return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = shape_of(weight) if isinstance(weight, fx.Node) else None
    return tuple(shape[2:]) if shape else ()


def is_depthwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A depthwise conv (groups == in_channels): a module, each part of a mixed conv (MixNet), or a
    CondConv2d (EfficientNet-CondConv)."""
    mod = module_of(gm, node)
    parts: list = conv_parts(mod) or ([mod] if mod is not None and is_conv_like(mod) else [])
    return bool(parts) and all(
        p.groups > 1 and p.groups == p.in_channels and p.out_channels % p.in_channels == 0 for p in parts
    )


def is_spatial_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution with a kernel wider than 1x1 (the paper's "3x3")."""
    return is_conv(gm, node) and any(k > 1 for k in kernel_of(gm, node))


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    mod = module_of(gm, node)
    if mod is None:
        return False
    if type(mod).__name__.lower() in ACTIVATION_NAMES:
        return True
    if qualified_name(type(mod)) in norm_classes():  # rules/tracing: a norm computing an activation (EvoNorm)
        flag = norm_classes()[qualified_name(type(mod))]
        return flag is not None and getattr(mod, flag, False) is True
    act = getattr(mod, "act", None)  # timm's fused norm + activation layers (BatchNormAct2d, ...)
    return isinstance(mod, NORM_TYPES) and isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


# norms called as functions: timm's GroupNormAct, LayerNorm2d and friends trace to these
NORM_FUNCTIONS = {F.group_norm, F.batch_norm, F.layer_norm, F.instance_norm, torch.group_norm, torch.layer_norm}


def is_shape_keeping_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_activation(gm, node):
        return True
    if node.op == "call_function" and node.target in NORM_FUNCTIONS:
        return True
    mod = module_of(gm, node)
    if mod is None:
        return False
    return (
        isinstance(mod, NORM_TYPES + PASSTHROUGH_TYPES)
        or type(mod).__name__.lower() in PASSTHROUGH_NAMES
        or qualified_name(type(mod)) in norm_classes()
    )


def is_select(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in SELECT_FUNCTIONS) or (
        node.op == "call_method" and node.target in SELECT_METHODS
    )


def is_feature_map(node: fx.Node) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) == 4


def conv_count(gm: fx.GraphModule, nodes: frozenset[fx.Node]) -> int:
    """How many of ``nodes`` are convolutions."""
    return sum(is_conv(gm, n) for n in nodes)


def cat_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The feature maps a channel concatenation (``torch.cat`` along dim 1) joins; None for any other node."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    if dim not in (1, -3) or not is_feature_map(node):
        return None
    return list(tensors)
