"""Twins: timm's hand-built SE networks reproduced by retrofitting their plain siblings.

The plain sibling is the twin with every SE module replaced by ``nn.Identity`` (the network timm
builds without SE). It is retrofitted with the style that names the twin's conventions and with
the blocks that hold SE in the twin selected (``include=``); the twin's SE weights are copied into
the units. BatchNorm statistics and the SE weights are random, the units use the published gate
(``init="paper"``: the preserve gate is scaled, so a wrong start could not pass), and both models
run in float64: every block's output agrees to float64 rounding. A wrong hidden width fails the
copy, a wrong activation, gate, bias or position fails the comparison.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from twin_harness import SIZE, X, scaled_difference, twin_and_plain
from twin_harness import _block_io as _block_inputs_outputs

import se_inject
from se_inject.units.base import ChannelUnit

# twin -> the options that reproduce it from its plain sibling (the blocks come from the twin)
TWINS: dict[str, dict] = {
    "seresnet18": {"style": "timm"},  # basic blocks: C/16 rounded to a multiple of 8, bias, ReLU, sigmoid
    "seresnet50": {"style": "timm"},  # bottlenecks, 256..2048 channels
    "seresnext26d_32x4d": {"style": "timm"},  # grouped 3x3, deep stem
    "seresnet152d": {"style": "timm"},  # 50 blocks, deep stem, average-pool shortcuts
    "seresnet33ts": {"style": "timm", "position": "inner"},  # timm's ByoB blocks put SE after the 3x3
    "legacy_seresnet18": {"bias": True},  # the original SENet code: floor(C/16), bias
    "efficientnet_b0": {"style": "efficientnet"},  # round(C_in / 4) of the block input, SiLU, expanded channels
    # blocks.0.1 is a separable block of 16 -> 16 channels with a skip: its unit is after the depthwise conv
    # (a linear bottleneck), which a rule telling the families apart by widths put on the block's output
    "efficientnet_b1": {"style": "efficientnet"},
    "semnasnet_100": {"style": "efficientnet", "act": "relu"},  # MnasNet's blocks are ReLU blocks
    "mobilenetv3_large_100": {"style": "mobilenetv3"},  # hard sigmoid, divisible-by-8 widths, SE in 8 of 15 blocks
    "regnety_002": {"style": "regnety"},  # after the grouped 3x3 conv, round(C_in / 4), ReLU
    # DarkNet's SE follows the block's first conv (conv + norm + act): "insert after X" with at=
    "sedarknet21": {"style": "timm", "act": "leaky_relu", "at": ["stages.*.blocks.*.conv1"]},
}


def _reduce_expand(se: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d]:
    if hasattr(se, "conv_reduce"):
        return se.conv_reduce, se.conv_expand
    return se.fc1, se.fc2


def _twin_and_plain(name: str) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    return twin_and_plain(lambda: timm.create_model(name))


def _retrofit_with_twin_weights(name: str, **options) -> tuple[nn.Module, nn.Module, nn.Module, list[str]]:
    """The twin, its plain sibling and the sibling's retrofit holding the twin's SE weights."""
    twin, plain, se_modules = _twin_and_plain(name)
    blocks = sorted(se_name.rpartition(".")[0] for se_name in se_modules)
    options = {"include": blocks, "init": "paper", "input_size": SIZE, **TWINS[name], **options}
    result = se_inject.retrofit(plain, **options)
    injected = result.model.double().eval()
    units = {n: m for n, m in injected.named_modules() if isinstance(m, ChannelUnit)}
    assert sorted(n.rpartition(".")[0] for n in units) == blocks  # one unit in each block that has SE
    with torch.no_grad():
        for unit_name, unit in units.items():
            (se,) = [m for n, m in se_modules.items() if n.rpartition(".")[0] == unit_name.rpartition(".")[0]]
            reduce, expand = _reduce_expand(se)
            assert (unit.hidden, unit.channels) == (reduce.out_channels, reduce.in_channels), unit_name
            unit.fc1.weight.copy_(reduce.weight.flatten(1))
            unit.fc1.bias.copy_(reduce.bias)
            unit.fc2.weight.copy_(expand.weight.flatten(1))
            unit.fc2.bias.copy_(expand.bias)
    assert result.report.totals.params_after == sum(p.numel() for p in twin.parameters())
    return twin, plain, injected, blocks


def twin_differences(name: str) -> tuple[float, float, int]:
    """(largest block difference, output difference, blocks): each block of the retrofit run on the
    input the twin's block received (so no earlier rounding reaches it), scaled as scaled_difference."""
    twin, plain, injected, blocks = _retrofit_with_twin_weights(name)
    expected, twin_blocks = _block_inputs_outputs(twin, blocks, X)
    with torch.no_grad():
        got = injected(X)
        per_block = [
            scaled_difference(injected.get_submodule(block)(*args), out) for block, (args, out) in twin_blocks.items()
        ]
        assert not torch.allclose(plain(X), expected)  # the SE modules matter: the comparison could fail
    assert len(per_block) == len(blocks)
    return max(per_block), scaled_difference(got, expected), len(blocks)


