"""The recipe of an injection: what :func:`se_inject.apply` needs to do it again.

JSON only (no pickles): the source model, every option, the units and the library versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from se_inject._version import __version__
from se_inject.config import InjectConfig
from se_inject.errors import ArtifactError

RECIPE_FILE = "recipe.json"
FORMAT_VERSION = 1
SITE_KEYS = ("name", "rule", "stage", "block", "channels", "hidden", "r")


@dataclass(frozen=True)
class Recipe:
    """Everything needed to rebuild an injected model from its original architecture."""

    source: str | None  # a load_model spec (timm name, torchvision:NAME, module:callable), if known
    options: dict[str, Any]  # the InjectConfig fields
    input_size: tuple[int, int]
    sites: tuple[dict[str, Any], ...]  # name, rule, stage, block, channels, hidden, r of every unit
    versions: dict[str, str] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments, e.g. num_classes
    pruned: list[str] = field(default_factory=list)  # units replaced by a fixed per-channel scale
    format_version: int = FORMAT_VERSION

    def config(self) -> InjectConfig:
        return InjectConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = RECIPE_FILE) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        missing = sorted({"options", "sites", "input_size"} - set(data))
        if missing:
            raise ArtifactError(f"{source}: field '{missing[0]}' is missing; is this an se_inject recipe?")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: recipe format {data['format_version']} is newer than this se_inject reads "
                f"({FORMAT_VERSION}); upgrade se_inject"
            )
        values = {k: v for k, v in data.items() if k in known}
        values["input_size"] = tuple(values["input_size"])
        values["sites"] = tuple(values["sites"])
        return cls(**values)


def versions() -> dict[str, str]:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "se_inject": __version__}


