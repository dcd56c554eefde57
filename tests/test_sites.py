import operator

import pytest
import torch
import torch.fx as fx
from tiny_models import TINY_MODELS, FunctionalResNet, InplaceResNet, MethodAddNet, PlainNet, RootResidualNet

from se_inject.sites import add_operands, analyse, is_conv, normalize_inplace_adds
from se_inject.tracing import trace


def _targets(analysis, nodes):
    gm = analysis.gm
    return sorted(n.target for n in nodes if n.op == "call_module" and is_conv(gm, n))


@pytest.mark.parametrize("case", TINY_MODELS, ids=lambda c: c.name)
def test_every_residual_block_is_found_whatever_the_coding_style(case):
    analysis = analyse(case.build(), input_size=32)
    sites = analysis.search.sites
    assert len(sites) == case.blocks
    assert analysis.search.stage_count == case.stages
    assert sum(s.inner is not None for s in sites) == case.spatial_convs
    for site in sites:
        assert any(is_conv(analysis.gm, n) for n in site.branch)
        assert site.branch.isdisjoint(site.shortcut)


def test_branch_and_shortcut_are_told_apart_by_structure():
    analysis = analyse(FunctionalResNet(), input_size=32)
    first, _, downsampling, *_ = analysis.search.sites
    assert _targets(analysis, first.branch) == ["stages.0.0.conv1", "stages.0.0.conv2"]
    assert first.shortcut == frozenset() and first.shortcut_out is first.fork  # identity shortcut
    assert _targets(analysis, downsampling.shortcut) == ["stages.1.0.proj.0"]  # projection: 1x1 conv + BN
    assert downsampling.shortcut_out.target == "stages.1.0.proj.1"
    assert downsampling.branch_out.target == "stages.1.0.bn2"


def test_shortcut_written_first_in_the_sum_is_still_the_shortcut():
    analysis = analyse(RootResidualNet(), input_size=16)
    site = analysis.search.sites[0]
    assert add_operands(site.add)[0] is site.shortcut_out  # x + branch(x)
    assert site.branch_out.target == "a2"


def test_post_is_the_activation_after_the_addition_and_inner_follows_the_spatial_conv():
    analysis = analyse(InplaceResNet(), input_size=32)
    site = analysis.search.sites[0]
    assert site.post.target == "layer1.0.relu"
    assert site.post.all_input_nodes == [site.add]
    # conv2 (the 3x3) -> bn2 -> relu: the unit goes after the activation, before conv3
    assert site.inner.op == "call_module" and site.inner.target == "layer1.0.relu"
    assert [u.target for u in site.inner.users] == ["layer1.0.conv3"]


def test_stages_follow_spatial_size_and_blocks_count_within_a_stage():
    sites = analyse(FunctionalResNet(), input_size=32).search.sites
    assert [(s.stage, s.block, s.size) for s in sites] == [
        (1, 1, (32, 32)), (1, 2, (32, 32)), (2, 1, (16, 16)), (2, 2, (16, 16)), (3, 1, (8, 8)),
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


def test_parallel_branches_are_not_residuals_and_the_census_says_what_was_found():
    search = analyse(PlainNet(), input_size=16).search
    assert search.sites == []
    assert search.census["convolutions"] == 4 and search.census["additions"] == 1
    assert "parallel branches" in search.describe()


def test_adds_of_other_shapes_are_rejected_with_a_reason():
    class BiasAdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bias = torch.nn.Parameter(torch.zeros(4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.bias

    search = analyse(BiasAdd(), input_size=8).search
    assert not search.sites
    assert "4-D feature maps" in search.rejected[0][1]


def test_analysis_leaves_the_model_alone():
    model = FunctionalResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyse(model, input_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and isinstance(analyse(model, 32).gm, fx.GraphModule)
