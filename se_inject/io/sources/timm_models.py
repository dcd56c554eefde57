"""timm model names (``resnet50``, ``resnet50.a1_in1k``), built by ``timm.create_model``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from se_inject.errors import ModelSpecError, SEInjectError
from se_inject.io.sources.base import ModelSource, suggest

if TYPE_CHECKING:
    from torch import nn

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class TimmSource(ModelSource):
    name = "timm"
    syntax = "NAME"
    example = "resnet50"
    description = "a timm model name, with or without a pretrained tag (timm.create_model)"
    headless_classes = 0  # timm builds a model without a classifier for num_classes=0

    def claims(self, spec: str) -> bool:
        return ":" not in spec

    def check(self, spec: str) -> None:
        if not spec.split(".")[0] or not all(c.isalnum() or c in "_-." for c in spec):
            raise ModelSpecError(f"model spec {spec!r}: not a timm model name, torchvision:NAME or module:callable")

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        import timm

        _check_known(spec)
        return timm.create_model(spec, pretrained=False, **{**optional, **kwargs})

    def build_pretrained(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        """timm's own pretrained loading; without a network, one line pointing to --checkpoint."""
        _check_known(spec, tags=False)
        return self._pretrained(spec, kwargs)

    def _pretrained(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        import timm

        unreachable = _hub_unreachable()
        with _hub_session(offline=unreachable is not None):
            try:
                return timm.create_model(spec, pretrained=True, **kwargs)
            except Exception as err:
                if unreachable or _hub_offline():
                    why = f"{unreachable or 'HF_HUB_OFFLINE is set'} and they are not in the local Hugging Face cache"
                else:
                    why = f"{type(err).__name__}: {_first_sentence(err)}"
        raise ModelSpecError(
            f"cannot fetch pretrained weights for '{spec}': {why}; download them on a machine with a network "
            "and pass the file with --checkpoint FILE"
        )

    def pretrained_named(self, spec: str) -> bool:
        return "." in spec  # resnet50.a1_in1k: a tag names the weights

    def identify(self, model: nn.Module, own: set[str]) -> str | None:
        """The architecture timm recorded in the model's ``pretrained_cfg`` (its tag only names weights)."""
        import timm

        config = getattr(model, "pretrained_cfg", None)
        architecture = config.get("architecture") if isinstance(config, dict) else None
        if not type(model).__module__.startswith("timm.") or not isinstance(architecture, str):
            return None
        return architecture if timm.is_model(architecture) else None

    def record(self, spec: str) -> tuple[str | None, dict[str, str] | None]:
        import timm

        return (spec, None) if timm.is_model(spec.split(".")[0]) else (None, None)


def _check_known(name: str, tags: bool = True) -> None:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSpecError(f"unknown timm model '{name}'{suggest(name, timm.list_models())}")
    if tags and "." in name:
        base, tag = name.split(".", 1)
        known = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        if tag not in known:
            listed = f"; its tags are {', '.join(known[:6])}{', ...' if len(known) > 6 else ''}" if known else ""
            raise ModelSpecError(f"timm model '{base}' has no pretrained tag '{tag}'{listed or '; it has no tags'}")


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found at once; None when it may be.

    A failed name lookup is certain and immediate, where a download would retry for about a
    minute; behind a proxy the proxy resolves names, so nothing is concluded.
    """
    if any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"no network ({host} cannot be resolved)"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _hub_session(offline: bool) -> Iterator[None]:
    """The hub in offline mode if asked (the local cache still serves), its warnings silenced:
    the user gets se_inject's one line, not the hub's retries."""
    from huggingface_hub import constants

    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "timm")]
    levels, was_offline = [lg.level for lg in loggers], constants.HF_HUB_OFFLINE
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = was_offline or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_sentence(err: Exception, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


class TimmHubSource(TimmSource):
    """``hf-hub:ORG/NAME[@REV]``: a timm model published on the Hub (its config.json names the architecture),
    built by ``timm.create_model``, resolved through huggingface_hub's cache."""

    name = "hf-hub"
    prefix = "hf-hub:"
    syntax = "hf-hub:ORG/NAME[@REV]"
    example = "hf-hub:timm/resnet50.a1_in1k"
    description = "a timm model on the Hugging Face Hub (timm.create_model), through the local cache"

    def claims(self, spec: str) -> bool:
        return spec.startswith(self.prefix)

    def check(self, spec: str) -> None:
        from se_inject.io.remote import check_repo_id

        try:
            check_repo_id(spec.removeprefix(self.prefix).partition("@")[0])
        except SEInjectError as err:
            raise ModelSpecError(f"model spec {spec!r}: {err}") from None

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        import timm

        with _hub_session(offline=_hub_unreachable() is not None):
            try:
                return timm.create_model(spec, pretrained=False, **{**optional, **kwargs})
            except OSError as err:  # huggingface_hub's errors for a missing file or repository are OSErrors
                raise ModelSpecError(f"cannot read {spec}'s config.json: {_first_sentence(err)}") from None

    def build_pretrained(self, spec: str, kwargs: dict[str, Any]) -> nn.Module:
        return self._pretrained(spec, kwargs)

    def pretrained_named(self, spec: str) -> bool:
        return True

    def identify(self, model: nn.Module, own: set[str]) -> str | None:
        return None

    def record(self, spec: str) -> tuple[str | None, dict[str, str] | None]:
        return spec, None
