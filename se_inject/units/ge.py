"""Gather-Excite (GE).

Paper: `Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks`, Hu, Shen, Albanie,
Sun, Vedaldi (NeurIPS 2018), https://arxiv.org/abs/1810.12348. A gather operator aggregates each
channel over a spatial extent (``extent=0``: the whole map, as SE; ``e``: windows covering about
``2e - 1`` positions at stride ``e``); an excite operator resizes the result back to the map (nearest)
and gates ``x`` with it. The variants:

- GE-θ⁻ (``extra_params=false, mlp=false``): average pooling, no parameters;
- GE-θ (``extra_params=true``): the gather is learned, depthwise convolutions with BatchNorm
  (one over the whole map for ``extent=0``, else ``log2(e)`` stride-2 3x3 convolutions);
- ``mlp=true`` (timm's default, GE-θ⁺ with a learned gather): an SE-like 1x1 bottleneck follows the gather.

``init="preserve"`` zeroes the last learned layer (the MLP's, else the gather's last BatchNorm) and
gates with ``2 * sigmoid``. GE-θ⁻ has no parameter to start from: it cannot start as the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.errors import ConfigError
from se_inject.units.base import register_unit
from se_inject.units.fold import FoldingGatedUnit
from se_inject.units.parts import (
    ConvMlp,
    bottleneck_params,
    create_act,
    spatial_mean,
    zeroes_last,
)

if TYPE_CHECKING:
    from se_inject.config import InjectConfig


MAX_GATHER_POSITIONS = 1 << 16  # a learned global gather's kernel (one weight per position and channel)


@dataclass(frozen=True)
class GatherExciteOptions:
    extent: int = field(
        default=0,
        metadata={
            "help": "gather extent: 0 for the whole map, or 2, 4, 8, ... up to 256 (windows at that stride)",
            "range": (0, 256),
        },
    )
    extra_params: bool = field(
        default=False, metadata={"help": "learn the gather: depthwise convolutions with BatchNorm (GE-theta)"}
    )
    mlp: bool = field(default=True, metadata={"help": "an SE-like 1x1 bottleneck after the gather (timm's default)"})

    def __post_init__(self) -> None:
        if self.extent < 0 or self.extent and (self.extent & (self.extent - 1) or self.extent < 2):
            raise ValueError(f"extent: expected 0 (global) or a power of two from 2, got {self.extent}")

    def check_start(self, init: str) -> None:
        """GE-theta-minus (no gather parameters, no MLP) has no last layer for ``init`` to start at zero."""
        if zeroes_last(init) and not (self.extra_params or self.mlp):
            raise ConfigError(
                f"init: the parameter-free Gather-Excite (extra_params=false, mlp=false) has no last layer to start "
                f"at zero (init={init!r}); use init='paper' (CLI: --init paper), or mlp=true / extra_params=true"
            )


class GatherExcite(FoldingGatedUnit):
    """``x * gate(resize(mlp(gather(x))))`` (timm's ``GatherExcite`` layout: ``gather``, ``mlp``).

    Example::

        >>> ge = GatherExcite(64, r=16, extent=4, extra_params=True)
        >>> ge(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    paper = "Gather-Excite, Hu et al., NeurIPS 2018 (arXiv:1810.12348)"
    Options = GatherExciteOptions
    needs_size = True  # a learned global gather is one depthwise conv as large as the map

    def __init__(
        self,
        channels: int,
        r: int = 16,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        extent: int = 0,
        extra_params: bool = False,
        mlp: bool = True,
        size: tuple[int, int] | None = None,
        bias: bool = True,
        rounding: str = "floor",
        reduced: int | None = None,
        hidden: int | None = None,
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        GatherExciteOptions(extent, extra_params, mlp).check_start(init)
        super().__init__(
            channels, r, gate_layer, init, rounding=rounding, reduced=reduced, hidden=hidden, bottleneck=mlp
        )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        width = self.hidden
        self.extent = extent
        self.gather = self._learned_gather(channels, extent, size, act_layer, factory) if extra_params else None
        self.mlp = ConvMlp(channels, width, act_layer, bias, **factory) if mlp else None
        self.channel_gate = extent == 0  # a windowed gather gates each region: no per-channel scale to freeze
        self.excitation_shows = "the channel gate" if extent == 0 else "the gate, averaged over positions"
        if zeroes_last(init):
            self._zero_last()

    @staticmethod
    def _learned_gather(
        channels: int, extent: int, size: tuple[int, int] | None, act: str | type[nn.Module], factory: dict[str, Any]
    ) -> nn.Sequential:
        gather = nn.Sequential()
        if extent == 0:  # one depthwise conv over the whole map, to one value per channel
            if size is None:
                raise ConfigError("unit_options.extra_params: a learned global gather needs the feature map's size")
            if size[0] * size[1] > MAX_GATHER_POSITIONS:  # its kernel is as large as the map: bounded before allocating
                raise ConfigError(
                    f"unit_options.extra_params: a learned global gather over a {size[0]}x{size[1]} map needs a "
                    f"kernel of {size[0] * size[1]:,} weights per channel (at most {MAX_GATHER_POSITIONS:,}); "
                    "give a smaller input size or a windowed gather (extent=2, 4, ...)"
                )
            gather.add_module("conv1", nn.Conv2d(channels, channels, size, groups=channels, bias=False, **factory))
            gather.add_module("norm1", nn.BatchNorm2d(channels, **factory))
            return gather
        steps = int(math.log2(extent))
        for i in range(1, steps + 1):
            conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False, **factory)
            gather.add_module(f"conv{i}", conv)
            gather.add_module(f"norm{i}", nn.BatchNorm2d(channels, **factory))
            if i != steps:
                gather.add_module(f"act{i}", create_act(act))
        return gather

    def _zero_last(self) -> None:
        if self.mlp is not None:
            self.mlp.zero_last()
            return
        assert self.gather is not None  # a unit with parameters has the MLP or a learned gather
        last_norm = [m for m in self.gather if isinstance(m, nn.BatchNorm2d)][-1]
        with torch.no_grad():
            nn.init.zeros_(last_norm.weight)
            nn.init.zeros_(last_norm.bias)

    @classmethod
    def check_config(cls, config: InjectConfig) -> None:
        super().check_config(config)
        options: GatherExciteOptions = cls.parse_options(config.unit_options)
        options.check_start(config.init)

    @classmethod
    def hidden_width(cls, channels: int, r: int, config: InjectConfig, *, reduced: int | None = None) -> int:
        if not cls.parse_options(config.unit_options).mlp:
            return 0
        return super().hidden_width(channels, r, config, reduced=reduced)

    def expected_params(self) -> Fraction:
        """The MLP's ``2 C h`` (+ ``h + C`` with bias, ``h = C/r`` unrounded); a learned gather adds, per
        depthwise conv, its kernel (``H W`` for the global one, 9 for a 3x3) times C and BatchNorm's ``2 C``."""
        total = Fraction(0)
        if self.mlp is not None:
            total += bottleneck_params(self.channels, self.exact_hidden(), self.mlp.fc1.bias is not None)
        if self.gather is not None:
            for conv in (m for m in self.gather if isinstance(m, nn.Conv2d)):
                kernel_h, kernel_w = conv.kernel_size
                total += self.channels * kernel_h * kernel_w + 2 * self.channels
        return total

    def fold_refusal(self) -> str | None:
        if self.extent:
            return f"its gather pools windows (extent={self.extent}), not the whole map"
        if self.gather is not None:
            return "its gather is learned (extra_params): a depthwise conv weighs each channel's positions apart"
        return None

    def pooled_map(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None, None) if self.mlp is None else (self.mlp.fc1.weight.flatten(1), self.mlp.fc1.bias)

    def fold_inputs(self) -> tuple[torch.Tensor | None, ...]:
        return () if self.mlp is None else (self.mlp.fc1.weight, self.mlp.fc1.bias)

    def logits(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        folded = self.folded_pool(source)
        if folded is not None:  # the mean and the MLP's first layer, before the block's last conv
            folded = folded.view(folded.shape[0], folded.shape[1], 1, 1)
            return folded if self.mlp is None else self.mlp.fc2(self.mlp.act(self.mlp.norm(folded)))
        if self.gather is not None:
            gathered = self.gather(x)
        elif self.extent == 0:
            gathered = spatial_mean(x)
        else:
            kernel = 2 * self.extent - 1
            gathered = F.avg_pool2d(x, kernel, stride=self.extent, padding=kernel // 2, count_include_pad=False)
        if self.mlp is not None:
            gathered = self.mlp(gathered)
        if gathered.shape[-2:] != (1, 1):
            gathered = F.interpolate(gathered, size=x.shape[-2:])  # nearest: each region's value over the region
        return gathered

    def extra_repr(self) -> str:
        return f"channels={self.channels}, r={self.r}, hidden={self.hidden}, extent={self.extent}"


register_unit("ge", GatherExcite)
