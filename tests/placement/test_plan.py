import pytest
from tiny_models import FunctionalResNet, MethodAddNet, PlainNet

from se_inject.config import InjectConfig
from se_inject.errors import ConfigError, NoSitesError
from se_inject.placement.plan import plan_units
from se_inject.placement.sites import analyse


@pytest.fixture(scope="module")
def analysis():
    return analyse(FunctionalResNet(), input_size=32)  # stages of 16, 32, 64 channels: 2, 2, 1 blocks


def test_one_unit_per_block_named_by_stage_and_block(analysis):
    plan = plan_units(analysis, InjectConfig(r=4))
    assert [u.qualified_name for u in plan.units] == [
        "stages.0.0.se_1_1",
        "stages.0.1.se_1_2",
        "stages.1.0.se_2_1",
        "stages.1.1.se_2_2",
        "stages.2.0.se_3_1",
    ]
    assert [u.hidden for u in plan.units] == [4, 4, 8, 8, 16]
    assert plan.stage_count == 3 and plan.selected_stages == (1, 2, 3)


def test_stage_selection(analysis):
    plan = plan_units(analysis, InjectConfig(r=4, stages=(2, 3)))
    assert [(u.stage, u.block) for u in plan.units] == [(2, 1), (2, 2), (3, 1)]


@pytest.mark.parametrize(
    "r, stages, expected",
    [
        ((2, 4, 8), None, [2, 2, 4, 4, 8]),  # one r per stage
        ((4, 8), (2, 3), [4, 4, 8]),  # one r per selected stage
        ((2, 4, 8), (1, 3), [2, 2, 8]),  # one per stage, some selected
    ],
)
def test_per_stage_r(analysis, r, stages, expected):
    plan = plan_units(analysis, InjectConfig(r=r, stages=stages))
    assert [u.r for u in plan.units] == expected


def test_wrong_number_of_ratios(analysis):
    with pytest.raises(ConfigError, match=r"^r: got 2 ratios; give one or one per stage \(3\)$"):
        plan_units(analysis, InjectConfig(r=(4, 8)))


def test_stages_out_of_range(analysis):
    with pytest.raises(ConfigError, match="stages: stage 4 does not exist; this model has stages 1-3"):
        plan_units(analysis, InjectConfig(stages=(2, 4)))


def test_r_wider_than_the_channels(analysis):
    with pytest.raises(ConfigError, match=r"r: r=32 is wider than the 16 channels .* stage 1, block 1; use r <= 16"):
        plan_units(analysis, InjectConfig(r=32))
    plan_units(analysis, InjectConfig(r=(16, 32, 64)))  # r == C is allowed: hidden width 1


def test_no_site_for_the_position_says_what_was_found():
    with pytest.raises(
        NoSitesError, match=r"no place for an SE unit at position 'pre' \(rules: residual\): found 4 convolutions"
    ):
        plan_units(analyse(PlainNet(), input_size=16), InjectConfig(position="pre"))


def test_inner_needs_a_spatial_convolution_on_the_branch():
    from torch import nn

    class PointwiseBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            x = self.stem(x)
            return x + self.b(self.a(x))

    analysis = analyse(PointwiseBlocks(), input_size=16)
    with pytest.raises(
        NoSitesError, match="position 'inner' applies to none of the 1 sites found: no 'after_spatial_conv'"
    ):
        plan_units(analysis, InjectConfig(position="inner", r=2))
    assert len(plan_units(analysis, InjectConfig(position="standard", r=2)).units) == 1


def test_owner_is_the_block_even_for_post_and_pre():
    analysis = analyse(MethodAddNet(), input_size=16)
    for position in ("standard", "pre", "post", "identity", "inner"):
        plan = plan_units(analysis, InjectConfig(position=position, r=4))
        assert [u.owner for u in plan.units] == ["blocks.0", "blocks.1", "blocks.2"], position


def test_blocks_chosen_by_name_and_each_pattern_counted(analysis):
    plan = plan_units(analysis, InjectConfig(r=4, include=("stages.1.*", "stages.2.0"), exclude=("stages.1.1",)))
    assert [u.qualified_name for u in plan.units] == ["stages.1.0.se_2_1", "stages.2.0.se_3_1"]
    assert plan.selection == (("include", "stages.1.*", 2), ("include", "stages.2.0", 1), ("exclude", "stages.1.1", 1))
    both = plan_units(analysis, InjectConfig(r=4, include=("stages.*",), stages=(1,)))  # with stages: both apply
    assert [u.module for u in both.units] == ["stages.0.0", "stages.0.1"]


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_pattern_matching_no_block_is_an_error_naming_blocks_that_exist(analysis, option):
    with pytest.raises(ConfigError, match=rf"{option}: 'layer3.\*' matches none of the 5 blocks .*e.g. stages.0.0"):
        plan_units(analysis, InjectConfig(r=4, **{option: ("layer3.*",)}))


def test_widths_from_the_block_input_or_absolute(analysis):
    # FunctionalResNet's downsampling blocks take 16 -> 32 and 32 -> 64 channels
    plan = plan_units(analysis, InjectConfig(r=4, reduce_from="block_input"))
    assert [(u.channels, u.reduced, u.hidden) for u in plan.units] == [
        (16, 16, 4),
        (16, 16, 4),
        (32, 16, 4),
        (32, 32, 8),
        (64, 32, 8),
    ]
    assert {u.hidden for u in plan_units(analysis, InjectConfig(hidden=3)).units} == {3}


