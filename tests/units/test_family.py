"""SE's descendants (ese, eca, ceca, gc, ge, cbam, lcbam) through every part of the machinery:
the identity at insertion at every position, the closed form against the weights added on five
models, the counted FLOPs, each unit against timm's module or its formula, options, save and
load, inspection and pruning."""

from __future__ import annotations

import math

import pytest
import timm.layers as timm_layers
import torch
import torch.nn.functional as F
from conftest import randomize_batchnorm, randomize_units
from tiny_models import DenseNetish, FunctionalResNet, InceptionNet, InplaceResNet, MobileNetV2ish
from torch import nn

import se_inject
from se_inject.errors import ConfigError
from se_inject.units.base import UNITS, ChannelUnit
from se_inject.units.cbam import Cbam, LightCbam
from se_inject.units.eca import CircularEfficientChannelAttention, EfficientChannelAttention, eca_kernel_size
from se_inject.units.ese import EffectiveSE
from se_inject.units.gc import GlobalContext
from se_inject.units.ge import GatherExcite

# every unit, and the variants whose wiring differs (fusions, gathers, fixed kernels)
CASES: list[tuple[str, dict]] = [
    ("se", {}),
    ("ese", {}),
    ("eca", {}),
    ("eca", {"kernel_size": 5}),
    ("ceca", {}),
    ("gc", {}),
    ("gc", {"fusion": "scale"}),
    ("gc", {"fusion": "both", "pooling": "avg"}),
    ("ge", {}),
    ("ge", {"extent": 2, "extra_params": True}),
    ("ge", {"extra_params": True, "mlp": False}),
    ("ge", {"extent": 4, "mlp": True}),
    ("cbam", {}),
    ("lcbam", {}),
]
IDS = [unit + "".join(f"-{k}={v}" for k, v in options.items()) for unit, options in CASES]


def test_every_built_in_unit_is_registered():
    assert {unit for unit, _ in CASES} == set(UNITS)


def _host(build=FunctionalResNet) -> nn.Module:
    torch.manual_seed(0)
    model = build().double().eval()
    return randomize_batchnorm(model, seed=1)


@pytest.mark.parametrize("position", se_inject.POSITIONS)
@pytest.mark.parametrize("unit, options", CASES, ids=IDS)
def test_each_unit_starts_as_the_identity_at_every_position(unit, options, position):
    """Bit for bit in float64 with random BatchNorm statistics; with random unit weights (the start
    switched off) the outputs differ, so a unit wired around nothing could not pass."""
    model = _host()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    injected = se_inject.inject(model, unit=unit, unit_options=options, position=position, r=4, input_size=16)
    injected = injected.double().eval()
    units = [m for m in injected.modules() if isinstance(m, ChannelUnit)]
    assert units and all(isinstance(m, UNITS[unit]) and m.starts_as_identity for m in units)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(injected(x), expected)
        randomize_units(injected)
        assert not torch.allclose(injected(x), expected)


@pytest.mark.parametrize("unit, options", CASES, ids=IDS)
def test_the_published_start_is_not_the_identity_except_gcnets_additive_block(unit, options):
    model = _host()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    injected = se_inject.inject(model, unit=unit, unit_options=options, init="paper", r=4, input_size=16).double()
    additive_gc = unit == "gc" and options.get("fusion", "add") == "add"  # GCNet zeroes the transform's last layer
    with torch.no_grad():
        assert torch.equal(injected.eval()(x), model(x)) == additive_gc


