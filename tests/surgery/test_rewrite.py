import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import assert_unchanged, randomize_batchnorm, randomize_units, snapshot
from tiny_models import FunctionalResNet, RootResidualNet
from torch import nn

import se_inject
from se_inject.config import InjectConfig
from se_inject.errors import RewriteError
from se_inject.graph.shadow import shadow
from se_inject.placement.plan import plan_units
from se_inject.placement.sites import analyse
from se_inject.surgery.rewrite import LocalTraces, build_injected, dry_run
from se_inject.units.se import SqueezeExcite


def _unit_node(block: fx.GraphModule, name: str) -> fx.Node:
    (node,) = [n for n in block.graph.nodes if n.op == "call_module" and n.target == name]
    return node


def _describe(node: fx.Node) -> str:
    return node.target if node.op in ("call_module", "placeholder", "output") else node.target.__name__


# Where the unit sits in the downsampling block stages.1.0 of FunctionalResNet:
# out = relu(bn1(conv1(x))); out = bn2(conv2(out)); return relu(out + proj(x))
# standard and identity feed the addition: the unit takes the other operand and computes
# residual + x * s itself (one pass over memory), so its users are those of the sum.
PLACEMENT = {
    "standard": ("bn2", ["relu"], "proj.1"),
    "pre": ("x", ["conv1"], None),  # the projection still sees the unscaled input
    "identity": ("proj.1", ["relu"], "bn2"),  # on the projected shortcut
    "post": ("relu", ["output"], None),  # after the activation that follows the addition
    "inner": ("relu", ["conv2"], None),  # after the 3x3 conv, its BN and its activation
}


@pytest.mark.parametrize("position", list(PLACEMENT))
def test_each_position_puts_the_unit_where_the_paper_does(position):
    model = se_inject.inject(FunctionalResNet(), position=position, r=4, input_size=32)
    block = model.stages[1][0]
    assert isinstance(block, fx.GraphModule)
    node = _unit_node(block, "se_2_1")
    source, users, residual = PLACEMENT[position]
    assert _describe(node.args[0]) == source
    assert [_describe(u) for u in node.users] == users
    assert (_describe(node.args[1]) if len(node.args) > 1 else None) == residual
    if position == "post":
        assert _describe(node.args[0].args[0]) == "add"
    if position == "inner":
        assert _describe(node.args[0].args[0]) == "bn1"


def test_the_model_keeps_its_class_methods_and_parameter_names():
    original = FunctionalResNet()
    injected = se_inject.inject(original, r=4, input_size=32)
    assert type(injected) is FunctionalResNet and injected is not original
    assert isinstance(injected.stages[1][0].proj, torch.nn.Sequential)  # containers survive
    result = injected.load_state_dict(original.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        f"{block}.se_{s}_{b}.{fc}.weight"
        for block, s, b in [
            ("stages.0.0", 1, 1),
            ("stages.0.1", 1, 2),
            ("stages.1.0", 2, 1),
            ("stages.1.1", 2, 2),
            ("stages.2.0", 3, 1),
        ]
        for fc in ("fc1", "fc2")
    )
    assert isinstance(injected.get_submodule("stages.1.0.se_2_1"), SqueezeExcite)


def test_the_users_model_is_never_touched_and_shares_no_tensor():
    original = FunctionalResNet()
    original.stages[0].eval()  # a mixed training state must survive too
    before = snapshot(original)
    injected = se_inject.inject(original, position="pre", r=4, input_size=32)
    assert_unchanged(original, before)
    original_ptrs = {t.data_ptr() for t in original.state_dict().values()}
    assert not original_ptrs & {t.data_ptr() for t in injected.state_dict().values()}
    assert injected.stages[0].training is False and injected.stages[1].training is True
    with torch.no_grad():
        injected.stages[0][0].conv1.weight.add_(1.0)
    assert_unchanged(original, before)


def test_a_failed_injection_leaves_the_model_as_it_was():
    injected = se_inject.inject(FunctionalResNet(), r=4, input_size=32)
    before = snapshot(injected)
    with pytest.raises(se_inject.AlreadyInjectedError, match="already holds 5 SE units"):
        se_inject.inject(injected, r=4, input_size=32)
    assert_unchanged(injected, before)
    with pytest.raises(RewriteError, match="already has an attribute 'se_.*': was this model injected before"):
        se_inject.inject(injected, r=4, input_size=32, existing="stack")
    assert_unchanged(injected, before)


