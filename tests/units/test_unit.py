import itertools

import pytest
import torch
from torch import nn

import se_inject
from se_inject.errors import ConfigError
from se_inject.units.se import (
    ScaledSigmoid,
    ShiftedReLU,
    ShiftedTanh,
    SqueezeExcite,
    create_gate,
    hidden_width,
)


@pytest.mark.parametrize(
    "channels, r, rounding, expected",
    [
        (64, 16, "floor", 4),
        (64, 16, "timm_se", 8),  # timm's rounding: breaks Eq. 5, so it is opt-in
        (100, 16, "floor", 6),
        (100, 16, "round", 6),
        (100, 16, "ceil", 7),
        (104, 16, "round", 7),  # 6.5 rounds half up
        (10, 16, "floor", 1),  # never below 1
        (10, 16, "round", 1),
        (3, 4, "ceil", 1),
        (2048, 16, "floor", 128),
        (2048, 16, "timm_se", 128),
        (144, 16, "timm_se", 8),  # timm's SEModule: the nearest multiple of 8
        (144, 16, "divisible8", 16),  # make_divisible's 90% rule (MobileNetV3) lifts it to 16
        (104, 16, "round_even", 6),  # 6.5: Python's round, as EfficientNet's and RegNetY's SE
        (120, 16, "round_even", 8),  # 7.5
    ],
)
def test_hidden_width_rules(channels, r, rounding, expected):
    assert hidden_width(channels, r, rounding) == expected


def test_widths_are_those_of_timms_own_rules_for_every_channel_count():
    """Each named rounding is the rule of the network it names, checked against timm's functions."""
    from timm.layers import make_divisible

    for r in (2, 3, 4, 8, 16, 32):
        for channels in range(1, 1025):
            assert hidden_width(channels, r, "timm_se") == make_divisible(channels * (1 / r), 8, round_limit=0.0)
            assert hidden_width(channels, r, "divisible8") == make_divisible(channels / r, 8)  # round_channels
            assert hidden_width(channels, r, "round_even") == max(1, round(channels * (1 / r)))
            assert hidden_width(channels, r, "divisible4") == make_divisible(channels / r, 4)  # GhostNet's SE
            assert hidden_width(channels, r, "floor_min64") == max(channels // r, 64)  # TResNet's SE
    for channels in range(12, 4097):  # ReXNet: make_divisible(int(C * se_ratio), 1) with se_ratio 1/12
        assert hidden_width(channels, 12, "floor") == make_divisible(int(channels * (1 / 12)), 1)


def test_the_old_rounding_name_is_read_as_what_it_computed():
    with pytest.warns(DeprecationWarning, match="now called 'divisible8'"):
        config = se_inject.InjectConfig(rounding="multiple8")
    assert config.rounding == "divisible8"


def test_hidden_width_refuses_unknown_rounding():
    with pytest.raises(ConfigError, match="rounding"):
        hidden_width(64, 16, "nearest")


def _paper_excitation(se: SqueezeExcite, x: torch.Tensor, pool, gate) -> torch.Tensor:
    """Eq. 2-4 written out with the unit's own weights."""
    z = pool(x)
    s = gate(torch.relu(z @ se.fc1.weight.T) @ se.fc2.weight.T)
    return x * s[:, :, None, None]


@pytest.mark.parametrize("squeeze, pool", [("avg", lambda x: x.mean((2, 3))), ("max", lambda x: x.amax((2, 3)))])
@pytest.mark.parametrize("excitation, gate", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("relu", torch.relu)])
def test_paper_init_computes_eq2_to_eq4(squeeze, pool, excitation, gate):
    torch.manual_seed(0)
    se = SqueezeExcite(32, r=4, gate_layer=excitation, squeeze=squeeze, init="paper")
    x = torch.randn(2, 32, 5, 7)
    torch.testing.assert_close(se(x), _paper_excitation(se, x, pool, gate))
    assert se.fc2.weight.abs().sum() > 0


def test_paper_sigmoid_gate_is_strictly_between_0_and_1():
    se = SqueezeExcite(16, r=4, init="paper")
    gate = se.excitation(torch.randn(3, 16, 4, 4))
    assert gate.shape == (3, 16, 1, 1)
    assert bool(((gate > 0) & (gate < 1)).all())


@pytest.mark.parametrize(
    "squeeze, excitation, bias",
    list(itertools.product(["avg", "max", "none"], ["sigmoid", "hard_sigmoid", "tanh", "relu"], [False, True])),
)
def test_preserve_init_is_the_exact_identity(squeeze, excitation, bias):
    torch.manual_seed(0)
    se = SqueezeExcite(24, r=4, gate_layer=excitation, squeeze=squeeze, bias=bias, init="preserve")
    x = torch.randn(2, 24, 6, 6) * 100
    assert torch.equal(se(x), x)
    # it is not a dead unit: the first layer is initialised and the gradient reaches the last one
    assert se.fc1.weight.abs().sum() > 0
    se(x).square().sum().backward()
    assert se.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("squeeze", ["avg", "max", "none"])
