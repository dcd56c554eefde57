"""Saving and loading retrofitted models: safetensors weights plus a JSON recipe.

A saved directory holds ``model.safetensors`` (every tensor of the injected model) and
``recipe.json``: the source model, every injection option, the sites the units went to, the
classifier head and the versions of torch, timm and se_inject. Loading rebuilds the architecture
from the recipe (or from a fresh copy of the original the caller passes), injects the same
units, checks that the sites match, and loads the weights: the result computes bit for bit what
was saved. Like peft's adapters, the recipe also re-applies to any fresh copy of the same
architecture (:func:`apply`), and refuses one whose sites differ.

A saved directory is data: nothing here unpickles (weights are safetensors, the recipe is JSON
checked against a schema), and a recipe whose source is Python code (``module:callable``,
``file.py:callable``) is rebuilt only when the caller says so (``trust_code=True``, CLI
``--trust-code``), as ``trust_remote_code`` does in the Hugging Face libraries.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from se_inject.api import retrofit
from se_inject.errors import (
    ArtifactError,
    ConfigError,
    RecipeMismatchError,
    UntrustedCodeError,
    one_line,
)
from se_inject.io.base_weights import changed_since_base, first_difference
from se_inject.io.files import (
    as_path,
    read_text_file,
    write_atomic,
    write_directory,
    write_text_atomic,
)
from se_inject.io.heads import classifier, fit_head, head_of
from se_inject.io.layout import CONFIG_FILE, OWNED_FILES, RECIPE_FILE, WEIGHTS_FILE
from se_inject.io.models import check_device, load_checkpoint, load_model, load_state, recorded_source
from se_inject.io.recipe import MAX_RECIPE_BYTES, SITE_KEYS, WEIGHTS_KINDS, Recipe, attach_recipe, attached_recipe
from se_inject.io.remote import HUB_PREFIX, is_shared_name, resolve
from se_inject.io.sources import source_of
from se_inject.io.sources.base import SourceChangedWarning, identify_source, names_pretrained
from se_inject.io.tied import restore_tied, retie, savable_state, tied_names
from se_inject.units.base import ChannelUnit
from se_inject.units.se import ChannelScale

__all__ = ["SourceChangedWarning", "apply", "current_recipe", "load", "recipe_of", "save"]


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe se_inject attached to a model it injected."""
    recipe = attached_recipe(model)
    if recipe is None:
        raise ArtifactError(
            f"{type(model).__name__} was not made by se_inject.inject/retrofit: there is no recipe to save"
        )
    return recipe


def current_recipe(model: nn.Module) -> Recipe:
    """The model's recipe with the classifier head it has now (fine-tuning may have resized it), and the
    source it was built from where the recipe names none but the model says (see :func:`identified`)."""
    recipe = recipe_of(model)
    if recipe.source is None:
        recipe = identified(recipe, model)
        if recipe.source is not None:
            attach_recipe(model, recipe)  # found once: later saves (each epoch of a run) read it
    head = head_of(model)
    kwargs = dict(recipe.model_kwargs)
    source = source_of(recipe.source) if recipe.source else None
    if head is not None and source is not None and source.takes_num_classes:
        kwargs["num_classes"] = head["out_features"]
    elif head is None and source is not None and source.headless_classes is not None:
        kwargs["num_classes"] = source.headless_classes  # (others are made headless by _fit_recorded_head)
    return replace(recipe, head=head, model_kwargs=kwargs, tied=tied_names(model))


def identified(recipe: Recipe, model: nn.Module) -> Recipe:
    """``recipe`` with the source a registered kind recognises in ``model`` (injected from an object: timm's
    ``pretrained_cfg``, a unique torchvision builder, a transformers model's directory); called where it names none."""
    units = [name for name, m in model.named_modules() if isinstance(m, (ChannelUnit, ChannelScale))]
    own = {k for k in model.state_dict() if not any(k.startswith(f"{u}.") for u in units)}
    spec = identify_source(model, own)
    if spec is None:
        return recipe
    source, source_file = recorded_source(spec)
    return replace(recipe, source=source, source_file=source_file)


