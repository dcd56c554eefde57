"""Sharing a retrofit on the Hugging Face Hub: push, a model card, and loading by ``hf-hub:`` or ``local-dir:``.

A pushed repository holds what :func:`se_inject.save` writes (``recipe.json``, ``model.safetensors``:
every weight, or the units alone), a ``config.json`` that timm users recognise (for a timm base: timm's
own ``save_config_for_hf`` of the base's architecture, ``num_classes`` and ``pretrained_cfg``; for a
transformers model: its config), with an ``se_inject`` entry that says how to load it, and a model card
(``README.md``, YAML metadata: library, tags, base model) with the overhead report.

Loading (:mod:`se_inject.io.remote`) is data only, as every load is.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from se_inject.errors import ArtifactError, ConfigError, one_line
from se_inject.io.files import as_path, write_text_atomic
from se_inject.io.layout import CONFIG_FILE, MODEL_CARD_FILE
from se_inject.io.recipe import Recipe, attached_report
from se_inject.io.remote import HUB_PREFIX, check_repo_id
from se_inject.io.saving import load, read_recipe, se_inject_entry, transformers_config, write_model_files
from se_inject.surgery.report import OverheadReport


def push_to_hub(
    model_or_dir: nn.Module | str | Path,
    repo_id: str,
    *,
    weights: str = "all",
    base: nn.Module | str | Path | None = None,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "se_inject retrofit",
    trust_code: bool = False,
    experiment: Any = None,
    api: Any = None,
) -> str:
    """Push a retrofit (a model se_inject made, or a directory it saved) to the Hub repository ``repo_id``.

    The repository gets the recipe, the weights (``weights="units"``: only what the retrofit added or
    changed), ``config.json`` and a model card with the overhead report. A saved directory is loaded
    first (``base`` for a units-only one, as :func:`se_inject.load` takes it), so that the card's numbers
    are measured. ``api`` is a ``huggingface_hub.HfApi`` (default: a new one with ``token``). Returns the
    repository's URL.

    Example::

        se_inject.push_to_hub(se_model, "me/se-resnet50", weights="units")
        again = se_inject.load("hf-hub:me/se-resnet50", base=trained_resnet50)
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="se_inject_push_") as staging:
        folder = Path(staging)
        write_repository(
            model_or_dir, folder, repo_id, weights=weights, base=base, trust_code=trust_code, experiment=experiment
        )
        from huggingface_hub.errors import HfHubHTTPError

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise ArtifactError(f"{repo_id}: the Hub refused the push: {one_line(err, 160)}") from None
    return str(url)


def write_repository(
    model_or_dir: nn.Module | str | Path,
    folder: Path,
    repo_id: str,
    *,
    weights: str = "all",
    base: nn.Module | str | Path | None = None,
    trust_code: bool = False,
    experiment: Any = None,
) -> None:
    """Write into ``folder`` (existing, empty) the files a pushed repository holds."""
    if isinstance(model_or_dir, nn.Module):
        if base is not None:
            raise ConfigError("base: only for a saved directory; a model se_inject made carries its recipe")
        model = model_or_dir
    else:
        directory = as_path(model_or_dir, "model_or_dir", ConfigError)
        if not directory.is_dir():
            raise ConfigError(
                f"{directory}: not a directory se_inject saved; give a model se_inject made, or its directory"
            )
        if read_recipe(directory).weights == "units":
            weights = "units"  # what was saved as units is pushed as units: the base is not the sharer's to publish
        model = load(directory, base=base, trust_code=trust_code)
    report = attached_report(model)
    if not isinstance(report, OverheadReport):
        raise ConfigError(f"{type(model).__name__} was not made by se_inject.inject/retrofit: there is nothing to push")
    recipe = write_model_files(model, folder, weights=weights)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(hub_config(model, recipe, repo_id), indent=2) + "\n")
    results = experiment.to_dict() if callable(getattr(experiment, "to_dict", None)) else experiment
    write_text_atomic(folder / MODEL_CARD_FILE, model_card(recipe, report, repo_id, results))


def hub_config(model: nn.Module, recipe: Recipe, repo_id: str) -> dict[str, Any]:
    """``config.json``: the base's own (timm's ``save_config_for_hf``, a transformers config) where there is
    one, and an ``se_inject`` entry naming the recipe and how to load the repository."""
    config: dict[str, Any] = {}
    if hasattr(model, "pretrained_cfg") and type(model).__module__.startswith("timm."):
        from timm.models._hub import save_config_for_hf

        with tempfile.TemporaryDirectory() as scratch:
            save_config_for_hf(model, str(Path(scratch) / CONFIG_FILE))
            config = json.loads((Path(scratch) / CONFIG_FILE).read_text(encoding="utf-8"))
    else:
        config = transformers_config(model) or {}
    config["se_inject"] = se_inject_entry(recipe, f"{HUB_PREFIX}{repo_id}")
    return config


