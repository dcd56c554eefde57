"""``residual_add``: an addition of two feature maps that share a fork; the path with more
convolutions (then more nodes) is the branch F_tr, the other the shortcut."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import (
    add_operands,
    conv_count,
    is_activation,
    is_conv,
    is_feature_map,
    is_spatial_conv,
    shape_of,
)
from se_inject.graph.walk import (
    common_fork,
    descendants,
    follow_shape_keeping,
    path_between,
)
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


@register_pattern(
    "residual_add",
    anchors=(
        "branch_output",
        "branch_input",
        "after_activation",
        "shortcut_output",
        "after_spatial_conv",
        "after_first_conv",
    ),
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
        if not is_feature_map(node) or shape_of(a) != shape or shape_of(b) != shape:
            continue
        fork = common_fork([a, b], order)
        if fork is None:
            continue
        inside = descendants(fork, order, order[node])
        sides = sorted(
            [(a, path_between(a, fork, inside, order)), (b, path_between(b, fork, inside, order))],
            key=lambda side: (conv_count(gm, side[1]), len(side[1])),
            reverse=True,
        )
        (branch_out, branch), (shortcut_out, shortcut) = sides
        if (conv_count(gm, branch), len(branch)) == (conv_count(gm, shortcut), len(shortcut)):
            continue  # two equal paths are parallel branches, not a residual
        post = node
        if len(node.users) == 1:
            user = next(iter(node.users))
            if is_activation(gm, user) and user.all_input_nodes[:1] == [node] and shape_of(user) == shape:
                post = user
        spatial = sorted((n for n in branch if is_spatial_conv(gm, n)), key=order.__getitem__)
        inner = follow_shape_keeping(gm, spatial[0], branch) if spatial else None
        convs = sorted((n for n in branch if is_conv(gm, n)), key=order.__getitem__)
        # DarkNet's SE follows the branch's first conv, its norm and its activation
        first = follow_shape_keeping(gm, convs[0], branch) if convs else None
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
                    "after_first_conv": Insertion(first, None, (first, node)) if first is not None else None,
                },
                facts={
                    "branch_convs": conv_count(gm, branch),
                    "shortcut_convs": conv_count(gm, shortcut),
                    "branch_nodes": len(branch),
                },
                parts={"fork": fork, "add": node, "branch_output": branch_out, "shortcut_output": shortcut_out},
                block_input=fork,
            )
        )
    return found