# seresnet152d (7 s on 2 cores) runs with -m slow: its deep stem and average-pool shortcuts are
# seresnext26d_32x4d's, its depth the only thing of its own
DEEP = {"seresnet152d"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in TWINS])
def test_the_retrofit_of_the_plain_sibling_is_the_twin(name):
    worst_block, output, _ = twin_differences(name)
    assert worst_block <= 1e-10
    # end to end, float64 rounding is amplified block after block by the random weights (to about 6e-5
    # of the output's scale through seresnet152d's 50 blocks); a misplaced or mis-built unit gives O(1)
    assert output <= 1e-3


@pytest.mark.parametrize(
    "name, wrong",
    [
        ("efficientnet_b0", {"act": "relu"}),  # EfficientNet's SE uses the block's SiLU
        ("mobilenetv3_large_100", {"gate": "sigmoid"}),  # MobileNetV3 gates with the hard sigmoid
        ("regnety_002", {"act": "silu"}),
    ],
)
def test_a_wrong_convention_of_the_same_shape_does_not_pass(name, wrong):
    twin, _, injected, _ = _retrofit_with_twin_weights(name, **wrong)
    with torch.no_grad():
        assert not torch.allclose(injected(X), twin(X), rtol=1e-6, atol=1e-8)


def test_the_plain_sibling_is_timms_plain_model():
    """Removing the SE modules gives the network timm builds without them: regnety_002 is regnetx_002 plus SE."""
    _, plain, _ = _twin_and_plain("regnety_002")
    regnetx = timm.create_model("regnetx_002")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in regnetx.state_dict().items()}


DARKNET_RULE = """
[[rule]]
name = "darknet"
pattern = "residual_add"
priority = 25
description = "DarkNet block: after the branch's first conv and its activation"
positions = { standard = "after_first_conv" }
when = { branch_convs = 2 }
"""


def test_darknet_as_a_rule_of_ones_own(tmp_path):
    """The same placement as at=, by structure: a rule file naming the residual branch's
    after_first_conv anchor for two-conv branches (DarkNet's 1x1 then 3x3)."""
    rule = tmp_path / "darknet.toml"
    rule.write_text(DARKNET_RULE)
    twin, _, injected, blocks = _retrofit_with_twin_weights("sedarknet21", at=(), rules=[str(rule)])
    expected, twin_blocks = _block_inputs_outputs(twin, blocks, X)
    with torch.no_grad():
        for block, (args, out) in twin_blocks.items():
            assert scaled_difference(injected.get_submodule(block)(*args), out) <= 1e-10, block
        assert scaled_difference(injected(X), expected) <= 1e-10


def test_a_wrong_width_rule_fails_the_copy():
    with pytest.raises(AssertionError, match=r"s1.b1.se_1_1"):  # regnety_002's SE widths come from the block input
        _retrofit_with_twin_weights("regnety_002", reduce_from="channels")


@pytest.mark.parametrize("style", ["paper", "timm", "efficientnet", "mobilenetv3", "regnety"])
def test_every_style_starts_as_the_identity(style):
    """The preserve init under each style's act, gate, bias and widths: the model computes exactly
    what it did (float64, random BatchNorm statistics); with the gate's published start it does not."""
    _, model, _ = _twin_and_plain("mobilenetv3_large_100")
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        options = {"style": style, "input_size": SIZE}
        preserved = se_inject.inject(model, **options).eval()
        assert torch.equal(preserved(x), expected)
        published = se_inject.inject(model, init="paper", **options).eval()
        assert not torch.allclose(published(x), expected)