def test_weights_are_those_of_eq5(bias, squeeze):
    se = SqueezeExcite(64, r=16, squeeze=squeeze, bias=bias)
    expected = 2 * 64 * 64 // 16 + (64 // 16 + 64 if bias else 0)
    assert sum(p.numel() for p in se.parameters()) == expected


def test_no_squeeze_gates_every_position_with_1x1_convolutions():
    torch.manual_seed(0)
    se = SqueezeExcite(16, r=4, squeeze="none", init="paper")
    assert isinstance(se.fc1, nn.Conv2d) and se.fc1.kernel_size == (1, 1)
    assert se.fc1.out_channels == 4 and se.fc2.out_channels == 16
    x = torch.randn(2, 16, 5, 5)
    gate = se.excitation(x)
    assert gate.shape == x.shape  # per position, no global information
    shifted = x.clone()
    shifted[:, :, 0, 0] += 10.0  # changing one position changes the gate only there
    changed = (se.excitation(shifted) != gate).any(1)
    assert changed[:, 0, 0].all() and not changed[:, 1:, :].any() and not changed[:, 0, 1:].any()


def test_gates_equal_one_at_zero():
    for gate in (ScaledSigmoid(), ShiftedTanh(), ShiftedReLU()):
        assert float(gate(torch.zeros(1))) == 1.0


def test_create_gate_from_name_and_class():
    assert isinstance(create_gate("tanh", preserve=False), nn.Tanh)
    assert isinstance(create_gate("tanh", preserve=True), ShiftedTanh)
    assert isinstance(create_gate(nn.Hardsigmoid, preserve=False), nn.Hardsigmoid)
    with pytest.raises(ConfigError, match="must equal 1"):
        create_gate(nn.Sigmoid, preserve=True)  # sigmoid(0) = 0.5 would halve every channel
    with pytest.raises(ConfigError, match="gate"):
        create_gate("softmax", preserve=False)
    with pytest.raises(ConfigError, match="gate"):
        create_gate(42, preserve=False)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"squeeze": "sum"}, "squeeze"), ({"init": "zeros"}, "init"), ({"r": 0}, "r"), ({"rounding": "up"}, "rounding")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SqueezeExcite(16, **kwargs)


def test_device_and_dtype_are_honoured():
    se = SqueezeExcite(32, r=8, device="meta", dtype=torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in se.parameters())
    assert "hidden=4" in repr(se)


@pytest.mark.parametrize("init", ["paper", "preserve"])
def test_the_fused_residual_form_computes_the_same_sum(init):
    torch.manual_seed(0)
    se = SqueezeExcite(32, r=4, init=init)
    x, residual = torch.randn(2, 32, 7, 7), torch.randn(2, 32, 7, 7)
    fused, plain = se(x, residual), se(x) + residual
    if init == "preserve":
        assert torch.equal(fused, plain) and torch.equal(fused, x + residual)
    else:
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)  # one rounding (fma) instead of two
    cl = x.contiguous(memory_format=torch.channels_last)
    assert se(cl, residual.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("with_residual", [False, True])
def test_writing_over_the_input_only_when_autograd_records_nothing(with_residual):
    """An SE-only training phase: the backbone's features need no gradient, the unit's weights do."""
    torch.manual_seed(0)
    se = SqueezeExcite(16, r=4, init="paper")
    se.overwrite_input = True
    x, residual = torch.randn(2, 16, 5, 5), (torch.randn(2, 16, 5, 5) if with_residual else None)
    expected = se(x.clone()) if residual is None else se(x.clone()) + residual
    kept = x.clone()
    out = se(x, residual)  # grad enabled, the weights require grad: x must be left alone
    assert torch.equal(x, kept)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert se.fc1.weight.grad is not None
    with torch.no_grad():
        out = se(x, residual)
    assert out.data_ptr() == x.data_ptr()  # inference reuses the input's memory
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_writing_over_the_input_never_narrows_the_result():
    """Under autocast the residual can be wider than the unit's input: the sum keeps its width."""
    torch.manual_seed(0)
    se = SqueezeExcite(16, r=4, init="paper").to(torch.bfloat16)
    se.overwrite_input = True
    x, residual = torch.randn(2, 16, 5, 5, dtype=torch.bfloat16), torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        out = se(x.clone(), residual)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.addcmul(residual, x, se.excitation(x)))


@pytest.mark.parametrize(
    "x_format, residual_format",
    [
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
        (torch.channels_last, torch.channels_last),
    ],
)
def test_writing_over_the_input_keeps_the_layout_the_sum_would_have(x_format, residual_format):
    """``residual + x`` takes the residual's strides; written into ``x`` in another layout, the same
    values would reach the next layers in a layout whose kernels round otherwise (CoAtNet)."""
    torch.manual_seed(0)
    se = SqueezeExcite(16, r=4)  # preserve: the sum is exactly residual + x
    se.overwrite_input = True
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=x_format)
    residual = torch.randn(2, 16, 5, 5).contiguous(memory_format=residual_format)
    expected = residual + x
    with torch.no_grad():
        out = se(x, residual)
    assert torch.equal(out, expected) and out.stride() == expected.stride()
    assert (out.data_ptr() == x.data_ptr()) == (x_format == residual_format)
