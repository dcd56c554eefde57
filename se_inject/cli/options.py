"""The options the commands share, declared once.

Each option's default and help text live on a field of :class:`~se_inject.config.InjectConfig`,
:class:`~se_inject.train.config.FinetuneConfig` or :class:`~se_inject.train.config.ExperimentConfig`;
the parsers here read option text with the one grammar (:mod:`se_inject.grammar`). Every command that
injects takes every injection option through :func:`takes_injection_options`, under the same names.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any, TypeVar

import typer

from se_inject.config import MAX_IN_CHANS, InjectConfig
from se_inject.errors import ConfigError
from se_inject.grammar import as_tuple, field_types, parse_int_list, read_options, read_value
from se_inject.io.sources import syntaxes
from se_inject.train.config import ARM_TUNING, ExperimentConfig, FinetuneConfig

MODEL_HELP = f"the model: {syntaxes()} (se-inject sources lists them)"
Command = TypeVar("Command", bound=Callable[..., Any])


def _field(config: type, name: str) -> Field[Any]:
    for f in fields(config):
        if f.name == name:
            return f
    raise KeyError(f"{config.__name__} has no field {name!r}")


def _option(config: type, name: str, *flags: str, default: Any = MISSING, suffix: str = "", **extra: Any) -> Any:
    f = _field(config, name)
    value = f.default if default is MISSING else default
    names = flags or (f"--{name.replace('_', '-')}",)
    return typer.Option(value, *names, help=f.metadata.get("help", "") + suffix, **extra)


# --- the injection options: every command that injects takes all of them ----------------------

_LISTS = {"at": "--at", "groups": "--group", "include": "--include", "exclude": "--exclude", "blocks": "--blocks"}
_LISTS |= {"unit_options": "--unit-option", "leaf_modules": "--leaf", "rules": "--rules", "target": "--target"}
_TEXTS = ("position", "r", "stages", "gate", "act", "rounding", "reduce_from")  # None: the style's value


def _injection_parameter(name: str) -> tuple[Any, Any]:
    """(type, typer option) of ``InjectConfig.<name>`` on the command line."""
    if name in _LISTS:
        said = "repeatable" in _field(InjectConfig, name).metadata.get("help", "")
        return list[str], _option(InjectConfig, name, _LISTS[name], default=[], suffix="" if said else " (repeatable)")
    if name == "r":  # one ratio or one per stage, read by the grammar
        return str | None, _option(InjectConfig, "r", "--r", "-r", default=None, suffix=" (e.g. 16 or 8,16,16,32)")
    if name == "stages":
        return str | None, _option(InjectConfig, "stages", default=None, suffix=" (e.g. 2,3 or 2-4)")
    if name == "position":
        return str | None, _option(InjectConfig, "position", "--position", "-p")
    if name == "bias":
        return bool | None, _option(InjectConfig, "bias", "--bias/--no-bias")
    if name == "hidden":
        return int | None, _option(InjectConfig, "hidden")
    if name == "excitation":  # gate's old name, still read
        return str | None, _option(InjectConfig, "excitation", hidden=True)
    return (str | None if name in _TEXTS else str), _option(InjectConfig, name)


def _injection_parameters() -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    found = []
    for f in fields(InjectConfig):
        annotation, default = _injection_parameter(f.name)
        found.append(inspect.Parameter(f.name, keyword, default=default, annotation=annotation))
    style_files = typer.Option(
        [], "--style-file", help="a style file (TOML) whose styles --style can name (repeatable)"
    )
    found.append(inspect.Parameter("style_files", keyword, default=style_files, annotation=list[str]))
    return found


def takes_injection_options(command: Command) -> Command:
    """Give ``command`` every injection option (one per ``InjectConfig`` field, and ``--style-file``).

    The command declares ``ctx: typer.Context`` and ``injection: dict``; it receives the options the
    user gave, read and checked (:func:`injection_options`), as ``injection``.
    """
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "injection"]
    added = _injection_parameters()
    hints = {name: hint for name, hint in typing.get_type_hints(command).items() if name != "injection"}

    @functools.wraps(command)
    def with_injection(ctx: typer.Context, **values: Any) -> Any:
        given = {p.name: values.pop(p.name) for p in added if _given(ctx, p.name)}
        for p in added:
            values.pop(p.name, None)
        return command(ctx=ctx, injection=injection_options(given), **values)

    with_injection.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
    with_injection.__annotations__ = {**hints, **{p.name: p.annotation for p in added}}
    return typing.cast(Command, with_injection)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def injection_options(given: dict[str, Any]) -> dict[str, Any]:
    """The injection options typed on the command line, as ``InjectConfig.from_dict`` takes them: lists
    read by the grammar, style files registered, everything checked now (before any work)."""
    from se_inject.io.styles import load_style_file

    for path in given.pop("style_files", ()):
        load_style_file(path)
    options: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    if "r" in options:
        options["r"] = parse_int_list(options["r"], "--r")
    if "stages" in options:
        options["stages"] = parse_int_list(options["stages"], "--stages")
    if "groups" in options:
        options["groups"] = tuple(parse_group(text) for text in options["groups"])
    if "unit_options" in options:
        unit = options.get("unit") or InjectConfig(style=options.get("style", "paper")).unit
        options["unit_options"] = parse_unit_options(unit, list(options["unit_options"]))
    InjectConfig.from_dict(options)
    return options


# --- the other shared options ------------------------------------------------------------------


def finetune_option(name: str, *flags: str, **extra: Any) -> Any:
    """The option for ``FinetuneConfig.<name>``."""
    if isinstance(_field(FinetuneConfig, name).default, bool):
        flag = name.replace("_", "-")
        return _option(FinetuneConfig, name, f"--{flag}/--no-{flag}", **extra)
    return _option(FinetuneConfig, name, *flags, **extra)


def finetune_config(values: dict[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a command's parsed options (its ``locals()``): every field the
    command has an option for, the defaults for the others."""
    return FinetuneConfig(**{f.name: values[f.name] for f in fields(FinetuneConfig) if f.name in values})


