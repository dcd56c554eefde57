"""``conv_act``: a convolution followed, through its norm, by a non-linearity (plain VGG stacks)."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import (
    cat_inputs,
    is_conv,
    is_depthwise,
    is_feature_map,
    is_shape_keeping_layer,
    is_spatial_conv,
    kernel_of,
)
from se_inject.graph.walk import (
    activation_between,
    follow_norms,
    follow_shape_keeping,
    pointwise_conv_after,
    walk_region,
)
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


def _pointwise_before(gm: fx.GraphModule, conv: fx.Node) -> fx.Node | None:
    """The 1x1 conv whose output (through its norm and activation alone) ``conv`` reads: the first conv
    of a bottleneck whose middle conv ``conv`` is."""
    walk = conv.all_input_nodes[0] if conv.all_input_nodes else None
    while walk is not None and len(walk.users) == 1:
        if is_conv(gm, walk):
            return None if is_spatial_conv(gm, walk) else walk
        if len(walk.all_input_nodes) != 1 or not is_shape_keeping_layer(gm, walk):
            return None  # only the norm and activation of the 1x1 conv lie between
        walk = walk.all_input_nodes[0]
    return None


@register_pattern(
    "conv_act",
    anchors=("after_activation", "after_norm"),
    facts={"kernel": int, "depthwise": bool, "pointwise_before": bool, "pointwise_after": bool, "reads_concat": bool},
)
def find_conv_activations(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Convolutions followed, through their norm, by a non-linearity (plain conv stacks); those between
    two 1x1 convs are a bottleneck's middle conv, whose block input is the first 1x1 conv's input."""
    found = []
    for node in gm.graph.nodes:
        if not is_conv(gm, node) or not is_feature_map(node):
            continue
        end = follow_shape_keeping(gm, node)
        if end is node or not activation_between(gm, node, end):
            continue
        before = _pointwise_before(gm, node)
        normed = follow_norms(gm, node)
        entry = before if before is not None else node
        found.append(
            Candidate(
                kind="conv_act",
                output=end,
                region=walk_region(node, end),
                anchors={
                    "after_activation": Insertion(end, None, (end,)),
                    # between the norm and the activation (MobileOne's single-branch block)
                    "after_norm": Insertion(normed, None, (normed,)),
                },
                facts={
                    "kernel": max(kernel_of(gm, node) or (1,)),
                    "depthwise": is_depthwise(gm, node),
                    "pointwise_before": before is not None,
                    "pointwise_after": pointwise_conv_after(gm, end) is not None,
                    # VoVNet's and HGNet's aggregation conv: it mixes the concatenation of the block's layers
                    "reads_concat": bool(node.all_input_nodes) and cat_inputs(node.all_input_nodes[0]) is not None,
                },
                parts={"conv": node},
                block_input=entry.all_input_nodes[0] if entry.all_input_nodes else None,
            )
        )
    return found
