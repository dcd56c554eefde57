"""Tied weights (one parameter under two names) survive every path that writes a model: save,
load, a fine-tuning run's model files, and prune-se. The loaded model computes bit for bit what was
saved, and the two names are one parameter again (trained once, counted once)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TiedResNet

import se_inject
from se_inject.errors import ArtifactError
from se_inject.io.layout import RECIPE_FILE
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, finetune

TINY = Path(__file__).parents[1] / "tiny_models.py"
ALIAS, KEPT = "stages.0.1.conv1.weight", "stages.0.0.conv1.weight"


def _tied(model) -> bool:
    return model.get_parameter(ALIAS) is model.get_parameter(KEPT)


def _trained_like(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def injected():
    torch.manual_seed(0)
    model = se_inject.inject(TiedResNet(), r=4, input_size=16, model_name=f"{TINY}:tied_resnet")
    assert _tied(model)  # injection keeps the tie
    return _trained_like(model).eval()


def _same_function(a, b) -> None:
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("how", ["fresh copy", "from the recipe's source"])
def test_tied_weights_save_and_load(injected, tmp_path, how):
    se_inject.save(injected, tmp_path / "saved")
    recipe = json.loads((tmp_path / "saved" / RECIPE_FILE).read_text())
    assert recipe["tied"] == {ALIAS: KEPT}
    if how == "fresh copy":
        loaded = se_inject.load(tmp_path / "saved", model=TiedResNet())
    else:
        loaded = se_inject.load(tmp_path / "saved", trust_code=True)
    _same_function(loaded, injected)
    assert _tied(loaded)


def test_a_model_untied_when_rebuilt_is_tied_again_on_load(injected, tmp_path):
    """The recipe, not the constructor, says which names share a tensor."""
    from tiny_models import FunctionalResNet

    se_inject.save(injected, tmp_path / "saved")
    loaded = se_inject.load(tmp_path / "saved", model=FunctionalResNet())  # the same architecture, untied
    _same_function(loaded, injected)
    assert _tied(loaded)


def test_tied_weights_through_a_fine_tuning_run(injected, tmp_path):
    run = finetune(
        copy.deepcopy(injected), digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=2, se_epochs=0)
    )
    assert _tied(run.model)
    loaded = se_inject.load(tmp_path / "run", trust_code=True)
    _same_function(loaded, run.model)
    assert _tied(loaded)
    resumed = finetune(
        copy.deepcopy(injected),
        digits(image_size=16),
        tmp_path / "run",
        FinetuneConfig(epochs=3, se_epochs=0),
        resume=True,
    )
    assert _tied(resumed.model)


def test_tied_weights_through_prune(injected, tmp_path):
    pruned = se_inject.prune(injected, digits(image_size=16), units=["stages.0.0.se_1_1"]).model
    se_inject.save(pruned, tmp_path / "pruned")
    loaded = se_inject.load(tmp_path / "pruned", trust_code=True)
    _same_function(loaded, pruned)
    assert _tied(loaded)


@pytest.mark.parametrize(
    "tied, match",
    [({ALIAS: "nowhere.weight"}, "no tensor of that name"), ({KEPT: ALIAS}, "alias is saved too")],
)
def test_a_recipe_whose_ties_do_not_fit_the_weights_is_refused(injected, tmp_path, tied, match):
    se_inject.save(injected, tmp_path / "saved")
    path = tmp_path / "saved" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    recipe["tied"] = tied
    path.write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match=match):
        se_inject.load(tmp_path / "saved", model=TiedResNet())


def test_a_recipe_with_chained_ties_is_refused(injected, tmp_path):
    se_inject.save(injected, tmp_path / "saved")
    path = tmp_path / "saved" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    recipe["tied"] = {ALIAS: KEPT, KEPT: "head.weight"}
    path.write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="field 'tied.stages.0.1.conv1.weight'"):
        se_inject.load(tmp_path / "saved", model=TiedResNet())
