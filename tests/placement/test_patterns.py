"""Each pattern kind on a small hand-written module; then every family through the whole API."""

from collections import Counter

import pytest
import torch
import torch.fx as fx
from conftest import assert_unchanged, snapshot
from tiny_models import (
    FAMILY_MODELS,
    TINY_MODELS,
    FunctionalResNet,
    InceptionNet,
    PartlyGatedNet,
    SeparableStack,
    ShuffleNetish,
)

import se_inject
from se_inject.graph.ops import normalize_inplace_adds
from se_inject.graph.trace import trace
from se_inject.graph.walk import ancestors, common_fork
from se_inject.placement.existing_gates import find_channel_gates
from se_inject.placement.patterns.base import PATTERNS, register_pattern
from se_inject.placement.sites import analyse


def test_the_registry_refuses_a_name_twice():
    assert set(PATTERNS) == {"residual_add", "branch_concat", "dense_concat", "depthwise", "conv_act", "branch_sum"}
    with pytest.raises(ValueError, match="already registered"):
        register_pattern("depthwise", anchors=(), facts={})(lambda gm, order: [])


@pytest.mark.parametrize("case", FAMILY_MODELS, ids=lambda c: c.name)
def test_every_family_gets_its_units(case):
    torch.manual_seed(0)
    model = case.build()
    before = snapshot(model)
    result = se_inject.retrofit(model, r=4, input_size=32)
    assert dict(Counter(u.rule for u in result.report.sites)) == case.rules
    assert [u.channels for u in result.report.sites] == case.channels
    assert result.report.eq5_agrees
    assert_unchanged(model, before)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    injected = result.model.eval()
    with torch.no_grad():
        assert torch.equal(injected(x), model(x))
    injected.train()
    injected(x).sum().backward()
    assert all(p.grad is not None for n, p in injected.named_parameters() if ".se_" in n)


def _unit_input(model, name):
    owner, _, unit = name.rpartition(".")
    block = model.get_submodule(owner)
    (node,) = [n for n in block.graph.nodes if n.op == "call_module" and n.target == unit]
    return block, node


def test_inception_unit_sits_on_the_concatenation():
    injected = se_inject.inject(InceptionNet(), r=4, input_size=32)
    block, node = _unit_input(injected, "mixed_a.se_1_1")
    assert node.args[0].target is torch.cat and [u.op for u in node.users] == ["output"]
    nested, node = _unit_input(injected, "mixed_c.se_2_2")  # the outer concatenation, not the inner
    assert node.args[0].target is torch.cat and len(node.args[0].args[0]) == 2
    assert [n.target for n in nested.graph.nodes if n.op == "call_module"][-1] == "se_2_2"


def test_separable_unit_follows_the_pointwise_activation():
    injected = se_inject.inject(SeparableStack(), r=4, input_size=32)
    block, node = _unit_input(injected, "blocks.0.1.se_1_1")
    assert node.args[0].target == "2"  # the ReLU of the pointwise conv_bn_relu
    assert se_inject.report(SeparableStack(), position="inner", r=4, input_size=32).sites[0].channels == 16


def test_shufflenet_unit_recalibrates_the_branch_only():
    injected = se_inject.inject(ShuffleNetish(), r=4, input_size=32)
    block, node = _unit_input(injected, "blocks.0.branch.3.se_1_1")  # the branch's last conv_bn_relu
    assert isinstance(block, fx.GraphModule) and node.args[0].target == "2"
    assert [u.op for u in node.users] == ["output"]  # then the concatenation with the untouched half


def test_channel_gates_already_in_the_model_are_found():
    analysis = analyse(PartlyGatedNet(), input_size=16)
    assert [g.name for g in analysis.gates] == ["blocks.0", "blocks.2"]
    gm = analysis.gm
    assert len(find_channel_gates(gm)) == 2


def test_gated_blocks_are_skipped_unless_stacking_is_asked_for():
    model = PartlyGatedNet()
    skipped = se_inject.retrofit(model, r=4, input_size=16)
    assert [u.name for u in skipped.report.sites] == ["blocks.1.se_1_2"]
    assert skipped.report.existing_gates == ("blocks.0", "blocks.2")
    assert any("already recalibrated by the SE-like gate 'blocks.0'" in n for n in skipped.report.notes)
    stacked = se_inject.retrofit(model, r=4, input_size=16, existing="stack")
    assert len(stacked.report.sites) == 3


def test_silu_is_not_mistaken_for_a_gate():
    class SiLUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(y)

    assert find_channel_gates(analyse(SiLUNet(), input_size=16).gm) == []


def _fork_by_definition(nodes, order):
    """The latest common ancestor, from whole ancestor sets (what _fork computes without them)."""
    common = set.intersection(*(ancestors(n) for n in nodes))
    return max(common, key=order.__getitem__) if common else None


JOINED = {
    c.name: c.build for c in FAMILY_MODELS + TINY_MODELS if c.name not in ("depthwise_separable_stack", "vgg_stack")
}


@pytest.mark.parametrize("name", [*JOINED, "resnet50", "dla34", "torchvision:densenet121"])
def test_the_fork_of_every_join_is_the_latest_common_ancestor(name, zoo):
    gm = trace(JOINED[name]() if name in JOINED else zoo(name))
    normalize_inplace_adds(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    joins = [n for n in gm.graph.nodes if len(n.all_input_nodes) > 1]
    assert joins
    for join in joins:
        assert common_fork(join.all_input_nodes, order) is _fork_by_definition(join.all_input_nodes, order), join


def test_a_finder_that_emits_undeclared_facts_is_refused_naming_its_kind():
    from se_inject.errors import RuleError
    from se_inject.placement.patterns.base import Candidate, find_candidates

    def finder(gm, order):
        node = next(n for n in gm.graph.nodes if n.op == "output")
        return [Candidate("sloppy", node, frozenset(), {"here": None}, {"surprise": 1})]

    register_pattern("sloppy", anchors=("here",), facts={"declared": int})(finder)
    try:
        with pytest.raises(RuleError, match="pattern kind 'sloppy': its finder emitted facts \\['surprise'\\]"):
            find_candidates(PATTERNS["sloppy"], trace(FunctionalResNet()), {})
    finally:
        del PATTERNS["sloppy"]
