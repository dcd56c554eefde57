"""``conv_act``: a convolution followed, through its norm, by a non-linearity (plain VGG stacks)."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import is_conv, is_feature_map, kernel_of
from se_inject.graph.walk import activation_between, follow_shape_keeping, walk_region
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


@register_pattern("conv_act", anchors=("after_activation",), facts={"kernel": int})
def find_conv_activations(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Convolutions followed, through their norm, by a non-linearity (plain conv stacks)."""
    found = []
    for node in gm.graph.nodes:
        if not is_conv(gm, node) or not is_feature_map(node):
            continue
        end = follow_shape_keeping(gm, node)
        if end is node or not activation_between(gm, node, end):
            continue
        found.append(
            Candidate(
                kind="conv_act",
                output=end,
                region=walk_region(node, end),
                anchors={"after_activation": Insertion(end, None, (end,))},
                facts={"kernel": max(kernel_of(gm, node) or (1,))},
                parts={"conv": node},
                block_input=node.all_input_nodes[0] if node.all_input_nodes else None,
            )
        )
    return found
