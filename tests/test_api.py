"""The public API end to end: hand-written nets and the ResNet zoo, at every position."""

from collections import Counter

import pytest
import torch
from conftest import assert_unchanged, snapshot
from tiny_models import TINY_MODELS, FunctionalResNet, PlainNet
from torch import nn

import se_inject
from se_inject import POSITIONS

# model spec -> residual blocks (units at every position) and stages
RESNETS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet101": 33,
    "resnet152": 50,
    "resnext50_32x4d": 16,
    "wide_resnet50_2": 16,
    "torchvision:resnet50": 16,
}


def _fwd_bwd_and_preserve(original: nn.Module, injected: nn.Module, size: int) -> None:
    """Shapes unchanged, gradients flow, and (preserve init) eval outputs are bit-exact."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    original_training = original.training
    original.eval()
    with torch.no_grad():
        expected = original(x)
    original.train(original_training)
    injected.eval()
    with torch.no_grad():
        got = injected(x)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"max |diff| = {(got - expected).abs().max()}"
    injected.train()
    injected(x).sum().backward()
    se_grads = [p.grad for n, p in injected.named_parameters() if ".se_" in n or n.startswith("se_")]
    assert se_grads and all(g is not None for g in se_grads)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("case", TINY_MODELS, ids=lambda c: c.name)
def test_hand_written_residual_nets(case, position):
    torch.manual_seed(0)
    model = case.build()
    before = snapshot(model)
    result = se_inject.retrofit(model, position=position, r=4, input_size=32)
    assert len(result.report.sites) == case.blocks
    assert result.report.eq5_agrees and result.report.totals.params_added == result.report.totals.eq5_params
    assert_unchanged(model, before)
    _fwd_bwd_and_preserve(model, result.model, 32)
    assert_unchanged(model, before)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("spec", list(RESNETS))
def test_resnet_zoo_report_on_meta(zoo, spec, position):
    model = zoo(spec, "meta")
    report = se_inject.report(model, position=position, r=16, model_name=spec)
    assert len(report.sites) == RESNETS[spec]
    assert [s.stage for s in report.stages] == [1, 2, 3, 4]
    assert [s.size for s in report.stages] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert report.eq5_agrees
    assert report.totals.params_added == report.totals.eq5_params
    assert report.totals.flops_after > report.totals.flops_before
    assert all(p.is_meta for p in model.parameters())


# the deep ones run the code the others run, block after block: they run with -m slow (their plans are
# checked on the meta device above in the fast suite)
DEEP = ("resnet101", "resnet152", "wide_resnet50_2")


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s in DEEP else s for s in RESNETS])
def test_resnet_zoo_runs_and_preserves_outputs(zoo, spec, position):
    model = zoo(spec, "cpu")
    before = snapshot(model)
    injected = se_inject.inject(model, position=position, r=16, input_size=64)
    assert type(injected) is type(model)
    assert sum(isinstance(m, se_inject.SqueezeExcite) for m in injected.modules()) == RESNETS[spec]
    missing = injected.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing and all(".se_" in k for k in missing)
    _fwd_bwd_and_preserve(model, injected, 64)
    assert_unchanged(model, before)


def test_resnet101_standard_r16_as_in_the_paper(zoo):
    report = se_inject.report(zoo("resnet101", "meta"), position="standard", r=16)
    assert [(s.blocks, s.channels) for s in report.stages] == [(3, 256), (4, 512), (23, 1024), (3, 2048)]
    assert report.totals.params_added == 2 / 16 * sum(n * c * c for n, c in [(3, 256), (4, 512), (23, 1024), (3, 2048)])
    assert report.sites[0].name == "layer1.0.se_1_1" and report.sites[-1].name == "layer4.2.se_4_3"


def test_inner_uses_the_narrower_width(zoo):
    report = se_inject.report(zoo("resnet50", "meta"), position="inner", r=16)
    assert [s.channels for s in report.stages] == [64, 128, 256, 512]


def test_paper_init_changes_outputs_and_preserve_does_not():
    torch.manual_seed(0)
    model = FunctionalResNet().eval()
    x = torch.randn(2, 3, 32, 32)
    paper = se_inject.inject(model, r=4, init="paper", input_size=32).eval()
    assert not torch.allclose(paper(x), model(x))
    gates = [m.gate for m in paper.modules() if isinstance(m, se_inject.SqueezeExcite)]
    assert all(isinstance(g, nn.Sigmoid) for g in gates)


def test_config_object_and_options_combine():
    config = se_inject.InjectConfig(position="post", r=8)
    result = se_inject.retrofit(FunctionalResNet(), config, r=4, input_size=32)
    assert result.config.position == "post" and result.config.r == 4
    assert result.model.se_inject_config == result.config
    assert se_inject.make_config(r=[2, 4, 8]).r == (2, 4, 8)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"position": "middle"}, se_inject.ConfigError, "position"),
        ({"r": 0}, se_inject.ConfigError, "r: "),
        ({"r": 1000}, se_inject.ConfigError, "wider than the 16 channels"),
        ({"stages": [7]}, se_inject.ConfigError, "stage 7 does not exist"),
        ({"ratio": 16}, se_inject.ConfigError, "ratio: not an injection option"),
        ({"input_size": 0}, se_inject.ConfigError, "input_size"),
        ({"input_size": (32, 32, 3)}, se_inject.ConfigError, "input_size"),
    ],
)
def test_bad_options_raise_specific_errors_and_leave_the_model_alone(kwargs, error, message):
    model = FunctionalResNet()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        se_inject.inject(model, **{"input_size": 32, **kwargs})
    assert_unchanged(model, before)


def test_no_sites_and_untraceable_models_raise_specific_errors():
    with pytest.raises(se_inject.NoSitesError, match="found 4 convolutions"):
        se_inject.inject(PlainNet(), position="identity", input_size=16)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x) if x.sum() > 0 else x

    with pytest.raises(se_inject.UntraceableModelError, match="Untraceable itself"):
        se_inject.inject(Untraceable())
    with pytest.raises(TypeError, match="expected an nn.Module"):
        se_inject.inject("resnet50")


# --- every family, on real timm / torchvision models ---------------------------------------------

# spec -> units per rule at the default position (models that already gate their channels: with
# existing="stack"), number of SE-like gates already in the model, and whether it is small enough
# for a real forward/backward in the default suite.
FAMILIES = {
    "inception_v3": ({"inception": 11}, 0, False),
    "inception_v4": ({"inception": 19}, 0, False),
    "inception_resnet_v2": ({"inception": 3, "residual": 40}, 0, False),
    "torchvision:googlenet": ({"inception": 9}, 0, False),
    "torchvision:inception_v3": ({"inception": 11}, 0, False),
    "mobilenetv1_100": ({"depthwise_separable": 13}, 0, True),
    "mobilenetv2_100": ({"inverted_residual": 17}, 0, True),
    # blocks.0.0, a separable block of 16 -> 16 channels, has a linear projection: its unit goes after the depthwise
    "mobilenetv3_large_100": ({"depthwise_separable": 0, "inverted_residual": 7, "residual": 0}, 8, True),
    "torchvision:mnasnet1_0": ({"inverted_residual": 17}, 0, True),
    "torchvision:shufflenet_v2_x1_0": ({"inception": 3, "split_concat": 13}, 0, True),
    "convnext_atto": ({"residual": 12}, 0, True),
    "regnetx_002": ({"residual": 13}, 0, True),
    "legacy_xception": ({"residual": 12}, 0, False),
    "vgg16_bn": ({"plain": 13}, 0, False),
    "torchvision:vgg16_bn": ({"plain": 13}, 0, False),
    "seresnet50": ({"residual": 16}, 16, False),
    "efficientnet_b0": ({"inverted_residual": 16}, 16, True),  # stacked: each block keeps its own placement
    "regnety_002": ({"residual": 13}, 13, True),
    "ecaresnet26t": ({"residual": 8}, 8, False),
}


@pytest.mark.parametrize("spec", list(FAMILIES))
def test_families_on_meta(zoo, spec):
    rules, gates, _ = FAMILIES[spec]
    model = zoo(spec, "meta")
    try:
        report = se_inject.report(model, model_name=spec)
    except se_inject.NoSitesError as err:
        assert gates and "already has an SE-like gate" in str(err) and "existing='stack'" in str(err)
        report = se_inject.report(model, model_name=spec, existing="stack")
    counts = Counter(u.rule for u in report.sites)
    assert {k: counts.get(k, 0) for k in rules} == rules and sum(counts.values()) == sum(rules.values())
    assert len(report.existing_gates) == gates
    # every unit holds exactly the weights of its (rounded) width: Eq. 5 with C/r replaced by the hidden width
    assert report.totals.params_added == sum(2 * u.channels * u.hidden for u in report.sites)


@pytest.mark.parametrize("spec", [s for s, (_, _, small) in FAMILIES.items() if small])
def test_small_family_models_run_and_preserve_outputs(zoo, spec):
    model = zoo(spec, "cpu")
    before = snapshot(model)
    injected = se_inject.inject(model, input_size=64, existing="stack")
    _fwd_bwd_and_preserve(model, injected, 64)
    assert_unchanged(model, before)


# The paper's parameter counts (millions, rounded to 0.1M in the paper; its base is 25.6M).
PAPER_RESNET50_R = {2: 45.7, 4: 35.7, 8: 30.7, 16: 28.1, 32: 26.9}  # Table 10
PAPER_RESNET50_STAGE = {1: 25.6, 2: 25.7, 3: 26.4}  # Table 13, the paper's stages 2-4 are conv2_x-conv4_x


@pytest.mark.parametrize("r", list(PAPER_RESNET50_R))
def test_se_resnet50_parameters_match_the_paper(zoo, r):
    report = se_inject.report(zoo("resnet50", "meta"), r=r)
    assert abs(report.totals.params_after / 1e6 - PAPER_RESNET50_R[r]) <= 0.15


def test_se_by_stage_and_se_3x3_match_the_paper(zoo):
    model = zoo("resnet50", "meta")
    for stage, millions in PAPER_RESNET50_STAGE.items():
        assert abs(se_inject.report(model, stages=[stage]).totals.params_after / 1e6 - millions) <= 0.15
    assert abs(se_inject.report(model, position="inner").totals.params_after / 1e6 - 25.8) <= 0.15  # Table 15


def test_se_mobilenet_matches_the_paper(zoo):
    totals = se_inject.report(zoo("mobilenetv1_100", "meta")).totals  # Table 3: 4.2M -> 4.7M
    assert round(totals.params_before / 1e6, 1) == 4.2 and round(totals.params_after / 1e6, 1) == 4.7


def test_se_vgg16_puts_a_unit_after_every_conv(zoo):
    report = se_inject.report(zoo("vgg16_bn", "meta"))
    assert [u.channels for u in report.sites] == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert report.eq5_agrees


def test_untraceable_module_named_and_the_leaf_option_fixes_it():
    from tiny_models import NetWithUntraceableChild

    model = NetWithUntraceableChild()
    with pytest.raises(
        se_inject.UntraceableModelError, match=r"'body.1' \(DataDependentGate\).*leaf_modules=\['DataDependentGate'\]"
    ):
        se_inject.inject(model, r=4, input_size=16)
    result = se_inject.retrofit(model, r=4, input_size=16, leaf_modules=["DataDependentGate"])
    assert [u.name for u in result.report.sites] == ["se_1_1"]
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(result.model(x), model(x))


def test_input_channels_have_one_owner_for_space_to_depth_stems():
    """tresnet_m rearranges 3 channels into 48 before its first convolution: --check used to feed 48."""
    from se_inject.graph.channels import input_channels

    torch.manual_seed(0)
    model = se_inject.load_model("tresnet_m").eval()
    assert input_channels(model) == 3
    injected = se_inject.inject(model, input_size=32, existing="stack")
    assert se_inject.check_outputs(model, injected, input_size=32) == 0.0
    plain = FunctionalResNet()  # no timm config: the first convolution the forward calls
    assert input_channels(plain) == plain.stem[0].in_channels
