"""The user's own code: ``package.module:callable`` and ``path/to/file.py:callable``.

Building imports the module (or runs the file) and calls the callable: a saved recipe that names
such a source is rebuilt only with ``trust_code=True``. A file is recorded with its absolute path
and SHA-256, so the model loads from any directory and a changed file is noticed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from se_inject.errors import ModelSpecError, NeedsValuesError, one_line
from se_inject.io.sources.base import ModelSource, check_recorded_file, record_file, suggest

if TYPE_CHECKING:
    from torch import nn


class ModuleSource(ModelSource):
    name = "module"
    syntax = "package.module:callable"
    example = "mynets.resnet:build"
    description = "a callable in an importable module, called with no arguments (runs your code)"
    runs_code = True
    takes_num_classes = False

    def claims(self, spec: str) -> bool:
        return ":" in spec

    def check(self, spec: str) -> None:
        source, _, attr = spec.rpartition(":")
        if not attr.isidentifier() or not source:
            raise ModelSpecError(
                f"model spec {spec!r}: expected module.path:callable or path/to/file.py:callable, "
                "with a callable's name after the ':'"
            )
        if not all(part.isidentifier() for part in source.split(".")):
            raise ModelSpecError(
                f"model spec {spec!r}: '{source}' is not an importable module name (dotted identifiers; relative "
                "names are not allowed); for a file give its path ending in .py"
            )

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        return _call(spec, _import(spec.rpartition(":")[0]), kwargs, optional, folder=None)


class FileSource(ModuleSource):
    name = "file"
    syntax = "path/to/file.py:callable"
    example = "nets/mine.py:build"
    description = "a callable in a Python file, called with no arguments (runs your code)"

    def claims(self, spec: str) -> bool:
        return spec.rpartition(":")[0].endswith(".py")

    def check(self, spec: str) -> None:
        if not spec.rpartition(":")[2].isidentifier():
            super().check(spec)  # the module kind's message about the callable's name

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        path = Path(spec.rpartition(":")[0])
        return _call(spec, _run_file(path), kwargs, optional, folder=path.resolve().parent)

    def record(self, spec: str) -> tuple[str | None, dict[str, str] | None]:
        path_text, _, attr = spec.rpartition(":")
        path = Path(path_text).resolve()
        if not path.is_file():
            return None, None
        return f"{path}:{attr}", record_file(path)

    def check_recorded(self, source_file: dict[str, str] | None, directory: Path) -> None:
        check_recorded_file(source_file, directory, "model file")

    def names_file(self, spec: str, path: str) -> bool:
        return spec.startswith(path + ":")


@contextlib.contextmanager
def _importable_folder(folder: Path | None) -> Iterator[None]:
    """``folder`` on sys.path while a model file loads and builds, so it may import its siblings."""
    entry = str(folder)
    added = folder is not None and entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _run_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ModelSpecError(f"no such file: '{path}'")
    module_name = f"se_inject_user_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"'{path}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        with _importable_folder(path.resolve().parent):
            spec.loader.exec_module(module)
    except NeedsValuesError:  # on the meta device: load_model builds for real instead
        del sys.modules[module_name]
        raise
    except (Exception, SystemExit) as err:  # a user file may call sys.exit() at import
        del sys.modules[module_name]
        raise ModelSpecError(f"importing '{path}' failed: {one_line(err)}") from err
    return module


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ModelSpecError(f"cannot import module '{name}': {err}") from err
    except NeedsValuesError:  # on the meta device: load_model builds for real instead
        raise
    except (Exception, SystemExit) as err:
        raise ModelSpecError(f"importing module '{name}' failed: {one_line(err)}") from err


def refused_kwargs(factory: object, kwargs: dict) -> list[str]:
    """The names in ``kwargs`` that ``factory``'s signature does not accept (all accepted: [])."""
    try:
        params = inspect.signature(factory).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    names = {
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return sorted(set(kwargs) - names)


def _call(spec: str, module: ModuleType, kwargs: dict, optional: dict, folder: Path | None) -> nn.Module:
    from torch import nn

    source, _, attr = spec.rpartition(":")
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ModelSpecError(f"'{source}' has no callable '{attr}'{suggest(attr, public)}")
    not_taken = refused_kwargs(factory, optional)
    kwargs = {**{k: v for k, v in optional.items() if k not in not_taken}, **kwargs}
    refused = refused_kwargs(factory, kwargs)
    if refused:
        raise ModelSpecError(
            f"{spec}() does not take {', '.join(refused)}; add the parameter to {attr}() "
            "or build the model yourself and pass it to the API"
        )
    try:
        with _importable_folder(folder):
            model = factory(**kwargs)
    except NeedsValuesError:  # on the meta device: load_model builds for real instead
        raise
    except (Exception, SystemExit) as err:
        raise ModelSpecError(f"calling {spec}() failed: {one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model