def save(model: nn.Module, directory: str | Path, *, force: bool = False, weights: str = "all") -> Path:
    """Write ``model`` (made by :func:`se_inject.inject`) to ``directory``: weights and recipe.

    ``weights="units"`` writes only what the retrofit added or changed relative to its base (the units;
    base tensors only where they differ, e.g. a resized head or a full fine-tune), with the base's
    digest in the recipe: a small artifact that :func:`load` applies to that base again, as peft's
    adapters are applied. ``"all"`` (the default) writes every tensor.

    The directory is written whole or not at all: files go to a temporary directory beside it,
    which is renamed into place. An existing ``directory`` is replaced only with ``force``, and
    only if it is a directory se_inject wrote holding nothing but se_inject's files; ``.``, its
    parents, the home directory and ``/`` are never replaced. Concurrent saves to one directory:
    one wins, the others raise ArtifactError.

    Example::

        se_model = se_inject.inject(timm.create_model("resnet50"), r=16)
        se_inject.save(se_model, "se_resnet50")
        again = se_inject.load("se_resnet50")
        se_inject.save(se_model, "se_resnet50_units", weights="units")  # the units alone, ~10% of the size
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected an nn.Module made by se_inject.inject, got {type(model).__name__}")
    _check_weights_kind(weights)
    _check_savable(model, weights)
    return write_directory(
        directory,
        lambda staging: write_model_files(model, staging, weights=weights),
        force=force,
        owned=OWNED_FILES,
        marker=RECIPE_FILE,
    )


def _check_weights_kind(weights: object) -> None:
    if weights not in WEIGHTS_KINDS:
        raise ConfigError(f"weights: expected one of {', '.join(WEIGHTS_KINDS)}, got {weights!r}")


def _check_savable(model: nn.Module, weights: str = "all") -> Recipe:
    recipe = recipe_of(model)
    if any(p.is_meta for p in model.parameters()):
        raise ArtifactError("the model is on the meta device: it has no weights to save; build it with real weights")
    if weights == "units" and recipe.base is None:
        raise ArtifactError(
            "a units-only save needs the base's weights as they were at injection, and this model has no record "
            "of them (injected on the meta device, or loaded from a save made before se_inject recorded them); "
            "save every weight instead (weights='all')"
        )
    return recipe


def write_model_files(
    model: nn.Module, directory: str | Path, extra_metadata: dict[str, str] | None = None, weights: str = "all"
) -> Recipe:
    """Write the weights and the recipe into an existing ``directory``, each file replaced atomically.

    A tensor registered under several names (tied weights) is written once; the recipe records the
    other names (see ``se_inject.io.tied``). ``weights="units"``: only the tensors the base lacked or
    held with other values. A write the file system refuses (a full disk) is an ArtifactError; the
    file it would have replaced is left as it was. Returns the recipe written.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    _check_weights_kind(weights)
    _check_savable(model, weights)
    recipe = replace(current_recipe(model), weights=weights)
    directory = Path(directory)
    metadata = {"format": "pt", "se_inject": recipe.versions.get("se_inject", ""), **(extra_metadata or {})}
    tensors = savable_state(model, recipe.tied)
    if weights == "units":
        assert recipe.base is not None  # _check_savable refused a model without it
        tensors = changed_since_base(tensors, recipe.base)
    try:
        write_atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except SafetensorError as err:
        raise ArtifactError(f"cannot write the weights ({WEIGHTS_FILE}): {one_line(err, 160)}") from None
    write_text_atomic(directory / RECIPE_FILE, recipe.to_json())
    own = transformers_config(model)
    if own is not None:
        # what save_pretrained writes beside the weights, and how to load the units a plain from_pretrained drops
        config = {**own, "se_inject": se_inject_entry(recipe, "<this directory>")}
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return recipe


