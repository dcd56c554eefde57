import json
from fractions import Fraction

import pytest
from tiny_models import FunctionalResNet

import se_inject
from se_inject.surgery.report import eq5_params


def test_eq5_per_unit():
    assert eq5_params(64, 16) == 512
    assert eq5_params(64, 16, bias=True) == 512 + 4 + 64
    assert eq5_params(16, 5) == Fraction(512, 5)


@pytest.fixture(scope="module")
def model():
    return FunctionalResNet()


def _stage_eq5(stage, r):
    """Eq. 5 for one stage, written as the paper does: (2 / r) * N_s * C_s**2."""
    return Fraction(2, r) * stage.blocks * stage.channels**2


@pytest.mark.parametrize("position", se_inject.POSITIONS)
def test_eq5_equals_the_weights_added_exactly(model, position):
    report = se_inject.report(model, position=position, r=4, input_size=32)
    assert report.eq5_agrees
    assert report.totals.params_added == report.totals.eq5_params == sum(s.added_params for s in report.stages)
    assert report.totals.params_after == report.totals.params_before + report.totals.params_added
    if position != "pre":  # pre: the first unit of a stage sees the previous stage's width
        assert [s.eq5_params for s in report.stages] == [_stage_eq5(s, 4) for s in report.stages]


def test_with_bias_eq5_gains_the_bias_terms(model):
    report = se_inject.report(model, r=4, bias=True, input_size=32)
    assert report.eq5_agrees
    bias_terms = sum(u.channels // 4 + u.channels for u in report.sites)
    assert report.totals.params_added == sum(_stage_eq5(s, 4) for s in report.stages) + bias_terms


def test_the_table_of_stages(model):
    report = se_inject.report(model, r=(2, 4, 8), input_size=32)
    rows = [(s.stage, s.size, s.blocks, s.sites, s.channels, s.r) for s in report.stages]
    assert rows == [(1, (32, 32), 2, 2, 16, 2), (2, (16, 16), 2, 2, 32, 4), (3, (8, 8), 1, 1, 64, 8)]
    partial = se_inject.report(model, r=4, stages=[3], input_size=32)
    assert [(s.blocks, s.r, s.added_params) for s in partial.stages] == [(0, None, 0), (0, None, 0), (1, 4, 2048)]
    assert partial.stages[0].flops_after == partial.stages[0].flops_before


def test_pre_position_reports_the_widths_each_unit_sees(model):
    report = se_inject.report(model, position="pre", r=4, input_size=32)
    assert [s.channels for s in report.stages] == [16, [16, 32], 32]


def test_flops_after_add_exactly_what_the_units_cost(model):
    report = se_inject.report(model, r=4, init="paper", input_size=32)
    totals = report.totals
    assert totals.flops_after - totals.flops_before == sum(u.flops for u in report.sites)
    for unit in report.sites:
        hw = unit.size[0] * unit.size[1]
        pooling, scaling, fcs = hw * unit.channels, hw * unit.channels, 2 * 2 * unit.channels * unit.hidden
        assert unit.flops == pooling + fcs + scaling
    for stage in report.stages:
        assert stage.flops_after - stage.flops_before == sum(u.flops for u in report.sites if u.stage == stage.stage)
    assert sum(s.flops_before for s in report.stages) < totals.flops_before  # the stem and head are outside stages
    assert 0 < totals.flops_increase < 0.05


def test_flops_scale_with_the_input_size(model):
    small = se_inject.report(model, r=4, input_size=32).totals.flops_before
    large = se_inject.report(model, r=4, input_size=(64, 64)).totals.flops_before
    assert 3.9 < large / small < 4.1


def test_rounded_widths_make_eq5_disagree_and_the_report_says_so(model):
    report = se_inject.report(model, r=5, input_size=32)  # 16/5, 32/5, 64/5 are not whole
    assert not report.eq5_agrees
    assert report.totals.eq5_params == pytest.approx(2 / 5 * (2 * 16**2 + 2 * 32**2 + 64**2))
    assert report.totals.params_added == 2 * (2 * 16 * 3 + 2 * 32 * 6 + 64 * 12)


def test_json_has_the_documented_shape(model):
    data = json.loads(se_inject.report(model, r=4, input_size=32, model_name="tiny").to_json())
    assert {"model", "position", "r", "sites", "stages", "totals"} <= set(data)
    assert data["model"] == "tiny" and data["position"] == "standard" and data["r"] == 4
    assert {"name", "stage", "block", "channels"} <= set(data["sites"][0])
    assert {"stage", "size", "blocks", "channels", "eq5_params", "added_params", "flops_before", "flops_after"} <= set(
        data["stages"][0]
    )
    assert {"params_before", "params_after", "params_added", "eq5_params", "flops_before", "flops_after"} <= set(
        data["totals"]
    )
    assert data["sites"][0]["name"] == "stages.0.0.se_1_1" and data["eq5_agrees"] is True


@pytest.mark.parametrize(
    "options",
    [
        {"reduce_from": "block_input", "r": 4},
        {"hidden": 5},
        {"style": "timm"},
        {"style": "efficientnet", "bias": False},
    ],
)
def test_eq5_generalised_to_each_width_rule_matches_the_weights_added(options):
    """Eq. 5's 2 C^2 / r becomes 2 C C_in / r when r divides the block input, and 2 C h for an absolute
    width h; timm's widths round C/16 up to 8, so there Eq. 5 and the weights differ, and the report says so."""
    report = se_inject.report(FunctionalResNet(), input_size=32, **options)
    units = report.sites
    bias = options.get("style") == "timm"
    assert report.totals.params_added == sum(2 * u.channels * u.hidden + (u.hidden + u.channels) * bias for u in units)
    assert report.eq5_agrees is (options.get("style") != "timm")


def test_multiply_adds_and_elementwise_work_are_reported_apart(zoo):
    """The paper's GFLOPs are multiply-adds of conv and FC layers: SE's FC layers add one per weight
    (at batch 1, no bias); its pooling and fused scaling add one FLOP per element each, the rest."""
    report = se_inject.report(zoo("resnet50"), model_name="resnet50")
    t = report.totals
    assert t.macs_before == 4_089_184_256  # timm's ResNet-50: 4.1 GMACs at 224x224
    assert t.macs_after - t.macs_before == t.params_added == 2_514_944
    maps = sum(2 * s.channels * s.size[0] * s.size[1] for s in report.sites)
    assert t.elementwise_after - t.elementwise_before == maps
    assert t.flops_after == 2 * t.macs_after + t.elementwise_after
    assert all(s.flops == 2 * s.macs + 2 * s.channels * s.size[0] * s.size[1] for s in report.sites)
    assert {"macs_before", "macs_after", "macs_increase", "elementwise_after"} <= set(report.to_dict()["totals"])
