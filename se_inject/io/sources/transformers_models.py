"""``transformers:TYPE`` and ``transformers:DIR``: Hugging Face transformers image classifiers.

``transformers:resnet`` builds the model type's default configuration (``AutoConfig.for_model``);
``transformers:path/to/dir`` builds the ``config.json`` of a local directory (``save_pretrained``'s),
with its ``model.safetensors`` when there is one. Both with random weights where there are none, and
nothing downloaded. Files are data: no ``trust_remote_code``, and pickled ``pytorch_model.bin`` weights
are refused (loading a pickle can run code). ``num_classes`` sets the config's ``num_labels``; other
keyword arguments override config fields. transformers is an optional extra
(``pip install 'se-inject[transformers]'``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from se_inject.errors import ModelSpecError
from se_inject.io.files import read_text_file
from se_inject.io.sources.base import ModelSource, check_recorded_file, record_file, suggest

if TYPE_CHECKING:
    from torch import nn

MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few kilobytes
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


class TransformersSource(ModelSource):
    name = "transformers"
    prefix = "transformers:"
    syntax = "transformers:TYPE or transformers:DIR"
    example = "transformers:resnet"
    description = (
        "a Hugging Face transformers image classifier: a model type's default config, or a local directory's "
        "config.json (and model.safetensors); needs the transformers extra"
    )

    def check(self, spec: str) -> None:
        rest = spec.removeprefix(self.prefix)
        if not rest.strip() or not (_is_path(rest) or rest.replace("-", "_").isidentifier()):
            raise ModelSpecError(
                f"model spec {spec!r}: expected transformers:TYPE (a model type, e.g. transformers:resnet) or "
                "transformers:DIR (a directory holding a config.json, e.g. transformers:./my-resnet)"
            )

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        rest = spec.removeprefix(self.prefix)
        overrides = {**optional, **kwargs}
        if "num_classes" in overrides:
            overrides["num_labels"] = overrides.pop("num_classes")
        if _is_path(rest):
            return _from_directory(Path(rest), overrides)
        return _from_type(rest, overrides)

    def identify(self, model: nn.Module, own: set[str]) -> str | None:
        """The local directory the model was loaded from (``from_pretrained`` records it in its config)."""
        config = getattr(model, "config", None)
        path = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        if not type(model).__module__.startswith("transformers.") or not isinstance(path, str) or not path:
            return None
        directory = Path(path)
        return f"{self.prefix}{directory.resolve()}" if (directory / "config.json").is_file() else None

    def record(self, spec: str) -> tuple[str | None, dict[str, str] | None]:
        rest = spec.removeprefix(self.prefix)
        if not _is_path(rest):
            return spec, None
        directory = Path(rest).resolve()
        config = directory / "config.json"
        if not config.is_file():
            return None, None
        return f"{self.prefix}{directory}", record_file(config)

    def check_recorded(self, source_file: dict[str, str] | None, directory: Path) -> None:
        check_recorded_file(source_file, directory, "model configuration")

    def names_file(self, spec: str, path: str) -> bool:
        return str(Path(spec.removeprefix(self.prefix)) / "config.json") == path


def _is_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(".") or Path(text).is_dir()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(
            "transformers: models need the transformers package: pip install 'se-inject[transformers]'"
        ) from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' progress bar off while the weights load (se_inject's commands print their own)."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def _from_type(model_type: str, overrides: dict[str, Any]) -> nn.Module:
    transformers = _transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    known = sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in known or model_type not in CONFIG_MAPPING:
        raise ModelSpecError(
            f"transformers has no image classifier of model type '{model_type}'{suggest(model_type, known)}"
        )
    config = transformers.AutoConfig.for_model(model_type, **overrides)
    return _model_class(config)(config)


def _model_class(config: Any) -> Any:
    """The class ``config.architectures`` names where it is a transformers model class, else the type's
    image classifier; never a class from outside transformers (that would run a repository's code)."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if not names:
        raise ModelSpecError(f"transformers model type '{config.model_type}' has no image classifier")
    return getattr(transformers, names if isinstance(names, str) else names[0])


def from_saved_config(directory: Path) -> nn.Module | None:
    """The model a saved retrofit's ``config.json`` describes (a transformers model injected from an object
    records no other source), with random weights: the saved weights go into it; None where the file is
    not a transformers configuration or transformers is not installed."""
    try:
        declared = _read_config(directory)
        _transformers()
    except ModelSpecError:
        return None
    if not isinstance(declared, dict) or "model_type" not in declared:
        return None
    model = _from_directory(directory, {}, weights=False, declared=declared)
    model.config._name_or_path = ""  # type: ignore[union-attr]  # the retrofit's directory is not its base's
    return model


def _read_config(directory: Path) -> object:
    """``directory``'s config.json, parsed: a regular file of at most ``MAX_CONFIG_BYTES`` of JSON; anything
    else is a ModelSpecError."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSpecError(f"transformers:{directory}: no config.json there (save_pretrained writes one)")
    text = read_text_file(config_file, limit=MAX_CONFIG_BYTES, what="model configuration", error=ModelSpecError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"{config_file}: not a JSON configuration ({err})") from None


def _from_directory(
    directory: Path, overrides: dict[str, Any], weights: bool = True, declared: object = None
) -> nn.Module:
    """The model of ``directory``'s config.json (``declared``: the file already read), checked as data before
    transformers reads it: a configuration naming code of its own (``auto_map``) is refused."""
    transformers = _transformers()
    declared = _read_config(directory) if declared is None else declared
    if not isinstance(declared, dict) or "auto_map" in declared:
        raise ModelSpecError(
            f"{directory / 'config.json'}: a configuration with auto_map names code in the repository, "
            "which se_inject never runs"
        )
    config = transformers.AutoConfig.from_pretrained(
        directory, local_files_only=True, trust_remote_code=False, **overrides
    )
    import torch

    if hasattr(config, "se_inject"):  # se_inject's note in a saved retrofit's config.json: not the model's
        delattr(config, "se_inject")
    cls = _model_class(config)
    shapes_only = torch.get_default_device().type == "meta"  # the plan and the report need no weights
    if weights and not shapes_only and any((directory / name).is_file() for name in _SAFETENSORS):
        with _quiet(transformers):
            return cls.from_pretrained(
                directory,
                config=config,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                ignore_mismatched_sizes="num_labels" in overrides,  # a new head for the user's classes
            )
    pickled = [name for name in _PICKLED if (directory / name).is_file()]
    if pickled and weights and not shapes_only:
        raise ModelSpecError(
            f"transformers:{directory}: its weights are a pickle ({pickled[0]}), which can run code when loaded; "
            "save them as model.safetensors (save_pretrained does by default)"
        )
    return cls(config)
