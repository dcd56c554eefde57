"""The units' training path: the gated product's own backward (ChannelScaleAdd) and the squeeze whose
backward is a broadcast view (spatial_mean) give autograd's gradients of the plain unit, in float64, for
every unit that uses them, with and without a residual, NCHW and channels-last, and in an SE-only phase."""

from __future__ import annotations

import pytest
import torch

from se_inject.units import parts
from se_inject.units.base import unit_class
from se_inject.units.parts import ChannelScaleAdd, channel_dots

UNITS = {
    "se": {},
    "se, preserve (2 sigmoid)": {"init": "preserve"},
    "ese": {},
    "eca": {},
    "ceca": {},
    "gc, scale": {"fusion": "scale"},
    "gc, both": {"fusion": "both"},
    "ge": {},
}


def _unit(case: str) -> torch.nn.Module:
    options = dict(UNITS[case])
    init = options.pop("init", "paper")
    torch.manual_seed(0)
    unit = unit_class(case.split(",")[0])(32, 4, init=init, **options).double()
    with torch.no_grad():  # no zero hides a weight's gradient
        for p in unit.parameters():
            p.normal_(0, 0.5)
    return unit


def _grads(unit, x, residual, plain: bool, monkeypatch, product: str = "") -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        if plain:  # autograd's own operations: mean and addcmul
            patch.setattr(parts, "_records_product", lambda x, s: False)
            patch.setattr(parts, "_sums_for_backward", lambda x: False)
        unit.zero_grad()
        inputs = [x] + ([residual] if residual is not None else [])
        for t in inputs:
            t.grad = None
        out = unit(x, residual) if residual is not None else unit(x)
        if not plain:  # the fused product is what ran (GC's "both" adds its context after its own product)
            assert type(out.grad_fn).__name__ == product, out.grad_fn
        out.mul(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in unit.named_parameters() if p.grad is not None}
    grads |= {f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.grad is not None}
    return {"out": out.detach(), **grads}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["alone", "residual"])
@pytest.mark.parametrize("case", list(UNITS))
def test_the_training_path_gives_autograds_gradients(case, with_residual, channels_last, monkeypatch):
    unit = _unit(case)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64, generator=generator)
    residual = torch.randn(3, 32, 5, 7, dtype=torch.float64, generator=generator) if with_residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    if residual is not None:
        residual.requires_grad_(True)
    product = "AddBackward0" if case == "gc, both" else "ChannelScaleAddBackward"
    fused = _grads(unit, x, residual, plain=False, monkeypatch=monkeypatch, product=product)
    reference = _grads(unit, x, residual, plain=True, monkeypatch=monkeypatch)
    assert fused.keys() == reference.keys() and len(fused) > 2
    for name, expected in reference.items():
        torch.testing.assert_close(fused[name], expected, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "chunk_bytes", [1, 5 * 35 * 8, 96 * 35 * 8], ids=["a row at a time", "5 rows", "the whole map, one chunk"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_gates_gradient_sums_every_channel_once_in_chunks(chunk_bytes, channels_last, monkeypatch):
    """channel_dots on the CPU without a graph takes the product a chunk of (sample, channel) rows at a time:
    96 rows of 35 positions in float64, in 96 or 20 chunks (the last of one row), or as one product and its
    sum where the map fits in a chunk; channels-last maps, whose rows are not adjacent, take the product whole
    (no chunk). Every row is summed whole, so the sums are the product map's bit for bit (the seeded figures
    of the guides do not depend on the chunk)."""
    generator = torch.Generator().manual_seed(3)
    grad, x = torch.randn(2, 3, 32, 5, 7, dtype=torch.float64, generator=generator)
    if channels_last:
        grad, x = (t.contiguous(memory_format=torch.channels_last) for t in (grad, x))
    calls, real_sum = [], torch.sum
    monkeypatch.setattr(parts, "DOT_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(torch, "sum", lambda *a, **k: calls.append(a[1]) or real_sum(*a, **k))
    with torch.no_grad():
        dots = channel_dots(grad, x)
    chunks = 0 if channels_last else {1: 96, 5 * 35 * 8: 20, 96 * 35 * 8: 0}[chunk_bytes]
    assert len(calls) == chunks
    assert torch.equal(dots, (grad * x).sum((2, 3)))


def test_an_se_only_phase_trains_the_gate_with_a_frozen_input():
    """x needs no gradient (the backbone is frozen), the gate does: only the gate's gradient is computed."""
    unit = _unit("se")
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    out = unit(x, torch.randn_like(x))
    assert type(out.grad_fn).__name__ == "ChannelScaleAddBackward"
    out.sum().backward()
    assert unit.fc1.weight.grad is not None and unit.fc1.weight.grad.abs().sum() > 0


def test_the_fused_product_passes_gradcheck_and_gradgradcheck():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    s = torch.rand(2, 3, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    residual = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(ChannelScaleAdd.apply, (x, s, residual))
    assert torch.autograd.gradgradcheck(ChannelScaleAdd.apply, (x, s, residual))
    assert torch.autograd.gradcheck(lambda a, b: ChannelScaleAdd.apply(a, b, None), (x, s))
    squeeze = parts.spatial_mean(x)
    torch.testing.assert_close(squeeze, x.mean((2, 3), keepdim=True), rtol=1e-15, atol=0)
    (grad,) = torch.autograd.grad(squeeze.sum(), x)
    assert grad.stride()[2:] == (0, 0)  # a broadcast view: no full map written


def test_under_autocast_the_squeeze_stays_a_mean_in_the_maps_dtype():
    """autocast lists sum among the operations it runs in float32: the squeeze then stays mean, which
    autocast leaves in the map's dtype, so no float32 copy of the map is made."""
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        squeezed = parts.spatial_mean(x)
    assert squeezed.dtype == torch.bfloat16 and type(squeezed.grad_fn).__name__ == "MeanBackward1"
    assert type(parts.spatial_mean(x).grad_fn).__name__ == "MulBackward0"  # outside autocast: the sum
