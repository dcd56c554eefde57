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

import math
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from se_inject.config import EXCITATIONS, INITS, ROUNDINGS, SQUEEZES
from se_inject.errors import ConfigError
from se_inject.units.base import ChannelUnit, register_unit

if TYPE_CHECKING:
    from se_inject.config import InjectConfig


def hidden_width(channels: int, r: int, rounding: str = "floor") -> int:
    """Width of the excitation bottleneck for ``channels`` at reduction ``r``.

    ``floor`` (default) gives exactly ``C/r`` whenever ``r`` divides ``C``, which is what Eq. 5
    assumes; ``round`` and ``ceil`` are the other ways to round ``C/r``; ``multiple8`` is timm's
    ``make_divisible(C/r, 8)``. The result is never below 1.

    >>> hidden_width(64, 16), hidden_width(64, 16, "multiple8"), hidden_width(10, 16)
    (4, 8, 1)
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    exact = channels / r
    if rounding == "floor":
        width = channels // r
    elif rounding == "ceil":
        width = -(-channels // r)
    elif rounding == "round":
        width = math.floor(exact + 0.5)
    else:  # multiple8, as timm's make_divisible: never more than 10% below the exact width
        width = max(8, int(exact + 4) // 8 * 8)
        if width < 0.9 * exact:
            width += 8
    return max(1, width)


class ScaledSigmoid(nn.Module):
    """``2 * sigmoid(x)``: a sigmoid gate that equals 1 at 0 (range 0..2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


class ShiftedTanh(nn.Module):
    """``1 + tanh(x)``: a tanh gate that equals 1 at 0 (range 0..2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.tanh(x)


class ShiftedReLU(nn.Module):
    """``relu(1 + x)``: a ReLU gate that equals 1 at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(1.0 + x)


# name -> (gate as published, gate with gate(0) == 1 for the preserve initialisation)
_GATES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module]]] = {
    "sigmoid": (nn.Sigmoid, ScaledSigmoid),
    "tanh": (nn.Tanh, ShiftedTanh),
    "relu": (nn.ReLU, ShiftedReLU),
}
assert set(_GATES) == set(EXCITATIONS)


def create_gate(gate: str | type[nn.Module], preserve: bool) -> nn.Module:
    """Build the excitation gate from a name (``sigmoid``, ``tanh``, ``relu``) or a module class.

    With ``preserve`` a named gate is its variant that equals 1 at 0; a class must already do so.
    """
    if isinstance(gate, str):
        if gate not in _GATES:
            raise ConfigError(f"excitation: {gate!r} is not one of {', '.join(EXCITATIONS)}")
        return _GATES[gate][1 if preserve else 0]()
    if isinstance(gate, type) and issubclass(gate, nn.Module):
        module = gate()
        if preserve and float(module(torch.zeros(1))) != 1.0:
            raise ConfigError(f"excitation: {gate.__name__}(0) must equal 1 for init='preserve'")
        return module
    raise ConfigError(f"excitation: expected a name or an nn.Module class, got {gate!r}")


def _can_write_over(x: torch.Tensor, s: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the result may go into ``x``'s memory: autograd records nothing (no operand needs a
    gradient: in an SE-only training phase ``x`` has none but the gate has) and the result has
    ``x``'s dtype (under autocast the residual or the gate can be wider)."""
    operands = (s,) if residual is None else (s, residual)
    return not any(t.requires_grad for t in operands) and all(
        t.dtype == x.dtype or torch.promote_types(x.dtype, t.dtype) == x.dtype for t in operands
    )


def eq5_params(channels: int, r: int, bias: bool = False) -> Fraction:
    """Weights Eq. 5 predicts for one SE unit on ``channels`` at reduction ``r`` (with bias: + C/r + C)."""
    weights = Fraction(2 * channels * channels, r)
    return weights + Fraction(channels, r) + channels if bias else weights


