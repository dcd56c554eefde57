"""FLOPs of every node, counted by ``torch.utils.flop_counter.FlopCounterMode`` on abstract tensors.

Shapes and FLOPs come from one run of the graph on meta or fake tensors (see
:mod:`se_inject.graph.shadow`); se_inject registers formulas for what the counter leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from se_inject.errors import ShapePropagationError, first_line
from se_inject.graph.shadow import abstract_tensors, with_real_fallback

# FlopCounterMode counts 2 per multiply-add for conv/matmul and nothing for pooling and
# elementwise products; the SE unit is mostly those, so they are registered here: one FLOP per
# element read by a reduction or a pooling window, one per element written by a product, three per
# element of a softmax. Activations and gates (sigmoid), additions and normalisation count nothing,
# in the units as in the host network.


def _reduction_flops(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return math.prod(x_shape)


def _elementwise_flops(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return math.prod(out_shape) if out_shape is not None else 0


def _no_flops(*args: Any, **kwargs: Any) -> int:
    return 0


def _softmax_flops(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 3 * math.prod(x_shape)  # an exp, a sum and a division per element (GC's attention pooling)


def _window_flops(
    x_shape: Sequence[int], kernel_size: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return math.prod(out_shape) * math.prod(kernel_size) if out_shape is not None else 0  # one per element read


aten = torch.ops.aten
FLOP_FORMULAS: dict[Any, Any] = {
    aten.mean: _reduction_flops,
    aten.amax: _reduction_flops,
    aten._adaptive_avg_pool2d: _reduction_flops,
    aten.adaptive_max_pool2d: _reduction_flops,
    aten.avg_pool2d: _window_flops,  # each output averages its window (Gather-Excite's gather, ResNet-D shortcuts)
    aten._softmax: _softmax_flops,
    aten.mul: _elementwise_flops,
    aten.mul_: _elementwise_flops,  # the unit's scale written over its input (inference)
    aten.addcmul: _elementwise_flops,  # the unit's scale fused with a residual add: the add is not counted, as elsewhere
    # FlopCounterMode decomposes every op without a formula, looking for matmuls inside; its check
    # compares the op's overload, so only an overload key stops it. Batch norm holds no matmul and
    # counts 0 either way, but decomposing it on meta tensors was 40% of a ResNet-152 report.
    aten.native_batch_norm.default: _no_flops,
}


_ELEMENTWISE_OPS = frozenset(getattr(op, "overloadpacket", op) for op in FLOP_FORMULAS)


def multiply_add_flops(counts: dict[Any, int]) -> int:
    """The FLOPs of ``counts`` (one FlopCounterMode entry: op -> FLOPs) that torch's own formulas
    count: convolutions and matrix products, 2 per multiply-add. The rest are se_inject's formulas
    for pooling, products and softmax (elementwise work, 1 per element)."""
    return sum(v for op, v in counts.items() if getattr(op, "overloadpacket", op) not in _ELEMENTWISE_OPS)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward, with the multiply-adds of convolutions and matrix products apart: the
    paper's "GFLOPs" are those multiply-adds (``macs``); the remainder is elementwise work."""

    total: int
    macs: int

    @property
    def elementwise(self) -> int:
        return self.total - 2 * self.macs


def flop_count(counter: FlopCounterMode, module_key: str = "Global") -> FlopCount:
    """The FlopCount of one entry of a finished counter (``Global``, or a module's key)."""
    counts = counter.get_flop_counts().get(module_key, {})
    return FlopCount(sum(counts.values()), multiply_add_flops(counts) // 2)


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with se_inject's extra formulas (see FLOP_FORMULAS)."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)  # depth only shapes the printed table


class ShapeFlopProp(fx.Interpreter):
    """Run a GraphModule node by node, recording ``meta['shape']`` and ``meta['flops']``.

    Like torch.fx.passes.shape_prop.ShapeProp, a failure is re-raised with the node printed.
    """

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, input_shape: Sequence[int]) -> None:
        super().__init__(gm)
        self.counter = counter
        self.input_shape = input_shape

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        try:
            result = super().run_node(n)
        except Exception as err:
            reason = first_line(err)
            raise ShapePropagationError(
                f"running node {n.format_node()} at input {tuple(self.input_shape)} failed: {reason}; "
                f"are its {self.input_shape[1]} channels and {tuple(self.input_shape[2:])} size right for this model "
                "(in_chans=, input_size=; CLI: --in-chans, --input-size)?"
            ) from err
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        n.meta["flops"] = self.counter.get_total_flops() - before
        return result


def propagate(gm: fx.GraphModule, input_shape: Sequence[int]) -> FlopCount:
    """Annotate every node of ``gm`` with its output shape and FLOPs; return the model's FLOPs."""

    def run(real: bool) -> FlopCount:
        with abstract_tensors(gm, real) as make, flop_counter() as counter:
            try:
                ShapeFlopProp(gm, counter, input_shape).run(make(tuple(input_shape)))
            except ShapePropagationError as err:  # drop the "While executing ..." fx appends on the way out
                raise ShapePropagationError(first_line(err, limit=10_000)) from err.__cause__
        return flop_count(counter)

    return with_real_fallback(gm, run)


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward of ``module`` on an input of ``input_shape`` (no real arithmetic if it can)."""
    return count_flops_by_module(module, input_shape)[0].total


def count_flops_by_module(module: nn.Module, input_shape: Sequence[int]) -> tuple[FlopCount, dict[str, FlopCount]]:
    """FLOPs of one forward of ``module``, in total and per submodule (qualified name, "" is the root).

    A submodule's count includes its children's; one called twice counts twice.
    """

    def run(real: bool) -> tuple[FlopCount, dict[str, FlopCount]]:
        with abstract_tensors(module, real) as make, flop_counter() as counter:
            module(make(tuple(input_shape)))
        per_module = {
            key.partition(".")[2]: flop_count(counter, key)  # keys are "RootClass.qualified.name"
            for key in counter.get_flop_counts()
            if key != "Global"
        }
        return flop_count(counter), per_module

    return with_real_fallback(module, run)
