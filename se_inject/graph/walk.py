"""Walks over a traced graph: ancestors, descendants, paths, the fork two branches share."""

from __future__ import annotations

import heapq

import torch.fx as fx

from se_inject.graph.ops import is_activation, is_conv, is_shape_keeping_layer, is_spatial_conv, module_of, shape_of

# --- graph walks --------------------------------------------------------------------------------


def ancestors(node: fx.Node, order: dict[fx.Node, int] | None = None, floor: int = 0) -> set[fx.Node]:
    """``node`` and every node it is computed from; with ``order``, only those at position ``floor`` or later."""
    seen, todo = {node}, [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen and (order is None or order[parent] >= floor):
                seen.add(parent)
                todo.append(parent)
    return seen


def descendants(node: fx.Node, order: dict[fx.Node, int], limit: int) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for child in todo.pop().users:
            if child not in seen and order[child] <= limit:
                seen.add(child)
                todo.append(child)
    return seen


def path_between(start: fx.Node, fork: fx.Node, inside: set[fx.Node], order: dict[fx.Node, int]) -> frozenset[fx.Node]:
    """The nodes between ``fork`` and ``start`` (``inside``: the fork's descendants up to the join)."""
    return frozenset((ancestors(start, order, order[fork]) & inside) - {fork})


def common_fork(nodes: list[fx.Node], order: dict[fx.Node, int]) -> fx.Node | None:
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
        if not is_shape_keeping_layer(gm, nxt) or shape_of(nxt) != shape_of(node):
            break
        node = nxt
    return node


def past_antialiasing(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Past a blur pool that strides what ``node`` computed (anti-aliased downsampling: timm's
    ``aa`` layers), and the shape-keeping layers after it; ``node`` itself where none follows."""
    if len(node.users) != 1:
        return node
    nxt = next(iter(node.users))
    mod = module_of(gm, nxt)
    shape, after = shape_of(node), shape_of(nxt)
    if mod is None or type(mod).__name__.lower() != "blurpool2d" or not shape or not after or after[:2] != shape[:2]:
        return node
    return follow_shape_keeping(gm, nxt)


def activation_between(gm: fx.GraphModule, start: fx.Node, end: fx.Node) -> bool:
    node = start
    while node is not end:
        node = next(iter(node.users))
        if is_activation(gm, node):
            return True
    return False


def walk_region(start: fx.Node, end: fx.Node) -> frozenset[fx.Node]:
    """``start`` and the sole-user chain from it to ``end``."""
    region, walk = {start}, start
    while walk is not end:
        walk = next(iter(walk.users))
        region.add(walk)
    return frozenset(region)


def follow_norms(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node`` and its norm: the sole-user layers after it that keep its shape and are not activations
    (ReXNet's depthwise conv before its ReLU6, RepViT's token-mixer sum)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if is_activation(gm, user) or not is_shape_keeping_layer(gm, user) or shape_of(user) != shape_of(node):
            break
        node = user
    return node


def pointwise_conv_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The 1x1 conv that is ``node``'s only user, if it is one."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if is_conv(gm, user) and not is_spatial_conv(gm, user) else None
