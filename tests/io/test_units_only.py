"""Units-only saves (#27 item 1): only what the retrofit added or changed, applied to its base again.

The recipe records a digest of every base tensor at injection; a units-only save writes the units and
the base tensors whose digest changed (a resized head, a full fine-tune); a load applies them to the
base it is given (a module, a checkpoint, or the source rebuilt) after checking the base's digest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_batchnorm, randomize_units
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.errors import ArtifactError, ConfigError, RecipeMismatchError
from se_inject.io.layout import RECIPE_FILE, WEIGHTS_FILE
from se_inject.units.base import ChannelUnit


def _base(name: str = "resnet18", seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(se_inject.load_model(name, **kwargs), seed).eval()


def _unit_names(model: torch.nn.Module) -> set[str]:
    return {
        f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, ChannelUnit) for key in m.state_dict()
    }


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resnet50_units_only_save_holds_the_units_alone(tmp_path: Path) -> None:
    base = _base("resnet50")
    se = randomize_units(se_inject.inject(base, r=16))
    se_inject.save(se, tmp_path / "all")
    se_inject.save(se, tmp_path / "units", weights="units")
    units = _unit_names(se)
    assert set(load_file(str(tmp_path / "units" / WEIGHTS_FILE))) == units
    unit_bytes = sum(t.numel() * t.element_size() for k, t in se.state_dict().items() if k in units)
    size = (tmp_path / "units" / WEIGHTS_FILE).stat().st_size
    full = (tmp_path / "all" / WEIGHTS_FILE).stat().st_size
    assert unit_bytes <= size <= unit_bytes * 1.03  # the header: a few percent
    assert size < full / 8  # ~10 MB against ~100 MB
    loaded = se_inject.load(tmp_path / "units", base=_base("resnet50"))
    assert _same_state(se, loaded)


def test_onto_another_base_is_refused_naming_both_digests(tmp_path: Path) -> None:
    se = randomize_units(se_inject.retrofit(_base(), r=8, model_name="resnet18").model)
    se_inject.save(se, tmp_path / "units", weights="units")
    recorded = json.loads((tmp_path / "units" / RECIPE_FILE).read_text())["base"]["sha256"]
    other = _base(seed=1)
    with pytest.raises(RecipeMismatchError) as caught:
        se_inject.load(tmp_path / "units", base=other)
    message = str(caught.value)
    assert recorded[:16] in message and "differs" in message and "base=CHECKPOINT" in message
    assert "\n" not in message
    # the source rebuilt with random weights is another base too
    with pytest.raises(RecipeMismatchError, match="the units were made for the base"):
        se_inject.load(tmp_path / "units")


def test_the_base_as_a_checkpoint_file(tmp_path: Path) -> None:
    base = _base()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    se = randomize_units(se_inject.retrofit(base, r=8, model_name="resnet18").model)
    se_inject.save(se, tmp_path / "units", weights="units")
    assert _same_state(se, se_inject.load(tmp_path / "units", base=tmp_path / "base.safetensors"))
    with pytest.raises(ConfigError, match="give base= alone"):
        se_inject.load(tmp_path / "units", _base(), base=_base())


def test_only_changed_base_tensors_are_saved(tmp_path: Path) -> None:
    """An SE-only fine-tune: no base tensor; a full one: every changed tensor and nothing unchanged."""
    se = randomize_units(se_inject.inject(_base(), r=8))
    se_inject.save(se, tmp_path / "se_only", weights="units")
    assert set(load_file(str(tmp_path / "se_only" / WEIGHTS_FILE))) == _unit_names(se)
    with torch.no_grad():
        se.layer2[0].conv1.weight.add_(0.1)
        se.fc.weight.mul_(2)
        se.layer3[1].bn2.running_mean.add_(1)
    se_inject.save(se, tmp_path / "full", weights="units")
    changed = {"layer2.0.conv1.weight", "fc.weight", "layer3.1.bn2.running_mean"}
    assert set(load_file(str(tmp_path / "full" / WEIGHTS_FILE))) == _unit_names(se) | changed
    assert _same_state(se, se_inject.load(tmp_path / "full", base=_base()))


def test_a_resized_head_travels_with_the_units(tmp_path: Path) -> None:
    se = se_inject.inject(_base(), r=8)
    from se_inject.io.heads import fit_head

    fit_head(se, 7)
    se_inject.save(se, tmp_path / "units", weights="units")
    saved = set(load_file(str(tmp_path / "units" / WEIGHTS_FILE)))
    assert {"fc.weight", "fc.bias"} <= saved and "conv1.weight" not in saved
    loaded = se_inject.load(tmp_path / "units", base=_base())
    assert loaded.fc.out_features == 7 and _same_state(se, loaded)


def test_a_loaded_save_keeps_its_original_base(tmp_path: Path) -> None:
    """Loaded from a full save, the model is still relative to the base it was injected into."""
    base = _base()
    se = randomize_units(se_inject.retrofit(base, r=8, model_name="resnet18").model)
    se_inject.save(se, tmp_path / "all")
    again = se_inject.load(tmp_path / "all")  # rebuilt from random weights, then the saved ones loaded
    se_inject.save(again, tmp_path / "units", weights="units")
    assert set(load_file(str(tmp_path / "units" / WEIGHTS_FILE))) == _unit_names(se)
    assert _same_state(se, se_inject.load(tmp_path / "units", base=_base()))


def test_what_cannot_be_saved_units_only_is_one_line(tmp_path: Path) -> None:
    meta = se_inject.inject(se_inject.load_model("resnet18", device="meta"))
    with pytest.raises(ArtifactError, match="meta device"):
        se_inject.save(meta, tmp_path / "x", weights="units")
    se = se_inject.inject(_base(), r=8)
    with pytest.raises(ConfigError, match="weights: expected one of all, units"):
        se_inject.save(se, tmp_path / "x", weights="some")
    assert not (tmp_path / "x").exists()


def test_a_tampered_base_record_is_refused(tmp_path: Path) -> None:
    se_inject.save(se_inject.inject(_base(), r=8), tmp_path / "units", weights="units")
    path = tmp_path / "units" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    name = next(iter(recipe["base"]["tensors"]))
    recipe["base"]["tensors"][name] = "0" * 64
    path.write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="base.sha256.*is not the digest of base.tensors"):
        se_inject.load(tmp_path / "units", base=_base())
    recipe.pop("base")
    path.write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="a units-only save must record its base"):
        se_inject.load(tmp_path / "units", base=_base())


def test_the_command_line_saves_units_only_and_loads_them_onto_a_base(tmp_path: Path) -> None:
    base = _base(num_classes=10)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    runner = CliRunner()
    common = ["--checkpoint", str(tmp_path / "base.safetensors"), "--num-classes", "10"]
    result = runner.invoke(app, ["resnet18", *common, "--save", str(tmp_path / "se"), "--save-weights", "units"])
    assert result.exit_code == 0, result.output
    assert set(load_file(str(tmp_path / "se" / WEIGHTS_FILE))) == _unit_names(se_inject.inject(base))
    # a fine-tune of the SE units alone writes units only, onto the base given with --base
    args = ["finetune", str(tmp_path / "se"), "--data", "digits", "--input-size", "16", "--out", str(tmp_path / "run")]
    args += ["--epochs", "1", "--se-epochs", "1", "--batch-size", "256", "--save-weights", "units"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--base" in refused.output  # the source rebuilt is another base
    result = runner.invoke(app, [*args, "--base", str(tmp_path / "base.safetensors")])
    assert result.exit_code == 0, result.output
    written = set(load_file(str(tmp_path / "run" / WEIGHTS_FILE)))
    assert written == _unit_names(se_inject.inject(base))  # the SE phase changes no base tensor (BatchNorm frozen)
    tuned = se_inject.load(tmp_path / "run", base=tmp_path / "base.safetensors")
    assert not _same_state(tuned, se_inject.load(tmp_path / "se", base=tmp_path / "base.safetensors"))
