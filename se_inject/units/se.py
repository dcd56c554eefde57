"""Squeeze-and-Excitation unit.

Paper: `Squeeze-and-Excitation Networks`, Hu, Shen, Albanie, Sun, Wu (CVPR 2018, TPAMI 2019),
https://arxiv.org/abs/1709.01507. Squeeze (Eq. 2) pools each channel to one number, excitation
(Eq. 3) is ``gate(W2 · act(W1 · z))`` with ``W1: (C/r, C)`` and ``W2: (C, C/r)``, and scale
(Eq. 4) multiplies each channel of the input by its gate.

Beyond the paper, for retrofitting trained models, ``init="preserve"`` zeroes ``W2`` (and the
biases) and rescales the gate so that ``gate(0) == 1``: at insertion every channel is multiplied
by exactly 1.0 and the host network computes bit for bit what it computed before.

A unit whose gate has turned out nearly constant can be pruned to :class:`ChannelScale`, its mean
gate as a fixed per-channel scale (see ``se_inject.inspect.excitation``).
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.config import SQUEEZES
from se_inject.errors import ConfigError
from se_inject.units.base import register_unit
from se_inject.units.fold import SqueezeFold
from se_inject.units.parts import (  # noqa: F401 - the gates and widths are also this module's public names
    BOTTLENECK_READS,
    GatedUnit,
    ScaledHardSigmoid,
    ScaledSigmoid,
    SEOptions,
    ShiftedReLU,
    ShiftedTanh,
    bottleneck_params,
    bottleneck_width,
    can_write_over,
    create_act,
    create_gate,
    gate_range,
    gated,
    hidden_width,
    is_traced,
    reduced_width,
    runs_functional,
    spatial_mean,
    zero_,
    zeroes_last,
)


def eq5_params(channels: int, r: int, bias: bool = False, reduced: int | None = None) -> Fraction:
    """Weights Eq. 5 predicts for one SE unit on ``channels`` at reduction ``r`` (with bias: + C/r + C).

    ``reduced`` is what ``r`` divides when it is not ``channels`` (the block's input, for
    ``reduce_from="block_input"``): the hidden width before rounding is ``reduced / r``, and the
    term ``2 C^2 / r`` generalises to ``2 C reduced / r``.
    """
    return bottleneck_params(channels, reduced_width(channels, r, reduced, None), bias)


def unit_weights(channels: int, hidden: int, bias: bool = False) -> int:
    """Weights one SE unit of hidden width ``hidden`` holds: the closed form the report checks."""
    return int(bottleneck_params(channels, hidden, bias))


class SqueezeExcite(SqueezeFold, GatedUnit):
    """The SE unit of Hu et al.: ``x * gate(fc2(act(fc1(squeeze(x)))))``.

    A :class:`~se_inject.units.parts.GatedUnit` that reads every shared option (``squeeze`` too):
    :meth:`from_config` passes them to the constructor by name. Copy this file to write a unit.

    Args:
        channels: C, channels of the feature map the unit recalibrates.
        r: reduction ratio; the hidden width is ``hidden_width(reduced or C, r, rounding)``.
        act_layer: non-linearity between the two FC layers: ``relu`` (paper), ``relu6``, ``silu``,
            ``gelu``, ``hard_swish``, ``leaky_relu`` or a module class.
        gate_layer: excitation gate, ``sigmoid`` (paper), ``hard_sigmoid``, ``tanh``, ``relu`` or a module class.
        squeeze: ``avg`` (paper), ``max``, or ``none``: the NoSqueeze control, where the FC layers
            become 1x1 convolutions of the same widths and the gate is computed per position.
        bias: bias on both FC layers (the paper's ResNets use none).
        rounding: how ``C/r`` is rounded when it is not whole (see :func:`hidden_width`).
        reduced: what ``r`` divides, when not ``channels`` (EfficientNet's and RegNetY's block input).
        hidden: an absolute hidden width (then ``r`` and ``rounding`` only describe the unit).
        init: ``paper`` (PyTorch's default init, gate as published) or ``preserve`` (zero last
            layer and a gate equal to 1 at 0: the unit starts as the identity).

    Example::

        >>> se = SqueezeExcite(64, r=16)
        >>> se(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    paper = "Squeeze-and-Excitation Networks, Hu et al., CVPR 2018 (arXiv:1709.01507)"
    reads = BOTTLENECK_READS | {"squeeze"}
    Options = SEOptions

    def __init__(
        self,
        channels: int,
        r: int = 16,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        squeeze: str = "avg",
        bias: bool = False,
        rounding: str = "floor",
        reduced: int | None = None,
        hidden: int | None = None,
        init: str = "preserve",
        norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if squeeze not in SQUEEZES:
            raise ConfigError(f"squeeze: {squeeze!r} is not one of {', '.join(SQUEEZES)}")
        if channels < 1 or r < 1:
            raise ConfigError(f"r: need channels >= 1 and r >= 1, got channels={channels}, r={r}")
        if reduced is not None and reduced < 1 or hidden is not None and hidden < 1:
            raise ConfigError(f"hidden: need a positive width, got reduced={reduced}, hidden={hidden}")
        super().__init__(channels, r, gate_layer, init, rounding=rounding, reduced=reduced, hidden=hidden)
        self.squeeze = squeeze
        self.fc1: nn.Conv2d | nn.Linear
        self.fc2: nn.Conv2d | nn.Linear
        # registered in the order they run (fc1, bn, fc2): a state dict lists them as ReXNet's SE does
        if squeeze == "none":
            self.fc1 = nn.Conv2d(channels, self.hidden, 1, bias=bias, device=device, dtype=dtype)
        else:
            self.fc1 = nn.Linear(channels, self.hidden, bias=bias, device=device, dtype=dtype)
        self.bn: nn.Module | None = None
        if norm:
            norm_type = nn.BatchNorm2d if squeeze == "none" else nn.BatchNorm1d
            self.bn = norm_type(self.hidden, device=device, dtype=dtype)
        if squeeze == "none":
            self.fc2 = nn.Conv2d(self.hidden, channels, 1, bias=bias, device=device, dtype=dtype)
        else:
            self.fc2 = nn.Linear(self.hidden, channels, bias=bias, device=device, dtype=dtype)
        self.act = create_act(act_layer)
        if zeroes_last(init):
            zero_(self.fc2)

    def expected_params(self) -> Fraction:
        bias = self.fc1.bias is not None
        norm = 2 * self.hidden if self.bn is not None else 0  # its weight and bias, on the rounded width
        if self.absolute_hidden:  # no r to predict from: the closed form of the width asked for
            return Fraction(unit_weights(self.channels, self.hidden, bias)) + norm
        return eq5_params(self.channels, self.r, bias=bias, reduced=self.reduced) + norm

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """fc2's output on the squeezed ``x`` (what the gate is applied to), shaped to broadcast against ``x``."""
        return self._second(self._first(x, None))

    def fold_refusal(self) -> str | None:
        if self.squeeze != "avg":
            return f"only an average squeeze commutes with a convolution, this unit's is {self.squeeze!r}"
        return None

    def pooled_map(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.fc1.weight, self.fc1.bias

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel (per-position for NoSqueeze) gate, shaped to broadcast against ``x``."""
        s, scale = self._gate(self._first(x, None))
        return s * scale if scale != 1.0 else s

    def _first(self, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """fc1's output: on the squeezed ``x``, or (folded, in eval mode) on the pooled ``source``."""
        if self.squeeze == "none":
            return self._layer(self.fc1, x)
        folded = self.folded_pool(source)
        if folded is not None:
            return folded
        z = spatial_mean(x) if self.squeeze == "avg" else x.amax((2, 3), keepdim=True)
        return self._layer(self.fc1, z.flatten(1))

    def _layer(self, layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` for fc1 or fc2: a functional call on its weights where that is the same computation
        (see :func:`~se_inject.units.parts.runs_functional`), else the module's own call."""
        if self.squeeze == "none":
            return F.conv2d(x, layer.weight, layer.bias) if runs_functional(layer, nn.Conv2d, x) else layer(x)
        return F.linear(x, layer.weight, layer.bias) if runs_functional(layer, nn.Linear, x) else layer(x)

    def _second(self, h: torch.Tensor) -> torch.Tensor:
        """fc2's output from fc1's output ``h``, shaped to broadcast against the unit's input."""
        if self.bn is not None:
            h = self.bn(h)
        # in place on fc1's output, which nothing else holds and whose backward needs only fc1's input
        h = h.relu_() if type(self.act) is nn.ReLU and not is_traced(h) and self.bn is None else self.act(h)
        s = self._layer(self.fc2, h)
        return s if self.squeeze == "none" else s.view(s.shape[0], s.shape[1], 1, 1)

    def _gate(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The gate from fc1's output ``h``, up to a constant factor (the preserve sigmoid's 2), and that
        factor, which goes into the final product."""
        # (sigmoid_ is not used: on meta tensors it is a Python kernel, ten times sigmoid's cost)
        s = self._second(h)
        if type(self.gate) is ScaledSigmoid:
            return torch.sigmoid(s), 2.0
        if type(self.gate) is nn.Sigmoid:
            return torch.sigmoid(s), 1.0
        return self.gate(s), 1.0

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x * s``; with ``residual``, ``residual + x * s`` in one pass over memory (addcmul).

        The rewrite passes the residual when the unit feeds an addition (standard and identity
        positions), which saves writing and re-reading a full feature map per block.
        ``source`` is the input of the conv that produced ``x``, given by
        ``se_inject.optimize_for_inference`` (see :meth:`~se_inject.units.fold.SqueezeFold.squeeze_through`).
        """
        s, scale = self._gate(self._first(x, source))
        return gated(x, s, residual, self.overwrite_input, scale)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, r={self.r}, hidden={self.hidden}, squeeze={self.squeeze}"


class ChannelScale(nn.Module):
    """A pruned unit: its mean gate per channel as a fixed buffer, called like the unit it replaces."""

    scale: torch.Tensor

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return x * self.scale
        return torch.addcmul(residual, x, self.scale)


register_unit("se", SqueezeExcite)
