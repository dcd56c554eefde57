"""``branch_sum``: the sum of parallel conv branches of one input (RepVGG, MobileOne: a kxk conv, a 1x1
conv, a BatchNorm identity), taken whole: the unit goes on the sum, before the block's activation."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import (
    PASSTHROUGH_TYPES,
    add_operands,
    conv_count,
    is_activation,
    is_feature_map,
    is_shape_keeping_layer,
    module_of,
    shape_of,
)
from se_inject.graph.walk import ancestors, common_fork, descendants, follow_norms, path_between
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


def _addends(node: fx.Node, fork: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The leaves of the tree of additions ending at ``node`` whose inner sums all descend from ``fork``."""
    operands = add_operands(node)
    if operands is None or common_fork(list(operands), order) is None:
        return [node]
    if fork not in ancestors(operands[0], order, order[fork]) or fork not in ancestors(operands[1], order, order[fork]):
        return [node]
    return _addends(operands[0], fork, order) + _addends(operands[1], fork, order)


def _sole_sum_user(node: fx.Node) -> fx.Node | None:
    """The addition ``node`` feeds, through one-user layers that keep its shape (drop path)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if add_operands(user) is not None:
            return user
        if shape_of(user) != shape_of(node) or len(user.all_input_nodes) != 1:
            return None
        node = user
    return None


def _activation_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The activation ``node`` feeds alone, through layers that pass it on unchanged (an ``nn.Identity``
    where a network's SE would be); ``node`` itself where there is none."""
    walk = node
    while len(walk.users) == 1:
        user = next(iter(walk.users))
        if shape_of(user) != shape_of(node) or not is_shape_keeping_layer(gm, user):
            break
        if is_activation(gm, user):
            return user
        if not isinstance(module_of(gm, user), PASSTHROUGH_TYPES):
            break
        walk = user
    return node


@register_pattern(
    "branch_sum",
    anchors=("sum_output", "after_norm", "after_activation"),
    facts={"branches": int, "conv_branches": int, "identity": bool},
)
def find_branch_sums(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Sums of two or more parallel branches of one input, at least one of them holding convs (a block of
    one conv branch and an identity is one too: MobileOne's 1x1 blocks; rules tell them apart by facts)."""
    found = []
    for node in gm.graph.nodes:
        operands = add_operands(node)
        if operands is None or not is_feature_map(node):
            continue
        fork = common_fork(list(operands), order)
        if fork is None or any(shape_of(o) != shape_of(node) for o in operands):
            continue
        outer = _sole_sum_user(node)
        if outer is not None and add_operands(outer) is not None and fork in ancestors(outer, order, order[fork]):
            if common_fork(list(add_operands(outer) or ()), order) is fork:
                continue  # an inner sum: the candidate is the outermost one
        inside = descendants(fork, order, order[node])
        paths = [path_between(a, fork, inside, order) | {a} for a in _addends(node, fork, order)]
        conv_paths = sum(conv_count(gm, p - {fork}) > 0 for p in paths)
        if conv_paths < 1:
            continue
        normed = follow_norms(gm, node)  # RepViT's token mixer normalises its sum: the SE follows that norm
        post = _activation_after(gm, normed)
        region = frozenset(set().union(*paths) - {fork}) | {node, post, normed}
        found.append(
            Candidate(
                kind="branch_sum",
                output=node,
                region=region,
                anchors={
                    "sum_output": Insertion(node, None, (node,)),
                    "after_norm": Insertion(normed, None, (normed, node)),
                    "after_activation": Insertion(post, None, (post, node)),
                },
                facts={
                    "branches": len(paths),
                    "conv_branches": conv_paths,
                    "identity": len(paths) > conv_paths,
                },
                parts={"fork": fork, "add": node},
                block_input=fork,
            )
        )
    return found
