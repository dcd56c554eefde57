"""The classifier head is what the model declares, never a layer se_inject inserted: headless models
(timm num_classes=0, torchvision with its fc removed, a hand-written body) are recorded as headless,
save and load bit for bit, and fine-tune with a head the model's own API adds, or are refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from tiny_models import FeatureNet, FunctionalResNet, NamedHeadNet
from torch import nn
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.errors import ConfigError
from se_inject.io.heads import classifier, head_of
from se_inject.io.layout import RECIPE_FILE
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, finetune

TINY = Path(__file__).parents[1] / "tiny_models.py"


def _timm_headless() -> nn.Module:
    return timm.create_model("resnet18", num_classes=0)


def _torchvision_headless() -> nn.Module:
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    return model


HEADLESS = {  # (build, model_name recorded as the source, how load gets the architecture)
    "timm num_classes=0": (_timm_headless, "resnet18", {}),
    "torchvision fc removed": (_torchvision_headless, "torchvision:resnet18", {}),
    "hand-written body": (FeatureNet, f"{TINY}:feature_net", {"trust_code": True}),
}


@pytest.mark.parametrize("case", list(HEADLESS))
def test_a_headless_model_is_recorded_headless_and_loads_bit_for_bit(case, tmp_path):
    build, name, load_options = HEADLESS[case]
    torch.manual_seed(0)
    model = build().eval()
    injected = se_inject.inject(model, r=8, init="paper", input_size=32, model_name=name).eval()
    assert classifier(injected) is None  # never the last unit's fc2
    se_inject.save(injected, tmp_path / "saved")
    recipe = json.loads((tmp_path / "saved" / RECIPE_FILE).read_text())
    assert recipe["head"] is None
    loaded = se_inject.load(tmp_path / "saved", **load_options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), injected(x))
    assert loaded(x).shape == (2, 512 if "resnet" in name else 64)  # features, as saved: no head came back


def test_finetune_gives_a_headless_timm_model_a_head_through_its_own_api(tmp_path):
    torch.manual_seed(0)
    injected = se_inject.inject(_timm_headless(), r=8, input_size=16, model_name="resnet18")
    result = finetune(injected, digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0))
    assert classifier(result.model)[0] == "fc" and result.model.fc.out_features == 10
    recipe = json.loads((tmp_path / "run" / RECIPE_FILE).read_text())
    assert recipe["head"] == {"name": "fc", "in_features": 512, "out_features": 10}
    assert recipe["model_kwargs"] == {"num_classes": 10}
    loaded = se_inject.load(tmp_path / "run")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


@pytest.mark.parametrize("build", [_torchvision_headless, FeatureNet], ids=["torchvision", "hand-written"])
def test_finetune_refuses_a_model_without_a_head_before_writing_anything(build, tmp_path):
    injected = se_inject.inject(build(), r=8, input_size=16)
    before = copy.deepcopy(injected.state_dict())
    with pytest.raises(ConfigError, match="declares no classifier head.*--head NAME"):
        finetune(injected, digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0))
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in injected.state_dict().items())


def test_a_head_under_another_name_is_named_by_the_user(tmp_path):
    injected = se_inject.inject(NamedHeadNet(num_classes=3), r=8, input_size=16, head="out")
    assert head_of(injected) == {"name": "out", "in_features": 64, "out_features": 3}
    result = finetune(injected, digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0))
    assert result.model.out.out_features == 10  # the recipe's head, fitted to the data
    loaded = se_inject.load(tmp_path / "run", model=NamedHeadNet(num_classes=3))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    plain = se_inject.inject(NamedHeadNet(), r=8, input_size=16)  # not named: the model declares none
    assert head_of(plain) is None
    with pytest.raises(ConfigError, match="head: 'stages' is not a Linear layer"):
        se_inject.inject(NamedHeadNet(), r=8, input_size=16, head="stages")
    with pytest.raises(ConfigError, match="head: 'stages.0.0.se_1_1.fc2' is not a Linear layer"):
        classifier(injected, "stages.0.0.se_1_1.fc2")  # a unit's layer is never a head


def test_declared_heads_of_the_usual_kinds():
    assert classifier(timm.create_model("resnet18"))[0] == "fc"
    assert classifier(timm.create_model("convnext_atto"))[0] == "head.fc"
    assert classifier(torchvision.models.vgg11())[0] == "classifier.6"
    assert classifier(torchvision.models.mobilenet_v3_small())[0] == "classifier.3"
    assert classifier(FunctionalResNet())[0] == "head"
    assert classifier(timm.create_model("resnet18", num_classes=0)) is None


def test_the_cli_refuses_fine_tuning_a_headless_model_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        ["finetune", f"{TINY}:feature_net", "--data", "digits", "--out", str(tmp_path / "run"), "--epochs", "1"],
    )
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "declares no classifier head" in result.stderr and not (tmp_path / "run").exists()
