"""Rewriting the model: each unit goes into the smallest module that holds its site.

The user's model is deep-copied first and never touched. In the copy, every module that holds
sites (a residual block, usually) is traced on its own, the units are inserted into that local
graph as named children (``layer1.0.se_1_1``), and the block is replaced by a GraphModule that
keeps all of the block's children, parameters and buffers under their original names. The
model's own class, its other methods and every original state_dict key survive.

The local graph is matched to the whole-model graph node for node (same tracer, same code
path), so the sites found on the whole model translate exactly. Dead-code elimination is never
run: an in-place op would look dead.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from se_inject.config import InjectConfig
from se_inject.errors import RewriteError, SEInjectError, UntraceableModelError
from se_inject.plan import Plan, PlannedUnit
from se_inject.patterns import add_operands, normalize_inplace_adds, owns_its_memory
from se_inject.sites import node_in_scope
from se_inject.tracing import count_flops, trace
from se_inject.unit import SqueezeExcite


def make_unit(unit: PlannedUnit, config: InjectConfig, like: nn.Module) -> SqueezeExcite:
    """The SE module for ``unit``, on the device and in the dtype of ``like``'s parameters."""
    reference = next(like.parameters(), None)
    return SqueezeExcite(
        unit.channels,
        unit.r,
        gate_layer=config.excitation,
        squeeze=config.squeeze,
        bias=config.bias,
        rounding=config.rounding,
        init=config.init,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
    )


def map_nodes(whole: fx.Graph, local: fx.Graph, owner: str) -> dict[fx.Node, fx.Node]:
    """Map the nodes of the whole-model graph created inside ``owner`` onto its local trace.

    Inputs coming from outside ``owner`` map onto the local placeholders.
    """
    outer = [n for n in whole.nodes if n.op not in ("placeholder", "output") and node_in_scope(n, owner)]
    inner = [n for n in local.nodes if n.op not in ("placeholder", "output")]
    if len(outer) != len(inner):
        raise RewriteError(
            f"module '{owner or '<root>'}' traces to {len(inner)} nodes alone but {len(outer)} inside the "
            "model (its forward depends on how it is called, or on train/eval mode): pass it in "
            "leaf_modules to skip it",
            owner,
        )
    prefix = f"{owner}." if owner else ""
    mapping: dict[fx.Node, fx.Node] = {}
    for w, l in zip(outer, inner):
        local_target = prefix + l.target if l.op in ("call_module", "get_attr") else l.target
        if w.op != l.op or w.target != local_target:
            raise RewriteError(f"module '{owner or '<root>'}': node {w.format_node()} has no twin in its own trace", owner)
        mapping[w] = l
        for wi, li in zip(w.all_input_nodes, l.all_input_nodes):
            if mapping.setdefault(wi, li) is not li:  # one value, two local inputs: a defaulted argument
                raise RewriteError(
                    f"module '{owner or '<root>'}' reads {wi.name} through two of its inputs; its forward "
                    "depends on how it is called",
                    owner,
                )
    return mapping


def _insert(graph: fx.Graph, mapping: dict[fx.Node, fx.Node], unit: PlannedUnit) -> None:
    value = mapping[unit.insertion.value]
    anchor = value
    if value.op == "placeholder":  # placeholders must stay first
        anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(anchor):
        se_node = graph.call_module(unit.name, (value,))
    if unit.insertion.consumers is None:
        value.replace_all_uses_with(se_node, delete_user_cb=lambda user: user is not se_node)
    else:
        for consumer in unit.insertion.consumers:
            mapping[consumer].replace_input_with(value, se_node)