def test_residuals_in_the_root_forward_make_a_graph_module_root():
    torch.manual_seed(0)
    original = RootResidualNet().eval()
    result = se_inject.retrofit(original, r=4, input_size=16)
    assert isinstance(result.model, fx.GraphModule)
    assert set(dict(result.model.named_children())) >= {"stem", "a1", "b2", "se_1_1", "se_1_2"}
    assert any("GraphModule" in note for note in result.report.notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(result.model(x), original(x))


def test_dry_run_catches_units_that_never_run():
    model = FunctionalResNet()
    analysis = analyse(model, input_size=32)
    plan = plan_units(analysis, InjectConfig(r=4))
    declared_only = copy.deepcopy(model)
    for unit in plan.units:
        declared_only.get_submodule(unit.owner).add_module(unit.name, SqueezeExcite(unit.channels, unit.r))
    with pytest.raises(RewriteError, match="never ran in a forward pass: stages.0.0.se_1_1"):
        dry_run(declared_only, plan, analysis.input_shape)


def test_units_follow_the_models_device_and_dtype():
    model = FunctionalResNet().to(torch.float64)
    injected = se_inject.inject(model, r=4, input_size=32)
    assert {p.dtype for p in injected.parameters()} == {torch.float64}
    with torch.device("meta"):
        meta_model = FunctionalResNet()
    assert all(p.is_meta for p in se_inject.inject(meta_model, r=4, input_size=32).parameters())


def test_injected_model_trains():
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, init="paper", input_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if ".se_" in n)


class ShortcutBlock(torch.nn.Module):
    """DLA style: ``forward(x, shortcut=None)``, called as ``block(x)`` by its parent."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class Tree(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.tree = torch.nn.Sequential(ShortcutBlock(8), ShortcutBlock(8))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.tree(self.stem(x)).mean((2, 3)))


def test_a_block_that_depends_on_how_it_is_called_hands_its_units_to_its_parent():
    torch.manual_seed(0)
    model = Tree().eval()
    result = se_inject.retrofit(model, r=4, input_size=16)
    assert [u.name for u in result.report.sites] == ["tree.se_1_1", "tree.se_1_2"]
    assert type(result.model) is Tree and isinstance(result.model.tree, fx.GraphModule)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(result.model(x), model(x))


class IdentityShortcutBlock(torch.nn.Module):
    """``relu(branch(x) + shortcut(x))`` with ``shortcut = nn.Identity()``: its output *is* x."""

    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.shortcut = torch.nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.shortcut(x))


@pytest.mark.parametrize("position, writes_over", [("identity", False), ("standard", True), ("post", True)])
def test_inference_writes_over_no_tensor_anything_else_reads(position, writes_over):
    """The unit reuses its input's memory only when that memory is its alone: never the caller's input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(IdentityShortcutBlock(8), IdentityShortcutBlock(8)).eval()
    injected = se_inject.inject(model, position=position, r=2, init="paper", input_size=8)
    units = [m for m in injected.modules() if isinstance(m, SqueezeExcite)]
    assert [u.overwrite_input for u in units] == [writes_over] * 2
    x = torch.randn(2, 8, 8, 8)
    kept = x.clone()
    with torch.no_grad():
        out = injected(x)
    assert torch.equal(x, kept)
    for unit in units:
        unit.overwrite_input = False
    with torch.no_grad():
        assert torch.equal(out, injected(kept))


class ScaledBlock(torch.nn.Module):
    """One class, instances that compute differently: a constant and a flag set per instance."""

    def __init__(self, channels, alpha, pool):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(channels)
        self.alpha, self.pool = alpha, pool

    def forward(self, x):
        out = self.bn(self.conv(x)) * self.alpha  # alpha is a Python float: a constant in the graph
        if self.pool:
            out = F.avg_pool2d(out, 3, 1, 1)
        return F.relu(out + x)


