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
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from se_inject.config import InjectConfig
from se_inject.errors import RewriteError, SEInjectError, UntraceableModelError, first_line
from se_inject.graph.flops import FlopCount, count_flops_by_module
from se_inject.graph.memory import owns_its_memory
from se_inject.graph.ops import add_operands, normalize_inplace_adds
from se_inject.graph.shadow import shadow
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
        unit.config or config,
        reduced=unit.reduced,
        size=unit.insertion.size,
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
    )


@dataclass(frozen=True)
class Mismatch:
    """Why a module's own trace cannot stand in for its part of the whole-model graph."""

    reason: str


def match_nodes(whole: fx.Graph, local: fx.Graph, owner: str, exact: bool = False) -> dict[fx.Node, fx.Node] | Mismatch:
    """Map the nodes of the whole-model graph created inside ``owner`` onto its local trace.

    Inputs coming from outside ``owner`` map onto the local placeholders. ``exact`` also requires
    the same constant arguments and the same values leaving the module, so that ``local`` is known
    to compute what ``owner`` computes in the model even if it was traced from another instance.
    A :class:`Mismatch` says why the two do not correspond.
    """
    where = f"module '{owner or '<root>'}'"
    outer = [n for n in whole.nodes if n.op not in ("placeholder", "output") and node_in_scope(n, owner)]
    inner = [n for n in local.nodes if n.op not in ("placeholder", "output")]
    if len(outer) != len(inner):
        return Mismatch(
            f"{where} traces to {len(inner)} nodes alone but {len(outer)} inside the model (its forward "
            "depends on how it is called, or on train/eval mode)"
        )
    prefix = f"{owner}." if owner else ""
    mapping: dict[fx.Node, fx.Node] = {}
    for w, twin in zip(outer, inner, strict=True):  # equal lengths: checked above
        local_target = prefix + str(twin.target) if twin.op in ("call_module", "get_attr") else twin.target
        if w.op != twin.op or w.target != local_target:
            return Mismatch(f"{where}: node {w.format_node()} has no twin in its own trace")
        mapping[w] = twin
        # same op and target, so the same inputs; a difference is caught by the twin check of that input
        for wi, li in zip(w.all_input_nodes, twin.all_input_nodes, strict=False):
            if mapping.setdefault(wi, li) is not li:  # one value, two local inputs: a defaulted argument
                return Mismatch(
                    f"{where} reads {wi.name} through two of its inputs; its forward depends on how it is called"
                )
    if exact and not _same_computation(outer, mapping, local):
        return Mismatch(f"{where} computes otherwise than the graph given for it")
    return mapping


def _same_computation(outer: list[fx.Node], mapping: dict[fx.Node, fx.Node], local: fx.Graph) -> bool:
    """Whether every mapped node has its twin's arguments, constants included, and the values that
    leave ``outer`` for the rest of the model are exactly those ``local`` returns."""
    for w in outer:
        twin = mapping[w]
        if any(i not in mapping for i in w.all_input_nodes):  # an input the local trace does not have
            return False
        if fx.node.map_arg(w.args, mapping.__getitem__) != twin.args:
            return False
        if fx.node.map_arg(w.kwargs, mapping.__getitem__) != twin.kwargs:
            return False
    inside = set(outer)
    leaving = {mapping[n] for n in outer if any(user not in inside for user in n.users)}
    (output,) = [n for n in local.nodes if n.op == "output"]
    return leaving == set(output.all_input_nodes)


def _copy_graph(graph: fx.Graph, owner: nn.Module, val_map: dict[fx.Node, fx.Node] | None = None) -> fx.Graph:
    copied = fx.Graph(owning_module=owner)  # type: ignore[arg-type]  # any module: see graph.trace
    copied.output(copied.graph_copy(graph, val_map if val_map is not None else {}))
    return copied


@dataclass(frozen=True)
class LocalTrace:
    """A module's graph on its own, and where each of its nodes sits in the whole-model graph."""

    graph: fx.Graph
    mapping: dict[fx.Node, fx.Node]
    traced: nn.Module

    def copy_for(self, module: nn.Module) -> LocalTrace:
        """A copy to rewrite in ``module``, another instance of the traced one (the rewrite edits
        the graph; this trace stays as it was). Tensors that tracing stored on the traced module
        (fx keeps a tensor created in ``forward`` as ``_tensor_constant0``) go along."""
        val_map: dict[fx.Node, fx.Node] = {}
        graph = _copy_graph(self.graph, module, val_map)
        for node in graph.nodes:
            name = str(node.target)
            if node.op == "get_attr" and "." not in name and not hasattr(module, name):
                setattr(module, name, getattr(self.traced, name))
        return LocalTrace(graph, {w: val_map[local] for w, local in self.mapping.items()}, module)


