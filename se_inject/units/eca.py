"""Efficient Channel Attention (ECA) and its circular variant (CECA).

Paper: `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks`, Wang, Wu, Zhu,
Li, Zuo, Hu (CVPR 2020), https://arxiv.org/abs/1910.03151. SE's bottleneck is replaced by a 1-D
convolution of kernel ``k`` across the pooled channels, no reduction: ``k`` weights per unit. The
paper chooses ``k`` from C: ``t = int(|log2(C) + b| / gamma)``, the odd number at or above t
(gamma 2, b 1), at least 3 as timm's ``EcaModule`` has it; ``kernel_size`` fixes it instead.
CECA (timm's ``CecaModule``) pads the channel axis circularly, so the first and last channels
are neighbours.

``init="preserve"`` zeroes the kernel and uses ``2 * sigmoid``: the unit starts as the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.errors import ConfigError
from se_inject.units.base import register_unit
from se_inject.units.fold import FoldingGatedUnit
from se_inject.units.parts import GATE_READS, runs_functional, spatial_mean, zero_, zeroes_last


def eca_kernel_size(channels: int, gamma: float = 2.0, beta: float = 1.0) -> int:
    """ECA-Net's adaptive kernel size for ``channels`` (odd, at least 3).

    >>> eca_kernel_size(64), eca_kernel_size(256), eca_kernel_size(2048)
    (3, 5, 7)
    """
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


MAX_KERNEL = 255  # taps of the 1-D conv: ECA-Net's adaptive size is 9 at 2^16 channels


@dataclass(frozen=True)
class EcaOptions:
    kernel_size: int | None = field(
        default=None,
        metadata={"help": "a fixed odd kernel size; None: ECA-Net's adaptive size from C", "range": (1, MAX_KERNEL)},
    )
    gamma: float = field(
        default=2.0, metadata={"help": "gamma of the adaptive kernel size (paper: 2)", "range": (0.1, 100.0)}
    )
    beta: float = field(
        default=1.0, metadata={"help": "b of the adaptive kernel size (paper: 1)", "range": (-100.0, 100.0)}
    )

    def __post_init__(self) -> None:
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"kernel_size: expected an odd size of at least 1, got {self.kernel_size}")
        if self.gamma <= 0:
            raise ValueError(f"gamma: expected a positive number, got {self.gamma}")


class EfficientChannelAttention(FoldingGatedUnit):
    """``x * gate(conv1d(mean(x)))``, the 1-D conv running across channels (timm's ``EcaModule`` layout).

    Example::

        >>> eca = EfficientChannelAttention(256)
        >>> eca.conv.kernel_size, eca(torch.randn(2, 256, 8, 8)).shape
        ((5,), torch.Size([2, 256, 8, 8]))
    """

    paper = "ECA-Net, Wang et al., CVPR 2020 (arXiv:1910.03151)"
    Options = EcaOptions
    uses_r = False
    reads = GATE_READS
    circular = False

    def __init__(
        self,
        channels: int,
        r: int = 16,
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        kernel_size: int | None = None,
        gamma: float = 2.0,
        beta: float = 1.0,
        bias: bool = False,
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(channels, r, gate_layer, init, bottleneck=False)
        size = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, beta)
        if size > MAX_KERNEL:  # checked before anything is allocated
            raise ConfigError(
                f"unit_options.gamma: gamma={gamma} and beta={beta} give a kernel of {size} taps for {channels} "
                f"channels, over {MAX_KERNEL}; use the paper's gamma=2, beta=1 or a kernel_size"
            )
        self.padding = (size - 1) // 2
        # padded as the unit pads: called as a module (by a tracer, or once swapped) it computes the same
        mode: Literal["zeros", "circular"] = "circular" if self.circular else "zeros"
        self.conv = nn.Conv1d(
            1, 1, size, padding=self.padding, padding_mode=mode, bias=bias, device=device, dtype=dtype
        )
        if zeroes_last(init):
            zero_(self.conv)

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def expected_params(self) -> Fraction:
        """``k`` weights of the 1-D kernel, ``+ 1`` with a bias."""
        return Fraction(self.kernel_size + (1 if self.conv.bias is not None else 0))

    def _across_channels(self, y: torch.Tensor) -> torch.Tensor:
        """The 1-D conv over the channels of ``y`` (B, 1, C), padded as the unit pads."""
        if not runs_functional(self.conv, nn.Conv1d, y):
            return self.conv(y)
        if self.circular:
            return F.conv1d(F.pad(y, (self.padding, self.padding), mode="circular"), self.conv.weight, self.conv.bias)
        return F.conv1d(y, self.conv.weight, self.conv.bias, padding=self.padding)

    def pooled_map(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The conv across channels as a (C, C) band (circulant for CECA): its response to each basis vector."""
        weight = self.conv.weight
        basis = torch.eye(self.channels, dtype=weight.dtype, device=weight.device).view(self.channels, 1, self.channels)
        if self.circular:
            basis = F.pad(basis, (self.padding, self.padding), mode="circular")
            padding = 0
        else:
            padding = self.padding
        columns = F.conv1d(basis, weight, padding=padding).view(self.channels, self.channels)
        bias = self.conv.bias
        return columns.T, None if bias is None else bias.expand(self.channels)

    def fold_inputs(self) -> tuple[torch.Tensor | None, ...]:
        return self.conv.weight, self.conv.bias

    def logits(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels = x.shape[0], x.shape[1]
        folded = self.folded_pool(source)
        if folded is not None:  # squeezed before the block's last conv (optimize_for_inference)
            return folded.view(batch, channels, 1, 1)
        return self._across_channels(spatial_mean(x, keepdim=False).view(batch, 1, channels)).view(
            batch, channels, 1, 1
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, circular={self.circular}"


class CircularEfficientChannelAttention(EfficientChannelAttention):
    """ECA with the channel axis padded circularly (timm's ``CecaModule``)."""

    paper = "ECA-Net (arXiv:1910.03151) with circular padding, timm's CecaModule"
    circular = True


register_unit("eca", EfficientChannelAttention)
register_unit("ceca", CircularEfficientChannelAttention)
