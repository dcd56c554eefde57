"""Model sources are a registry: a kind registered here, from the test file, goes through inject, save and
load (API and CLI) without a package file naming it; the built-in kinds keep their forms and trust rule."""

from __future__ import annotations

import json
from typing import Any

import pytest
import tiny_models
import torch
from torch import nn
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.errors import ModelSpecError, UntrustedCodeError
from se_inject.io.sources import SOURCES, ModelSource, describe_sources, register_source, source_of

runner = CliRunner()


class TinySource(ModelSource):
    """``tiny:NAME``: a model class of the test suite's tiny_models, built by name (no user code runs)."""

    name = "tiny"
    prefix = "tiny:"
    syntax = "tiny:NAME"
    example = "tiny:FunctionalResNet"
    description = "the tiny models of se_inject's tests"
    built: list[str] = []

    def check(self, spec: str) -> None:
        if not spec.removeprefix(self.prefix).isidentifier():
            raise ModelSpecError(f"model spec {spec!r}: expected tiny:NAME")

    def build(self, spec: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
        self.built.append(spec)
        return getattr(tiny_models, spec.removeprefix(self.prefix))(**{**optional, **kwargs})


class CodeSource(TinySource):
    """The same models, declared as running the user's code: a recipe naming one needs trust_code."""

    name = "tiny_code"
    prefix = "tinycode:"
    syntax = "tinycode:NAME"
    runs_code = True
    takes_num_classes = False


@pytest.fixture(autouse=True)
def registered():
    register_source(TinySource())
    register_source(CodeSource())
    yield
    del SOURCES["tiny"], SOURCES["tiny_code"]


def test_a_registered_kind_goes_through_inject_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = se_inject.load_model("tiny:FunctionalResNet", num_classes=7)
    injected = se_inject.retrofit(model, r=4, model_name="tiny:FunctionalResNet").model
    for unit in injected.modules():  # random unit weights: a load that rebuilt the wrong thing shows
        if isinstance(unit, se_inject.ChannelUnit):
            for p in unit.parameters():
                nn.init.normal_(p)
    se_inject.save(injected, tmp_path / "saved")
    recipe = json.loads((tmp_path / "saved" / "recipe.json").read_text())
    assert recipe["source"] == "tiny:FunctionalResNet" and recipe["model_kwargs"] == {"num_classes": 7}
    TinySource.built.clear()
    loaded = se_inject.load(tmp_path / "saved")
    assert TinySource.built == ["tiny:FunctionalResNet"]  # rebuilt by the registered kind
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), injected.eval()(x))


def test_the_cli_takes_it_lists_it_and_saves_it(tmp_path):
    result = runner.invoke(
        app, ["tiny:FunctionalResNet", "--r", "4", "--input-size", "32", "--save", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert se_inject.load(tmp_path / "s").head.out_features == 10
    listed = runner.invoke(app, ["sources", "--json"])
    kinds = {k["name"]: k for k in json.loads(listed.stdout)}
    assert kinds["tiny"] == {
        "name": "tiny",
        "syntax": "tiny:NAME",
        "example": "tiny:FunctionalResNet",
        "runs_code": False,
        "description": "the tiny models of se_inject's tests",
    }
    assert {"timm", "torchvision", "module", "file"} <= set(kinds)
    bad = runner.invoke(app, ["tiny:not-a-name"])
    assert bad.exit_code == 2 and bad.stderr.splitlines() == [
        "se-inject: error: model spec 'tiny:not-a-name': expected tiny:NAME"
    ]


def test_the_trust_rule_reads_the_kind(tmp_path):
    injected = se_inject.retrofit(
        se_inject.load_model("tinycode:FunctionalResNet"), model_name="tinycode:FunctionalResNet"
    )
    se_inject.save(injected.model, tmp_path / "code")
    with pytest.raises(UntrustedCodeError, match="is Python code"):
        se_inject.load(tmp_path / "code")
    assert isinstance(se_inject.load(tmp_path / "code", trust_code=True), nn.Module)


def test_a_prefix_wins_over_the_module_form_and_names_and_prefixes_are_unique():
    assert source_of("tiny:FunctionalResNet").name == "tiny"  # not module 'tiny' with callable FunctionalResNet
    assert source_of("tinyx:build").name == "module"
    with pytest.raises(ValueError, match="already registered"):
        register_source(TinySource())
    other = type("Other", (TinySource,), {"name": "other"})
    with pytest.raises(ValueError, match="the prefix 'tiny:' belongs to 'tiny'"):
        register_source(other())
    with pytest.raises(TypeError, match="not an instance"):
        register_source(TinySource)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("resnet50", "timm"),
        ("resnet50.a1_in1k", "timm"),
        ("torchvision:resnet50", "torchvision"),
        ("nets/mine.py:build", "file"),
        ("package.module:build", "module"),
    ],
)
def test_the_built_in_kinds_keep_their_forms(spec, kind):
    assert source_of(spec).name == kind
    described = {info.name: info for info in describe_sources()}
    assert described[kind].runs_code == (kind in ("module", "file"))
