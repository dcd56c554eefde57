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

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from se_inject.config import UNIT_SHAPING_FIELDS, unit_conventions
from se_inject.errors import ConfigError, NotScriptableError

if TYPE_CHECKING:
    from se_inject.config import InjectConfig


@dataclass(frozen=True)
class NoOptions:
    """The options of a unit that has none beyond the shared ones (r, act, gate, bias, rounding, init)."""


class ChannelUnit(nn.Module):
    """Base class of the units se_inject inserts; see the module docstring for the contract.

    Class attributes a unit type sets:

    - ``Options``: a frozen dataclass of the unit's own options (``unit_options``), each field with
      its help in ``metadata["help"]`` and, for a number, its bounds in ``metadata["range"]``;
      :meth:`parse_options` checks a mapping against it (types, bounds, finite numbers).
    - ``uses_r``: whether ``r`` shapes the unit (ECA and effective SE have no bottleneck).
    - ``reads``: the shared options (``squeeze``, ``gate``, ``act``, ``bias``, ``rounding``,
      ``reduce_from``, ``hidden``, ``init``) that shape the unit; a config that sets another one on
      purpose is refused by :meth:`check_config`, naming the unit and the option.
    - ``channel_gate``: whether the unit computes ``x * excitation(x)`` with a per-channel gate and
      nothing else, so that pruning can freeze it to a fixed scale (an instance may set it).
    - ``excitation_shows``: what the unit's ``excitation(x)`` returns, in words ("" where it has no
      readable gate); inspection reads the gates of the units that have one.
    """

    Options: ClassVar[type] = NoOptions
    paper: ClassVar[str] = ""  # where the unit was published, in a few words
    uses_r: ClassVar[bool] = True
    reads: ClassVar[frozenset[str]] = frozenset({"init"})
    channel_gate: bool = False
    excitation_shows: str = ""

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
        size: tuple[int, int] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> ChannelUnit:
        """The unit for one site, built as ``config`` says, on ``device`` in ``dtype``.

        ``reduced`` is what ``r`` divides where that is not ``channels`` (``reduce_from="block_input"``:
        the block's input channels); a unit without a bottleneck ignores it. ``size`` is the (height,
        width) of the feature map at the site, for a unit whose weights depend on it.
        """
        raise NotImplementedError(f"{cls.__name__} must implement from_config")

    @classmethod
    def hidden_width(cls, channels: int, r: int, config: InjectConfig, *, reduced: int | None = None) -> int:
        """The bottleneck width a unit for ``channels`` at ``r`` will have (0: none); the plan records it."""
        raise NotImplementedError(f"{cls.__name__} must implement hidden_width")

    @classmethod
    def check_config(cls, config: InjectConfig) -> None:
        """Raise a ConfigError if ``config`` cannot build this unit: a shared option it does not read, set on
        purpose; its ``unit_options``. The planner calls it before anything is built."""
        unread = config.set_options(name for name in UNIT_SHAPING_FIELDS if name not in cls.reads)
        if unread:
            name = unread[0]
            reads = ", ".join(n for n in UNIT_SHAPING_FIELDS if n in cls.reads) or "none"
            raise ConfigError(
                f"{name}: the {config.unit} unit does not read {name} (it reads {reads}); "
                f"leave {name}={getattr(config, name)!r} out or choose a unit that reads it"
            )
        cls.parse_options(config.unit_options)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> Any:
        """``options`` (``InjectConfig.unit_options``) as this unit's ``Options``; a ConfigError names
        the field that is unknown or of the wrong type."""
        return parse_options(cls.Options, options)

    @property
    def gate_range(self) -> float:
        """The width of the range of the unit's gate (1 for a sigmoid); inspection measures saturation against it."""
        return 1.0

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

    def __prepare_scriptable__(self) -> ChannelUnit:
        """Refuse ``torch.jit.script`` in one line: PyTorch deprecated TorchScript, and a unit's forward
        chooses its fast path in Python. ``torch.export``, ONNX and ``torch.compile`` take a retrofit."""
        raise NotScriptableError(
            f"torch.jit.script: {type(self).__name__} (an se_inject unit) is not scriptable, as TorchScript is "
            "deprecated; use torch.export.export(model, (x,)), torch.onnx.export or torch.compile instead"
        )


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


def _accepts(annotation: Any, value: object) -> bool:
    """Whether ``value`` fits an Options field's annotation (int, float, bool, str, a Literal, X | None)."""
    if typing.get_origin(annotation) is typing.Literal:
        return value in typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(annotation, type) and isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is bool:  # as InjectConfig says it of its own flags
        return "True or False"
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _check_bounds(name: str, value: object, bounds: tuple[float, float] | None) -> None:
    """A number must be finite (no NaN, no infinity) and, where its field declares ``metadata["range"]``,
    within it: a small file or flag must not make a unit allocate gigabytes or compute with denormals."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{name}: {value!r} is out of range ({bounds[0]} to {bounds[1]})")


def parse_options(options_type: type, options: Mapping[str, Any]) -> Any:
    """An ``options_type`` dataclass from a mapping, each value checked against its field's type."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"unit_options: expected a mapping of option names to values, got {options!r}")
    hints = typing.get_type_hints(options_type)
    known = {f.name: f for f in dataclasses.fields(options_type)}
    for key, value in options.items():
        if key not in known:
            names = ", ".join(known) or "none"
            raise ConfigError(f"unit_options.{key}: not an option of this unit; its options are {names}")
        if not _accepts(hints[key], value):
            raise ConfigError(f"unit_options.{key}: expected {_describe(hints[key])}, got {value!r}")
        _check_bounds(f"unit_options.{key}", value, known[key].metadata.get("range"))
    try:
        return options_type(**options)
    except (ValueError, TypeError) as err:  # an Options class's own cross-field check
        raise ConfigError(f"unit_options: {err}") from None


@dataclass(frozen=True)
class UnitInfo:
    """What ``se-inject units`` lists about one registered unit type."""

    name: str
    cls: str  # import path of the class
    paper: str
    uses_r: bool
    options: dict[str, tuple[Any, str]]  # option -> (default, help)
    conventions: dict[str, Any]  # the options its style (named like it) sets


def _help_with_range(option: dataclasses.Field) -> str:
    bounds = option.metadata.get("range")
    text = option.metadata.get("help", "")
    return f"{text} (from {bounds[0]} to {bounds[1]})" if bounds else text


def describe_units() -> list[UnitInfo]:
    """Every registered unit type, with its paper, own options and published conventions.

    >>> [u.name for u in describe_units()][:3]
    ['cbam', 'ceca', 'eca']
    """
    return [
        UnitInfo(
            name,
            f"{cls.__module__}.{cls.__qualname__}",
            cls.paper,
            cls.uses_r,
            {f.name: (f.default, _help_with_range(f)) for f in dataclasses.fields(cls.Options)},
            unit_conventions(name),
        )
        for name, cls in sorted(UNITS.items())
    ]
