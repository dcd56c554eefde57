"""Finding residual blocks in a traced graph, by graph structure alone.

A residual addition is an add (``x + y``, ``torch.add``, ``out += y``, ``.add_``) of two 4-D
tensors of the output's shape that share a fork: the latest node both operands descend from.
The path from the fork with more convolutions (then more nodes) is the branch F_tr; the other
is the shortcut (empty for an identity shortcut, a 1x1 conv + norm for a projection). Module
names play no part, so a user's hand-written block is found like timm's.

Stages are runs of consecutive sites whose output has the same spatial size, numbered from 1.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.tracing import infer_in_channels, propagate, trace

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv2d}

# Layers that keep shape and channels, so a unit placed "after the conv" goes after them too.
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_PASSTHROUGH_TYPES = (nn.Identity, nn.modules.dropout._DropoutNd)
_PASSTHROUGH_NAMES = {"droppath", "dropblock2d", "blurpool2d"}
_ACTIVATION_NAMES = {
    "relu", "relu6", "leakyrelu", "prelu", "elu", "selu", "celu", "gelu", "gelutanh", "quickgelu",
    "silu", "swish", "mish", "hardswish", "hardsigmoid", "hardtanh", "tanh", "sigmoid", "softplus",
}
_ACTIVATION_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu,
    F.hardswish, F.mish, torch.sigmoid, torch.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of an addition node, or None if ``node`` adds no two nodes."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    first = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(first, fx.Node) and isinstance(other, fx.Node):
        return first, other
    return None


def _is_inplace_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    )


def normalize_inplace_adds(graph: fx.Graph) -> None:
    """Rewrite ``a += b`` / ``a.add_(b)`` as ``a + b``, pointing later uses of ``a`` at the sum.

    In-place adds hide the data flow (``out.add_(x)`` may have no users at all) and a unit
    inserted before one would be mutated by it. Analysis and rewrite both run this pass, so
    their graphs keep the same node sequence.
    """
    renamed: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        for old in [n for n in node.all_input_nodes if n in renamed]:
            node.replace_input_with(old, renamed[old])
        if not (_is_inplace_add(node) and add_operands(node)):
            continue
        with graph.inserting_after(node):
            if node.op == "call_function":
                new = graph.call_function(operator.add, node.args, node.kwargs)
            else:
                new = graph.call_method("add", node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        renamed[add_operands(new)[0]] = new


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _CONV_FUNCTIONS
    return isinstance(_module(gm, node), nn.modules.conv._ConvNd)


def is_spatial_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution with a kernel wider than 1x1 (the paper's "3x3")."""
    if not is_conv(gm, node):
        return False
    if node.op == "call_module":
        return any(k > 1 for k in _module(gm, node).kernel_size)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = weight.meta.get("shape") if isinstance(weight, fx.Node) else None
    return bool(shape) and any(k > 1 for k in shape[2:])


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    mod = _module(gm, node)
    return mod is not None and type(mod).__name__.lower() in _ACTIVATION_NAMES


def _is_shape_keeping_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_activation(gm, node):
        return True
    mod = _module(gm, node)
    return isinstance(mod, _NORM_TYPES + _PASSTHROUGH_TYPES) or (
        mod is not None and type(mod).__name__.lower() in _PASSTHROUGH_NAMES
    )


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