def experiment_option(name: str) -> Any:
    """The option for ``ExperimentConfig.<name>``."""
    return _option(ExperimentConfig, name)


def input_size_option(help: str) -> Any:
    """``--input-size``: the one name of the input's spatial size, in every command."""
    return typer.Option(None, "--input-size", min=1, help=help)


def in_chans_option() -> Any:
    """``--in-chans``: the input's channels where the model does not say (timm's pretrained_cfg, a transformers
    config's num_channels, else its first convolution)."""
    return typer.Option(
        None,
        "--in-chans",
        min=1,
        max=MAX_IN_CHANS,
        help="input channels (default: the model's own, from its config or its first convolution)",
    )


def base_option() -> Any:
    """``--base``: the original a units-only save goes onto, as a checkpoint file."""
    return typer.Option(
        None,
        "--base",
        help="for a units-only save: a checkpoint of the original's weights, which the units go onto "
        "(default: the recipe's source, rebuilt)",
    )


def device_option() -> Any:
    return typer.Option("auto", "--device", help="auto, cpu or cuda")


def json_option(what: str) -> Any:
    return typer.Option(False, "--json", help=f"print the {what} as JSON")


def trust_code_option() -> Any:
    return typer.Option(False, "--trust-code", help="a saved recipe that names Python code may import and run it")


def num_classes_option(help: str) -> Any:
    return typer.Option(None, "--num-classes", min=0, help=help)


def checkpoint_option() -> Any:
    return typer.Option(None, "--checkpoint", help="trained weights (.safetensors, .pth) loaded before injection")


def pretrained_option() -> Any:
    return typer.Option(False, "--pretrained", help="timm's pretrained weights (needs a network)")


def nproc_option(help: str) -> Any:
    return typer.Option(1, "--nproc", min=1, help=help)


# --- parsers -------------------------------------------------------------------------------------


