"""Channel gates a model already has (``x * f(pool(x))``: SE, ECA, ...), so that blocks holding
one get no second unit unless the user asks to stack."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from se_inject.graph.ops import (
    MUL_FUNCTIONS,
    MUL_METHODS,
    binary_operands,
    module_of,
    shape_of,
)
from se_inject.graph.trace import module_scope
from se_inject.graph.walk import ancestors
from se_inject.units.base import ChannelUnit

# --- channel gates already in the model -------------------------------------------------------------


@dataclass(frozen=True)
class ChannelGate:
    """An SE-like gate already in the model: ``x * f(pool(x))``, or an inserted unit."""

    node: fx.Node  # the product (or the unit's call)
    scope: tuple[str, ...]  # modules around it, outermost first

    @property
    def name(self) -> str:
        if self.node.op == "call_module":
            return str(self.node.target)
        return self.scope[-1] if self.scope else self.node.name


def is_pooled(node: fx.Node) -> bool:
    """A feature map pooled to one value per channel: (N, C), ECA's (N, 1, C), or (N, C, 1, 1). Group
    statistics such as EvoNorm's (N, groups, 1) are not: a norm is not a channel gate."""
    shape = shape_of(node)
    if shape is None:
        return False
    return len(shape) == 2 or (len(shape) == 3 and shape[1] == 1) or (len(shape) == 4 and shape[2] * shape[3] == 1)


def _is_gate_product(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` multiplies ``x`` by a gate computed from ``x``'s own global pooling."""
    operands = binary_operands(node, MUL_FUNCTIONS, MUL_METHODS)
    if operands is None or x not in operands or shape_of(node) != shape_of(x):
        return False
    gate = operands[1] if operands[0] is x else operands[0]
    between = ancestors(gate) - ancestors(x)
    # the pooling must be of x's values: a learned per-channel parameter viewed as (1, C, 1, 1) and cast to
    # x's dtype (EvoNorm's x * sigmoid(v * x), a norm's activation) is not a squeeze
    return x in ancestors(gate) and any(is_pooled(n) and x in _tensor_ancestors(n) for n in between)


def _tensor_ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and the tensors it is computed from (not through metadata such as ``x.dtype``)."""
    seen, todo = {node}, [node]
    while todo:
        for parent in todo.pop().all_input_nodes:
            if parent not in seen and shape_of(parent) is not None:
                seen.add(parent)
                todo.append(parent)
    return seen


def through_gate(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node``, or the output of the SE-like gate that recalibrates it (an existing gate inside a
    block: a product with its own pooled gate, or a unit se_inject inserted), so that a walk along
    a block continues past it. Only where the gate is what the block does with ``node`` next."""
    users = list(node.users)
    if len(users) == 1 and isinstance(module_of(gm, users[0]), ChannelUnit):
        return users[0]
    products = [u for u in users if _is_gate_product(u, node)]
    if len(products) == 1:
        feeding = ancestors(products[0])  # every other reader of node computes the gate
        if all(u is products[0] or u in feeding for u in users):
            return products[0]
    return node


def find_channel_gates(gm: fx.GraphModule) -> list[ChannelGate]:
    """Products of a feature map with a gate computed from its own global pooling, and SE units."""
    gates = []
    for node in gm.graph.nodes:
        if isinstance(module_of(gm, node), ChannelUnit):
            gates.append(ChannelGate(node, module_scope(node)))
            continue
        operands = binary_operands(node, MUL_FUNCTIONS, MUL_METHODS)
        shape = shape_of(node)
        if operands is None or shape is None or len(shape) != 4 or shape[2] * shape[3] == 1:
            continue
        if any(_is_gate_product(node, x) for x in operands):
            gates.append(ChannelGate(node, module_scope(node)))
    return gates
