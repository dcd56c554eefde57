"""Inference optimisation of a retrofitted model: the squeeze taken before the block's last 1x1 conv.

Where a unit's input is BatchNorm (eval) of a stride-1 1x1 convolution, the last conv of every
bottleneck and inverted residual, the squeeze (the mean over positions) commutes with both and with
the unit's first linear map: for SE ``fc1(mean(BN(W h + c))) = fc1(a * (W mean(h) + c) + b)``, with
BN's affine map ``a, b`` from its running statistics. The unit then pools ``h``, which is 4x
(bottleneck) to 6x (inverted residual) narrower than its own input, and applies one matrix
``W1 diag(a) W`` (``hidden x narrow``, also smaller than ``fc1``). eSE, ECA, CECA, Gather-Excite over
the whole map and GC (whose attention weights over positions come from ``h`` too) fold the same way;
``se_inject.units.fold`` has the machinery and each unit's ``fold_refusal`` says where it does not
apply (a max squeeze, windowed or learned gathers, CBAM's spatial gate). No hand-built SE network
does this: its SE module sees only its own input.

The values are the usual ones up to float rounding (the sums are taken in another order);
``tests/surgery/test_optimize.py`` checks that in float64 on every bottleneck family of the suite
and for every unit that folds.
Under ``torch.compile`` the narrow pooling fuses into the kernel that writes ``h`` (the activation
after the middle conv), so the squeeze costs almost no memory traffic; in eager mode it is a
separate pass either way. The README's "Performance" section has the measured ratios.

In training mode BatchNorm normalises with the batch's statistics, so a unit then pools its own
input as before. The folded matrix follows the weights it is made of: a unit folds again at its next
call once ``load_state_dict``, an optimiser step or anything else has changed one of them (the model's
forward pre-hook checks every unit once per call, outside the graph when compiled; a unit called
alone checks itself), and where a gradient is wanted (grad mode on, one of those weights trainable)
it computes from the live weights layer by layer, so training in eval mode trains every weight.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.fx as fx
from torch import nn

from se_inject.errors import ConfigError, InvalidModelError
from se_inject.units.fold import FoldsChecked, SqueezeFold


def _affine_batch_norm(module: nn.Module) -> bool:
    """BatchNorm2d, torchvision's FrozenBatchNorm2d (the norm of its pretrained detection backbones), or
    timm's BatchNormAct2d with its activation and dropout off (the last norm of a timm ConvNormAct block
    before an addition): modules that compute BatchNorm's affine map alone, from running statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(module) is FrozenBatchNorm2d:
        return True
    if not isinstance(module, nn.BatchNorm2d) or module.running_mean is None or module.running_var is None:
        return False
    if type(module) is nn.BatchNorm2d:
        return True
    from timm.layers import BatchNormAct2d

    return type(module) is BatchNormAct2d and all(isinstance(m, nn.Identity) for m in module.children())


def _pointwise_conv(module: nn.Module) -> bool:
    """A dense 1x1 convolution with stride 1 and no padding: the mean over positions commutes with it."""
    ones = (1, 1)
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == ones
        and module.stride == ones
        and module.dilation == ones
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


def _sole_module_input(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node] | None:
    """The module ``node`` calls and its input node, when ``node`` is a module call whose output only
    one node reads (so that folding it into the squeeze changes nothing else)."""
    if node.op != "call_module" or len(node.users) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return gm.get_submodule(str(node.target)), node.args[0]


