"""Command-line options made from the config dataclasses: each option's default and help text is
declared once, on the field of :class:`~se_inject.config.InjectConfig`,
:class:`~se_inject.train.config.FinetuneConfig` or :class:`~se_inject.train.config.ExperimentConfig`,
and every command that takes it builds it here."""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any

import typer

from se_inject.config import InjectConfig
from se_inject.train.config import ExperimentConfig, FinetuneConfig


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


def inject_option(name: str, *flags: str, **extra: Any) -> Any:
    """The option for ``InjectConfig.<name>``."""
    if name == "r":  # typed as text: one ratio or a list, parsed by the command
        return _option(
            InjectConfig,
            "r",
            "--r",
            "-r",
            default=None,
            suffix=" (e.g. 16 or 8,16,16,32)",
        )
    if name in ("include", "exclude", "at", "groups", "blocks", "unit_options"):  # repeatable on the command line
        return _option(InjectConfig, name, *(flags or (f"--{name}",)), default=[], suffix=" (repeatable)")
    if name == "stages":
        return _option(InjectConfig, "stages", "--stages", suffix=" (e.g. 2,3 or 2-4)")
    if name == "position":
        return _option(InjectConfig, "position", "--position", "-p", **extra)
    if name == "bias":
        return _option(InjectConfig, "bias", "--bias/--no-bias")
    if name == "excitation":
        return _option(InjectConfig, "excitation", "--excitation", hidden=True)
    return _option(InjectConfig, name, *flags, **extra)


def finetune_config(values: dict[str, Any]) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a command's parsed options (its ``locals()``): every field the
    command has an option for, the defaults for the others."""
    return FinetuneConfig(**{f.name: values[f.name] for f in fields(FinetuneConfig) if f.name in values})


def finetune_option(name: str, *flags: str, **extra: Any) -> Any:
    """The option for ``FinetuneConfig.<name>``."""
    if isinstance(_field(FinetuneConfig, name).default, bool):
        flag = name.replace("_", "-")
        return _option(FinetuneConfig, name, f"--{flag}/--no-{flag}", **extra)
    return _option(FinetuneConfig, name, *flags, **extra)


def experiment_option(name: str) -> Any:
    """The option for ``ExperimentConfig.<name>``."""
    return _option(ExperimentConfig, name)
