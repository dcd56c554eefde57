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

import copy

import pytest
import timm
import torch
from conftest import randomize_batchnorm
from torch import nn

import se_inject
from se_inject.units.base import ChannelUnit

# twin -> (style, what the style reproduces)
TWINS = {
    "seresnet18": "timm",  # basic blocks: C/16 rounded to a multiple of 8, bias, ReLU, sigmoid
    "seresnet50": "timm",  # bottlenecks, 256..2048 channels
    "efficientnet_b0": "efficientnet",  # round(C_in / 4) of the block input, SiLU, on the expanded channels
    "mobilenetv3_large_100": "mobilenetv3",  # hard sigmoid, divisible-by-8 widths, SE in 8 of 15 blocks
    "regnety_002": "regnety",  # after the grouped 3x3 conv, round(C_in / 4), ReLU
}
SIZE = 64


def _se_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The twin's SE modules by name: timm's SEModule and EfficientNet's SqueezeExcite."""
    kinds = (timm.layers.SqueezeExcite, timm.models._efficientnet_blocks.SqueezeExcite)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _reduce_expand(se: nn.Module) -> tuple[nn.Conv2d, nn.Conv2d]:
    if hasattr(se, "conv_reduce"):
        return se.conv_reduce, se.conv_expand
    return se.fc1, se.fc2


def _twin_and_plain(name: str) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    twin = timm.create_model(name).double().eval()
    randomize_batchnorm(twin, seed=1)
    se_modules = _se_modules(twin)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for se in se_modules.values():
            for p in se.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    plain = copy.deepcopy(twin)
    for se_name in se_modules:
        plain.set_submodule(se_name, nn.Identity())
    return twin, plain, se_modules


def _retrofit_with_twin_weights(name: str, **options) -> tuple[nn.Module, nn.Module, nn.Module, list[str]]:
    """The twin, its plain sibling and the sibling's retrofit holding the twin's SE weights."""
    twin, plain, se_modules = _twin_and_plain(name)
    blocks = sorted(se_name.rpartition(".")[0] for se_name in se_modules)
    options = {"style": TWINS[name], "include": blocks, "init": "paper", "input_size": SIZE, **options}
    result = se_inject.retrofit(plain, **options)
    injected = result.model.double().eval()
    units = {n: m for n, m in injected.named_modules() if isinstance(m, ChannelUnit)}
    assert sorted(n.rpartition(".")[0] for n in units) == blocks  # one unit in each block that has SE
    with torch.no_grad():
        for unit_name, unit in units.items():
            reduce, expand = _reduce_expand(se_modules[unit_name.rpartition(".")[0] + ".se"])
            assert (unit.hidden, unit.channels) == (reduce.out_channels, reduce.in_channels), unit_name
            unit.fc1.weight.copy_(reduce.weight.flatten(1))
            unit.fc1.bias.copy_(reduce.bias)
            unit.fc2.weight.copy_(expand.weight.flatten(1))
            unit.fc2.bias.copy_(expand.bias)
    assert result.report.totals.params_after == sum(p.numel() for p in twin.parameters())
    return twin, plain, injected, blocks


def _block_outputs(
    model: nn.Module, blocks: list[str], x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(block).register_forward_hook(lambda m, a, out, b=block: outputs.update({b: out}))
        for block in blocks
    ]
    try:
        with torch.no_grad():
            return model(x), outputs
    finally:
        for handle in handles:
            handle.remove()


X = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(TWINS))
def test_the_retrofit_of_the_plain_sibling_is_the_twin(name):
    twin, plain, injected, blocks = _retrofit_with_twin_weights(name)
    expected, twin_blocks = _block_outputs(twin, blocks, X)
    got, injected_blocks = _block_outputs(injected, blocks, X)
    for block in blocks:
        torch.testing.assert_close(injected_blocks[block], twin_blocks[block], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(plain(X), expected)  # the SE modules matter: the comparison could fail


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


def test_a_wrong_width_rule_fails_the_copy():
    with pytest.raises(AssertionError, match=r"s1.b1.se_1_1"):  # regnety_002's SE widths come from the block input
        _retrofit_with_twin_weights("regnety_002", reduce_from="channels")


@pytest.mark.parametrize("style", ["paper", *sorted(set(TWINS.values()))])
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