def _squeezable(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Conv2d, nn.BatchNorm2d, fx.Node] | None:
    """The conv, the BatchNorm and the conv's input when ``node`` (a unit's input) is BN(1x1 conv(h)),
    through identities (timm's ``drop_path`` and ``attn_last`` placeholders in eval mode)."""
    found = _sole_module_input(gm, node)
    while found is not None and isinstance(found[0], nn.Identity):
        found = _sole_module_input(gm, found[1])
    if found is None or not _affine_batch_norm(found[0]):
        return None
    norm, conv_node = found
    inner = _sole_module_input(gm, conv_node)
    if inner is None or not _pointwise_conv(inner[0]):
        return None
    assert isinstance(inner[0], nn.Conv2d)  # checked above
    # a FrozenBatchNorm2d is no BatchNorm2d, but has the tensors and eps the fold reads
    return inner[0], cast(nn.BatchNorm2d, norm), inner[1]


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """A copy of the retrofitted ``model``, in eval mode, whose units squeeze before the last 1x1 conv.

    Every unit whose squeeze is a pooled linear map (SE with an average squeeze, eSE, ECA, CECA, GC,
    Gather-Excite over the whole map without a learned gather) and whose input is BatchNorm of a
    stride-1 1x1 conv (read by nothing else) pools that conv's narrower input instead, through one
    folded matrix; the outputs are the same up to float rounding. Other units are left as they are;
    :func:`optimized_units` lists the changed ones. ``model`` is not changed.

    Example::

        model = se_inject.inject(timm.create_model("resnet50"), r=16)
        fast = se_inject.optimize_for_inference(model)
        se_inject.optimized_units(fast)   # ['layer1.0.se_1_1', ...]: 16 units
        torch.compile(fast)(x)            # where it pays: see the cost guide's measured ratios
    """
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"model: expected an nn.Module, got {type(model).__name__}")
    optimized = copy.deepcopy(model).eval()
    already = len(optimized_units(optimized))
    changed = fold_squeezes(optimized)
    if not changed and already:
        raise ConfigError(
            f"optimize_for_inference: the model is already optimised ({already} units fold); use it as it is"
        )
    if not changed:
        raise ConfigError(
            "optimize_for_inference: no unit of this model both reads BatchNorm of a 1x1 conv and squeezes by "
            f"pooling the whole map ({FOLDING_UNITS}), so there is nothing to fold; use the model as it is"
        )
    return optimized


def fold_squeezes(model: nn.Module) -> int:
    """Fold, in place, every unit of ``model`` that can squeeze before its block's last 1x1 conv and does
    not yet (see :func:`optimize_for_inference`, which does this on a copy and checks the result);
    how many were folded. ``model`` should be in eval mode, where the folded path runs; it gets the
    pre-hook :func:`refresh_folds` that keeps the folds current (under torch.compile too) and the hook
    :func:`folds_unchecked` that ends what the pre-hook checked with the call."""
    changed = 0
    for graph_module in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        found_here = 0
        for node in graph_module.graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            unit = graph_module.get_submodule(str(node.target))
            if not isinstance(unit, SqueezeFold) or unit.fold_refusal() is not None or "source" in node.kwargs:
                continue
            found = _squeezable(graph_module, node.args[0])
            if found is None:
                continue
            conv, norm, source = found
            unit.squeeze_through(conv, norm)
            node.kwargs = {**node.kwargs, "source": source}
            found_here += 1
        if found_here:
            graph_module.recompile()
            changed += found_here
    if changed:
        # the units the pre-hook checks, listed once (walking the model at every call costs more than the check)
        units = [m for m in model.modules() if isinstance(m, SqueezeFold) and m.squeezes_through]
        setattr(model, FOLDED_UNITS, units)
        checked = FoldsChecked()
        for unit in units:
            unit.folds_checked = checked
        if refresh_folds not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(refresh_folds)
            model.register_forward_hook(folds_unchecked, always_call=True)
    return changed


# the units whose squeeze can fold, in words (each unit's fold_refusal says why a configuration cannot)
FOLDING_UNITS = (
    "SE with an average squeeze, eSE, ECA, CECA, GC, Gather-Excite over the whole map without a learned gather"
)
FOLDED_UNITS = "_se_inject_folded_units"  # attribute of an optimised model: its units that squeeze through


@torch.compiler.disable
def refresh_folds(model: nn.Module, args: object) -> None:
    """Before each call of an optimised model: every unit whose folded weights changed folds again.

    A forward pre-hook that torch.compile does not trace (the check reads tensors' version counters):
    compiled, the model breaks once at its start, runs this eagerly, and the rest is one graph that
    reads the folded matrices. Eagerly the units trust this check for the rest of the call (see
    :func:`folds_unchecked`); a block called alone checks its units itself.
    """
    for unit in getattr(model, FOLDED_UNITS, ()):
        unit.refresh_fold()
    _mark_checked(model, True)  # no unit checks itself again in this call


@torch.compiler.disable
def folds_unchecked(model: nn.Module, args: object, output: object) -> None:
    """When a call of an optimised model returns or raises: its units check their own folds again when
    called alone (see :class:`~se_inject.units.fold.FoldsChecked`)."""
    _mark_checked(model, False)


def _mark_checked(model: nn.Module, now: bool) -> None:
    """Set the :class:`~se_inject.units.fold.FoldsChecked` that ``model``'s folded units share."""
    units = getattr(model, FOLDED_UNITS, ())
    if units and units[0].folds_checked is not None:
        units[0].folds_checked.now = now


def optimized_units(model: nn.Module) -> list[str]:
    """The names of ``model``'s units that squeeze before their block's last 1x1 conv."""
    return [name for name, m in model.named_modules() if isinstance(m, SqueezeFold) and m.squeezes_through]