def model_card(recipe: Recipe, report: OverheadReport, repo_id: str, experiment: Any = None) -> str:
    """``README.md``: YAML metadata (library, tags, base model), the overhead report as a table and, given
    an experiment's ``to_dict()``, its arms against the control."""
    from huggingface_hub import ModelCard, ModelCardData

    base_model = _hub_base(recipe.source)
    data = ModelCardData(
        library_name="se_inject",
        tags=["se_inject", "squeeze-and-excitation", report.unit, "image-classification"],
        base_model=base_model,
    )
    totals = report.totals
    rows = [
        f"| {s.stage} | {s.size[0]}x{s.size[1]} | {s.blocks} | {_channels(s.channels)} | {s.r} | "
        f"{s.added_params:,} | {s.flops_after - s.flops_before:,} |"
        for s in report.stages
    ]
    load_call = se_inject_entry(recipe, f"{HUB_PREFIX}{repo_id}")["load"]
    body = [
        f"# {repo_id.split('/')[1]}",
        "",
        f"{recipe.source or report.model} with {len(recipe.sites)} {report.unit} units at position "
        f"`{report.position}`, r={report.r}, retrofitted by se_inject "
        f"(Hu et al., Squeeze-and-Excitation Networks).",
        "",
        "```python",
        "import se_inject",
        "",
        f"model = {load_call}",
        "```",
        "",
        f"Weights: {'the units alone (apply them to the base with the digest below)' if recipe.weights == 'units' else 'every tensor'}."
        + (f" Base SHA-256: `{recipe.base['sha256']}`." if recipe.base else ""),
        "",
        f"## Overhead at {report.input_size[0]}x{report.input_size[1]}",
        "",
        "| stage | feature map | units | channels | r | params added | FLOPs added |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Parameters {totals.params_before:,} -> {totals.params_after:,} "
        f"(+{100 * totals.params_added / max(totals.params_before, 1):.2f}%); FLOPs {totals.flops_before:,} -> "
        f"{totals.flops_after:,} (+{100 * (totals.flops_after - totals.flops_before) / max(totals.flops_before, 1):.2f}%). "
        f"Eq. 5 gives {totals.eq5_params:,} added parameters.",
        "",
        *_experiment_table(experiment),
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _experiment_table(experiment: Any) -> list[str]:
    """The arms of an experiment (``ExperimentResult.to_dict()``) against their control, as markdown."""
    if not isinstance(experiment, dict) or not isinstance(experiment.get("arms"), list):
        return []

    def points(summary: Any) -> str:
        if not isinstance(summary, dict) or summary.get("mean") is None:
            return "-"
        low, high = summary.get("low"), summary.get("high")
        interval = f" [{100 * low:+.2f}, {100 * high:+.2f}]" if low is not None and high is not None else ""
        return f"{100 * summary['mean']:+.2f}{interval}"

    rows = [
        f"| {arm.get('label', '?')} | {100 * arm['accuracy']['mean']:.2f} | {points(arm.get('difference'))} | "
        f"{arm.get('params_added', 0):,} |"
        for arm in experiment["arms"]
        if isinstance(arm, dict) and isinstance(arm.get("accuracy"), dict) and arm.get("error") is None
    ]
    seeds = experiment.get("seeds") or []
    return [
        f"## Against a control ({len(seeds)} seeds, {experiment.get('model', '')})",
        "",
        "| arm | accuracy % | vs control, points (interval) | params added |",
        "|---|---|---|---|",
        *rows,
        "",
        *[f"- {line}" for line in experiment.get("verdicts", []) if isinstance(line, str)],
        "",
    ]


def _channels(channels: int | list[int]) -> str:
    return str(channels) if isinstance(channels, int) else ", ".join(map(str, channels))


def _hub_base(source: str | None) -> str | None:
    """The base model's Hub id where the source names one (timm's models live under ``timm/``)."""
    if not source:
        return None
    if source.startswith(HUB_PREFIX):
        return source.removeprefix(HUB_PREFIX).split("@")[0]
    if ":" not in source and "." in source:  # a timm name with its pretrained tag
        return f"timm/{source}"
    return None


__all__ = ["hub_config", "model_card", "push_to_hub", "write_repository"]