def test_units_after_named_modules(analysis):
    plan = plan_units(analysis, InjectConfig(r=4, at=("stages.*.0.bn1", "stages.1.1")))
    assert [(u.qualified_name, u.channels, u.owner) for u in plan.units] == [
        ("stages.0.0.se_1_1", 16, "stages.0.0"),  # held by the block that calls bn1, not inside bn1
        ("stages.1.0.se_2_1", 32, "stages.1.0"),
        ("stages.1.1.se_2_2", 32, "stages.1.1"),  # read by no module of its caller: the block holds it
        ("stages.2.0.se_3_1", 64, "stages.2.0"),
    ]
    assert plan.search.position == "at"


def test_at_names_that_match_nothing_or_no_feature_map_are_errors(analysis):
    with pytest.raises(ConfigError, match=r"at: 'layer1.\*' names no module the forward runs"):
        plan_units(analysis, InjectConfig(at=("layer1.*",)))
    with pytest.raises(ConfigError, match="outputs a feature map"):
        plan_units(analysis, InjectConfig(at=("head",)))


def test_units_after_named_modules_start_as_the_identity_and_run():
    import torch
    from conftest import randomize_batchnorm, randomize_units

    import se_inject

    model = randomize_batchnorm(FunctionalResNet()).eval()
    injected = se_inject.inject(model, r=4, at=["stages.*.0.bn1", "stages.1.1"], input_size=32).eval()
    assert se_inject.check_outputs(model, injected, input_size=32) == 0.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(randomize_units(injected)(x), model(x))


@pytest.mark.parametrize("spec", ["densenet121", "torchvision:densenet121"])
def test_densenet_gets_a_unit_per_dense_layer(zoo, spec):
    """DenseNet-121's 58 dense layers each add 32 channels that every later layer reads: a unit on
    each layer's new features recalibrates them once, for every reader.
    The dense rule finds them by structure; at= names the same places by module."""
    import se_inject

    model = zoo(spec, "meta")
    report = se_inject.report(model, input_size=64)
    assert len(report.sites) == 58 and {u.rule for u in report.sites} == {"dense"}
    assert {u.channels for u in report.sites} == {32} and report.eq5_agrees
    assert report.sites[0].owner == "features.denseblock1.denselayer1"  # each layer holds its unit, at its end
    if spec == "densenet121":  # at= puts units on the same values, held by the blocks that call the layers
        named = se_inject.report(model, at=["features.denseblock*.denselayer*"], input_size=64)
        assert [u.name.rsplit(".", 1)[1] for u in named.sites] == [u.name.rsplit(".", 1)[1] for u in report.sites]
        assert {u.owner for u in named.sites} == {f"features.denseblock{i}" for i in range(1, 5)}


def test_groups_of_blocks_take_their_own_options(analysis):
    config = InjectConfig(
        r=4,
        groups=(
            {"blocks": ["stages.1.*"], "r": 8, "act": "silu"},
            {"blocks": ["stages.1.0", "stages.2.*"], "hidden": 3},
        ),
    )
    plan = plan_units(analysis, config)
    assert [(u.module, u.r, u.hidden) for u in plan.units] == [
        ("stages.0.0", 4, 4),
        ("stages.0.1", 4, 4),
        ("stages.1.0", 8, 4),  # the first group that matches decides
        ("stages.1.1", 8, 4),
        ("stages.2.0", 4, 3),
    ]
    assert plan.units[2].config.act == "silu" and plan.units[0].config is None
    assert ("groups[1]", "stages.2.*", 1) in plan.selection


@pytest.mark.parametrize(
    "groups, message",
    [
        (({"blocks": ["stages.*"], "position": "post"},), r"groups\[0\].position: a group sets r, act"),
        (({"blocks": ["stages.*"]},), r"groups\[0\]: no options"),
        (({"blocks": ["stages.*"], "r": 0},), "r: the reduction ratio must be an integer from 1 to 65536"),
        (({"r": 8},), r"groups\[0\].blocks: expected block name globs"),
        (("layer4.*",), r"groups\[0\]: expected \{'blocks'"),
    ],
)
def test_bad_groups_name_the_group_and_the_field(groups, message):
    with pytest.raises(ConfigError, match=message):
        InjectConfig(groups=groups)


def test_block_ranges_within_stages(analysis):
    plan = plan_units(analysis, InjectConfig(r=4, blocks=("1:2", "2:1-2")))
    assert [(u.stage, u.block) for u in plan.units] == [(1, 2), (2, 1), (2, 2)]
    assert ("blocks", "2:1-2", 2) in plan.selection
    with pytest.raises(ConfigError, match=r"blocks: '3:2-4' matches none of the sites"):
        plan_units(analysis, InjectConfig(r=4, blocks=("3:2-4",)))


@pytest.mark.parametrize("text", ["3", "3-4", "a:1", "2:3-1", "0:1"])
def test_bad_block_ranges(text):
    with pytest.raises(ConfigError, match="blocks: expected STAGE:FIRST-LAST"):
        InjectConfig(blocks=(text,))
