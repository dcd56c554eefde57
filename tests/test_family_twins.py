"""Twins of SE's descendants: timm's networks built with an attention module reproduced by
retrofitting the same network without it.

For every unit timm can put into its ResNets (``block_args=dict(attn_layer=UNIT)``), resnet18 and
resnet50, and for timm's named attention networks, the twin is built, its attention modules and
BatchNorm statistics are randomised (the spatial BatchNorm of CBAM too), and its plain sibling (every
attention module replaced by ``nn.Identity``) is retrofitted with ``unit=``; the twin's attention
weights are loaded into the units by ``load_state_dict(strict=True)`` (a wrong layout or width fails
there) and, in float64, every block of the retrofit computes what the twin's block computes. The units
use their published start (``init="paper"``): a scaled preserve gate could not pass.

timm's own ``ge`` cannot be built in this timm version (GatherExcite passes ``*dd`` positionally into
ConvMlp); GE is checked against its formula in tests/units/test_family.py.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import randomize_batchnorm
from test_twins import SIZE, X, _block_inputs_outputs, scaled_difference
from timm.layers.cbam import CbamModule, LightCbamModule
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.global_context import GlobalContext
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from torch import nn

import se_inject
from se_inject.units.base import ChannelUnit

ATTENTION = (SEModule, EffectiveSEModule, EcaModule, CecaModule, GlobalContext, CbamModule, LightCbamModule)

# timm's attn_layer name -> the unit that reproduces it under the style "timm" (whose entries for gc,
# cbam and lcbam are timm's: r=8 or 16 rounded half up, gc's scale fusion, cbam without bias; ese, eca
# and ceca take their own conventions); "gca" is timm's gc with additive fusion
TIMM_UNITS: dict[str, dict] = {
    "se": {"unit": "se", "style": "timm"},
    "ese": {"unit": "ese", "style": "timm"},  # the unit's conventions: hard sigmoid, bias
    "eca": {"unit": "eca", "style": "timm"},  # adaptive kernel size
    "ceca": {"unit": "ceca", "style": "timm"},
    "gc": {"unit": "gc", "style": "timm"},
    "gca": {"unit": "gc", "style": "timm", "unit_options": {"fusion": "add"}},
    "cbam": {"unit": "cbam", "style": "timm"},
    "lcbam": {"unit": "lcbam", "style": "timm"},
}

# timm's named attention networks -> (their sibling without attention, the options)
NAMED: dict[str, tuple[str, dict]] = {
    "ecaresnet50d": ("resnet50d", TIMM_UNITS["eca"]),
    "eca_resnet33ts": ("resnet33ts", {"unit": "eca", "style": "byobnet"}),  # ByoB: after the 3x3
    "gcresnet33ts": ("resnet33ts", {"unit": "gc", "style": "byobnet"}),  # byobnet's gc entry: timm's gca
    "ese_vovnet19b_dw": ("ese_vovnet19b_dw", {"style": "vovnet"}),  # built again with attn='' as the sibling
}


def _randomized_twin(build) -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    twin = build().double().eval()
    randomize_batchnorm(twin, seed=1)
    attention = {name: m for name, m in twin.named_modules() if isinstance(m, ATTENTION)}
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in attention.values():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3)
    return twin, attention


def _load_twin_weights(unit: ChannelUnit, module: nn.Module) -> None:
    if isinstance(module, SEModule):  # timm's SE holds 1x1 convs where the SE unit holds linear layers
        for mine, theirs in ((unit.fc1, module.fc1), (unit.fc2, module.fc2)):
            mine.weight.copy_(theirs.weight.flatten(1))
            mine.bias.copy_(theirs.bias)
        return
    unit.load_state_dict(module.state_dict(), strict=True)


def compare(twin: nn.Module, attention: dict[str, nn.Module], plain: nn.Module, options: dict) -> tuple[float, float]:
    """(worst block difference, output difference) of the retrofit of ``plain`` holding the twin's weights."""
    blocks = sorted(name.rpartition(".")[0] for name in attention)
    result = se_inject.retrofit(plain, include=blocks, init="paper", input_size=SIZE, **options)
    injected = result.model.double().eval()
    units = {n: m for n, m in injected.named_modules() if isinstance(m, ChannelUnit)}
    assert sorted(n.rpartition(".")[0] for n in units) == blocks  # one unit where the twin has attention
    with torch.no_grad():
        for name, unit in units.items():
            (module,) = [m for n, m in attention.items() if n.rpartition(".")[0] == name.rpartition(".")[0]]
            _load_twin_weights(unit, module)
    assert result.report.totals.params_after == sum(p.numel() for p in twin.parameters())
    assert result.report.eq5_agrees or options.get("style") in ("timm", "byobnet")  # rounded widths
    expected, twin_blocks = _block_inputs_outputs(twin, blocks, X)
    with torch.no_grad():
        per_block = [scaled_difference(injected.get_submodule(b)(*args), out) for b, (args, out) in twin_blocks.items()]
        assert not torch.allclose(plain(X), expected)  # the attention matters: the comparison could fail
        return max(per_block), scaled_difference(injected(X), expected)


def _plain(twin: nn.Module, attention: dict[str, nn.Module]) -> nn.Module:
    plain = copy.deepcopy(twin)
    for name in attention:
        plain.set_submodule(name, nn.Identity())
    return plain


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
@pytest.mark.parametrize("attn", list(TIMM_UNITS))
def test_timms_resnet_with_each_attention_layer_is_the_retrofit_of_the_plain_resnet(model, attn):
    twin, attention = _randomized_twin(lambda: timm.create_model(model, block_args=dict(attn_layer=attn)))
    assert len(attention) == (8 if model == "resnet18" else 16)
    plain = _plain(twin, attention)
    reference = timm.create_model(model)  # the sibling is timm's plain network
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    worst_block, output = compare(twin, attention, plain, TIMM_UNITS[attn])
    assert worst_block <= 1e-10
    assert output <= 1e-6


@pytest.mark.parametrize("name", list(NAMED))
def test_timms_named_attention_networks_are_retrofits_of_their_siblings(name):
    sibling, options = NAMED[name]
    twin, attention = _randomized_twin(lambda: timm.create_model(name))
    assert attention
    plain = _plain(twin, attention)
    reference = timm.create_model(sibling, attn="") if sibling == name else timm.create_model(sibling)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    worst_block, output = compare(twin, attention, plain, options)
    assert worst_block <= 1e-10
    assert output <= 1e-6


@pytest.mark.parametrize("attn, wrong", [("eca", {"position": "post"}), ("cbam", {"unit": "lcbam"})])
def test_a_unit_of_the_right_shape_in_the_wrong_place_or_kind_does_not_pass(attn, wrong):
    """ECA after the residual addition instead of before it; the light CBAM where the twin has CBAM
    (the weights differ in shape: the load refuses them)."""
    twin, attention = _randomized_twin(lambda: timm.create_model("resnet18", block_args=dict(attn_layer=attn)))
    options = {**TIMM_UNITS[attn], **wrong}
    if wrong.get("unit") == "lcbam":
        with pytest.raises(RuntimeError, match="size mismatch"):
            compare(twin, attention, _plain(twin, attention), options)
        return
    worst_block, _ = compare(twin, attention, _plain(twin, attention), options)
    assert worst_block > 1e-3
