"""The number of input channels a model takes: one owner for this decision."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from se_inject.graph.ops import module_of
from se_inject.graph.shadow import shadow
from se_inject.graph.trace import trace_graph


def recorded_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) as timm records them in ``pretrained_cfg["input_size"]``; None when it does not."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) for v in size):
        return (size[0], size[1], size[2])
    return None


def input_channels(model: nn.Module, gm: fx.GraphModule | None = None) -> int:
    """The channels ``model`` takes as input: the one owner of this decision.

    timm records them (``pretrained_cfg["input_size"]``): that is the truth for stems that
    rearrange their input before the first convolution (TResNet's space-to-depth turns 3
    channels into 48); a Hugging Face transformers model records them in its config
    (``num_channels``). Otherwise the in_channels of the first convolution the forward calls
    (graph order, not registration order), traced if no graph is given; else 3.
    """
    size = recorded_input_size(model)
    if size is not None:
        return size[0]
    declared = getattr(getattr(model, "config", None), "num_channels", None)  # a transformers model's config
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    if gm is None:
        try:
            gm = fx.GraphModule(model, trace_graph(shadow(model)))
        except Exception:  # an untraceable model: the first convolution it registers
            first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
            return first.in_channels if first is not None else 3
    return _first_conv_channels(gm)


def _first_conv_channels(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = module_of(gm, node)
            if isinstance(mod, nn.modules.conv._ConvNd):
                return mod.in_channels
        if node.op == "call_function" and node.target in (torch.conv2d, nn.functional.conv2d):
            weight = node.args[1]
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                return _fetch_attr(gm, str(weight.target)).shape[1]
    return 3


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
