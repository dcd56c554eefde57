"""Convolutional Block Attention Module (CBAM) and timm's light variant (LCBAM).

Paper: `CBAM: Convolutional Block Attention Module`, Woo, Park, Lee, Kweon (ECCV 2018),
https://arxiv.org/abs/1807.06521. A channel gate, then a spatial gate: the channel gate is SE's
bottleneck applied to the average- and to the max-pooled map and summed before the gate; the
spatial gate pools across channels (mean and max, two maps), convolves them (7x7 and BatchNorm)
and gates every position. timm's light variant (``lcbam``) averages the two poolings instead of
running the bottleneck twice, and convolves one map.

``init="preserve"`` zeroes the bottleneck's last layer and the spatial BatchNorm's affine terms
and gates with ``2 * sigmoid``: both gates are exactly 1. Inspection shows the channel gate only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from se_inject.units.base import register_unit
from se_inject.units.parts import (
    ConvMlp,
    GatedUnit,
    bottleneck_params,
    gated,
    zeroes_last,
)


@dataclass(frozen=True)
class CbamOptions:
    spatial_kernel: int = field(
        default=7, metadata={"help": "kernel size of the spatial gate's conv (paper: 7)", "range": (1, 63)}
    )

    def __post_init__(self) -> None:
        if self.spatial_kernel < 1 or self.spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel: expected an odd size of at least 1, got {self.spatial_kernel}")


class _ConvNorm(nn.Module):
    """A bias-free conv and its BatchNorm (keys ``conv``, ``bn`` as timm's ``ConvNormAct``)."""

    def __init__(self, in_channels: int, kernel: int, **factory: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel, padding=kernel // 2, bias=False, **factory)
        self.bn = nn.BatchNorm2d(1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _Spatial(nn.Module):
    def __init__(self, in_channels: int, kernel: int, **factory: Any) -> None:
        super().__init__()
        self.conv = _ConvNorm(in_channels, kernel, **factory)


class Cbam(GatedUnit):
    """``y = x * gate(mlp(avg(x)) + mlp(max(x)))``, then ``y * gate(bn(conv([mean_c(y), max_c(y)])))``
    (timm's ``CbamModule`` layout: ``channel.fc1``, ``channel.fc2``, ``spatial.conv``).

    Example::

        >>> Cbam(64, r=16)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    paper = "CBAM, Woo et al., ECCV 2018 (arXiv:1807.06521)"
    Options = CbamOptions
    channel_gate = False  # the spatial gate follows: no per-channel scale stands in for the unit
    excitation_shows = "the channel gate (the spatial gate that follows it is not shown)"
    light = False

    def __init__(
        self,
        channels: int,
        r: int = 16,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        spatial_kernel: int = 7,
        bias: bool = False,
        rounding: str = "floor",
        reduced: int | None = None,
        hidden: int | None = None,
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, r, gate_layer, init, rounding=rounding, reduced=reduced, hidden=hidden)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.channel = ConvMlp(channels, self.hidden, act_layer, bias, **factory)  # keys fc1, fc2 as timm's ChannelAttn
        self.spatial = _Spatial(1 if self.light else 2, spatial_kernel, **factory)
        if zeroes_last(init):
            with torch.no_grad():
                nn.init.zeros_(self.spatial.conv.bn.weight)
                nn.init.zeros_(self.spatial.conv.bn.bias)
            self.channel.zero_last()

    def expected_params(self) -> Fraction:
        """The bottleneck's ``2 C h`` (+ ``h + C`` with bias, ``h = C/r`` unrounded), the spatial conv's
        ``k^2`` per pooled map (two; one for lcbam) and its BatchNorm's 2."""
        h = self.exact_hidden()
        kernel = self.spatial.conv.conv.kernel_size[0]
        maps = 1 if self.light else 2
        return bottleneck_params(self.channels, h, self.channel.fc1.bias is not None) + maps * kernel * kernel + 2

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The channel gate's input: the bottleneck of both poolings (summed), or of their average (light)."""
        avg, peak = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        if self.light:
            return self.channel(0.5 * avg + 0.5 * peak)
        return self.channel(avg) + self.channel(peak)

    def spatial_gate(self, y: torch.Tensor) -> torch.Tensor:
        """The gate of every position of ``y`` (the channel-gated map), (B, 1, H, W)."""
        avg, peak = y.mean(1, keepdim=True), y.amax(1, keepdim=True)
        pooled = 0.5 * avg + 0.5 * peak if self.light else torch.cat([avg, peak], dim=1)
        return self.gate(self.spatial.conv(pooled))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = x * self.excitation(x)
        return gated(y, self.spatial_gate(y), residual, overwrite=True)  # y is the unit's own memory


class LightCbam(Cbam):
    """timm's light CBAM: one bottleneck on the averaged poolings, one pooled map for the spatial conv."""

    paper = "CBAM (arXiv:1807.06521), timm's light variant LightCbamModule"
    light = True


register_unit("cbam", Cbam)
register_unit("lcbam", LightCbam)
