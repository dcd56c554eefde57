"""The units se_inject inserts: the interface every unit provides (``base``), the registry of unit
types, the SE unit and its gates (``se``), and the fixed scale a pruned unit leaves."""

from se_inject.units import se  # noqa: F401 - registers "se"
from se_inject.units.base import UNITS, ChannelUnit, register_unit, unit_class

__all__ = ["UNITS", "ChannelUnit", "register_unit", "unit_class"]
