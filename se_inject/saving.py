"""Saving and loading retrofitted models: safetensors weights plus a JSON recipe.

A saved directory holds ``model.safetensors`` (every tensor of the injected model) and
``recipe.json``: the source model, every injection option, the sites the units went to, and the
versions of torch, timm and se_inject. Loading rebuilds the architecture from the recipe (or
from a fresh copy of the original the caller passes), injects the same units, checks that the
sites match, and loads the weights: the result computes bit for bit what was saved. Like peft's
adapters, the recipe also re-applies to any fresh copy of the same architecture
(:func:`apply`), and refuses one whose sites differ.

Nothing here unpickles: weights are safetensors, the recipe is JSON.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from se_inject.api import retrofit
from se_inject.errors import ArtifactError, RecipeMismatchError
from se_inject.models import load_model, load_state
from se_inject.recipe import RECIPE_FILE, SITE_KEYS, Recipe
from se_inject.unit import ChannelScale

WEIGHTS_FILE = "model.safetensors"


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe se_inject attached to a model it injected."""
    recipe = getattr(model, "se_inject_recipe", None)
    if not isinstance(recipe, Recipe):
        raise ArtifactError(
            f"{type(model).__name__} was not made by se_inject.inject/retrofit: there is no recipe to save"
        )
    return recipe


def save(model: nn.Module, directory: str | Path, *, force: bool = False) -> Path:
    """Write ``model`` (made by :func:`se_inject.inject`) to ``directory``: weights and recipe.

    The directory is written whole or not at all: files go to a temporary directory beside it,
    which is renamed into place. An existing ``directory`` is replaced only with ``force``.

    Example::

        se_model = se_inject.inject(timm.create_model("resnet50"), r=16)
        se_inject.save(se_model, "se_resnet50")
        again = se_inject.load("se_resnet50")
    """
    target = Path(directory)
    if target.exists() and not force:
        raise ArtifactError(f"{target} already exists; choose another directory or pass force=True (CLI: --force)")
    _check_savable(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_model_files(model, staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_savable(model: nn.Module) -> Recipe:
    recipe = recipe_of(model)
    if any(p.is_meta for p in model.parameters()):
        raise ArtifactError("the model is on the meta device: it has no weights to save; build it with real weights")
    return recipe


def write_model_files(model: nn.Module, directory: str | Path) -> None:
    """Write the weights and the recipe into an existing ``directory``, each file replaced atomically."""
    from safetensors.torch import save_model

    recipe = _check_savable(model)
    directory = Path(directory)
    weights_tmp, recipe_tmp = directory / f".{WEIGHTS_FILE}.tmp", directory / f".{RECIPE_FILE}.tmp"
    try:
        save_model(model, str(weights_tmp), metadata={"format": "pt", "se_inject": recipe.versions.get("se_inject", "")})
        recipe_tmp.write_text(recipe.to_json())
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(recipe_tmp, directory / RECIPE_FILE)
    finally:
        weights_tmp.unlink(missing_ok=True)
        recipe_tmp.unlink(missing_ok=True)


def read_recipe(directory: str | Path) -> Recipe:
    path = Path(directory) / RECIPE_FILE
    if not Path(directory).is_dir():
        raise ArtifactError(f"{directory}: no such directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; is {directory} a directory written by se_inject.save?")
    return Recipe.from_json(path.read_text(), str(path))


def _site_signature(sites: Any) -> list[tuple]:
    return [tuple(site[k] for k in SITE_KEYS) for site in sites]


def apply(recipe: Recipe | str | Path, model: nn.Module) -> nn.Module:
    """Inject ``model`` (a fresh copy of the recipe's architecture) exactly as the recipe says.

    Raises RecipeMismatchError, naming the first differing unit, when the model's sites are not
    the recipe's: another architecture, or another version of it. ``model`` is not changed.
    """
    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        recipe = read_recipe(path) if path.is_dir() else Recipe.from_json(path.read_text(), str(path))
    result = retrofit(model, recipe.config(), input_size=recipe.input_size, model_name=recipe.source)
    expected, found = _site_signature(recipe.sites), _site_signature(recipe_of(result.model).sites)
    if expected != found:
        mismatch = next(
            (f"unit {i + 1}: recipe has {e}, model gives {f}" for i, (e, f) in enumerate(zip(expected, found)) if e != f),
            f"recipe has {len(expected)} units, model gives {len(found)}",
        )
        raise RecipeMismatchError(
            f"the model does not match the recipe ({mismatch}; fields {', '.join(SITE_KEYS)}); "
            f"was the recipe made for another architecture?"
        )
    return result.model


def load(directory: str | Path, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in ``directory``: architecture, units and every weight.

    ``model`` is a fresh original to inject (needed when the recipe has no loadable ``source``,
    as for a user's own module passed to the API). The result is in eval mode.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    recipe = read_recipe(directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights}: missing; the directory holds a recipe but no weights")
    if model is None:
        if not recipe.source:
            raise ArtifactError(
                f"{directory}: the recipe names no source model (it was injected from a module object); "
                "pass a fresh copy of the original: se_inject.load(directory, model=...)"
            )
        model = load_model(recipe.source, device=device, **recipe.model_kwargs)
    injected = apply(recipe, model)
    if recipe.pruned:
        for name in recipe.pruned:  # the scales themselves come with the weights
            owner, _, child = name.rpartition(".")
            unit = injected.get_submodule(name)
            setattr(injected.get_submodule(owner) if owner else injected, child, ChannelScale(torch.ones(unit.channels)))
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{weights}: cannot be read as safetensors ({err}); the file is damaged or truncated") from None
    load_state(injected, state, str(weights), ArtifactError)
    return injected.eval()
