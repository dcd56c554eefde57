"""``depthwise``: a depthwise convolution (groups == in_channels) with its norm and activation,
and the pointwise convolution after it."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from se_inject.graph.ops import (
    is_conv,
    is_depthwise,
    is_spatial_conv,
    kernel_of,
    module_of,
    shape_of,
    tensor_shape,
)
from se_inject.graph.walk import (
    activation_between,
    ancestors,
    follow_norms,
    follow_shape_keeping,
    past_antialiasing,
    pointwise_conv_after,
    walk_region,
)
from se_inject.placement.existing_gates import through_gate
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


def _space_to_depth(gm: fx.GraphModule, conv: fx.Node) -> bool:
    """A conv over non-overlapping k x k patches with k x k times its input's channels: a learned
    space-to-depth, which widens channels as an expansion conv does."""
    mod = module_of(gm, conv)
    if not isinstance(mod, nn.Conv2d) or mod.groups != 1:
        return False
    kernel, stride = tuple(mod.kernel_size), tuple(mod.stride)
    return kernel == stride and mod.out_channels == mod.in_channels * kernel[0] * kernel[1]


def block_input(gm: fx.GraphModule, depthwise: fx.Node) -> fx.Node | None:
    """What enters a depthwise block: the input of the pointwise conv that expands channels for the
    depthwise conv (an inverted residual), else the depthwise conv's own input (a separable block;
    a conv found upstream that does not widen belongs to the previous block). A space-to-depth conv
    (EfficientNet-X's first block) expands as a pointwise conv does."""
    start = depthwise.all_input_nodes[0] if depthwise.all_input_nodes else None
    walk = start
    while walk is not None:
        if is_conv(gm, walk):
            if (is_spatial_conv(gm, walk) and not _space_to_depth(gm, walk)) or not walk.all_input_nodes:
                return start
            widens = tensor_shape(walk)[1] > tensor_shape(walk.all_input_nodes[0])[1]
            return walk.all_input_nodes[0] if widens else start
        # only the norm and activation between an expansion and the depthwise conv
        # (a functional norm reads its weight and bias too: parameters, not other feature maps)
        if (
            len(walk.users) != 1
            or not walk.all_input_nodes
            or any(n.op != "get_attr" for n in walk.all_input_nodes[1:])
            or shape_of(walk) != shape_of(depthwise.all_input_nodes[0])
        ):
            return start
        walk = walk.all_input_nodes[0]
    return start


def _past_existing_gate(gm: fx.GraphModule, node: fx.Node, activated: fx.Node) -> tuple[fx.Node, frozenset[fx.Node]]:
    """Where the depthwise part of a block ends, and its nodes: past an SE-like gate that already
    recalibrates it (EfficientNet's own SE, or a unit inserted before), so that a block with a gate
    is recognised as the same block (``existing="stack"`` puts the new unit after the old one)."""
    region = set(walk_region(node, activated))
    gated = through_gate(gm, activated)
    if gated is activated:
        return activated, frozenset(region)
    end = follow_shape_keeping(gm, gated)
    region |= (ancestors(gated) - ancestors(activated)) | walk_region(gated, end)
    return end, frozenset(region)


@register_pattern(
    "depthwise",
    anchors=("after_depthwise", "after_pointwise", "depthwise_output", "after_depthwise_norm"),
    facts={
        "activation_after": bool,
        "kernel": int,
        "pointwise_after": bool,
        "pointwise_reduces": bool,
        "pointwise_linear": bool,
    },
)
def find_depthwise(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Depthwise convolutions with their norm and activation, and the pointwise conv after them."""
    found = []
    for node in gm.graph.nodes:
        if not is_depthwise(gm, node):
            continue
        # an anti-aliased block strides after the activation, with a blur pool: the depthwise part ends there
        activated = past_antialiasing(gm, follow_shape_keeping(gm, node))
        end, region = _past_existing_gate(gm, node, activated)
        normed = follow_norms(gm, node)
        pointwise = pointwise_conv_after(gm, end)
        pointwise_end = follow_shape_keeping(gm, pointwise) if pointwise is not None else None
        reduces = pointwise is not None and tensor_shape(pointwise)[1] < tensor_shape(end)[1]
        # a linear bottleneck (no activation after the pointwise conv: MobileNetV2, EfficientNet, whatever the
        # widths) against MobileNetV1's separable block, whose pointwise conv is activated
        linear = (
            pointwise_end is not None and pointwise is not None and not activation_between(gm, pointwise, pointwise_end)
        )
        anchors = {
            "after_depthwise": Insertion(end, None, (end,)),
            "after_pointwise": Insertion(pointwise_end, None, (pointwise_end,)) if pointwise_end is not None else None,
            # the depthwise conv's own output, before its norm (timm's CoAtNet-rw "SE early")
            "depthwise_output": Insertion(node, None, (node,)),
            # after its norm, before its activation (ReXNet)
            "after_depthwise_norm": Insertion(normed, None, (normed,)),
        }
        if pointwise is not None and pointwise_end is not None:
            region |= walk_region(pointwise, pointwise_end)
        found.append(
            Candidate(
                kind="depthwise",
                output=end,
                region=region,
                anchors=anchors,
                facts={
                    "activation_after": activation_between(gm, node, activated),
                    "kernel": max(kernel_of(gm, node)),
                    "pointwise_after": pointwise is not None,
                    "pointwise_reduces": reduces,
                    "pointwise_linear": linear,
                },
                parts={"conv": node},
                block_input=block_input(gm, node),
                block_output=pointwise_end,
            )
        )
    return found
