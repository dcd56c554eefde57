"""The units se_inject inserts: the interface every unit provides and the registry of unit types
(``base``), the parts units share (``parts``: gates, widths, the gated product), SE and the fixed
scale a pruned unit leaves (``se``), and SE's descendants, one module each with its paper: ``ese``,
``eca`` (and ``ceca``), ``gc``, ``ge``, ``cbam`` (and ``lcbam``)."""

from se_inject.units import cbam, eca, ese, gc, ge, se  # noqa: F401 - each registers its units
from se_inject.units.base import UNITS, ChannelUnit, register_unit, unit_class

__all__ = ["UNITS", "ChannelUnit", "register_unit", "unit_class"]
