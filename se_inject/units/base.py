"""The interface every inserted unit provides, and the registry of unit types.

Downstream code (the plan, the rewrite, the report, recipes, fine-tuning, inspection) talks to
:class:`ChannelUnit`, never to a concrete unit: adding a unit type is a subclass and one
:func:`register_unit` call, as timm's ``create_attn`` maps names to attention modules.

A unit recalibrates a feature map of ``channels`` channels. ``forward(x)`` returns the
recalibrated ``x``; ``forward(x, residual)`` returns ``residual + forward(x)`` (the rewrite fuses
a unit with the residual addition it feeds, so a unit can do both in one pass over memory).

Example::

    class ChannelScaleUnit(ChannelUnit):   # a learned per-channel scale, starting at 1
        def __init__(self, channels, r, config, device=None, dtype=None):
            super().__init__(channels, r, hidden=0)
            self.scale = nn.Parameter(torch.ones(channels, device=device, dtype=dtype))
        ...

    register_unit("scale", ChannelScaleUnit)
    se_inject.inject(model, unit="scale")
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from se_inject.errors import ConfigError

if TYPE_CHECKING:
    from se_inject.config import InjectConfig


class ChannelUnit(nn.Module):
    """Base class of the units se_inject inserts; see the module docstring for the contract."""

    def __init__(self, channels: int, r: int, hidden: int) -> None:
        super().__init__()
        self.channels = channels  # C: channels of the feature map the unit recalibrates
        self.r = r  # the reduction ratio it was planned with (recorded in recipes)
        self.hidden = hidden  # its bottleneck width (0 for a unit without one)
        # set by the rewrite when the unit's input is memory nothing else reads: inference may
        # then write the result over it; False always allocates a new feature map
        self.overwrite_input = False

    @classmethod
    def from_config(
        cls,
        channels: int,
        r: int,
        config: InjectConfig,
        *,
        reduced: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ChannelUnit:
        """The unit for one site, built as ``config`` says, on ``device`` in ``dtype``.

        ``reduced`` is what ``r`` divides where that is not ``channels`` (``reduce_from="block_input"``:
        the block's input channels); a unit without a bottleneck ignores it.
        """
        raise NotImplementedError(f"{cls.__name__} must implement from_config")

    @classmethod
    def hidden_width(cls, channels: int, r: int, config: InjectConfig, *, reduced: int | None = None) -> int:
        """The bottleneck width a unit for ``channels`` at ``r`` will have (0: none); the plan records it."""
        raise NotImplementedError(f"{cls.__name__} must implement hidden_width")

    def expected_params(self) -> Fraction:
        """The closed-form count of the weights this unit adds (Eq. 5's term for SE), checked
        against the weights really added by the report."""
        raise NotImplementedError(f"{type(self).__name__} must implement expected_params")

    @property
    def starts_as_identity(self) -> bool:
        """Whether the unit computes its input exactly (in eval mode) as it is now."""
        raise NotImplementedError(f"{type(self).__name__} must implement starts_as_identity")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


UNITS: dict[str, type[ChannelUnit]] = {}


def register_unit(name: str, cls: type[ChannelUnit]) -> type[ChannelUnit]:
    """Register a unit type under ``name`` (the ``unit=`` option); a name registered twice is refused."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"unit name {name!r}: expected an identifier such as 'se'")
    if not (isinstance(cls, type) and issubclass(cls, ChannelUnit)):
        raise TypeError(f"unit '{name}': {cls!r} is not a subclass of se_inject.units.ChannelUnit")
    if name in UNITS:
        raise ValueError(f"unit '{name}' is already registered (as {UNITS[name].__name__})")
    UNITS[name] = cls
    return cls


def unit_class(unit: str | type[ChannelUnit] | Any) -> type[ChannelUnit]:
    """The unit type ``unit`` names (a registered name) or is (a ChannelUnit subclass)."""
    if isinstance(unit, type) and issubclass(unit, ChannelUnit):
        return unit
    if isinstance(unit, str) and unit in UNITS:
        return UNITS[unit]
    raise ConfigError(f"unit: {unit!r} is not a registered unit; units are {', '.join(sorted(UNITS))}")
