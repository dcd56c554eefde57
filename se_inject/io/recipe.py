"""The recipe of an injection: what :func:`se_inject.apply` needs to do it again.

JSON only (no pickles): the source model, every option, the units, the classifier head and the
library versions. A recipe is data that may come from anyone, so :meth:`Recipe.from_json` checks
every field against the schema below (known keys, types, ranges, ``format_version``) before any
of it is used, and names the field it refuses. What a recipe can make se_inject do is limited on
purpose: its source is rebuilt only from timm and torchvision names unless the caller trusts code
(see :func:`se_inject.load`), and its ``model_kwargs`` pass an allow-list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from se_inject._version import __version__
from se_inject.config import MAX_IN_CHANS, InjectConfig
from se_inject.errors import ArtifactError, ConfigError, ModelSpecError, one_line
from se_inject.io.base_weights import combined_digest
from se_inject.io.layout import RECIPE_FILE
from se_inject.io.models import RECIPE_MODEL_KWARGS, spec_kind
from se_inject.io.sources import source_of
from se_inject.units.base import unit_class

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 4  # 2: head and source_file; 3: tied; 4: base and weights; older recipes are read as well
SITE_KEYS = ("name", "rule", "stage", "block", "channels", "hidden", "r")
MAX_RECIPE_BYTES = 16 << 20
MAX_SIZE = 16384  # the largest input side a recipe may ask for
MAX_UNITS = 100_000
MAX_TENSORS = 1_000_000  # tensors of a base model a recipe may list
WEIGHTS_KINDS = ("all", "units")
_SHA256_HEX = set("0123456789abcdef")


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
    head: dict[str, Any] | None = None  # the classifier when saved: name, in_features, out_features
    source_file: dict[str, str] | None = None  # for a file.py:callable source: its absolute path and sha256
    tied: dict[str, str] = field(default_factory=dict)  # alias -> the name its tensor is saved under (io/tied.py)
    in_chans: int | None = None  # the input channels given for the analysis (None: the model's own)
    # the base before injection: {"sha256": digest of the whole, "tensors": {name: digest}} (io/base_weights.py)
    base: dict[str, Any] | None = None
    weights: str = "all"  # what the saved weights file holds: every tensor, or only what the base lacks ("units")
    format_version: int = FORMAT_VERSION

    def config(self) -> InjectConfig:
        return InjectConfig.from_dict(self.options)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = RECIPE_FILE) -> Recipe:
        """Parse and validate a recipe; anything outside the schema is an ArtifactError naming the field."""
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, RecursionError, ValueError) as err:
            raise ArtifactError(f"{source}: not valid JSON ({one_line(err, 160, with_type=False)})") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: object, source: str = RECIPE_FILE) -> Recipe:
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArtifactError(
                f"{source}: field '{unknown[0]}' is not a recipe field; fields are {', '.join(sorted(known))}"
            )
        missing = sorted({"options", "sites", "input_size"} - set(data))
        if missing:
            raise ArtifactError(f"{source}: field '{missing[0]}' is missing; is this an se_inject recipe?")
        check = _Checker(source)
        version = data.get("format_version", 1)
        check.integer(version, "format_version", 1, None)
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: recipe format {version} is newer than this se_inject reads ({FORMAT_VERSION}); upgrade se_inject"
            )
        recipe = cls(
            source=check.source(data.get("source")),
            options=check.options(data["options"]),
            input_size=check.input_size(data["input_size"]),
            sites=check.sites(data["sites"]),
            versions=check.versions(data.get("versions", {})),
            model_kwargs=check.model_kwargs(data.get("model_kwargs", {})),
            pruned=check.string_list(data.get("pruned", []), "pruned"),
            head=check.head(data.get("head")),
            source_file=check.source_file(data.get("source_file"), data.get("source")),
            tied=check.tied(data.get("tied", {})),
            in_chans=None
            if data.get("in_chans") is None
            else check.integer(data["in_chans"], "in_chans", 1, MAX_IN_CHANS),
            base=check.base(data.get("base")),
            weights=check.choice(data.get("weights", "all"), "weights", WEIGHTS_KINDS),
            format_version=version,
        )
        if recipe.weights == "units" and recipe.base is None:
            raise ArtifactError(f"{source}: field 'base': a units-only save must record its base")
        names = {site["name"] for site in recipe.sites}
        stray = [name for name in recipe.pruned if name not in names]
        if stray:
            raise ArtifactError(f"{source}: field 'pruned': {stray[0]!r} is not a unit of the recipe's sites")
        return recipe


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


class _Checker:
    """Field-by-field validation of a recipe; every error names the file and the field."""

    def __init__(self, source: str) -> None:
        self.source_name = source

    def fail(self, name: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.source_name}: field '{name}': {problem}")

    def integer(self, value: object, name: str, low: int, high: int | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"expected an integer, got {value!r}"[:200])
        if value < low or (high is not None and value > high):
            raise self.fail(name, f"{value} is out of range ({low} to {high if high is not None else 'any'})")
        return value

    def string(self, value: object, name: str, limit: int = 4096) -> str:
        if not isinstance(value, str) or not value or len(value) > limit or "\0" in value:
            raise self.fail(name, f"expected a non-empty string of at most {limit} characters, got {value!r}"[:200])
        return value

    def string_list(self, value: object, name: str) -> list[str]:
        if not isinstance(value, list) or len(value) > MAX_UNITS:
            raise self.fail(name, "expected a list of strings")
        return [self.string(item, f"{name}[{i}]") for i, item in enumerate(value)]

    def source(self, value: object) -> str | None:
        if value is None:
            return None
        text = self.string(value, "source")
        try:
            spec_kind(text)
        except ModelSpecError as err:
            raise self.fail("source", str(err)) from None
        return text

    def options(self, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail("options", "expected an object of injection options")
        known = {f.name for f in fields(InjectConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise self.fail(f"options.{unknown[0]}", f"not an injection option; options are {', '.join(sorted(known))}")
        try:
            config = InjectConfig.from_dict(value)
            # the unit's own options, bounds included, before anything is built from them
            unit = unit_class(config.unit)
            for each in (config, *(config.for_group(g) for g in config.groups)):
                unit.check_config(each)
        except ConfigError as err:
            raise self.fail(f"options.{str(err).split(':')[0]}", str(err)) from None
        except TypeError as err:
            raise self.fail("options", str(err)) from None
        return dict(value)

    def input_size(self, value: object) -> tuple[int, int]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail("input_size", f"expected [height, width], got {value!r}"[:200])
        return (
            self.integer(value[0], "input_size[0]", 1, MAX_SIZE),
            self.integer(value[1], "input_size[1]", 1, MAX_SIZE),
        )

    def sites(self, value: object) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list) or len(value) > MAX_UNITS:
            raise self.fail("sites", f"expected a list of at most {MAX_UNITS:,} units")
        sites = []
        for i, site in enumerate(value):
            where = f"sites[{i}]"
            if not isinstance(site, dict) or set(site) != set(SITE_KEYS):
                raise self.fail(where, f"expected an object with exactly the keys {', '.join(SITE_KEYS)}")
            self.string(site["name"], f"{where}.name", 1000)
            self.string(site["rule"], f"{where}.rule", 200)
            self.integer(site["stage"], f"{where}.stage", 0, MAX_UNITS)
            self.integer(site["block"], f"{where}.block", 0, MAX_UNITS)
            self.integer(site["channels"], f"{where}.channels", 1, 1 << 20)
            self.integer(site["hidden"], f"{where}.hidden", 0, 1 << 20)  # 0: a unit without a bottleneck
            self.integer(site["r"], f"{where}.r", 1, 1 << 20)
            sites.append(dict(site))
        return tuple(sites)

    def versions(self, value: object) -> dict[str, str]:
        if not isinstance(value, dict) or len(value) > 32:
            raise self.fail("versions", "expected an object of library versions")
        return {self.string(k, "versions", 100): self.string(v, f"versions.{k}", 100) for k, v in value.items()}

    def model_kwargs(self, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail("model_kwargs", "expected an object of constructor arguments")
        for key, item in value.items():
            if key not in RECIPE_MODEL_KWARGS:
                raise self.fail(
                    f"model_kwargs.{key}",
                    f"not an allowed constructor argument; a recipe may pass only {', '.join(sorted(RECIPE_MODEL_KWARGS))}",
                )
            low, high = RECIPE_MODEL_KWARGS[key]
            self.integer(item, f"model_kwargs.{key}", low, high)
        return dict(value)

    def head(self, value: object) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"name", "in_features", "out_features"}:
            raise self.fail("head", "expected an object with name, in_features and out_features")
        self.string(value["name"], "head.name", 1000)
        self.integer(value["in_features"], "head.in_features", 1, 1 << 24)
        self.integer(value["out_features"], "head.out_features", 1, 1 << 24)
        return dict(value)

    def tied(self, value: object) -> dict[str, str]:
        if not isinstance(value, dict) or len(value) > MAX_UNITS:
            raise self.fail("tied", f"expected an object of at most {MAX_UNITS:,} alias -> name pairs")
        tied = {self.string(k, "tied", 1000): self.string(v, f"tied.{k}", 1000) for k, v in value.items()}
        chained = next((k for k, v in tied.items() if v in tied or k == v), None)
        if chained is not None:
            raise self.fail(
                f"tied.{chained}", "names a tensor that is itself an alias; each alias names a saved tensor"
            )
        return tied

    def digest(self, value: object, name: str) -> str:
        if not isinstance(value, str) or len(value) != 64 or not set(value) <= _SHA256_HEX:
            raise self.fail(name, "expected 64 lowercase hexadecimal digits")
        return value

    def choice(self, value: object, name: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(name, f"expected one of {', '.join(allowed)}, got {value!r}"[:200])
        return str(value)

    def base(self, value: object) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"sha256", "tensors"}:
            raise self.fail("base", "expected an object with sha256 and tensors")
        tensors = value["tensors"]
        if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
            raise self.fail("base.tensors", f"expected an object of at most {MAX_TENSORS:,} tensor digests")
        for key, digest in tensors.items():
            self.string(key, "base.tensors", 1000)
            self.digest(digest, f"base.tensors.{key}")
        self.digest(value["sha256"], "base.sha256")
        if combined_digest(tensors) != value["sha256"]:
            raise self.fail("base.sha256", "is not the digest of base.tensors; the recipe is damaged")
        return {"sha256": value["sha256"], "tensors": dict(tensors)}

    def source_file(self, value: object, source: object) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) != {"path", "sha256"}:
            raise self.fail("source_file", "expected an object with path and sha256")
        self.string(value["path"], "source_file.path")
        self.digest(value["sha256"], "source_file.sha256")
        if not isinstance(source, str) or not source_of(source).names_file(source, value["path"]):
            raise self.fail("source_file.path", "does not match the file named by 'source'")
        return dict(value)


RECIPE_ATTRIBUTE = "se_inject_recipe"
CONFIG_ATTRIBUTE = "se_inject_config"


def attach_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Record on ``model`` how it was made: ``model.se_inject_recipe``, and its options as
    ``model.se_inject_config`` (an InjectConfig), for the tools that save, train or inspect it."""
    setattr(model, RECIPE_ATTRIBUTE, recipe)  # setattr: nn.Module's attribute types know only tensors and modules
    setattr(model, CONFIG_ATTRIBUTE, recipe.config())


REPORT_ATTRIBUTE = "se_inject_report"


def attach_report(model: nn.Module, report: object) -> None:
    """Record on ``model`` the overhead report of the retrofit that made it (a model card shows it)."""
    setattr(model, REPORT_ATTRIBUTE, report)


def attached_report(model: nn.Module) -> Any:
    """The report :func:`attach_report` recorded on ``model``, or None."""
    return getattr(model, REPORT_ATTRIBUTE, None)


def attached_recipe(model: nn.Module) -> Recipe | None:
    """The recipe :func:`attach_recipe` recorded on ``model``; None for a model se_inject did not make."""
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return recipe if isinstance(recipe, Recipe) else None


def versions() -> dict[str, str]:
    import timm

    return {"torch": torch.__version__, "timm": timm.__version__, "se_inject": __version__}