class SqueezeExcite(ChannelUnit):
    """The SE unit of Hu et al.: ``x * gate(fc2(act(fc1(squeeze(x)))))``.

    Args:
        channels: C, channels of the feature map the unit recalibrates.
        r: reduction ratio; the hidden width is ``hidden_width(C, r, rounding)``.
        act_layer: non-linearity between the two FC layers (ReLU in the paper).
        gate_layer: excitation gate, ``sigmoid`` (paper), ``tanh``, ``relu`` or a module class.
        squeeze: ``avg`` (paper), ``max``, or ``none``: the NoSqueeze control, where the FC layers
            become 1x1 convolutions of the same widths and the gate is computed per position.
        bias: bias on both FC layers (the paper's ResNets use none).
        rounding: how ``C/r`` is rounded when it is not whole.
        init: ``paper`` (PyTorch's default init, gate as published) or ``preserve`` (zero last
            layer and a gate equal to 1 at 0: the unit starts as the identity).

    Example::

        >>> se = SqueezeExcite(64, r=16)
        >>> se(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        r: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
        gate_layer: str | type[nn.Module] = "sigmoid",
        *,
        squeeze: str = "avg",
        bias: bool = False,
        rounding: str = "floor",
        init: str = "preserve",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if squeeze not in SQUEEZES:
            raise ConfigError(f"squeeze: {squeeze!r} is not one of {', '.join(SQUEEZES)}")
        if init not in INITS:
            raise ConfigError(f"init: {init!r} is not one of {', '.join(INITS)}")
        if channels < 1 or r < 1:
            raise ConfigError(f"r: need channels >= 1 and r >= 1, got channels={channels}, r={r}")
        super().__init__(channels, r, hidden_width(channels, r, rounding))
        self.squeeze = squeeze
        self.init = init
        self.fc1: nn.Conv2d | nn.Linear
        self.fc2: nn.Conv2d | nn.Linear
        if squeeze == "none":
            self.fc1 = nn.Conv2d(channels, self.hidden, 1, bias=bias, device=device, dtype=dtype)
            self.fc2 = nn.Conv2d(self.hidden, channels, 1, bias=bias, device=device, dtype=dtype)
        else:
            self.fc1 = nn.Linear(channels, self.hidden, bias=bias, device=device, dtype=dtype)
            self.fc2 = nn.Linear(self.hidden, channels, bias=bias, device=device, dtype=dtype)
        self.act = act_layer()
        self.gate = create_gate(gate_layer, preserve=init == "preserve")
        if init == "preserve":
            with torch.no_grad():
                nn.init.zeros_(self.fc2.weight)
                if self.fc2.bias is not None:
                    nn.init.zeros_(self.fc2.bias)

    @classmethod
    def from_config(
        cls,
        channels: int,
        r: int,
        config: InjectConfig,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> SqueezeExcite:
        return cls(
            channels,
            r,
            gate_layer=config.excitation,
            squeeze=config.squeeze,
            bias=config.bias,
            rounding=config.rounding,
            init=config.init,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def hidden_width(cls, channels: int, r: int, config: InjectConfig) -> int:
        return hidden_width(channels, r, config.rounding)

    def expected_params(self) -> Fraction:
        return eq5_params(self.channels, self.r, bias=self.fc1.bias is not None)

    @property
    def starts_as_identity(self) -> bool:
        return self.init == "preserve"

    def excitation(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel (per-position for NoSqueeze) gate, shaped to broadcast against ``x``."""
        s, scale = self._gate(x)
        return s * scale if scale != 1.0 else s

    def _gate(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The gate up to a constant factor (the preserve sigmoid's 2), and that factor.

        Functional calls on the unit's own weights: at batch 1 the per-call cost of four module
        calls is a visible share of a block's time. The factor goes into the final product.
        """
        if self.squeeze == "none":
            h = F.conv2d(x, self.fc1.weight, self.fc1.bias)
        else:
            z = x.mean((2, 3), keepdim=True) if self.squeeze == "avg" else x.amax((2, 3), keepdim=True)
            h = F.linear(z.flatten(1), self.fc1.weight, self.fc1.bias)
        # in place on fc1's output, which nothing else holds and whose backward needs only fc1's input
        # (sigmoid_ is not used below: on meta tensors it is a Python kernel, ten times sigmoid's cost)
        h = h.relu_() if type(self.act) is nn.ReLU else self.act(h)
        s = (
            F.conv2d(h, self.fc2.weight, self.fc2.bias)
            if self.squeeze == "none"
            else F.linear(h, self.fc2.weight, self.fc2.bias)
        )
        if type(self.gate) is ScaledSigmoid:
            s, scale = torch.sigmoid(s), 2.0
        elif type(self.gate) is nn.Sigmoid:
            s, scale = torch.sigmoid(s), 1.0
        else:
            s, scale = self.gate(s), 1.0
        return (s if self.squeeze == "none" else s.view(s.shape[0], s.shape[1], 1, 1)), scale

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x * s``; with ``residual``, ``residual + x * s`` in one pass over memory (addcmul).

        The rewrite passes the residual when the unit feeds an addition (standard and identity
        positions), which saves writing and re-reading a full feature map per block.
        """
        s, scale = self._gate(x)
        gate = s * scale if residual is None and scale != 1.0 else s
        if self.overwrite_input and _can_write_over(x, s, residual):
            # inference on an intermediate nobody else reads: write the result over it, no allocation
            return x.mul_(gate) if residual is None else torch.addcmul(residual, x, s, value=scale, out=x)
        return x * gate if residual is None else torch.addcmul(residual, x, s, value=scale)

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