def transformers_config(model: nn.Module) -> dict[str, Any] | None:
    """A transformers model's configuration as a dict (what ``save_pretrained`` writes); None for another model."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    return dict(to_dict()) if callable(to_dict) and type(model).__module__.startswith("transformers.") else None


def se_inject_entry(recipe: Recipe, name: str) -> dict[str, Any]:
    """What ``config.json`` says about the retrofit: the units, and the one call that loads them."""
    base = ", base=<the base model or its checkpoint>" if recipe.weights == "units" else ""
    return {
        "recipe": RECIPE_FILE,
        "weights": recipe.weights,
        "base_model": recipe.source,
        "base_sha256": recipe.base["sha256"] if recipe.base else None,
        "units": len(recipe.sites),
        "load": f"se_inject.load('{name}'{base})",
        "note": "the units are not part of the base architecture: a plain from_pretrained/create_model "
        "builds the model without them",
    }


def read_recipe(directory: str | Path) -> Recipe:
    directory = as_path(directory, "directory")
    path = directory / RECIPE_FILE
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; is {directory} a directory written by se_inject.save?")
    return Recipe.from_json(read_text_file(path, limit=MAX_RECIPE_BYTES, what="recipe"), str(path))


def _site_signature(sites: object) -> list[tuple]:
    return [tuple(site[k] for k in SITE_KEYS) for site in sites]  # type: ignore[attr-defined]


def apply(recipe: Recipe | str | Path, model: nn.Module) -> nn.Module:
    """Inject ``model`` (a fresh copy of the recipe's architecture) exactly as the recipe says.

    Raises RecipeMismatchError, naming the first differing unit, when the model's sites are not
    the recipe's: another architecture, or another version of it. ``model`` is not changed.
    """
    if not isinstance(recipe, Recipe):
        path = as_path(recipe, "recipe")
        recipe = (
            read_recipe(path)
            if path.is_dir()
            else Recipe.from_json(read_text_file(path, limit=MAX_RECIPE_BYTES, what="recipe"), str(path))
        )
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected an nn.Module, got {type(model).__name__}")
    result = retrofit(
        model, recipe.config(), input_size=recipe.input_size, model_name=recipe.source, in_chans=recipe.in_chans
    )
    expected, found = _site_signature(recipe.sites), _site_signature(recipe_of(result.model).sites)
    if expected != found:
        mismatch = next(
            (
                f"unit {i + 1}: recipe has {e}, model gives {f}"
                for i, (e, f) in enumerate(zip(expected, found, strict=False))
                if e != f
            ),
            f"recipe has {len(expected)} units, model gives {len(found)}",
        )
        raise RecipeMismatchError(
            f"the model does not match the recipe ({mismatch}; fields {', '.join(SITE_KEYS)}); "
            f"was the recipe made for another architecture?"
        )
    injected = result.model
    attach_recipe(
        injected,
        replace(
            recipe_of(injected),
            source=recipe.source,
            source_file=recipe.source_file,
            model_kwargs=dict(recipe.model_kwargs),
        ),
    )
    return injected


def _build_source(
    recipe: Recipe, directory: Path, device: torch.device | None, trust_code: bool, pretrained: bool = False
) -> nn.Module:
    """The recipe's original architecture, built as the recipe says (code only with ``trust_code``)."""
    if not recipe.source:
        from se_inject.io.sources.transformers_models import from_saved_config

        described = from_saved_config(directory)  # the config.json a transformers retrofit is saved with
        if described is not None:
            return described.to(device) if device is not None else described
        raise ArtifactError(
            f"{directory}: the recipe names no source model (it was injected from a module object that names no "
            "timm, torchvision or transformers source); pass a fresh copy of the original: "
            "se_inject.load(directory, base=...)"
        )
    source = source_of(recipe.source)
    if source.runs_code and not trust_code:
        raise UntrustedCodeError(
            f"{directory}: the recipe's source '{recipe.source}' is Python code, which loading would import and run; "
            "if you trust this directory pass trust_code=True (CLI: --trust-code), "
            "or pass a fresh copy of the original yourself: se_inject.load(directory, base=...)"
        )
    kwargs: dict[str, object] = dict(recipe.model_kwargs)
    source.check_recorded(recipe.source_file, directory)
    # a constructor that may take no num_classes (a user's): then the head is resized after injection instead
    optional = (
        {"num_classes": kwargs.pop("num_classes")} if not source.takes_num_classes and "num_classes" in kwargs else {}
    )
    return load_model(
        recipe.source,
        device=device,
        pretrained=pretrained,
        optional_kwargs=optional,
        **kwargs,  # type: ignore[arg-type]
    )


def _fit_recorded_head(injected: nn.Module, recipe: Recipe, directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Give the rebuilt model the classifier the saved one had: resized (a model whose constructor takes
    no ``num_classes``, or a fresh original the caller passed with the default head), or none at all
    (a model saved headless whose constructor builds a head: torchvision's, a user's)."""
    if recipe.head is None:
        found = classifier(injected)
        if found is not None and f"{found[0]}.weight" not in state:
            injected.set_submodule(found[0], nn.Identity())
        return
    try:
        found = classifier(injected, recipe.head["name"])
    except ConfigError:
        raise ArtifactError(
            f"{directory}: the rebuilt model has no Linear layer '{recipe.head['name']}', the saved classifier: "
            "the model is not the saved architecture"
        ) from None
    assert found is not None  # classifier() with a name finds it or raises
    if found[1].in_features != recipe.head["in_features"]:
        raise ArtifactError(
            f"{directory}: the classifier '{found[0]}' takes {found[1].in_features} features, the saved one "
            f"{recipe.head['in_features']}: the model is not the saved architecture"
        )
    fit_head(injected, recipe.head["out_features"], recipe.head["name"])


def _check_tied(recipe: Recipe, state: dict[str, torch.Tensor], weights: Path) -> None:
    """Each alias the recipe records is absent from the weights, and the name it points to present."""
    for alias, kept in recipe.tied.items():
        if alias in state or kept not in state:
            raise ArtifactError(
                f"{weights}: the recipe ties '{alias}' to '{kept}', which the weights do not match "
                f"({'the alias is saved too' if alias in state else 'no tensor of that name'}); the directory is damaged"
            )


def load(
    directory: str | Path,
    model: nn.Module | None = None,
    *,
    base: nn.Module | str | Path | None = None,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild the model saved in ``directory``: architecture, units, classifier head and every weight.

    ``directory`` may also be a shared name: ``hf-hub:org/name[@revision]`` (through huggingface_hub's
    cache, offline with ``HF_HUB_OFFLINE=1``) or ``local-dir:PATH``; what it holds is read as data.

    The architecture is rebuilt from the recipe's source when it is a timm, torchvision or transformers
    name. A source that is Python code (``module:callable``, ``file.py:callable``) is imported and run
    only with ``trust_code=True``; or pass ``base``, a fresh copy of the original (needed anyway
    when the model was injected from a module object), or a checkpoint file of the original's weights
    (loaded into the rebuilt source). ``model`` is ``base``'s older name. A units-only save
    (``save(..., weights="units")``) is applied to its base, whose digest must be the one recorded; a
    different base is refused naming both digests. ``base`` itself is not changed. A model file's folder
    is importable while it loads, so it may import its sibling modules; a file that changed since the
    save is reported with a :class:`SourceChangedWarning`. The result is in eval mode.

    Example::

        se_model = se_inject.load("se_resnet50")
        mine = se_inject.load("se_mynet", base=MyNet())               # your own architecture
        same = se_inject.load("se_mynet_file", trust_code=True)       # recipe source: mynet.py:build
        units = se_inject.load("se_resnet50_units", base="resnet50_trained.safetensors")
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from_hub = isinstance(directory, str) and directory.startswith(HUB_PREFIX)
    if is_shared_name(directory):
        directory = resolve(str(directory))
    directory = as_path(directory, "directory")
    if model is not None and base is not None:
        raise ConfigError("model and base both name the original: give base= alone (model= is its older name)")
    if model is not None and not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a fresh nn.Module of the saved architecture, got {type(model).__name__}")
    given = base if base is not None else model
    if given is not None and not isinstance(given, (nn.Module, str, Path)):
        raise ConfigError(
            f"base: expected a fresh nn.Module of the saved architecture or a checkpoint file, got {type(given).__name__}"
        )
    if not isinstance(trust_code, bool):
        raise ConfigError(f"trust_code: expected True or False, got {trust_code!r}")
    target = check_device(device)
    recipe = read_recipe(directory)
    if from_hub and recipe.options.get("rules"):
        # a path in a downloaded recipe names a file on this machine, outside the repository: never read it
        raise ArtifactError(
            f"{directory}: the recipe names rule files ({recipe.options['rules'][0]!r}, ...), which would be read "
            "from this machine, outside the repository; a retrofit shared on the Hub cannot use its own rule files"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing; the directory holds a recipe but no weights")
    injected = apply(recipe, _original(recipe, directory, given, target, trust_code))
    if recipe.weights == "units":
        _check_base(recipe, recipe_of(injected), directory)
    for name in recipe.pruned:  # the scales themselves come with the weights
        unit = injected.get_submodule(name)
        assert isinstance(unit, ChannelUnit)  # apply() made it from the recipe
        injected.set_submodule(name, ChannelScale(torch.ones(unit.channels)))
    try:
        state = load_file(str(weights), device=str(target))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ArtifactError(
            f"{weights}: cannot be read as safetensors ({err}); the file is damaged or truncated"
        ) from None
    _fit_recorded_head(injected, recipe, directory, state)
    _check_tied(recipe, state, weights)
    if recipe.weights == "units":
        state = _with_base_tensors(injected, recipe, state)
    load_state(injected, restore_tied(state, recipe.tied), str(weights), ArtifactError)
    retie(injected, recipe.tied)
    # the base stays the one recorded at injection: a later units-only save is relative to it
    attach_recipe(
        injected, replace(recipe_of(injected), head=recipe.head, pruned=list(recipe.pruned), base=recipe.base)
    )
    return injected.eval()


def _original(
    recipe: Recipe, directory: Path, given: nn.Module | str | Path | None, device: torch.device | None, trust_code: bool
) -> nn.Module:
    """The original the units go into: the module given, or the recipe's source rebuilt (with the weights of a
    checkpoint given, or, for a units-only save of a base named with published weights, those weights)."""
    if isinstance(given, nn.Module):
        return given
    # a units-only save of a base with named pretrained weights (resnet50.a1_in1k, hf-hub:...) goes onto them
    pretrained = given is None and recipe.weights == "units" and names_pretrained(recipe.source)
    original = _build_source(recipe, directory, device, trust_code, pretrained)
    if given is not None:
        load_checkpoint(original, as_path(given, "base", ConfigError))
    return original


def _check_base(saved: Recipe, rebuilt: Recipe, directory: Path) -> None:
    """A units-only save goes onto the base it was made from: the same digest, or a one-line refusal."""
    assert saved.base is not None  # the recipe schema requires it of a units-only save
    found = rebuilt.base
    if found is not None and found["sha256"] == saved.base["sha256"]:
        return
    what = "no weights (the meta device)" if found is None else f"sha256 {found['sha256'][:16]}"
    why = "" if found is None else f" ({first_difference(found['tensors'], saved.base['tensors'])})"
    raise RecipeMismatchError(
        f"{directory}: the units were made for the base with sha256 {saved.base['sha256'][:16]}, and the base "
        f"given has {what}{why}; pass the base they were made from: base=MODULE or base=CHECKPOINT "
        "(CLI: --base CHECKPOINT)"
    )


def _with_base_tensors(injected: nn.Module, recipe: Recipe, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A units-only file's tensors, with the base's own for the names it left out (and only those: a unit's
    tensor missing from the file is still reported as missing)."""
    assert recipe.base is not None
    own = injected.state_dict()
    left_out = [
        name for name in recipe.base["tensors"] if name in own and name not in state and name not in recipe.tied
    ]
    return {**{name: own[name] for name in left_out}, **state}
