"""Who owns a node's memory: whether a unit may write its result over its input (inference).

A node owns its memory when it was freshly allocated by a conv, norm, activation, addition, ...,
and reaches the unit only through in-place operations; never through an ``nn.Identity`` or a
dropout that hands over the caller's tensor.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.graph.ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_NAMES,
    CAT_FUNCTIONS,
    CONV_FUNCTIONS,
    NORM_TYPES,
    PASSTHROUGH_NAMES,
    PASSTHROUGH_TYPES,
    module_of,
)

FRESH_MODULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + NORM_TYPES
FRESH_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, *CAT_FUNCTIONS, *CONV_FUNCTIONS}
FRESH_METHODS = {"add", "mul"}
ALIAS_FUNCTIONS = {torch.relu_, F.relu_}
ALIAS_METHODS = {"relu_", "add_", "mul_", "sigmoid_", "tanh_", "clamp_", "contiguous"}


def memory_of(gm: nn.Module, node: fx.Node) -> str:
    """``fresh`` (the output is newly allocated), ``alias`` (it may be the first input's memory), or ``unknown``."""
    if node.op == "call_module":
        mod = module_of(gm, node)
        if isinstance(mod, FRESH_MODULE_TYPES):
            return "fresh"
        if (
            getattr(mod, "inplace", False) is True
            or isinstance(mod, PASSTHROUGH_TYPES)
            or (type(mod).__name__.lower() in PASSTHROUGH_NAMES)
        ):
            return "alias"  # in-place activations; Identity, dropout, drop-path return their input in eval
        return "fresh" if type(mod).__name__.lower() in ACTIVATION_NAMES else "unknown"
    if node.op == "call_function":
        inplace = node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:])
        if node.target in ALIAS_FUNCTIONS or (node.target in ACTIVATION_FUNCTIONS and inplace):
            return "alias"
        return "fresh" if node.target in FRESH_FUNCTIONS | ACTIVATION_FUNCTIONS else "unknown"
    if node.op == "call_method":
        if node.target in ALIAS_METHODS:
            return "alias"
        return "fresh" if node.target in FRESH_METHODS | ACTIVATION_METHODS else "unknown"
    return "unknown"  # placeholders and attributes belong to the caller or the module


def owns_its_memory(gm: nn.Module, node: fx.Node) -> bool:
    """Whether the tensor ``node`` computes is memory that nothing but ``node``'s one user reads.

    Follows aliasing ops (in-place activations, Identity, dropout) back to the op that allocated
    the tensor; every tensor on the way must have that one user. Unknown ops count as aliasing:
    a wrong "no" costs an allocation, a wrong "yes" would corrupt another tensor.
    """
    while len(node.users) == 1:
        memory = memory_of(gm, node)
        if memory != "alias":
            return memory == "fresh"
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return False
        node = source
    return False
