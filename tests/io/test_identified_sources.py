"""A model injected from an object records the source it can name (#27 item 3), so that load rebuilds it
without base=: timm's pretrained_cfg, the one torchvision builder of its class and shapes, a transformers
model's directory; where none names it, load says what to pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import randomize_units
from tiny_models import FunctionalResNet

import se_inject
from se_inject.errors import ArtifactError
from se_inject.io.layout import RECIPE_FILE


def _round_trip(model: torch.nn.Module, directory: Path) -> tuple[str | None, bool]:
    se = randomize_units(se_inject.inject(model, r=8, input_size=64))
    se_inject.save(se, directory)
    source = json.loads((directory / RECIPE_FILE).read_text())["source"]
    loaded = se_inject.load(directory)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return source, se_inject.largest_difference(se.eval()(x), loaded(x)) == 0.0


@pytest.mark.parametrize(
    ("build", "spec"),
    [
        (lambda: timm.create_model("resnet18", num_classes=7), "resnet18"),
        (lambda: torchvision.models.resnet34(num_classes=5), "torchvision:resnet34"),
        (lambda: torchvision.models.mobilenet_v3_small(), "torchvision:mobilenet_v3_small"),
    ],
    ids=["timm", "torchvision-resnet34", "torchvision-mobilenet"],
)
def test_an_object_records_its_source(build, spec: str, tmp_path: Path) -> None:
    assert _round_trip(build().eval(), tmp_path / "se") == (spec, True)


def test_a_transformers_model_records_its_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    model = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "hf").eval()
    source, same = _round_trip(model, tmp_path / "se")
    assert source == f"transformers:{(tmp_path / 'hf').resolve()}" and same


def test_an_object_nothing_names_gets_one_line_saying_what_to_pass(tmp_path: Path) -> None:
    se_inject.save(se_inject.inject(FunctionalResNet(), r=4), tmp_path / "se")
    with pytest.raises(ArtifactError, match=r"names no source model .* se_inject.load\(directory, base=...\)"):
        se_inject.load(tmp_path / "se")
    assert se_inject.load(tmp_path / "se", base=FunctionalResNet()) is not None
