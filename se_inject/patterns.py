"""Pattern kinds: the graph structures an SE unit can be attached to, found by structure alone.

Each kind is a function registered with :func:`register_pattern`, which refuses a name twice. It
returns :class:`Candidate` s: where the structure is, the named *anchors* a rule can put a unit on,
and measured *facts* a rule's conditions test. Which kinds are used, under which conditions and
with which anchor per position is decided by the rules in ``rules/*.toml``, not here.

- ``residual_add``: an addition of two feature maps that share a fork. The path from the fork with
  more convolutions (then more nodes) is the branch F_tr; the other is the shortcut.
- ``branch_concat``: a channel concatenation of paths that fork from one input (Inception modules;
  ShuffleNet's split / concatenate; DenseNet's concatenation of new features).
- ``depthwise``: a depthwise convolution (groups == in_channels) with the norm and activation after it.
- ``conv_act``: a convolution followed (through its norm) by a non-linearity (plain VGG stacks).

Existing channel gates (``x * f(pool(x))``: SE, ECA, ...) are found by :func:`find_channel_gates`.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.tracing import module_scope
from se_inject.unit import SqueezeExcite

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv2d}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}

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
# Ops that only select or rearrange channels: a concatenation input made of them alone is a
# passthrough (ShuffleNet's split half, DenseNet's earlier features), not a branch.
_SELECT_FUNCTIONS = {operator.getitem, torch.chunk, torch.split, torch.narrow}
_SELECT_METHODS = {"chunk", "split", "narrow", "contiguous"}


def _binary_operands(node: fx.Node, functions: set, methods: set) -> tuple[fx.Node, fx.Node] | None:
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
    return _binary_operands(node, _ADD_FUNCTIONS, _ADD_METHODS)


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


# --- what a node is ----------------------------------------------------------------------------

def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


def is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _CONV_FUNCTIONS
    return isinstance(_module(gm, node), nn.modules.conv._ConvNd)


def _kernel(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...]:
    if node.op == "call_module":
        return tuple(_module(gm, node).kernel_size)
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    shape = shape_of(weight) if isinstance(weight, fx.Node) else None
    return tuple(shape[2:]) if shape else ()


def is_spatial_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A convolution with a kernel wider than 1x1 (the paper's "3x3")."""
    return is_conv(gm, node) and any(k > 1 for k in _kernel(gm, node))


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    mod = _module(gm, node)
    if mod is None:
        return False
    if type(mod).__name__.lower() in _ACTIVATION_NAMES:
        return True
    act = getattr(mod, "act", None)  # timm's fused norm + activation layers (BatchNormAct2d, ...)
    return isinstance(mod, _NORM_TYPES) and isinstance(act, nn.Module) and not isinstance(act, nn.Identity)


def _is_shape_keeping_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if is_activation(gm, node):
        return True
    mod = _module(gm, node)
    return isinstance(mod, _NORM_TYPES + _PASSTHROUGH_TYPES) or (
        mod is not None and type(mod).__name__.lower() in _PASSTHROUGH_NAMES
    )


# Whether a node's output is new memory or may be its input's (see owns_its_memory).
_FRESH_MODULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + _NORM_TYPES
_FRESH_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, *_CAT_FUNCTIONS, *_CONV_FUNCTIONS}
_FRESH_METHODS = {"add", "mul"}
_ALIAS_FUNCTIONS = {torch.relu_, F.relu_}
_ALIAS_METHODS = {"relu_", "add_", "mul_", "sigmoid_", "tanh_", "clamp_", "contiguous"}


def _memory_of(gm: nn.Module, node: fx.Node) -> str:
    """``fresh`` (the output is newly allocated), ``alias`` (it may be the first input's memory), or ``unknown``."""
    if node.op == "call_module":
        mod = _module(gm, node)
        if isinstance(mod, _FRESH_MODULE_TYPES):
            return "fresh"
        if getattr(mod, "inplace", False) is True or isinstance(mod, _PASSTHROUGH_TYPES) or (
            type(mod).__name__.lower() in _PASSTHROUGH_NAMES
        ):
            return "alias"  # in-place activations; Identity, dropout, drop-path return their input in eval
        return "fresh" if type(mod).__name__.lower() in _ACTIVATION_NAMES else "unknown"
    if node.op == "call_function":
        inplace = node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])
        if node.target in _ALIAS_FUNCTIONS or (node.target in _ACTIVATION_FUNCTIONS and inplace):
            return "alias"
        return "fresh" if node.target in _FRESH_FUNCTIONS | _ACTIVATION_FUNCTIONS else "unknown"
    if node.op == "call_method":
        if node.target in _ALIAS_METHODS:
            return "alias"
        return "fresh" if node.target in _FRESH_METHODS | _ACTIVATION_METHODS else "unknown"
    return "unknown"  # placeholders and attributes belong to the caller or the module


