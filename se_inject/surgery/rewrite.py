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
from se_inject.graph.abstract import shadow
from se_inject.graph.flops import count_flops_by_module
from se_inject.graph.memory import owns_its_memory
from se_inject.graph.ops import add_operands, normalize_inplace_adds
from se_inject.graph.trace import trace_graph
from se_inject.placement.plan import Plan, PlannedUnit
from se_inject.placement.sites import node_in_scope
from se_inject.units.base import ChannelUnit, unit_class


def make_unit(unit: PlannedUnit, config: InjectConfig, like: nn.Module) -> ChannelUnit:
    """The unit ``config.unit`` names for ``unit``, on the device and in the dtype of ``like``'s parameters."""
    reference = next(like.parameters(), None)
    return unit_class(config.unit).from_config(
        unit.channels,
        unit.r,
        config,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
    )


def map_nodes(whole: fx.Graph, local: fx.Graph, owner: str, exact: bool = False) -> dict[fx.Node, fx.Node]:
    """Map the nodes of the whole-model graph created inside ``owner`` onto its local trace.

    Inputs coming from outside ``owner`` map onto the local placeholders. ``exact`` also requires
    the same constant arguments and the same values leaving the module, so that ``local`` is known
    to compute what ``owner`` computes in the model even if it was traced from another instance.
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
    for w, twin in zip(outer, inner, strict=True):  # equal lengths: checked above
        local_target = prefix + twin.target if twin.op in ("call_module", "get_attr") else twin.target
        if w.op != twin.op or w.target != local_target:
            raise RewriteError(
                f"module '{owner or '<root>'}': node {w.format_node()} has no twin in its own trace", owner
            )
        mapping[w] = twin
        # same op and target, so the same inputs; a difference is caught by the twin check of that input
        for wi, li in zip(w.all_input_nodes, twin.all_input_nodes, strict=False):
            if mapping.setdefault(wi, li) is not li:  # one value, two local inputs: a defaulted argument
                raise RewriteError(
                    f"module '{owner or '<root>'}' reads {wi.name} through two of its inputs; its forward "
                    "depends on how it is called",
                    owner,
                )
    if exact and not _same_computation(outer, mapping, local):
        raise RewriteError(f"module '{owner or '<root>'}' computes otherwise than the graph given for it", owner)
    return mapping


def _same_computation(outer: list[fx.Node], mapping: dict[fx.Node, fx.Node], local: fx.Graph) -> bool:
    """Whether every mapped node has its twin's arguments, constants included, and the values that
    leave ``outer`` for the rest of the model are exactly those ``local`` returns."""
    for w in outer:
        twin = mapping[w]
        if fx.node.map_arg(w.args, mapping.__getitem__) != twin.args:
            return False
        if fx.node.map_arg(w.kwargs, mapping.__getitem__) != twin.kwargs:
            return False
    inside = set(outer)
    leaving = {mapping[n] for n in outer if any(user not in inside for user in n.users)}
    (output,) = [n for n in local.nodes if n.op == "output"]
    return leaving == set(output.all_input_nodes)


def _copy_graph(graph: fx.Graph, owner: nn.Module) -> fx.Graph:
    copied = fx.Graph(owning_module=owner)
    copied.output(copied.graph_copy(graph, {}))
    return copied


def local_graph(
    module: nn.Module, owner: str, whole: fx.Graph, config: InjectConfig, traced: dict[type, list[fx.Graph]]
) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """The graph of ``module`` (at ``owner``) on its own, and the map of its nodes in ``whole``.

    Tracing a block costs more than its size suggests (fx patches every non-traceable function
    in and out again), and the blocks of one class trace to a few graphs (with and without a
    projection shortcut, say): ``traced`` keeps the graphs of each class, and one is reused for
    another instance when it is exactly that instance's computation in ``whole`` (see
    ``map_nodes(exact=True)``); otherwise the instance is traced itself.
    """
    for candidate in traced.get(type(module), []):
        graph = _copy_graph(candidate, module)
        try:
            return graph, map_nodes(whole, graph, owner, exact=True)
        except RewriteError:
            continue
    try:  # a block is called with all its arguments: fixing defaulted ones would change it
        graph = trace_graph(module, config.leaf_modules, fix_defaults=not owner)
    except UntraceableModelError as err:
        raise RewriteError(f"module '{owner}' cannot be traced on its own: {err}", owner) from err
    normalize_inplace_adds(graph)
    mapping = map_nodes(whole, graph, owner)
    traced.setdefault(type(module), []).append(_copy_graph(graph, module))
    return graph, mapping


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


def _mark_overwritable(module: nn.Module, graph: fx.Graph, name: str) -> None:
    """Let the unit write over its input when that input is memory the unit alone reads."""
    (se_node,) = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    module.get_submodule(name).overwrite_input = owns_its_memory(module, se_node.args[0])


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
    traced: dict[type, list[fx.Graph]] = {}
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, module in injected.named_modules(remove_duplicate=False):
        aliases[id(module)].append(name)
    for owner, units in by_owner.items():
        module = injected.get_submodule(owner)
        local, mapping = local_graph(module, owner, whole.graph, config, traced)
        for unit in units:
            if hasattr(module, unit.name):
                raise RewriteError(
                    f"module '{owner or '<root>'}' already has an attribute '{unit.name}': was this model injected before?"
                )
            module.add_module(unit.name, make_unit(unit, config, module))
            _insert(local, mapping, unit)
        for unit in units:
            _fuse_with_addition(local, unit.name)
            _mark_overwritable(module, local, unit.name)
        local.lint()
        rewritten = _graph_module_like(module, local)
        if owner:
            for alias in aliases.get(id(module), [owner]):  # a block registered under several names stays one block
                injected.set_submodule(alias, rewritten)
        else:
            injected = rewritten
    return injected


def _record_call(seen: set[str], name: str):
    def hook(module: nn.Module, args: tuple) -> None:  # returning a value would replace the args
        seen.add(name)

    return hook


def dry_run(injected: nn.Module, plan: Plan, input_shape: Sequence[int]) -> tuple[int, dict[str, int]]:
    """Run ``injected`` once on abstract tensors: total FLOPs and each unit's own FLOPs (what it
    computes inside the model: a unit fused with an addition counts the fused product).

    Raises RewriteError if a unit never ran (a unit declared but not on the forward path).
    """
    seen: set[str] = set()
    handles = []
    injected = shadow(injected)  # the result is returned unrun: no user hook or counter of it fires here
    for unit in plan.units:
        module = injected.get_submodule(unit.qualified_name)
        handles.append(module.register_forward_pre_hook(_record_call(seen, unit.qualified_name)))
    try:
        total, per_module = count_flops_by_module(injected, input_shape)
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
    return total, {u.qualified_name: per_module.get(u.qualified_name, 0) for u in plan.units}
