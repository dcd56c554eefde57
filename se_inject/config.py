"""The options of an injection, validated once, in one frozen dataclass.

Each field carries its help text in ``metadata["help"]`` (the CLI reuses it), choices are
``Literal`` types, and a bad value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from os import PathLike, fspath
from typing import Any, Literal, get_args

from se_inject.errors import ConfigError

Position = Literal["standard", "pre", "post", "identity", "inner"]
Squeeze = Literal["avg", "max", "none"]
Excitation = Literal["sigmoid", "tanh", "relu"]
Rounding = Literal["floor", "round", "ceil", "multiple8"]
Init = Literal["preserve", "paper"]
Existing = Literal["skip", "stack"]

POSITIONS: tuple[str, ...] = get_args(Position)
SQUEEZES: tuple[str, ...] = get_args(Squeeze)
EXCITATIONS: tuple[str, ...] = get_args(Excitation)
ROUNDINGS: tuple[str, ...] = get_args(Rounding)
INITS: tuple[str, ...] = get_args(Init)
EXISTINGS: tuple[str, ...] = get_args(Existing)


@dataclass(frozen=True)
class InjectConfig:
    """Where SE units go and what they look like.

    Example::

        cfg = InjectConfig(position="standard", r=16, stages=(2, 3, 4))
    """

    position: Position = field(
        default="standard",
        metadata={"help": "where the unit goes in a residual block: " + ", ".join(POSITIONS)},
    )
    r: int | tuple[int, ...] = field(
        default=16,
        metadata={"help": "reduction ratio: one int, or one per stage (all stages, or the selected ones)"},
    )
    stages: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "stages (numbered from 1 over stages that hold sites) that get units; None: all"},
    )
    squeeze: Squeeze = field(
        default="avg",
        metadata={"help": "squeeze operator: avg or max pooling, or none (the paper's NoSqueeze control)"},
    )
    excitation: Excitation = field(
        default="sigmoid", metadata={"help": "gating non-linearity of the excitation: " + ", ".join(EXCITATIONS)}
    )
    bias: bool = field(default=False, metadata={"help": "bias on the two FC layers (off: the paper's ResNet setting)"})
    rounding: Rounding = field(
        default="floor",
        metadata={
            "help": "hidden width when C/r is not whole: floor, round, ceil, or multiple8 (timm's); never below 1"
        },
    )
    init: Init = field(
        default="preserve",
        metadata={
            "help": "preserve: the model computes exactly what it did at insertion; paper: standard init, sigmoid gate"
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
        default="se",
        metadata={"help": "the unit inserted: a name registered with se_inject.register_unit (built in: se)"},
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
        for name, choices in (
            ("position", POSITIONS),
            ("squeeze", SQUEEZES),
            ("excitation", EXCITATIONS),
            ("rounding", ROUNDINGS),
            ("init", INITS),
            ("existing", EXISTINGS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
        object.__setattr__(self, "r", _validate_r(self.r))
        if self.stages is not None:
            object.__setattr__(self, "stages", _validate_stages(self.stages))
        if not isinstance(self.unit, str) or not self.unit.isidentifier():
            raise ConfigError(f"unit: expected the name of a registered unit such as 'se', got {self.unit!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias: expected True or False, got {self.bias!r}")
        object.__setattr__(
            self, "leaf_modules", _string_tuple(self.leaf_modules, "leaf_modules", "class or module names")
        )
        object.__setattr__(self, "rules", _string_tuple(self.rules, "rules", "paths of rule files"))

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
    items = tuple(fspath(v) if isinstance(v, PathLike) else v for v in items)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{name}: expected {what}, got {item!r}")
    return items


def _validate_r(r: object) -> int | tuple[int, ...]:
    if isinstance(r, int) and _is_int(r):
        if r <= 0:
            raise ConfigError(f"r: the reduction ratio must be a positive integer, got {r}")
        return r
    if isinstance(r, (list, tuple)) and r and all(_is_int(v) for v in r):
        bad = [v for v in r if v <= 0]
        if bad:
            raise ConfigError(f"r: every reduction ratio must be a positive integer, got {bad[0]}")
        return r[0] if len(r) == 1 else tuple(r)
    raise ConfigError(f"r: expected a positive integer or a list of them, got {r!r}")


def _validate_stages(stages: object) -> tuple[int, ...]:
    if _is_int(stages):
        stages = (stages,)
    if not isinstance(stages, (list, tuple)) or not stages or not all(_is_int(s) for s in stages):
        raise ConfigError(f"stages: expected stage numbers counted from 1, got {stages!r}")
    if any(s < 1 for s in stages):
        raise ConfigError(f"stages: stage numbers count from 1, got {min(stages)}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: a stage is listed twice in {list(stages)}")
    return tuple(sorted(stages))