@pytest.mark.parametrize("unit, options", CASES, ids=IDS)
def test_the_zero_start_is_a_zero_last_layer_under_the_published_gate(unit, options):
    """init="zero": every channel gate is exactly sigmoid(0) = 0.5 whatever the input (the third start
    an experiment compares); an additive GC block still adds nothing."""
    model = _host()
    injected = se_inject.inject(model, unit=unit, unit_options=options, init="zero", r=4, input_size=16).double()
    units = [m for m in injected.modules() if isinstance(m, ChannelUnit)]
    assert units and not any(m.starts_as_identity for m in units)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        for unit_module in units:
            if unit_module.channel_gate and unit_module.excitation_shows:
                features = torch.randn(2, unit_module.channels, 16, 16, dtype=torch.float64)
                assert torch.equal(
                    unit_module.excitation(features), torch.full_like(unit_module.excitation(features), 0.5)
                )
        additive_gc = unit == "gc" and options.get("fusion", "add") == "add"
        assert torch.equal(injected.eval()(x), model(x)) == additive_gc


MODELS = [FunctionalResNet, InplaceResNet, InceptionNet, MobileNetV2ish, DenseNetish]


@pytest.mark.parametrize("build", MODELS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("unit, options", CASES, ids=IDS)
def test_the_closed_form_equals_the_weights_added(unit, options, build):
    result = se_inject.retrofit(build(), unit=unit, unit_options=options, r=4, input_size=16)
    totals = result.report.totals
    assert totals.params_added > 0 and totals.eq5_params == totals.params_added
    assert result.report.eq5_agrees
    assert [s.params for s in result.report.sites] == [
        sum(p.numel() for p in result.model.get_submodule(s.name).parameters()) for s in result.report.sites
    ]


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_closed_form_on_resnet50(zoo, unit):
    """On the meta device: ResNet-50's 16 blocks, 256 to 2048 channels (r = 16 divides them all)."""
    result = se_inject.retrofit(zoo("resnet50"), unit=unit, model_name="resnet50")
    assert result.report.eq5_agrees and result.report.totals.params_added > 0


def test_a_rounded_width_is_reported_as_a_disagreement():
    result = se_inject.retrofit(FunctionalResNet(), unit="gc", r=3, input_size=16)  # 8/3, 16/3, ... round down
    assert not result.report.eq5_agrees


def test_ecas_flops_are_its_pooling_its_kernel_and_its_product():
    """Counted by torch's FlopCounter (with se_inject's formulas), unit by unit at batch 1: a read per
    element to pool, 2k per channel for the 1-D conv, one per channel for the preserve gate's 2 * sigmoid,
    a product per element."""
    result = se_inject.retrofit(FunctionalResNet(), unit="eca", position="post", input_size=16)
    for site in result.report.sites:
        c, (h, w) = site.channels, site.size
        k = eca_kernel_size(c)
        assert site.flops == c * h * w + 2 * k * c + c + c * h * w, site.name


def test_gcs_flops_count_the_attention_pooling():
    """The attention conv (2 C per position), the softmax (3 per position), the weighted sum (2 C per
    position), the transform's two 1x1 convs, and the broadcast add (not counted, as additions nowhere are)."""
    result = se_inject.retrofit(FunctionalResNet(), unit="gc", r=4, position="post", input_size=16)
    for site in result.report.sites:
        c, (h, w), hidden = site.channels, site.size, site.hidden
        attention = 2 * c * h * w + 3 * h * w + 2 * c * h * w
        assert site.flops == attention + 2 * c * hidden * 2, site.name  # fusion add: no gate


# --- each unit against timm's module, or against its formula -------------------------------------


def _same_weights(unit: nn.Module, reference: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
        for b in reference.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=generator, dtype=b.dtype) + 0.5)
    unit.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: EffectiveSE(48, init="paper"), lambda: timm_layers.squeeze_excite.EffectiveSEModule(48)),
        (lambda: EfficientChannelAttention(256, init="paper"), lambda: timm_layers.eca.EcaModule(256)),
        (lambda: CircularEfficientChannelAttention(256, init="paper"), lambda: timm_layers.eca.CecaModule(256)),
        (
            lambda: GlobalContext(48, r=8, fusion="both", init="paper"),
            lambda: timm_layers.global_context.GlobalContext(48, fuse_add=True, fuse_scale=True),
        ),
        (lambda: Cbam(48, r=16, bias=False, init="paper"), lambda: timm_layers.cbam.CbamModule(48)),
        (lambda: LightCbam(48, r=16, init="paper"), lambda: timm_layers.cbam.LightCbamModule(48)),
    ],
    ids=["ese", "eca", "ceca", "gc-both", "cbam", "lcbam"],
)
def test_a_unit_computes_what_timms_module_computes(ours, theirs):
    unit, reference = ours().double().eval(), theirs().double().eval()
    _same_weights(unit, reference)
    x = torch.randn(3, unit.channels, 7, 9, dtype=torch.float64)
    residual = torch.randn_like(x)
    with torch.no_grad():
        expected = reference(x)
        assert (unit(x) - expected).abs().max() <= 1e-12
        assert (unit(x, residual) - (expected + residual)).abs().max() <= 1e-12  # fused with the addition


