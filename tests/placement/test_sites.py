import operator

import pytest
import torch
import torch.fx as fx
from tiny_models import (
    TINY_MODELS,
    FunctionalResNet,
    InplaceResNet,
    MethodAddNet,
    PlainNet,
    RootResidualNet,
)

from se_inject.graph.ops import add_operands, is_conv, normalize_inplace_adds
from se_inject.graph.trace import trace
from se_inject.placement.sites import analyse


def residual_sites(model, size):
    """The residual candidates of ``model``, as the standard position selects them."""
    analysis = analyse(model, input_size=size)
    return analysis, [s for s in analysis.select("standard").sites if s.rule.name == "residual"]


def parts(site):
    """branch/shortcut node sets of a residual site, from its fork and the two operands."""
    return site.candidate.parts


def _targets(analysis, nodes):
    gm = analysis.gm
    return sorted(n.target for n in nodes if n.op == "call_module" and is_conv(gm, n))


@pytest.mark.parametrize("case", TINY_MODELS, ids=lambda c: c.name)
def test_every_residual_block_is_found_whatever_the_coding_style(case):
    analysis = analyse(case.build(), input_size=32)
    search = analysis.select("standard")
    assert len(search.sites) == case.blocks and {s.rule.name for s in search.sites} == {"residual"}
    assert search.stage_count == case.stages
    inner = analysis.select("inner").sites
    assert sum(s.insertion is not None for s in inner) == case.spatial_convs
    for site in search.sites:
        assert site.candidate.facts["branch_convs"] >= 1
        assert any(is_conv(analysis.gm, n) for n in site.region)


def test_branch_and_shortcut_are_told_apart_by_structure():
    analysis, (first, _, downsampling, *_) = residual_sites(FunctionalResNet(), 32)
    assert _targets(analysis, first.region) == ["stages.0.0.conv1", "stages.0.0.conv2"]
    assert parts(first)["shortcut_output"] is parts(first)["fork"]  # identity shortcut
    assert first.candidate.facts == {
        "branch_convs": 2,
        "branch_pointwise_convs": 0,
        "shortcut_convs": 0,
        "branch_nodes": 5,
    }
    assert downsampling.candidate.facts["shortcut_convs"] == 1  # projection: 1x1 conv + BN
    assert parts(downsampling)["shortcut_output"].target == "stages.1.0.proj.1"
    assert parts(downsampling)["branch_output"].target == "stages.1.0.bn2"


def test_shortcut_written_first_in_the_sum_is_still_the_shortcut():
    _, (site, _) = residual_sites(RootResidualNet(), 16)
    assert add_operands(parts(site)["add"])[0] is parts(site)["shortcut_output"]  # x + branch(x)
    assert parts(site)["branch_output"].target == "a2"


def test_post_is_the_activation_after_the_addition_and_inner_follows_the_spatial_conv():
    analysis = analyse(InplaceResNet(), input_size=32)
    post = analysis.select("post").sites[0].insertion.value
    assert post.target == "layer1.0.relu" and add_operands(post.all_input_nodes[0])
    # conv2 (the 3x3) -> bn2 -> relu: the unit goes after the activation, before conv3
    inner = analysis.select("inner").sites[0].insertion.value
    assert inner.op == "call_module" and inner.target == "layer1.0.relu"
    assert [u.target for u in inner.users] == ["layer1.0.conv3"]


def test_stages_follow_spatial_size_and_blocks_count_within_a_stage():
    _, sites = residual_sites(FunctionalResNet(), 32)
    assert [(s.stage, s.block, s.size) for s in sites] == [
        (1, 1, (32, 32)),
        (1, 2, (32, 32)),
        (2, 1, (16, 16)),
        (2, 2, (16, 16)),
        (3, 1, (8, 8)),
    ]


def test_inplace_adds_become_ordinary_adds_and_later_uses_see_the_sum():
    torch.manual_seed(0)
    model = MethodAddNet().eval()
    gm = trace(model)
    in_place = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_"]
    assert len(in_place) == 2 and all(not n.users for n in in_place)  # out.add_(x): result unused
    normalize_inplace_adds(gm.graph)
    gm.recompile()
    assert not [n for n in gm.graph.nodes if n.target in ("add_", operator.iadd)]
    adds = [n for n in gm.graph.nodes if add_operands(n)]
    assert len(adds) == 3 and all(n.users for n in adds)  # every sum now feeds the relu after it
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=0)


def test_parallel_branches_are_not_residuals_and_plain_stacks_fall_back_to_conv_act():
    analysis = analyse(PlainNet(), input_size=16)
    assert not [c for r, c in analysis.matches if r.name == "residual"]
    search = analysis.select("standard")
    assert [s.rule.name for s in search.sites] == ["plain", "plain"]  # c1 and c2 are followed by a relu
    assert search.census["convolutions"] == 4 and search.census["additions"] == 1
    assert analysis.select("pre").sites == []
    assert "found 4 convolutions, 0 depthwise convolutions, 1 additions" in search.describe()


def test_adds_of_other_shapes_are_not_residuals():
    class BiasAdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bias = torch.nn.Parameter(torch.zeros(4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.bias

    analysis = analyse(BiasAdd(), input_size=8)
    assert analysis.census["additions"] == 1 and not analysis.matches


def test_analysis_leaves_the_model_alone():
    model = FunctionalResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyse(model, input_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and isinstance(analyse(model, 32).gm, fx.GraphModule)
