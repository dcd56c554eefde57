"""``dense_concat``: DenseNet's growth. Each dense layer computes new features from the concatenation
of everything before it, and the new features are concatenated in turn: the next layer's input,
and the block's output.

Found by structure: a channel concatenation whose newest input (the last computed) was computed,
through at least one convolution, from a concatenation of exactly its other inputs. Every dense
layer's new features are the newest input of the concatenation that follows the layer, so each
layer is one candidate, and the candidates do not overlap. A unit on the new features
recalibrates them once, for every later layer that reads them; ``after_last_conv`` puts it on the
layer's last conv (with its norm and activation), before a layer scale (RDNet's gamma) scales it. Inception modules (parallel
branches), ShuffleNet (a split, not a concatenation, feeds the branch) and VoVNet (each conv reads
only the previous one) do not match.
"""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import cat_inputs, conv_count, is_conv
from se_inject.graph.walk import ancestors, follow_shape_keeping
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


def _layer_input(newest: fx.Node, others: list[fx.Node]) -> fx.Node | None:
    """The concatenation of exactly ``others`` that ``newest`` was computed from, if there is one."""
    for node in ancestors(newest):
        if node is not newest and cat_inputs(node) == others:
            return node
    return None


@register_pattern(
    "dense_concat", anchors=("new_features", "after_last_conv"), facts={"layer_convs": int, "inputs": int}
)
def find_dense_concats(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Concatenations that append a dense layer's new features to the features it read."""
    found = []
    for node in gm.graph.nodes:
        inputs = cat_inputs(node)
        if not inputs or len(inputs) < 2:
            continue
        newest = max(inputs, key=order.__getitem__)
        others = [i for i in inputs if i is not newest]
        layer_input = _layer_input(newest, others)
        if layer_input is None:
            continue
        layer = frozenset(ancestors(newest) - ancestors(layer_input)) | {layer_input}
        convs = conv_count(gm, layer)
        if not convs:
            continue
        last_conv = follow_shape_keeping(gm, max((n for n in layer if is_conv(gm, n)), key=order.__getitem__), layer)
        found.append(
            Candidate(
                kind="dense_concat",
                output=node,
                region=layer,
                anchors={
                    "new_features": Insertion(newest, None, (newest,)),
                    "after_last_conv": Insertion(last_conv, None, (last_conv, newest)),
                },
                facts={"layer_convs": convs, "inputs": len(inputs)},
                parts={"layer_input": layer_input, "new_features": newest, "concat": node},
                block_input=layer_input,
            )
        )
    return found
