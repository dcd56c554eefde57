"""The public API end to end: hand-written nets and the ResNet zoo, at every position."""

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


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("spec", list(RESNETS))
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