@dataclass(frozen=True)
class Insertion:
    """Where one unit goes: it recalibrates ``value`` as seen by ``consumers`` (None: by all)."""

    value: fx.Node
    consumers: tuple[fx.Node, ...] | None
    anchors: tuple[fx.Node, ...]  # nodes the rewritten module must contain

    @property
    def channels(self) -> int:
        return shape_of(self.value)[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(shape_of(self.value)[2:4])


@dataclass(eq=False)
class ResidualSite:
    """One residual block found in the graph: ``post(add(branch(fork), shortcut(fork)))``."""

    add: fx.Node
    fork: fx.Node
    branch_out: fx.Node
    shortcut_out: fx.Node
    branch: frozenset[fx.Node]
    shortcut: frozenset[fx.Node]
    post: fx.Node  # the activation right after the addition, or the addition itself
    inner: fx.Node | None  # the first spatial conv of the branch, with its norm/activation
    stage: int = 0
    block: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return tuple(shape_of(self.add)[2:4])

    @property
    def region(self) -> frozenset[fx.Node]:
        """The nodes of the block: both paths, the addition and the activation after it."""
        return self.branch | self.shortcut | {self.add, self.post}

    def insertion(self, position: str) -> Insertion | None:
        """Where a unit at ``position`` goes in this block (None: the position does not apply)."""
        if position == "standard":
            return Insertion(self.branch_out, (self.add,), (self.add,))
        if position == "identity":
            return Insertion(self.shortcut_out, (self.add,), (self.add,))
        if position == "pre":
            users = tuple(u for u in self.fork.users if u in self.branch)
            return Insertion(self.fork, users, users + (self.add,))
        if position == "post":
            return Insertion(self.post, None, (self.post, self.add))
        if position == "inner":
            return None if self.inner is None else Insertion(self.inner, None, (self.inner, self.add))
        raise ValueError(position)


@dataclass
class SiteSearch:
    """Every residual site in graph order, plus what was looked at and rejected (and why)."""

    sites: list[ResidualSite]
    rejected: list[tuple[fx.Node, str]] = field(default_factory=list)
    census: Counter = field(default_factory=Counter)

    @property
    def stage_count(self) -> int:
        return max((s.stage for s in self.sites), default=0)

    def describe(self) -> str:
        """A one-line account of what the graph holds, for "no site" errors."""
        parts = [f"{self.census[k]} {k}" for k in ("convolutions", "additions", "concatenations")]
        text = "found " + ", ".join(parts)
        if self.rejected:
            reasons = Counter(reason for _, reason in self.rejected)
            text += " (additions rejected: " + "; ".join(f"{n}x {r}" for r, n in reasons.items()) + ")"
        return text


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _descendants(node: fx.Node, order: dict[fx.Node, int], limit: int) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for child in todo.pop().users:
            if child not in seen and order[child] <= limit:
                seen.add(child)
                todo.append(child)
    return seen


def _path(start: fx.Node, fork: fx.Node, inside: set[fx.Node]) -> frozenset[fx.Node]:
    return frozenset((_ancestors(start) & inside) - {fork})


def _follow_shape_keeping(gm: fx.GraphModule, node: fx.Node, within: frozenset[fx.Node]) -> fx.Node:
    """Walk from ``node`` through its sole-user norm/activation/identity layers inside ``within``."""
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if nxt not in within or not _is_shape_keeping_layer(gm, nxt) or shape_of(nxt) != shape_of(node):
            break
        node = nxt
    return node


def _classify(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> ResidualSite | str:
    a, b = add_operands(node)
    shape = shape_of(node)
    if not shape or len(shape) != 4 or shape_of(a) != shape or shape_of(b) != shape:
        return "operands are not two 4-D feature maps of the output's shape"
    common = _ancestors(a) & _ancestors(b)
    if not common:
        return "operands share no input"
    fork = max(common, key=order.__getitem__)
    inside = _descendants(fork, order, order[node])
    path_a, path_b = _path(a, fork, inside), _path(b, fork, inside)
    weight_a = (sum(is_conv(gm, n) for n in path_a), len(path_a))
    weight_b = (sum(is_conv(gm, n) for n in path_b), len(path_b))
    if weight_a == weight_b:
        return "both paths from the fork weigh the same (parallel branches, not a residual)"
    (branch_out, branch), (shortcut_out, shortcut) = sorted(
        [(a, path_a), (b, path_b)], key=lambda side: (sum(is_conv(gm, n) for n in side[1]), len(side[1])),
        reverse=True,
    )
    if not any(is_conv(gm, n) for n in branch):
        return "no convolution on the branch"
    post = node
    if len(node.users) == 1:
        user = next(iter(node.users))
        if is_activation(gm, user) and user.all_input_nodes[:1] == [node] and shape_of(user) == shape:
            post = user
    spatial = sorted((n for n in branch if is_spatial_conv(gm, n)), key=order.__getitem__)
    inner = _follow_shape_keeping(gm, spatial[0], branch) if spatial else None
    return ResidualSite(node, fork, branch_out, shortcut_out, branch, shortcut, post, inner)


def find_residual_sites(gm: fx.GraphModule) -> SiteSearch:
    """Every residual block of a traced, shape-annotated graph (see :func:`analyse`)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    search = SiteSearch(sites=[])
    for node in gm.graph.nodes:
        if is_conv(gm, node):
            search.census["convolutions"] += 1
        elif node.op == "call_function" and node.target is torch.cat:
            search.census["concatenations"] += 1
        if add_operands(node) is None:
            continue
        search.census["additions"] += 1
        found = _classify(gm, node, order)
        if isinstance(found, str):
            search.rejected.append((node, found))
        else:
            search.sites.append(found)
    _number_stages(search.sites)
    return search


def _number_stages(sites: Iterable[ResidualSite]) -> None:
    stage, block, previous = 0, 0, None
    for site in sites:
        if site.size != previous:
            stage, block, previous = stage + 1, 0, site.size
        block += 1
        site.stage, site.block = stage, block


@dataclass
class Analysis:
    """A model traced, annotated with shapes and FLOPs, and searched for sites."""

    gm: fx.GraphModule
    search: SiteSearch
    input_shape: tuple[int, ...]
    flops: int


def input_shape_for(gm: fx.GraphModule, input_size: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(input_size, int):
        height = width = input_size
    else:
        height, width = input_size
    return (1, infer_in_channels(gm), height, width)


def analyse(model: nn.Module, input_size: int | Sequence[int] = 224, leaf_modules: Sequence[str] = ()) -> Analysis:
    """Trace ``model``, annotate shapes and FLOPs at ``input_size``, and find its residual sites.

    Nothing of ``model`` is changed: the graph only references its modules.
    """
    gm = trace(model, leaf_modules)
    normalize_inplace_adds(gm.graph)
    gm.recompile()
    shape = input_shape_for(gm, input_size)
    flops = propagate(gm, shape)
    return Analysis(gm, find_residual_sites(gm), shape, flops)


def node_in_scope(node: fx.Node, owner: str) -> bool:
    """Whether ``node`` was created while tracing module ``owner`` ("" is the root)."""
    return owner == "" or owner in (node.meta.get("nn_module_stack") or {})

