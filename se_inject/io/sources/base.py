"""The interface of a model source, and the registry of source kinds.

A model spec names where a model comes from: ``resnet50`` (timm), ``torchvision:resnet50``,
``package.module:callable``, ``path/to/file.py:callable``. Each kind is a :class:`ModelSource`
registered by name; the CLI's help, ``se-inject sources``, the recipe's checks and the trust rule
of :func:`se_inject.load` read this registry, so a new kind is one subclass and one
:func:`register_source` call.

Light on purpose (no torch at import): the command line lists the kinds in its help.

Example::

    class TinySource(ModelSource):
        name, prefix, syntax, example = "tiny", "tiny:", "tiny:NAME", "tiny:FunctionalResNet"
        description = "the tiny models of the test suite"

        def build(self, spec, kwargs, optional):
            return getattr(tiny_models, spec.removeprefix("tiny:"))(**kwargs)

    register_source(TinySource())
    se_inject.load_model("tiny:FunctionalResNet")
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from se_inject.errors import ArtifactError, ModelSpecError

if TYPE_CHECKING:
    from torch import nn

MAX_SPEC_LENGTH = 1000


class ModelSource:
    """One kind of model spec: how it is written, built, recorded in a recipe, and whether it runs code.

    Class attributes a kind sets:

    - ``name``: the kind's name (``se-inject sources`` lists it); ``syntax`` and ``example``: how a
      spec of this kind is written; ``description``: what it builds, in a few words.
    - ``prefix``: the text a spec of this kind starts with (``"torchvision:"``); a kind without one
      claims specs by their form (:meth:`claims`).
    - ``runs_code``: whether building imports and runs the user's Python code: a saved recipe naming
      such a source is rebuilt only with ``trust_code=True``.
    - ``takes_num_classes``: whether every constructor of this kind takes ``num_classes``; where not
      (a user's callable), the head is resized after building instead.
    - ``headless_classes``: the ``num_classes`` that builds the model without a head (timm's 0),
      recorded for a model saved headless; None where there is none.
    """

    name: ClassVar[str]
    syntax: ClassVar[str]
    example: ClassVar[str]
    description: ClassVar[str] = ""
    prefix: ClassVar[str | None] = None
    runs_code: ClassVar[bool] = False
    takes_num_classes: ClassVar[bool] = True
    headless_classes: ClassVar[int | None] = None

    def claims(self, spec: str) -> bool:
        """Whether ``spec`` is of this kind (by its form only)."""
        return self.prefix is not None and spec.startswith(self.prefix)

    def check(self, spec: str) -> None:
        """Raise ModelSpecError if ``spec`` is malformed for this kind; nothing is imported or built."""
        if self.prefix is not None and not spec[len(self.prefix) :].strip():
            raise ModelSpecError(f"model spec {spec!r}: expected {self.syntax}, e.g. {self.example}")

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        """The model ``spec`` names, with constructor arguments ``kwargs`` and, where the constructor takes
        them, ``optional``; built on the current default device (the caller sets it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build")

    def build_pretrained(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        """The model with its published pretrained weights; a kind without them refuses."""
        raise ModelSpecError("pretrained applies to timm model names; pass the weights with checkpoint instead")

    def record(self, spec: str) -> tuple[str | None, dict[str, str] | None]:
        """How a recipe records ``spec``: the spec to build again (None: nothing buildable) and, for a file,
        its path and digest."""
        return spec, None

    def check_recorded(self, source_file: dict[str, str] | None, directory: Path) -> None:
        """Before a saved model is rebuilt: check what :meth:`record` recorded beside the spec."""

    def pretrained_named(self, spec: str) -> bool:
        """Whether ``spec`` names one set of published weights (a timm pretrained tag, a Hub repository): the
        base a units-only save is applied to when none is given."""
        return False

    def identify(self, model: nn.Module, own: set[str]) -> str | None:
        """The spec of this kind that builds ``model``'s architecture again, where the object says so (timm's
        ``pretrained_cfg``, a transformers config's directory); None where it does not. ``own`` names the
        state-dict keys of the model's own modules (a retrofit's units left out)."""
        return None

    def names_file(self, spec: str, path: str) -> bool:
        """Whether ``spec`` (as :meth:`record` wrote it) is built from the file at ``path``."""
        return False


class SourceChangedWarning(UserWarning):
    """The file a recipe's source was made from (a model file, a model configuration) has changed since
    the model was saved."""


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as a recipe records a source's file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_file(path: Path) -> dict[str, str]:
    """What a recipe records of a source's file: its absolute path and digest."""
    return {"path": str(path.resolve()), "sha256": file_digest(path)}


def check_recorded_file(source_file: dict[str, str] | None, directory: Path, what: str) -> None:
    """Before a model saved in ``directory`` is rebuilt: its source's file (``what``) must still exist; a
    changed one is rebuilt from its current contents, with a :class:`SourceChangedWarning`."""
    if source_file is None:
        return
    path = Path(source_file["path"])
    if not path.is_file():
        raise ArtifactError(f"{directory}: the {what} {path} the recipe was made from no longer exists")
    if file_digest(path) != source_file["sha256"]:
        warnings.warn(
            f"{path} has changed since {directory} was saved; the model is rebuilt from its current contents",
            SourceChangedWarning,
            stacklevel=5,
        )


SOURCES: dict[str, ModelSource] = {}


def register_source(source: ModelSource) -> ModelSource:
    """Register a source kind under ``source.name``; a name or prefix registered twice is refused."""
    if not isinstance(source, ModelSource):
        raise TypeError(f"{source!r} is not an instance of se_inject.io.sources.ModelSource")
    if not isinstance(source.name, str) or not source.name.replace("-", "_").isidentifier():
        raise ValueError(f"source kind name {source.name!r}: expected a name such as 'timm'")
    if source.name in SOURCES:
        raise ValueError(f"source kind '{source.name}' is already registered ({type(SOURCES[source.name]).__name__})")
    taken = [s.name for s in SOURCES.values() if source.prefix is not None and s.prefix == source.prefix]
    if taken:
        raise ValueError(f"source kind '{source.name}': the prefix {source.prefix!r} belongs to '{taken[0]}'")
    SOURCES[source.name] = source
    return source


def _ordered() -> list[ModelSource]:
    """Kinds with a prefix first (a prefix is unambiguous), then the others in registration order."""
    return sorted(SOURCES.values(), key=lambda s: s.prefix is None)


def source_of(spec: object) -> ModelSource:
    """The kind of ``spec``, checked for form only (nothing is imported); a malformed spec raises
    ModelSpecError.

    >>> source_of("resnet50").name, source_of("torchvision:resnet50").name, source_of("nets/mine.py:build").name
    ('timm', 'torchvision', 'file')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model name: give {syntaxes()}")
    if "\0" in spec or len(spec) > MAX_SPEC_LENGTH or not spec.isprintable():
        raise ModelSpecError(
            f"model spec {spec[:60]!r}: not a model name (control characters or over {MAX_SPEC_LENGTH} characters)"
        )
    for source in _ordered():
        if source.claims(spec):
            source.check(spec)
            return source
    raise ModelSpecError(f"model spec {spec!r}: not {syntaxes()}")


def names_pretrained(spec: str | None) -> bool:
    """Whether ``spec`` names published weights as well as an architecture (see :meth:`ModelSource.pretrained_named`)."""
    if not spec:
        return False
    try:
        return source_of(spec).pretrained_named(spec)
    except ModelSpecError:
        return False


def identify_source(model: nn.Module, own: set[str]) -> str | None:
    """The first spec a registered kind finds for ``model`` (see :meth:`ModelSource.identify`)."""
    for source in _ordered():
        spec = source.identify(model, own)
        if spec is not None:
            return spec
    return None


def syntaxes() -> str:
    """How specs are written, every kind's syntax: 'NAME (timm), torchvision:NAME, ...'."""
    named = [f"{s.syntax} ({s.name})" if s.name not in s.syntax else s.syntax for s in SOURCES.values()]
    return ", ".join(named[:-1]) + f" or {named[-1]}" if len(named) > 1 else "".join(named)


@dataclass(frozen=True)
class SourceInfo:
    """One source kind, as ``se-inject sources`` lists it."""

    name: str
    syntax: str
    example: str
    runs_code: bool
    description: str


def describe_sources() -> list[SourceInfo]:
    """Every registered source kind, in the order specs are matched against them."""
    return [SourceInfo(s.name, s.syntax, s.example, s.runs_code, s.description) for s in _ordered()]


def suggest(name: str, candidates: list[str]) -> str:
    """'; did you mean a, b?' for the close matches of ``name`` (or '')."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""
