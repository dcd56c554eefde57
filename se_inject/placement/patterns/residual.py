"""``residual_add``: an addition of two feature maps that share a fork; the path with more
convolutions (then more nodes) is the branch F_tr, the other the shortcut."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import (
    add_operands,
    conv_count,
    is_activation,
    is_conv,
    is_depthwise,
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


def _is_pointwise(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """A 1x1 conv that mixes channels: a 1x1 depthwise conv (a reparameterisable scale branch) is not one."""
    return not is_spatial_conv(gm, conv) and not is_depthwise(gm, conv)


def _inside_branch(
    gm: fx.GraphModule, branch: frozenset[fx.Node], add: fx.Node, order: dict[fx.Node, int]
) -> dict[str, Insertion | None]:
    """The anchors inside the branch, by its convolutions (None where the branch has no such conv)."""

    def after(node: fx.Node | None) -> Insertion | None:
        return Insertion(node, None, (node, add)) if node is not None else None

    def into(conv: fx.Node | None, alone: bool = True) -> Insertion | None:
        """What enters ``conv``: for it alone, or for all that read it (parallel convs: GhostNetV3)."""
        feeding = conv.args[0] if conv is not None and isinstance(conv.args[0], fx.Node) else None
        if conv is None or feeding not in branch or not (alone or set(feeding.users) <= branch):
            return None
        return Insertion(feeding, (conv,) if alone else None, (feeding, conv, add))

    convs = sorted((n for n in branch if is_conv(gm, n)), key=order.__getitem__)
    spatial = [n for n in convs if is_spatial_conv(gm, n)]
    pointwise = [n for n in convs if _is_pointwise(gm, n)]
    return {
        "after_spatial_conv": after(follow_shape_keeping(gm, spatial[0], branch) if spatial else None),
        # DarkNet's SE follows the branch's first conv, its norm and its activation
        "after_first_conv": after(follow_shape_keeping(gm, convs[0], branch) if convs else None),
        # TResNet's bottleneck: on what enters the last conv (after the 3x3 and its anti-aliasing pool)
        "before_last_conv": into(convs[-1] if convs else None),
        # a pre-activation block's spatial conv feeds the next block's norm: SE on the conv itself
        "spatial_conv_output": after(spatial[0] if spatial else None),
        # NFNet's attn_last: on the last conv's output, before the branch is scaled by alpha
        "after_last_conv": after(follow_shape_keeping(gm, convs[-1], branch) if convs else None),
        # GhostNet: on what enters the second ghost module, whose 1x1 convs (one, or GhostNetV3's parallel
        # reparameterisable ones) are the branch's last
        "before_last_pointwise": into(pointwise[-1] if pointwise else None, alone=False),
    }


@register_pattern(
    "residual_add",
    anchors=(
        "branch_output",
        "branch_input",
        "after_activation",
        "shortcut_output",
        "after_spatial_conv",
        "after_first_conv",
        "before_last_conv",
        "spatial_conv_output",
        "after_last_conv",
        "before_last_pointwise",
    ),
    facts={"branch_convs": int, "branch_pointwise_convs": int, "shortcut_convs": int, "branch_nodes": int},
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
                    **_inside_branch(gm, branch, node, order),
                },
                facts={
                    "branch_convs": conv_count(gm, branch),
                    "branch_pointwise_convs": sum(is_conv(gm, n) and _is_pointwise(gm, n) for n in branch),
                    "shortcut_convs": conv_count(gm, shortcut),
                    "branch_nodes": len(branch),
                },
                parts={"fork": fork, "add": node, "branch_output": branch_out, "shortcut_output": shortcut_out},
                block_input=fork,
            )
        )
    return found