def _ge_reference(ge: GatherExcite, x: torch.Tensor) -> torch.Tensor:
    """The Gather-Excite formula, written out: gather (learned or pooled), MLP, nearest resize, gate."""
    if ge.gather is not None:
        g = x
        for layer in ge.gather:
            g = layer(g)
    elif ge.extent == 0:
        g = x.mean((2, 3), keepdim=True)
    else:
        k = 2 * ge.extent - 1
        g = F.avg_pool2d(x, k, ge.extent, k // 2, count_include_pad=False)
    if ge.mlp is not None:
        g = F.conv2d(torch.relu(F.conv2d(g, ge.mlp.fc1.weight, ge.mlp.fc1.bias)), ge.mlp.fc2.weight, ge.mlp.fc2.bias)
    g = (
        g.expand(-1, -1, *x.shape[2:])
        if g.shape[2:] == (1, 1)
        else g.repeat_interleave(ge.extent, 2).repeat_interleave(ge.extent, 3)
    )
    return x * torch.sigmoid(g[:, :, : x.shape[2], : x.shape[3]])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"extent": 2},
        {"extent": 4, "extra_params": True},
        {"extra_params": True, "mlp": False},
        {"extent": 2, "extra_params": False, "mlp": False},
    ],
)
def test_gather_excite_computes_its_formula(options):
    torch.manual_seed(0)
    ge = GatherExcite(32, r=4, size=(8, 8), init="paper", **options).double().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ge.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.5)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert (ge(x) - _ge_reference(ge, x)).abs().max() <= 1e-12
    assert ge.expected_params() == sum(p.numel() for p in ge.parameters())


def test_eca_kernel_sizes_follow_the_paper():
    # t = int(|log2(C) + 1| / 2), made odd, at least 3 (timm's floor)
    assert [eca_kernel_size(c) for c in (16, 64, 128, 256, 512, 1024, 2048)] == [3, 3, 5, 5, 5, 5, 7]
    assert all(eca_kernel_size(c) == max(3, (t := int((math.log2(c) + 1) / 2)) + (t % 2 == 0)) for c in range(1, 4097))