def _fuse_with_addition(graph: fx.Graph, name: str) -> None:
    """``se(x) + y`` becomes ``se(x, y)`` (an addcmul in the unit): the same sum, one pass less over memory."""
    (se_node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(se_node.users) != 1:
        return
    add = next(iter(se_node.users))
    operands = add_operands(add)
    plain_add = add.op == "call_function" and add.target in (operator.add, torch.add) or add.op == "call_method"
    if operands is None or not plain_add or add.kwargs or len(add.args) != 2 or operands[0] is operands[1]:
        return
    other = operands[1] if operands[0] is se_node else operands[0]
    with graph.inserting_before(add):
        fused = graph.call_module(name, (se_node.args[0], other))
    fused.meta = dict(se_node.meta)
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    graph.erase_node(se_node)


def _mark_overwritable(gm: fx.GraphModule, name: str, unit: SqueezeExcite) -> None:
    """Let the unit write over its input when that input is memory the unit alone reads."""
    (se_node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    unit.overwrite_input = owns_its_memory(gm, se_node.args[0])


def _graph_module_like(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that owns exactly ``module``'s children, parameters and buffers.

    GraphModule alone copies only what the graph references and flattens containers on the way
    (``downsample.0`` would hang off a bare Module); putting the originals back keeps every
    state_dict key and every container type.
    """
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm._modules = OrderedDict(module.named_children())
    gm._parameters = OrderedDict(module.named_parameters(recurse=False))
    gm._buffers = OrderedDict(module.named_buffers(recurse=False))
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    gm.training = module.training
    return gm


def build_injected(model: nn.Module, whole: fx.GraphModule, plan: Plan, config: InjectConfig) -> nn.Module:
    """A deep copy of ``model`` with every planned unit inserted; ``model`` is never changed."""
    injected = copy.deepcopy(model)
    by_owner: dict[str, list[PlannedUnit]] = defaultdict(list)
    for unit in plan.units:
        by_owner[unit.owner].append(unit)
    for owner, units in by_owner.items():
        module = injected.get_submodule(owner)
        try:  # a block is called with all its arguments: fixing defaulted ones would change it
            local = trace(module, config.leaf_modules, fix_defaults=not owner)
        except UntraceableModelError as err:
            raise RewriteError(f"module '{owner}' cannot be traced on its own: {err}", owner) from err
        normalize_inplace_adds(local.graph)
        mapping = map_nodes(whole.graph, local.graph, owner)
        for unit in units:
            if hasattr(module, unit.name):
                raise RewriteError(
                    f"module '{owner or '<root>'}' already has an attribute '{unit.name}': was this model injected before?"
                )
            se = make_unit(unit, config, module)
            module.add_module(unit.name, se)
            local.add_module(unit.name, se)  # the graph checks call_module targets on its owner
            _insert(local.graph, mapping, unit)
        for unit in units:
            _fuse_with_addition(local.graph, unit.name)
            _mark_overwritable(local, unit.name, module.get_submodule(unit.name))
        local.graph.lint()
        rewritten = _graph_module_like(module, local.graph)
        if owner:
            parent, _, child = owner.rpartition(".")
            setattr(injected.get_submodule(parent), child, rewritten)
        else:
            injected = rewritten
    return injected


def _record_input_shape(seen: dict[str, torch.Size], name: str):
    def hook(module: nn.Module, args: tuple) -> None:  # returning a value would replace the args
        seen.setdefault(name, args[0].shape)

    return hook


def dry_run(injected: nn.Module, plan: Plan, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """Run ``injected`` once on abstract tensors: total FLOPs and each unit's own FLOPs.

    Raises RewriteError if a unit never ran (a unit declared but not on the forward path).
    """
    seen: dict[str, torch.Size] = {}
    handles = []
    for unit in plan.units:
        module = injected.get_submodule(unit.qualified_name)
        handles.append(module.register_forward_pre_hook(_record_input_shape(seen, unit.qualified_name)))
    try:
        total = count_flops(injected, input_shape)
    except SEInjectError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise RewriteError(f"the injected model failed its dry run: {type(err).__name__}: {first}") from err
    finally:
        for handle in handles:
            handle.remove()
    missing = [u.qualified_name for u in plan.units if u.qualified_name not in seen]
    if missing:
        raise RewriteError(f"inserted units never ran in a forward pass: {', '.join(missing)}")
    unit_flops = {
        u.qualified_name: count_flops(injected.get_submodule(u.qualified_name), seen[u.qualified_name])
        for u in plan.units
    }
    return total, unit_flops
