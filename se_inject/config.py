"""The options of an injection, validated once, in one frozen dataclass.

Each field carries its help text in ``metadata["help"]`` (the CLI reuses it), choices are
``Literal`` types, and a bad value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from os import PathLike, fspath
from pathlib import Path
from typing import Any, Literal, get_args

from se_inject.datafiles import read_tables, table_error
from se_inject.errors import ConfigError

Position = Literal["standard", "pre", "post", "identity", "inner"]
Squeeze = Literal["avg", "max", "none"]
Gate = Literal["sigmoid", "hard_sigmoid", "tanh", "relu"]
Act = Literal["relu", "relu6", "silu", "gelu", "hard_swish", "leaky_relu", "block"]
Rounding = Literal["floor", "ceil", "round", "round_even", "divisible8", "divisible4", "timm_se", "floor_min64"]
ReduceFrom = Literal["channels", "block_input", "block_output"]
Init = Literal["preserve", "paper", "zero"]
Existing = Literal["skip", "stack"]

POSITIONS: tuple[str, ...] = get_args(Position)
SQUEEZES: tuple[str, ...] = get_args(Squeeze)
GATES: tuple[str, ...] = get_args(Gate)
EXCITATIONS = GATES  # the name of the gate option before it was `gate`
ACTS: tuple[str, ...] = get_args(Act)
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
REDUCE_FROMS: tuple[str, ...] = get_args(ReduceFrom)
INITS: tuple[str, ...] = get_args(Init)
EXISTINGS: tuple[str, ...] = get_args(Existing)

# "multiple8" was described as timm's rounding but computed make_divisible's 90% rule (MobileNetV3's
# round_channels), which differs from timm's SEModule in 46 of 1,024 (C, r) pairs: renamed for what it is
RENAMED_ROUNDINGS = {"multiple8": "divisible8"}

# bounds of what a flag or file may ask for: far above any published network, far below what exhausts memory
MAX_R = 1 << 16  # a reduction ratio (the hidden width never falls below 1 anyway)
MAX_HIDDEN = 1 << 14  # an absolute hidden width: two C x 16384 layers per unit
MAX_STAGES = 1000  # ratios per stage, stage numbers
MAX_IN_CHANS = 4096  # input channels (in_chans): images have 1 to 4, multispectral stacks a few hundred
MAX_PATTERNS = 1000  # names or globs in at, include, exclude, blocks, leaf_modules, rules, one group; groups
MAX_NAME_LENGTH = 1000  # characters of one such name

# None as a field default: "the style's value" (filled in by __post_init__; never None afterwards)
FROM_STYLE: Any = None
STYLED_FIELDS = ("position", "r", "act", "gate", "bias", "rounding", "reduce_from", "unit")
# what a style may set beyond STYLED_FIELDS: the unit's own options (merged under those given)
STYLE_FIELDS = (*STYLED_FIELDS, "unit_options")
# what a group of blocks may set for its own units (the unit's shape and conventions, not where units go)
GROUP_FIELDS = ("r", "act", "gate", "bias", "rounding", "reduce_from", "hidden", "squeeze", "unit_options")
# the options that shape a unit, beyond r (which every unit records); each unit type names those it reads
UNIT_SHAPING_FIELDS = ("squeeze", "gate", "act", "bias", "rounding", "reduce_from", "hidden", "init")


@dataclass(frozen=True)
class Group:
    """Blocks that take their own unit options: ``Group(("layer4.*",), {"r": 32})``.

    ``blocks`` are fnmatch globs over the block module names the report lists; ``options`` are
    InjectConfig fields among GROUP_FIELDS. The first group whose globs match a block decides.
    """

    blocks: tuple[str, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class InjectConfig:
    """Where SE units go and what they look like.

    Example::

        cfg = InjectConfig(position="standard", r=16, stages=(2, 3, 4))
    """

    position: Position = field(
        default=FROM_STYLE,
        metadata={"help": "where the unit goes in a residual block: " + ", ".join(POSITIONS) + " (paper: standard)"},
    )
    r: int | tuple[int, ...] = field(
        default=FROM_STYLE,
        metadata={"help": "reduction ratio: one int, or one per stage (all stages, or the selected ones); paper: 16"},
    )
    stages: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stages (numbered from 1 over stages that hold sites) that get units; None: all"},
    )
    at: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "put units on the outputs of these modules instead (qualified names or fnmatch globs, "
            "e.g. 'layer1.0.conv1', 'stages.*.blocks.*.conv1'): insert after X; the placement rules are not used"
        },
    )
    groups: tuple[Group, ...] = field(
        default=(),
        metadata={
            "help": "blocks with their own unit options, e.g. ({'blocks': ['layer4.*'], 'r': 32},); the first "
            "group matching a block decides (CLI: --group 'layer4.*:r=32,act=silu', repeatable)"
        },
    )
    include: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "only the blocks whose module name matches one of these fnmatch globs "
            "(e.g. 'layer3.*', 'blocks.2.*'; the names the report lists); empty: every block"
        },
    )
    blocks: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "block ranges within stages, as STAGE:FIRST-LAST or STAGE:BLOCK (e.g. '3:2-4', '4:1'; "
            "numbered as the report numbers them); empty: every block"
        },
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "no unit in the blocks whose module name matches one of these globs"}
    )
    target: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "retrofit only these submodules (qualified names or fnmatch globs, e.g. 'backbone.body'), "
            "or 'auto': the largest traceable parts that hold sites; the result is still the whole model "
            "(detectors, segmenters, models torch.fx cannot trace whole)"
        },
    )
    squeeze: Squeeze = field(
        default="avg",
        metadata={"help": "squeeze operator: avg or max pooling, or none (the paper's NoSqueeze control)"},
    )
    gate: Gate | type = field(
        default=FROM_STYLE,
        metadata={"help": "gate of the excitation: " + ", ".join(GATES) + ", or an nn.Module class (paper: sigmoid)"},
    )
    excitation: Gate | type | None = field(
        default=None, metadata={"help": "the former name of gate, still accepted (read into gate, then None)"}
    )
    act: Act | type = field(
        default=FROM_STYLE,
        metadata={
            "help": "activation between the two FC layers: " + ", ".join(ACTS) + " (the activation the block "
            "applies before the unit: MobileNetV3's ReLU and hard-swish blocks), or a class (paper: relu)"
        },
    )
    bias: bool = field(
        default=FROM_STYLE, metadata={"help": "bias on the two FC layers (paper: off, its ResNet setting)"}
    )
    rounding: Rounding = field(
        default=FROM_STYLE,
        metadata={
            "help": "hidden width when C/r is not whole: floor (paper), ceil, round (halves up), round_even "
            "(Python's round: EfficientNet, RegNetY), divisible8 (nearest multiple of 8, not below 90%: "
            "MobileNetV3), divisible4 (the same with 4: GhostNet), timm_se (nearest multiple of 8, at least 8: "
            "timm's SEModule), floor_min64 (floor, at least 64: TResNet); never below 1"
        },
    )
    reduce_from: ReduceFrom = field(
        default=FROM_STYLE,
        metadata={
            "help": "what r divides: channels (those the unit sees; paper), block_input (the block's input "
            "channels: EfficientNet, RegNetY) or block_output (its output channels: MaxViT, CoAtNet)"
        },
    )
    hidden: int | None = field(
        default=None, metadata={"help": "an absolute hidden width for every unit, instead of one computed from r"}
    )
    style: str = field(
        default="paper",
        metadata={
            "help": "a family's design by name (rules/styles, rules/families; se-inject rules lists them): its "
            "conventions and placement, e.g. paper, timm, efficientnet, mobilenetv3, regnety, ghostnet, nfnet; "
            "explicit options override the style's"
        },
    )
    init: Init = field(
        default="preserve",
        metadata={
            "help": "preserve: the model computes exactly what it did at insertion; paper: standard init, sigmoid gate; "
            "zero: last layer zero under the published gate (a sigmoid gate starts at exactly 0.5)"
        },
    )
    leaf_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "module class names or qualified names torch.fx must not trace into"},
    )
    existing: Existing = field(
        default="skip",
        metadata={"help": "blocks that already hold an SE-like gate: skip them, or stack a second unit"},
    )
    unit: str = field(
        default=FROM_STYLE,
        metadata={
            "help": "the unit inserted: se, ese, eca, ceca, gc, ge, cbam, lcbam, or a name registered with "
            "se_inject.register_unit (default: the style's, se); a style named like the unit holds its "
            "published conventions"
        },
    )
    unit_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "the unit's own options, e.g. {'kernel_size': 5} for eca, {'fusion': 'scale'} for gc "
            "(CLI: --unit-option kernel_size=5, repeatable; se-inject units lists them)"
        },
    )
    rules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "extra placement rule files (TOML); a rule named like a built-in one replaces it"},
    )

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> InjectConfig:
        """The config of a mapping read from data (a recipe, a plan file): lists become tuples."""
        values: dict[str, Any] = {name: tuple(v) if isinstance(v, list) else v for name, v in options.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        self._apply_style()
        for name, choices in (
            ("position", POSITIONS),
            ("squeeze", SQUEEZES),
            ("rounding", ROUNDINGS),
            ("reduce_from", REDUCE_FROMS),
            ("init", INITS),
            ("existing", EXISTINGS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        for name, choices in (("gate", GATES), ("act", ACTS)):
            value = getattr(self, name)
            if not (isinstance(value, str) and value in choices) and not isinstance(value, type):
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}, nor a module class")
        object.__setattr__(self, "r", _validate_r(self.r))
        if self.stages is not None:
            object.__setattr__(self, "stages", _validate_stages(self.stages))
        if self.hidden is not None and not (_is_int(self.hidden) and 1 <= self.hidden <= MAX_HIDDEN):
            raise ConfigError(f"hidden: expected a hidden width from 1 to {MAX_HIDDEN}, got {self.hidden!r}")
        if not isinstance(self.unit, str) or not self.unit.isidentifier():
            raise ConfigError(f"unit: expected the name of a registered unit such as 'se', got {self.unit!r}")
        if not isinstance(self.unit_options, Mapping) or not all(isinstance(k, str) for k in self.unit_options):
            raise ConfigError(f"unit_options: expected a mapping of option names to values, got {self.unit_options!r}")
        object.__setattr__(self, "unit_options", dict(self.unit_options))  # checked against the unit by the planner
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias: expected True or False, got {self.bias!r}")
        object.__setattr__(
            self, "leaf_modules", _string_tuple(self.leaf_modules, "leaf_modules", "class or module names")
        )
        object.__setattr__(self, "rules", _string_tuple(self.rules, "rules", "paths of rule files"))
        object.__setattr__(self, "at", _string_tuple(self.at, "at", "module names or globs"))
        object.__setattr__(self, "target", _string_tuple(self.target, "target", "module names or globs, or 'auto'"))
        if not isinstance(self.groups, (list, tuple)) or len(self.groups) > MAX_PATTERNS:
            raise ConfigError(f"groups: expected at most {MAX_PATTERNS} groups of blocks, got {self.groups!r:.80}")
        object.__setattr__(self, "groups", tuple(_group(g, i) for i, g in enumerate(self.groups)))
        for group in self.groups:  # each group's options checked as the options themselves are
            self.for_group(group)
        object.__setattr__(
            self, "blocks", tuple(_block_range(b) for b in _string_tuple(self.blocks, "blocks", "ranges"))
        )
        for name in ("include", "exclude"):
            object.__setattr__(self, name, _string_tuple(getattr(self, name), name, "module name globs"))

    def _apply_style(self) -> None:
        """Fill every option left unset from the style; ``excitation`` is ``gate``'s old name."""
        if self.excitation is not None:
            if self.gate is not None and self.gate != self.excitation:
                raise ConfigError(f"gate: {self.gate!r} and excitation={self.excitation!r} disagree (one is enough)")
            object.__setattr__(self, "gate", self.excitation)
        if self.rounding in RENAMED_ROUNDINGS:
            new = RENAMED_ROUNDINGS[self.rounding]
            warnings.warn(f"rounding={self.rounding!r} is now called {new!r}", DeprecationWarning, stacklevel=4)
            object.__setattr__(self, "rounding", new)
        unset = [name for name in STYLED_FIELDS if getattr(self, name) is None]
        if unset or self.style != "paper":
            preset = self._preset()
            for name in unset:
                value = preset[name]
                object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)
            if isinstance(self.unit_options, Mapping):  # the style's options for its unit, under those given
                object.__setattr__(self, "unit_options", {**preset["unit_options"], **self.unit_options})
        object.__setattr__(self, "excitation", None)  # read once into gate: replace(gate=...) stays consistent

    def for_group(self, group: Group) -> InjectConfig:
        """The options of the units in ``group``'s blocks: these, with the group's own on top."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("groups", "excitation")}
        options = dict(group.options)
        if "unit_options" in options:  # the group's own unit options over the call's
            options["unit_options"] = {**self.unit_options, **options["unit_options"]}
        return InjectConfig(**{**values, **options})

    def _preset(self) -> dict[str, Any]:
        """The styled options' values where none is given: the paper's, under the unit's published
        conventions (the style named like the unit, if any), under the chosen style (a style leaves out
        what it shares with the paper), under the chosen style's entry for this unit. The unit is the one
        given, else the style's."""
        chosen = style(self.style) if self.style != "paper" else Style("paper", {})  # paper: the base itself
        unit = self.unit if self.unit is not None else chosen.options.get("unit", _PAPER["unit"])
        # the style's options describe its own unit; another unit takes only its placement, and the
        # style's entry for that unit (timm's gc at r=8), not the widths and bias written for SE
        own = chosen.options if unit == chosen.options.get("unit", _PAPER["unit"]) else {}
        own = own or {k: v for k, v in chosen.options.items() if k == "position"}
        for_unit = chosen.units.get(unit, {})
        unit_options = {**own.get("unit_options", {}), **for_unit.get("unit_options", {})}
        return {
            **_PAPER,
            **unit_conventions(unit),
            **{k: v for k, v in own.items() if k not in ("unit", "unit_options")},
            **{k: v for k, v in for_unit.items() if k != "unit_options"},
            "unit": unit,
            "unit_options": unit_options,
        }

    def set_options(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` whose value is not what the style and the unit's conventions give (nor the
        field's default): the options this config sets on purpose.

        >>> InjectConfig(unit="eca", squeeze="max").set_options(["squeeze", "act"])
        ['squeeze']
        """
        preset = self._preset()
        defaults = {f.name: f.default for f in fields(self)}
        return [n for n in names if getattr(self, n) != preset.get(n, defaults[n])]

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Help text of every field, for the CLI and the docs."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_tuple(value: object, name: str, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, (str, PathLike)) else value
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{name}: expected {what}, got {value!r}")
    if len(items) > MAX_PATTERNS:
        raise ConfigError(f"{name}: at most {MAX_PATTERNS} {what}, got {len(items):,}")
    items = tuple(fspath(v) if isinstance(v, PathLike) else v for v in items)
    for item in items:
        if not isinstance(item, str) or not item or len(item) > MAX_NAME_LENGTH:
            raise ConfigError(f"{name}: expected {what} (of at most {MAX_NAME_LENGTH} characters), got {item!r:.80}")
    return tuple(dict.fromkeys(items))  # a name given twice means it once


def parse_block_range(text: str) -> tuple[int, int, int]:
    """``"3:2-4"`` -> (3, 2, 4), ``"4:1"`` -> (4, 1, 1): a stage and a range of its blocks, from 1."""
    stage, colon, span = text.partition(":")
    first, dash, last = span.partition("-")
    try:
        numbers = (int(stage), int(first), int(last) if dash else int(first))
    except ValueError:
        raise ConfigError(f"blocks: expected STAGE:FIRST-LAST or STAGE:BLOCK such as '3:2-4', got {text!r}") from None
    if not colon or min(numbers) < 1 or numbers[2] < numbers[1]:
        raise ConfigError(f"blocks: expected STAGE:FIRST-LAST with numbers from 1 and FIRST <= LAST, got {text!r}")
    return numbers


def _block_range(text: str) -> str:
    parse_block_range(text)  # checked here, kept as written (recipes store it as data)
    return text.replace(" ", "")


def _group(value: object, index: int) -> Group:
    """A Group from a Group or a mapping ``{"blocks": [...], "r": 32, ...}`` (recipes store
    ``{"blocks": [...], "options": {...}}``); the field named in errors is ``groups[index]``."""
    where = f"groups[{index}]"
    blocks: object
    if isinstance(value, Group):
        blocks, options = value.blocks, dict(value.options)
    elif isinstance(value, Mapping):
        rest = {k: v for k, v in value.items() if k not in ("blocks", "options")}
        nested = value.get("options", {})
        if not isinstance(nested, Mapping):
            raise ConfigError(f"{where}.options: expected a mapping of options, got {nested!r}")
        blocks, options = value.get("blocks"), {**nested, **rest}
    else:
        raise ConfigError(f"{where}: expected {{'blocks': [...], option: value, ...}}, got {value!r}")
    globs = _string_tuple(blocks, f"{where}.blocks", "block name globs")
    unknown = sorted(set(options) - set(GROUP_FIELDS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: a group sets {', '.join(GROUP_FIELDS)}")
    if not options:
        raise ConfigError(f"{where}: no options; a group changes at least one of {', '.join(GROUP_FIELDS)}")
    return Group(globs, {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def _validate_r(r: object) -> int | tuple[int, ...]:
    if isinstance(r, int) and _is_int(r):
        if not 1 <= r <= MAX_R:
            raise ConfigError(f"r: the reduction ratio must be an integer from 1 to {MAX_R}, got {r}")
        return r
    if isinstance(r, (list, tuple)) and r and all(_is_int(v) for v in r):
        bad = [v for v in r if not 1 <= v <= MAX_R]
        if bad:
            raise ConfigError(f"r: every reduction ratio must be an integer from 1 to {MAX_R}, got {bad[0]}")
        if len(r) > MAX_STAGES:
            raise ConfigError(f"r: at most {MAX_STAGES} ratios (one per stage), got {len(r)}")
        return r[0] if len(r) == 1 else tuple(r)
    raise ConfigError(f"r: expected a positive integer or a list of them, got {r!r}")


def _validate_stages(stages: object) -> tuple[int, ...]:
    if _is_int(stages):
        stages = (stages,)
    if not isinstance(stages, (list, tuple)) or not stages or not all(_is_int(s) for s in stages):
        raise ConfigError(f"stages: expected stage numbers counted from 1, got {stages!r}")
    if any(s < 1 for s in stages):
        raise ConfigError(f"stages: stage numbers count from 1, got {min(stages)}")
    if max(stages) > MAX_STAGES:
        raise ConfigError(f"stages: stage numbers go up to {MAX_STAGES}, got {max(stages)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: a stage is listed twice in {list(stages)}")
    return tuple(sorted(stages))


# --- styles: SE conventions by name ---------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """A named set of InjectConfig options (``style="timm"``), read from a style file."""

    name: str
    options: dict[str, Any]
    description: str = ""
    source: str = ""
    # the style's conventions for units other than its own: unit name -> options (e.g. timm's gc at r=8)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    # blocks the family's design gives other options by name (MixNet's searched ratio per stage): after
    # the call's own groups, yielding to options the call sets; a group naming no block of a network is
    # no error (the names are the family's own network's)
    groups: tuple[Group, ...] = ()


_STYLE_KEYS = {"name", "description", "options", "units", "groups"}


def _style_error(source: str, name: str | None, field_name: str | None, problem: str) -> Exception:
    return table_error(ConfigError, source, "style", name, field_name, problem)


def _style_options(options: object, source: str, name: str, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    """One table of a style's options, each checked as the option itself checks it."""
    if not isinstance(options, dict) or not options:
        raise _style_error(source, name, where, 'expected a table of options, e.g. { r = 8, act = "silu" }')
    for key in options:
        if key not in allowed:
            raise _style_error(source, name, f"{where}.{key}", f"a style sets {', '.join(allowed)}; not {key!r}")
    unit_options = options.get("unit_options", {})
    if not isinstance(unit_options, dict):
        raise _style_error(source, name, f"{where}.unit_options", f"expected a table, got {unit_options!r}")
    try:  # every value checked as the option itself checks it
        InjectConfig.from_dict({**{k: v for k, v in _PAPER.items() if k not in options}, **options})
    except ConfigError as err:
        raise _style_error(source, name, where, str(err)) from None
    return dict(options)


def _parse_style(entry: dict[str, Any], source: str) -> Style:
    """One style from its table (its name and fields already checked by read_tables)."""
    name = entry["name"]
    options = _style_options(entry.get("options"), source, name, "options", STYLE_FIELDS)
    units = entry.get("units", {})
    if not isinstance(units, dict):
        raise _style_error(source, name, "units", "expected a table of unit = { options }, e.g. { gc = { r = 8 } }")
    per_unit = {}
    for unit, unit_entry in units.items():
        if not unit.isidentifier():
            raise _style_error(source, name, f"units.{unit}", "expected the name of a unit such as 'gc'")
        allowed = tuple(f for f in STYLE_FIELDS if f != "unit")
        per_unit[unit] = _style_options(unit_entry, source, name, f"units.{unit}", allowed)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise _style_error(source, name, "description", f"expected a string, got {description!r}")
    return Style(name, options, description, source, per_unit, _style_groups(entry.get("groups", []), source, name))


def _style_groups(groups: object, source: str, name: str) -> tuple[Group, ...]:
    """A style's groups, each checked as the ``groups`` option checks it."""
    if not isinstance(groups, list) or len(groups) > MAX_PATTERNS:
        raise _style_error(source, name, "groups", f"expected a list of at most {MAX_PATTERNS} groups of blocks")
    try:
        return InjectConfig(groups=tuple(groups)).groups
    except ConfigError as err:
        raise _style_error(source, name, "groups", str(err)) from None


def parse_styles(text: str, source: str) -> list[Style]:
    """The styles of one TOML document (``source`` names it in errors); nothing is registered."""
    entries = read_tables(text, source, "style", _STYLE_KEYS, ConfigError, identifier_names=True)
    return [_parse_style(entry, source) for entry in entries]


# the paper's options: the base every style starts from (and what validates a style on its own)
_PAPER: dict[str, Any] = {
    "position": "standard",
    "r": 16,
    "act": "relu",
    "gate": "sigmoid",
    "bias": False,
    "rounding": "floor",
    "reduce_from": "channels",
    "unit": "se",
}
_USER_STYLES: dict[str, Style] = {}


def builtin_data_dir() -> Path:
    """The shipped rules and styles: inside the installed package, or the checkout's ``rules/``."""
    packaged = Path(str(resources.files("se_inject"))) / "rules"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "rules"


_PAPER_STYLE = Style("paper", dict(_PAPER), "Hu et al.: the defaults every other style starts from", "built in")


@cache
def _builtin_styles() -> dict[str, Style]:
    found: dict[str, Style] = {"paper": _PAPER_STYLE}
    # se.toml first: paper's own descendants (timm, efficientnet, ...) lead the lists, the families follow
    for path in sorted((builtin_data_dir() / "styles").glob("*.toml"), key=lambda p: (p.name != "se.toml", p.name)):
        for entry in parse_styles(path.read_text(encoding="utf-8"), str(path)):
            if entry.name in found:
                raise ConfigError(f"{path}: style '{entry.name}' is defined twice among the built-in styles")
            found[entry.name] = entry
    return found


def builtin_styles() -> dict[str, Style]:
    """The styles se_inject ships: ``paper`` and those of ``rules/styles/`` (not those registered)."""
    return dict(_builtin_styles())


def styles() -> dict[str, Style]:
    """Every known style: ``paper``, the built-in ones, then those registered."""
    return {**_builtin_styles(), **_USER_STYLES}


def style(name: str) -> Style:
    """The style called ``name``."""
    if name == "paper":  # the base of every other: known without reading a file
        return _PAPER_STYLE
    known = styles()
    if not isinstance(name, str) or name not in known:
        listed = ", ".join(list(known)[:8])
        raise ConfigError(
            f"style: {name!r} is not a style; styles are {listed}, ... ({len(known)}: se-inject rules lists them)"
        )
    return known[name]


def unit_conventions(unit: str) -> dict[str, Any]:
    """The published conventions of ``unit``: the options of the style named like it (``ese``'s hard
    sigmoid and bias, say), or none; explicit options and a chosen style override them."""
    if unit == "se":  # the paper's own unit: its conventions are the paper's
        return {}
    found = styles().get(unit)
    return dict(found.options) if found is not None else {}


def register_style(*entries: Style) -> tuple[Style, ...]:
    """Make ``entries`` known by their names (``style=entry.name``); if any name is already known,
    none is registered."""
    known = styles()
    for entry in entries:
        if entry.name in known:
            raise ConfigError(f"style: '{entry.name}' is already defined ({known[entry.name].source or 'built in'})")
    for entry in entries:
        _USER_STYLES[entry.name] = entry
    return entries