def parse_group(text: str) -> dict[str, Any]:
    """``"layer4.*:r=32,act=silu"`` -> ``{"blocks": ["layer4.*"], "r": 32, "act": "silu"}`` (globs
    joined with ``|``: ``"layer3.*|layer4.*:r=32"``); the values are read as InjectConfig declares them
    (the one grammar, se_inject.grammar) and checked by it."""
    blocks, colon, settings = text.partition(":")
    if not colon or not blocks.strip() or not settings.strip():
        raise ConfigError(
            f"--group: expected BLOCKS:OPTION=VALUE,... such as 'layer4.*:r=32,act=silu', got {text[:60]!r}"
        )
    options = read_options(settings, field_types(InjectConfig), "--group", "layer4.*:r=32,act=silu")
    return {"blocks": [b.strip() for b in blocks.split("|")], **options}


def parse_candidate(text: str, tuning: bool = False) -> dict[str, Any]:
    """``"position=pre,r=8,include=layer3.*|layer4.*"`` -> injection options, read as InjectConfig declares
    them (lists joined with ``|``) and checked by it now, as a group's are; with ``tuning``, an experiment's
    arm, which may also set its own fine-tuning (``unit_lr_scale=100``: ARM_TUNING, as FinetuneConfig reads it)."""
    own = {k: v for k, v in field_types(FinetuneConfig).items() if k in ARM_TUNING} if tuning else {}
    options = read_options(text, {**field_types(InjectConfig), **own}, "--candidate", "position=pre,r=8")
    unknown = sorted(set(options) - set(field_types(InjectConfig)) - set(own))
    if unknown:
        also = f" nor one of {', '.join(own)}" if own else ""
        raise ConfigError(f"--candidate: {unknown[0]}: not an injection option{also}; see se-inject inject --help")
    InjectConfig.from_dict({k: v for k, v in options.items() if k not in own})
    return options


def parse_number_list(text: str | None, option: str, kind: type = float) -> list[Any]:
    """``"1,30,100"`` -> [1.0, 30.0, 100.0] (None: none); each value read as ``kind`` with the one grammar."""
    return [read_value(value, kind, option) for value in parse_names(text, option)]


def parse_unit_options(unit: str, texts: list[str]) -> dict[str, Any]:
    """``["kernel_size=5", "fusion=scale"]`` -> ``{"kernel_size": 5, "fusion": "scale"}``, each value read as
    the unit's ``Options`` declares it; the unit checks names, types and bounds."""
    if not texts:
        return {}
    from se_inject.units.base import unit_class

    return read_options(texts, field_types(unit_class(unit).Options), "--unit-option", "kernel_size=5")


def parse_positive_list(text: str, option: str) -> tuple[int, ...]:
    """A list of positive integers (batch sizes and the like)."""
    values = as_tuple(parse_int_list(text, option))
    bad = [v for v in values if v < 1]
    if bad or not values:
        raise ConfigError(f"{option}: expected positive integers, got {text[:40]!r}")
    return values


def parse_batches(text: str | None) -> tuple[int, ...] | None:
    """``--batch 1,16``; None (not given) leaves the default to the API, which knows the device."""
    return None if text is None else parse_positive_list(text, "--batch")


def parse_names(text: str | None, option: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"] (None: no names); an empty name is refused."""
    if text is None:
        return []
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ConfigError(f"{option}: expected comma-separated names, got {text[:60]!r}")
    return names


def parse_ratios(text: str | None) -> tuple[int, ...]:
    """``--ratios 8,16,32``: reduction ratios to compare (None: none)."""
    return as_tuple(parse_int_list(text, "--ratios")) if text else ()


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 5`` (seeds 0-4), or a list of seeds as other lists are written: ``0,3,7`` or ``0-2``."""
    if "," in text or "-" in text.strip():
        return as_tuple(parse_int_list(text, "--seeds"))
    return tuple(range(parse_positive_list(text, "--seeds")[0]))


def check_save_target(directory: str | None, force: bool, option: str = "--save") -> None:
    """Refuse a --save/--out target before any work is done (it is checked again when written)."""
    if directory is not None:
        from se_inject.io.files import as_path, check_target
        from se_inject.io.layout import OWNED_FILES, RECIPE_FILE

        check_target(as_path(directory, option), force=force, owned=OWNED_FILES, marker=RECIPE_FILE)