class LocalTraces:
    """Which modules can be rewritten on their own, decided before anything is built.

    A unit lives in the smallest module that holds its site, which needs that module's own trace
    to compute exactly its part of the whole-model graph. :meth:`obstacle` says why not, or None;
    the planner hands the units of such a module to its parent, and the rewrite reuses the traces
    made here. Modules are traced in a shadow of ``model`` of their own: tracing runs a module's
    Python forward, which must not touch the user's model, and stores the tensors a forward
    creates on the traced module, which must not collide with those of the whole-model trace.

    Tracing a block costs more than its size suggests (fx patches every non-traceable function in
    and out again), and the blocks of one class trace to a few graphs (with and without a
    projection shortcut, say): a graph of the same class is reused for another instance when it
    is exactly that instance's computation in the whole graph (``match_nodes(exact=True)``).
    """

    def __init__(self, model: nn.Module, whole: fx.Graph, leaf_modules: Sequence[str] = ()) -> None:
        self._root = shadow(model)
        self._whole = whole
        self._leaf_modules = tuple(leaf_modules)
        self._by_owner: dict[str, LocalTrace | Mismatch] = {}
        self._by_class: dict[type, list[fx.Graph]] = defaultdict(list)

    def obstacle(self, owner: str) -> str | None:
        """Why the module at ``owner`` cannot be rewritten on its own; None when it can."""
        found = self.trace(owner)
        return found.reason if isinstance(found, Mismatch) else None

    def trace(self, owner: str) -> LocalTrace | Mismatch:
        if owner not in self._by_owner:
            self._by_owner[owner] = self._trace(owner)
        return self._by_owner[owner]

    def _trace(self, owner: str) -> LocalTrace | Mismatch:
        module = self._root.get_submodule(owner)
        for candidate in self._by_class[type(module)]:
            graph = _copy_graph(candidate, module)
            mapping = match_nodes(self._whole, graph, owner, exact=True)
            if not isinstance(mapping, Mismatch):
                return LocalTrace(graph, mapping, module)
        try:  # a block is called with all its arguments: fixing defaulted ones would change it
            graph = trace_graph(module, self._leaf_modules, fix_defaults=not owner)
        except UntraceableModelError as err:
            return Mismatch(f"module '{owner}' cannot be traced on its own: {err}")
        normalize_inplace_adds(graph)
        found = match_nodes(self._whole, graph, owner)
        if isinstance(found, Mismatch):
            return found
        self._by_class[type(module)].append(_copy_graph(graph, module))
        return LocalTrace(graph, found, module)


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
    unit = module.get_submodule(name)
    assert isinstance(unit, ChannelUnit) and isinstance(se_node.args[0], fx.Node)
    unit.overwrite_input = owns_its_memory(module, se_node.args[0])


def _graph_module_like(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that owns exactly ``module``'s children, parameters and buffers.

    GraphModule alone copies only what the graph references and flattens containers on the way
    (``downsample.0`` would hang off a bare Module); putting the originals back keeps every
    state_dict key and every container type. A tensor the graph reads that is no buffer of
    ``module`` (a plain tensor attribute, or a constant fx made of a tensor created in ``forward``)
    stays a non-persistent buffer, as GraphModule holds it: the state_dict keys do not change.
    """
    gm = fx.GraphModule(module, graph, type(module).__name__)
    own_buffers: dict[str, torch.Tensor | None] = OrderedDict(module.named_buffers(recurse=False))
    constants = {name: tensor for name, tensor in gm._buffers.items() if name not in own_buffers}
    gm._modules = OrderedDict(module.named_children())
    gm._parameters = OrderedDict(module.named_parameters(recurse=False))
    gm._buffers = own_buffers
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, tensor in constants.items():
        gm.register_buffer(name, tensor, persistent=False)
    gm.training = module.training
    return gm


def build_injected(model: nn.Module, plan: Plan, traces: LocalTraces, config: InjectConfig) -> nn.Module:
    """A deep copy of ``model`` with every planned unit inserted; ``model`` is never changed.

    ``traces`` holds the local graph of every owner in ``plan`` (the planner asked it which
    modules can be rewritten on their own, so each owner here has one).
    """
    injected = copy.deepcopy(model)
    by_owner: dict[str, list[PlannedUnit]] = defaultdict(list)
    for unit in plan.units:
        by_owner[unit.owner].append(unit)
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, module in injected.named_modules(remove_duplicate=False):
        aliases[id(module)].append(name)
    for owner, units in by_owner.items():
        module = injected.get_submodule(owner)
        found = traces.trace(owner)
        if isinstance(found, Mismatch):
            raise RewriteError(f"the plan puts units in a module that cannot hold them: {found.reason}", owner)
        local = found.copy_for(module)
        for unit in units:
            if hasattr(module, unit.name):
                raise RewriteError(
                    f"module '{owner or '<root>'}' already has an attribute '{unit.name}': was this model injected before?"
                )
            module.add_module(unit.name, make_unit(unit, config, module))
            _insert(local.graph, local.mapping, unit)
        for unit in units:
            _fuse_with_addition(local.graph, unit.name)
            _mark_overwritable(module, local.graph, unit.name)
        local.graph.lint()
        rewritten = _graph_module_like(module, local.graph)
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


def dry_run(injected: nn.Module, plan: Plan, input_shape: Sequence[int]) -> tuple[FlopCount, dict[str, FlopCount]]:
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
        raise RewriteError(f"the injected model failed its dry run: {first_line(err, with_type=True)}") from err
    finally:
        for handle in handles:
            handle.remove()
    missing = [u.qualified_name for u in plan.units if u.qualified_name not in seen]
    if missing:
        raise RewriteError(f"inserted units never ran in a forward pass: {', '.join(missing)}")
    nothing = FlopCount(0, 0)
    return total, {u.qualified_name: per_module.get(u.qualified_name, nothing) for u in plan.units}
