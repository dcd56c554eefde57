"""Effective Squeeze-Excitation (eSE).

Paper: `CenterMask: Real-Time Anchor-Free Instance Segmentation`, Lee, Park (CVPR 2020),
https://arxiv.org/abs/1911.06667 (VoVNetV2). SE's two-layer bottleneck loses information by
reducing the channels; eSE keeps one C x C fully-connected layer (with bias) and a hard sigmoid
gate: ``x * hard_sigmoid(fc(avgpool(x)))``. Its conventions (hard sigmoid, bias) are the style
``ese`` in rules/styles/units.toml; ``r`` does not shape it.

``init="preserve"`` zeroes ``fc`` and uses ``2 * hard_sigmoid``, which is exactly 1 at 0.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.units.base import register_unit
from se_inject.units.fold import FoldingGatedUnit
from se_inject.units.parts import GATE_READS, runs_functional, spatial_mean, zero_, zeroes_last


class EffectiveSE(FoldingGatedUnit):
    """``x * gate(fc(mean(x)))`` with one 1x1 conv ``C -> C`` (timm's ``EffectiveSEModule`` layout).

    Example::

        >>> EffectiveSE(64)(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    paper = "CenterMask (VoVNetV2), Lee and Park, CVPR 2020 (arXiv:1911.06667)"
    uses_r = False
    reads = GATE_READS

    def __init__(
        self,
        channels: int,
        r: int = 16,
        gate_layer: str | type[nn.Module] = "hard_sigmoid",
        *,
        bias: bool = True,
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, r, gate_layer, init, bottleneck=False)
        self.fc = nn.Conv2d(channels, channels, 1, bias=bias, device=device, dtype=dtype)
        if zeroes_last(init):
            zero_(self.fc)

    def expected_params(self) -> Fraction:
        """``C^2`` weights of the one FC layer, ``+ C`` with its bias."""
        return Fraction(self.channels * self.channels + (self.channels if self.fc.bias is not None else 0))

    def pooled_map(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.fc.weight.flatten(1), self.fc.bias

    def fold_inputs(self) -> tuple[torch.Tensor | None, ...]:
        return self.fc.weight, self.fc.bias

    def logits(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        folded = self.folded_pool(source)
        if folded is not None:  # squeezed before the block's last conv (optimize_for_inference)
            return folded.view(x.shape[0], self.channels, 1, 1)
        z = spatial_mean(x)
        return F.conv2d(z, self.fc.weight, self.fc.bias) if runs_functional(self.fc, nn.Conv2d, z) else self.fc(z)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


register_unit("ese", EffectiveSE)
