"""``branch_concat``: a channel concatenation of paths that fork from one input (Inception modules,
ShuffleNet's split / concatenate, DenseNet's concatenation of new features)."""

from __future__ import annotations

import torch.fx as fx

from se_inject.graph.ops import cat_inputs, conv_count, is_feature_map, is_select
from se_inject.graph.walk import common_fork, descendants, path_between
from se_inject.placement.patterns.base import Candidate, Insertion, register_pattern


@register_pattern(
    "branch_concat",
    anchors=("output", "conv_branch_output"),
    facts={"inputs": int, "conv_inputs": int, "passthrough_inputs": int},
)
def find_branch_concats(gm: fx.GraphModule, order: dict[fx.Node, int]) -> list[Candidate]:
    """Channel concatenations of paths forking from one input (Inception, ShuffleNet, DenseNet)."""
    found = []
    for node in gm.graph.nodes:
        inputs = cat_inputs(node)
        if not inputs or len(inputs) < 2 or not all(is_feature_map(i) for i in inputs):
            continue
        fork = common_fork(inputs, order)
        if fork is None:
            continue
        inside = descendants(fork, order, order[node])
        paths = [path_between(i, fork, inside, order) for i in inputs]
        conv_inputs = [i for i, p in zip(inputs, paths, strict=True) if conv_count(gm, p)]
        passthrough = [p for p in paths if all(is_select(n) for n in p)]
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
                block_input=fork,
            )
        )
    return found