def test_blocks_of_one_class_share_a_trace_only_when_they_compute_the_same(monkeypatch):
    """Six blocks of one class, three different computations: three traces, and each block keeps its own."""
    import se_inject.surgery.rewrite as rewrite

    traced = []
    real_trace_graph = rewrite.trace_graph
    monkeypatch.setattr(
        rewrite, "trace_graph", lambda module, *a, **k: traced.append(module) or real_trace_graph(module, *a, **k)
    )
    torch.manual_seed(0)
    settings = [(1.0, False), (1.0, False), (0.5, False), (1.0, False), (0.5, True), (0.5, False)]
    model = torch.nn.Sequential(*(ScaledBlock(8, alpha, pool) for alpha, pool in settings)).eval()
    for module in model.modules():  # non-trivial statistics, so a wrong constant shows in the output
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    injected = se_inject.inject(model, r=2, input_size=8)
    assert [(m.alpha, m.pool) for m in traced] == [(1.0, False), (0.5, False), (0.5, True)]
    assert all(isinstance(block, fx.GraphModule) for block in injected)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(injected(x), model(x))
    assert all(torch.equal(injected[i](x), model[i](x)) for i in range(len(settings)))


class FlaggedBlock(nn.Module):
    """A residual block whose forward branches on a Python flag its parent passes: traced on its
    own, the flag is a proxy and the branch cannot be decided, so the block cannot hold a unit itself."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if double:
            out = out * 2
        return F.relu(out + x)


class UnflaggedBlock(FlaggedBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class FlaggedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Module()
        self.stage.first = FlaggedBlock(8)
        self.stage.second = UnflaggedBlock(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        # the parent of the blocks is a plain Module whose forward is this one: the root holds the units
        return self.stage.second(self.stage.first(x, double=True))


class ConstantScaleNet(FlaggedNet):
    """The root's forward makes a tensor: fx keeps it on the traced module as ``_tensor_constant0``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) * torch.tensor(0.5)
        return self.stage.second(self.stage.first(x, double=True))


def _flagged_reference(model: nn.Module, units: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The standard position by hand: each block's unit on its residual branch (after the flag's
    doubling), before the addition."""
    x = model.stem(x)
    if isinstance(model, ConstantScaleNet):
        x = x * 0.5
    for block, unit, double in (
        (model.stage.first, units.se_1_1, True),
        (model.stage.second, units.se_1_2, False),
    ):
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        x = F.relu(unit(out * 2 if double else out) + x)
    return x


@pytest.mark.parametrize("make", [FlaggedNet, ConstantScaleNet])
def test_a_block_that_cannot_be_rewritten_alone_hands_its_units_to_its_parent(make):
    torch.manual_seed(0)
    model = randomize_batchnorm(make().double()).eval()
    analysis = analyse(shadow(model), input_size=8)
    traces = LocalTraces(model, analysis.gm.graph)
    assert "cannot be traced on its own" in traces.obstacle("stage.first")
    assert traces.obstacle("stage.second") is None
    plan = plan_units(analysis, InjectConfig(r=2), traces.obstacle)
    # the root holds both: a rewrite of the root replaces its whole forward, nested rewrites included
    assert {u.qualified_name for u in plan.units} == {"se_1_1", "se_1_2"}
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    injected = se_inject.inject(model, r=2).eval()
    torch.testing.assert_close(injected(x), model(x), rtol=0, atol=0)  # preserve: the identity at insertion
    for init in ("preserve", "paper"):  # with units that do something, the wiring shows
        injected = randomize_units(se_inject.inject(model, r=2, init=init)).eval()
        got = injected(x)
        assert not torch.allclose(got, model(x))
        torch.testing.assert_close(got, _flagged_reference(model, injected, x), rtol=1e-12, atol=1e-12)
    assert_unchanged(model, before)


def test_a_plan_naming_an_owner_that_cannot_hold_units_is_refused():
    model = FlaggedNet()
    analysis = analyse(shadow(model), input_size=8)
    traces = LocalTraces(model, analysis.gm.graph)
    plan = plan_units(analysis, InjectConfig(r=2))  # no obstacle check: every block holds its own units
    with pytest.raises(RewriteError, match="cannot hold them: module 'stage.first' cannot be traced on its own"):
        build_injected(model, plan, traces, InjectConfig(r=2))