# --- options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit, options, message",
    [
        ("eca", {"kernel": 3}, r"unit_options.kernel: not an option of this unit; its options are kernel_size"),
        ("eca", {"kernel_size": 4}, r"kernel_size: expected an odd size"),
        ("eca", {"kernel_size": "5"}, r"unit_options.kernel_size: expected int or None, got '5'"),
        ("gc", {"fusion": "mul"}, r"unit_options.fusion: expected one of 'add', 'scale', 'both', got 'mul'"),
        ("ge", {"extent": 3}, r"extent: expected 0 \(global\) or a power of two"),
        ("ge", {"mlp": False}, r"init: the parameter-free Gather-Excite .* has no last layer to start at zero"),
        ("cbam", {"spatial_kernel": 6}, r"spatial_kernel: expected an odd size"),
        ("se", {"kernel_size": 3}, r"unit_options.kernel_size: not an option of this unit; its options are norm"),
    ],
)
def test_bad_unit_options_name_the_field_and_change_nothing(unit, options, message):
    model = FunctionalResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        se_inject.inject(model, unit=unit, unit_options=options, input_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parameter_free_gather_excite_runs_with_the_published_start():
    result = se_inject.retrofit(FunctionalResNet(), unit="ge", unit_options={"mlp": False}, init="paper", input_size=16)
    assert result.report.totals.params_added == 0 == result.report.totals.eq5_params


def test_a_units_published_conventions_are_its_defaults_and_explicit_options_win():
    assert se_inject.make_config(unit="ese").gate == "hard_sigmoid"
    assert se_inject.make_config(unit="ese", gate="sigmoid").gate == "sigmoid"
    assert se_inject.make_config(unit="cbam").bias is True and se_inject.make_config(unit="se").bias is False
    assert se_inject.make_config(se_inject.make_config(r=8), unit="ese").gate == "hard_sigmoid"


# --- save and load, inspection and pruning -----------------------------------------------------------


@pytest.mark.parametrize("unit, options", [("gc", {"fusion": "both"}), ("eca", {"kernel_size": 5}), ("cbam", {})])
def test_units_and_their_options_survive_save_and_load(unit, options, tmp_path):
    model = FunctionalResNet().eval()
    injected = randomize_units(se_inject.inject(model, unit=unit, unit_options=options, r=4, input_size=16))
    se_inject.save(injected, tmp_path / "saved")
    loaded = se_inject.load(tmp_path / "saved", model=FunctionalResNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), injected.eval()(x))
    kinds = {type(m) for m in loaded.modules() if isinstance(m, ChannelUnit)}
    assert kinds == {UNITS[unit]}


def _loader():
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 3, 16, 16, generator=generator), torch.arange(40) % 4
    return DataLoader(TensorDataset(images, labels), batch_size=10)


@pytest.mark.parametrize("unit, options", [("eca", {}), ("ese", {}), ("gc", {"fusion": "scale"}), ("ge", {})])
def test_channel_gates_are_inspected_and_pruned(unit, options):
    from se_inject.inspect.excitation import collect, max_output_change, prune_units

    torch.manual_seed(0)
    model = randomize_units(se_inject.inject(FunctionalResNet(), unit=unit, unit_options=options, r=4, input_size=16))
    report = collect(model, _loader(), ["a", "b", "c", "d"])
    assert len(report.units) == 5 and all(u.kind == unit and u.prunable for u in report.units)
    assert all(u.gate_range == 2.0 for u in report.units)  # the preserve start's 2 * gate
    names = [u.name for u in report.units]
    pruned = prune_units(
        se_inject.inject(FunctionalResNet(), unit=unit, unit_options=options, r=4, input_size=16), report, names
    )
    assert pruned.removed == names and not [m for m in pruned.model.modules() if isinstance(m, ChannelUnit)]
    assert max_output_change(model, pruned.model, _loader()) < float("inf")


def test_cbam_shows_its_channel_gate_and_is_not_pruned():
    from se_inject.inspect.excitation import collect, prune_units

    model = randomize_units(se_inject.inject(FunctionalResNet(), unit="cbam", r=4, input_size=16))
    report = collect(model, _loader(), ["a", "b", "c", "d"])
    assert all("spatial gate" in u.shows and not u.prunable for u in report.units)
    assert report.suggestions(threshold=0.0) == []
    with pytest.raises(ConfigError, match=r"\(cbam\) is not a channel gate alone"):
        prune_units(model, report, [report.units[0].name])


def test_an_additive_gc_block_has_no_gate_to_inspect():
    from se_inject.inspect.excitation import collect

    model = se_inject.inject(FunctionalResNet(), unit="gc", r=4, input_size=16)
    with pytest.raises(ConfigError, match="no units with a readable gate"):
        collect(model, _loader(), ["a", "b", "c", "d"])
