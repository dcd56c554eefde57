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
    shape = shape_of(node)
    return shape is not None and (len(shape) in (2, 3) or (len(shape) == 4 and shape[2] * shape[3] == 1))


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
        for x, gate in (operands, operands[::-1]):
            between = ancestors(gate) - ancestors(x)
            if x in ancestors(gate) and any(is_pooled(n) for n in between):
                gates.append(ChannelGate(node, module_scope(node)))
                break
    return gates
