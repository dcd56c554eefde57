"""The classifier head of a model: what the model declares, never a module se_inject inserted.

Fine-tuning fits the head to a dataset's classes, a recipe records it (so that a saved model with a
resized head loads again), and an experiment scores a base through it. The head is, in this order:

1. the module named by the user (``head="fc2"``; CLI ``--head fc2``), which must be a Linear;
2. the head recorded in the model's recipe when it was injected;
3. what timm's ``get_classifier()`` returns: ``nn.Identity`` for a model built with ``num_classes=0``
   or after ``reset_classifier(0)``, which has none;
4. a child named ``fc``, ``classifier`` or ``head`` (torchvision's names, and most hand-written
   models'): a Linear, a Sequential ending in one, or a module holding one as ``fc`` (timm's heads).

A model with none of these is headless (a backbone, a detection body, a feature extractor): it is
recorded as such, saves and loads as it is, and fine-tuning gives it a head only where the model
says how (timm's ``reset_classifier``); otherwise it is refused in one line.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from se_inject.errors import ConfigError
from se_inject.io.recipe import attached_recipe
from se_inject.units.base import ChannelUnit

HEAD_NAMES = ("fc", "classifier", "head")


def _inserted(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, ChannelUnit)]


def _declared_linear(name: str, module: nn.Module | None) -> tuple[str, nn.Linear] | None:
    """``module`` itself when it is a Linear, else the Linear it ends in (a Sequential's last layer, a
    head module's ``fc``), named under ``name``."""
    if isinstance(module, nn.Linear):
        return name, module
    if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
        return f"{name}.{len(module) - 1}", module[-1]
    inner = getattr(module, "fc", None) if module is not None else None
    return (f"{name}.fc", inner) if isinstance(inner, nn.Linear) else None


def _named(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear] | None:
    """The model's classifier head as (qualified name, Linear); None when it declares none (see the module
    docstring for the order). ``name`` names it explicitly: a ConfigError when that is not a Linear."""
    inserted = _inserted(model)

    def ours(found: tuple[str, nn.Linear] | None) -> bool:
        return found is not None and any(found[0] == u or found[0].startswith(u + ".") for u in inserted)

    if name is not None:
        found = _declared_linear(name, _named(model, name)) if isinstance(name, str) and name else None
        if found is None or found[0] != name or ours(found):
            raise ConfigError(f"head: {name!r} is not a Linear layer of {type(model).__name__}; name its classifier")
        return found
    recipe = attached_recipe(model)
    if recipe is not None and recipe.head is not None:
        recorded = recipe.head["name"]
        found = _declared_linear(recorded, _named(model, recorded))
        if found is not None and found[0] == recorded:
            return found
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # a user's get_classifier that does not fit timm's contract: read the names below
            head = None
        if isinstance(head, nn.Module):
            names = {id(m): n for n, m in model.named_modules()}
            found = _declared_linear(names.get(id(head), ""), head) if id(head) in names else None
            return None if ours(found) else found
    for attribute in HEAD_NAMES:
        found = _declared_linear(attribute, model._modules.get(attribute))
        if found is not None and not ours(found):
            return found
    return None


def head_of(model: nn.Module, name: str | None = None) -> dict[str, Any] | None:
    """The classifier as a recipe records it: name, in_features, out_features (None: headless)."""
    found = classifier(model, name)
    if found is None:
        return None
    name, head = found
    return {"name": name, "in_features": head.in_features, "out_features": head.out_features}


HEADLESS = (
    "the model declares no classifier head (it outputs features: a backbone, timm's num_classes=0); give it one "
    "(a Linear named fc, classifier or head, or timm's reset_classifier) or name it with head=NAME (CLI: --head NAME)"
)


def fit_head(model: nn.Module, num_classes: int, name: str | None = None) -> list[nn.Parameter]:
    """Give ``model`` (in place) a classifier for ``num_classes`` if its own has another size; the new
    head's parameters (to train), [] when it already fits. A headless model gets a head where it says
    how (timm's ``reset_classifier``); otherwise a ConfigError."""
    found = classifier(model, name)
    if found is None:
        return _add_head(model, num_classes)
    qualified, head = found
    if head.out_features == num_classes:
        return []
    reference = head.weight
    new = nn.Linear(
        head.in_features, num_classes, bias=head.bias is not None, device=reference.device, dtype=reference.dtype
    )
    model.set_submodule(qualified, new)
    return list(new.parameters())


def _add_head(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """A new head through the model's own ``reset_classifier`` (timm), placed as its other weights are."""
    reset = getattr(model, "reset_classifier", None)
    reference = next(model.parameters(), None)
    if not callable(reset) or reference is None:
        raise ConfigError(HEADLESS)
    try:
        reset(num_classes)
    except Exception as err:
        raise ConfigError(f"{HEADLESS} ({type(model).__name__}.reset_classifier failed: {err})") from None
    found = classifier(model)
    if found is None:
        raise ConfigError(HEADLESS)
    found[1].to(device=reference.device, dtype=reference.dtype)
    return list(found[1].parameters())