def owns_its_memory(gm: nn.Module, node: fx.Node) -> bool:
    """Whether the tensor ``node`` computes is memory that nothing but ``node``'s one user reads.

    Follows aliasing ops (in-place activations, Identity, dropout) back to the op that allocated
    the tensor; every tensor on the way must have that one user. Unknown ops count as aliasing:
    a wrong "no" costs an allocation, a wrong "yes" would corrupt another tensor.
    """
    while len(node.users) == 1:
        memory = _memory_of(gm, node)
        if memory != "alias":
            return memory == "fresh"
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return False
        node = source
    return False


def _is_select(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SELECT_FUNCTIONS) or (
        node.op == "call_method" and node.target in _SELECT_METHODS
    )


def _is_feature_map(node: fx.Node) -> bool:
    shape = shape_of(node)
    return bool(shape) and len(shape) == 4


# --- graph walks --------------------------------------------------------------------------------

def _ancestors(node: fx.Node, order: dict[fx.Node, int] | None = None, floor: int = 0) -> set[fx.Node]:
    """``node`` and every node it is computed from; with ``order``, only those at position ``floor`` or later."""
    seen, todo = {node}, [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen and (order is None or order[parent] >= floor):
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


def _path(start: fx.Node, fork: fx.Node, inside: set[fx.Node], order: dict[fx.Node, int]) -> frozenset[fx.Node]:
    """The nodes between ``fork`` and ``start`` (``inside``: the fork's descendants up to the join)."""
    return frozenset((_ancestors(start, order, order[fork]) & inside) - {fork})


def _fork(nodes: list[fx.Node], order: dict[fx.Node, int]) -> fx.Node | None:
    """The latest node every one of ``nodes`` descends from (or is).

    Walks back in graph order from ``nodes``, marking which of them reach each node: a node is
    final when it is popped, as its users come later in the graph, and the first one reached
    from all of them is the fork. Nothing before the fork is visited.
    """
    everyone = (1 << len(nodes)) - 1
    reached: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        reached[node] = reached.get(node, 0) | (1 << i)
    heap = [(-order[node], node.name, node) for node in reached]
    heapq.heapify(heap)
    while heap:
        _, _, node = heapq.heappop(heap)
        if reached[node] == everyone:
            return node
        for parent in node.all_input_nodes:
            if parent not in reached:
                heapq.heappush(heap, (-order[parent], parent.name, parent))
            reached[parent] = reached.get(parent, 0) | reached[node]
    return None


def follow_shape_keeping(gm: fx.GraphModule, node: fx.Node, within: frozenset[fx.Node] | None = None) -> fx.Node:
    """Walk from ``node`` through its sole-user norm/activation/identity layers (inside ``within``)."""
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if within is not None and nxt not in within:
            break
        if not _is_shape_keeping_layer(gm, nxt) or shape_of(nxt) != shape_of(node):
            break
        node = nxt
    return node


def _activation_between(gm: fx.GraphModule, start: fx.Node, end: fx.Node) -> bool:
    node = start
    while node is not end:
        node = next(iter(node.users))
        if is_activation(gm, node):
            return True
    return False


# --- candidates and the registry ------------------------------------------------------------------

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
class Candidate:
    """A structure a pattern kind found: its nodes, where units can go, and what was measured."""

    kind: str
    output: fx.Node  # the structure's output: its spatial size decides the stage
    region: frozenset[fx.Node]
    anchors: dict[str, Insertion | None]
    facts: dict[str, int | bool]
    parts: dict[str, fx.Node] = field(default_factory=dict)  # named nodes, for tests and messages

    @property
    def size(self) -> tuple[int, int]:
        return tuple(shape_of(self.output)[2:4])


Finder = Callable[[fx.GraphModule, dict[fx.Node, int]], list[Candidate]]


@dataclass(frozen=True)
class PatternKind:
    name: str
    find: Finder
    anchors: tuple[str, ...]
    facts: dict[str, type]  # fact name -> int or bool: what rule conditions may test
    doc: str


PATTERNS: dict[str, PatternKind] = {}


def register_pattern(name: str, anchors: tuple[str, ...], facts: dict[str, type]) -> Callable[[Finder], Finder]:
    """Register a pattern kind under ``name``; a name registered twice is refused."""

    def register(find: Finder) -> Finder:
        if name in PATTERNS:
            raise ValueError(f"pattern kind '{name}' is already registered")
        PATTERNS[name] = PatternKind(name, find, anchors, facts, (find.__doc__ or "").strip().splitlines()[0])
        return find

    return register


def _conv_count(gm: fx.GraphModule, nodes: frozenset[fx.Node]) -> int:
    return sum(is_conv(gm, n) for n in nodes)


@register_pattern(
    "residual_add",
    anchors=("branch_output", "branch_input", "after_activation", "shortcut_output", "after_spatial_conv"),
    facts={"branch_convs": int, "shortcut_convs": int, "branch_nodes": int},
)
def find_residual_adds(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Residual additions: post(add(branch(fork), shortcut(fork)))."""
    found = []
    for node in gm.graph.nodes:
        operands = add_operands(node)
        if operands is None:
            continue
        a, b = operands
        shape = shape_of(node)
        if not _is_feature_map(node) or shape_of(a) != shape or shape_of(b) != shape:
            continue
        fork = _fork([a, b], order)
        if fork is None:
            continue
        inside = _descendants(fork, order, order[node])
        sides = sorted(
            [(a, _path(a, fork, inside, order)), (b, _path(b, fork, inside, order))],
            key=lambda side: (_conv_count(gm, side[1]), len(side[1])),
            reverse=True,
        )
        (branch_out, branch), (shortcut_out, shortcut) = sides
        if (_conv_count(gm, branch), len(branch)) == (_conv_count(gm, shortcut), len(shortcut)):
            continue  # two equal paths are parallel branches, not a residual
        post = node
        if len(node.users) == 1:
            user = next(iter(node.users))
            if is_activation(gm, user) and user.all_input_nodes[:1] == [node] and shape_of(user) == shape:
                post = user
        spatial = sorted((n for n in branch if is_spatial_conv(gm, n)), key=order.__getitem__)
        inner = follow_shape_keeping(gm, spatial[0], branch) if spatial else None
        branch_users = tuple(u for u in fork.users if u in branch)
        found.append(
            Candidate(
                kind="residual_add",
                output=node,
                region=branch | shortcut | {node, post},
                anchors={
                    "branch_output": Insertion(branch_out, (node,), (node,)),
                    "branch_input": Insertion(fork, branch_users, branch_users + (node,)) if branch_users else None,
                    "after_activation": Insertion(post, None, (post, node)),
                    "shortcut_output": Insertion(shortcut_out, (node,), (node,)),
                    "after_spatial_conv": Insertion(inner, None, (inner, node)) if inner is not None else None,
                },
                facts={
                    "branch_convs": _conv_count(gm, branch),
                    "shortcut_convs": _conv_count(gm, shortcut),
                    "branch_nodes": len(branch),
                },
                parts={"fork": fork, "add": node, "branch_output": branch_out, "shortcut_output": shortcut_out},
            )
        )
    return found


def _cat_inputs(node: fx.Node) -> list[fx.Node] | None:
    if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    if dim not in (1, -3) or not _is_feature_map(node):
        return None
    return list(tensors)


@register_pattern(
    "branch_concat",
    anchors=("output", "conv_branch_output"),
    facts={"inputs": int, "conv_inputs": int, "passthrough_inputs": int},
)
def find_branch_concats(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Channel concatenations of paths forking from one input (Inception, ShuffleNet, DenseNet)."""
    found = []
    for node in gm.graph.nodes:
        inputs = _cat_inputs(node)
        if not inputs or len(inputs) < 2 or not all(_is_feature_map(i) for i in inputs):
            continue
        fork = _fork(inputs, order)
        if fork is None:
            continue
        inside = _descendants(fork, order, order[node])
        paths = [_path(i, fork, inside, order) for i in inputs]
        conv_inputs = [i for i, p in zip(inputs, paths) if _conv_count(gm, p)]
        passthrough = [p for p in paths if all(_is_select(n) for n in p)]
        single = conv_inputs[0] if len(conv_inputs) == 1 else None
        found.append(
            Candidate(
                kind="branch_concat",
                output=node,
                region=frozenset().union(*paths) | {node},
                anchors={
                    "output": Insertion(node, None, (node,)),
                    # the branch output is recalibrated for every user (DenseNet reuses it in later concatenations)
                    "conv_branch_output": Insertion(single, None, (single,)) if single is not None else None,
                },
                facts={"inputs": len(inputs), "conv_inputs": len(conv_inputs), "passthrough_inputs": len(passthrough)},
                parts={"fork": fork, "concat": node},
            )
        )
    return found


def _is_depthwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = _module(gm, node)
    return (
        isinstance(mod, nn.modules.conv._ConvNd)
        and mod.groups > 1
        and mod.groups == mod.in_channels
        and mod.out_channels % mod.in_channels == 0
    )


def _walk_region(start: fx.Node, end: fx.Node) -> frozenset[fx.Node]:
    """``start`` and the sole-user chain from it to ``end``."""
    region, walk = {start}, start
    while walk is not end:
        walk = next(iter(walk.users))
        region.add(walk)
    return frozenset(region)


def _pointwise_after(gm: fx.GraphModule, end: fx.Node) -> fx.Node | None:
    if len(end.users) != 1:
        return None
    nxt = next(iter(end.users))
    return nxt if is_conv(gm, nxt) and not is_spatial_conv(gm, nxt) else None


@register_pattern(
    "depthwise",
    anchors=("after_depthwise", "after_pointwise"),
    facts={"activation_after": bool, "kernel": int, "pointwise_after": bool, "pointwise_reduces": bool},
)
def find_depthwise(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Depthwise convolutions with their norm and activation, and the pointwise conv after them."""
    found = []
    for node in gm.graph.nodes:
        if not _is_depthwise(gm, node):
            continue
        end = follow_shape_keeping(gm, node)
        pointwise = _pointwise_after(gm, end)
        pointwise_end = follow_shape_keeping(gm, pointwise) if pointwise is not None else None
        reduces = pointwise is not None and shape_of(pointwise)[1] < shape_of(end)[1]
        anchors = {
            "after_depthwise": Insertion(end, None, (end,)),
            "after_pointwise": Insertion(pointwise_end, None, (pointwise_end,)) if pointwise_end is not None else None,
        }
        region = _walk_region(node, pointwise_end if pointwise_end is not None else end)
        found.append(
            Candidate(
                kind="depthwise",
                output=end,
                region=region,
                anchors=anchors,
                facts={
                    "activation_after": _activation_between(gm, node, end),
                    "kernel": max(_kernel(gm, node)),
                    "pointwise_after": pointwise is not None,
                    "pointwise_reduces": reduces,
                },
                parts={"conv": node},
            )
        )
    return found


@register_pattern("conv_act", anchors=("after_activation",), facts={"kernel": int})
def find_conv_activations(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Convolutions followed, through their norm, by a non-linearity (plain conv stacks)."""
    found = []
    for node in gm.graph.nodes:
        if not is_conv(gm, node) or not _is_feature_map(node):
            continue
        end = follow_shape_keeping(gm, node)
        if end is node or not _activation_between(gm, node, end):
            continue
        found.append(
            Candidate(
                kind="conv_act",
                output=end,
                region=_walk_region(node, end),
                anchors={"after_activation": Insertion(end, None, (end,))},
                facts={"kernel": max(_kernel(gm, node) or (1,))},
                parts={"conv": node},
            )
        )
    return found


# --- channel gates already in the model -------------------------------------------------------------

@dataclass(frozen=True)
class ChannelGate:
    """An SE-like gate already in the model: ``x * f(pool(x))``, or an inserted SqueezeExcite."""

    node: fx.Node  # the product (or the SqueezeExcite call)
    scope: tuple[str, ...]  # modules around it, outermost first

    @property
    def name(self) -> str:
        return self.node.target if self.node.op == "call_module" else (self.scope[-1] if self.scope else self.node.name)


def _is_pooled(node: fx.Node) -> bool:
    shape = shape_of(node)
    return bool(shape) and (len(shape) in (2, 3) or (len(shape) == 4 and shape[2] * shape[3] == 1))


def find_channel_gates(gm: fx.GraphModule) -> list[ChannelGate]:
    """Products of a feature map with a gate computed from its own global pooling, and SE units."""
    gates = []
    for node in gm.graph.nodes:
        if isinstance(_module(gm, node), SqueezeExcite):
            gates.append(ChannelGate(node, module_scope(node)))
            continue
        operands = _binary_operands(node, _MUL_FUNCTIONS, _MUL_METHODS)
        if operands is None or not _is_feature_map(node) or shape_of(node)[2] * shape_of(node)[3] == 1:
            continue
        for x, gate in (operands, operands[::-1]):
            between = _ancestors(gate) - _ancestors(x)
            if x in _ancestors(gate) and any(_is_pooled(n) for n in between):
                gates.append(ChannelGate(node, module_scope(node)))
                break
    return gates
