"""The CLI as a package of commands: -h everywhere, every injecting command takes every injection
option under one name, and the rules the CLI used to hold (the CUDA batch default, the dataset's head)
live in the API."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.cli.commands import COMMANDS
from se_inject.config import InjectConfig
from se_inject.io.models import load_model_for_data
from se_inject.measure.bench import default_batches

runner = CliRunner()
TINY = Path(__file__).resolve().parents[1] / "tiny_models.py"
INJECTING = ("inject", "finetune", "experiment", "bench", "compare")
FLAGS = {"groups": "--group", "unit_options": "--unit-option", "leaf_modules": "--leaf"}


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_dash_h_is_help(command):
    args = [command] if command else []
    short, long = runner.invoke(app, [*args, "-h"]), runner.invoke(app, [*args, "--help"])
    assert short.exit_code == 0 and short.stdout == long.stdout and "Usage:" in short.stdout


@pytest.mark.parametrize("command", INJECTING)
def test_every_injecting_command_takes_every_injection_option(command):
    text = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
    for f in fields(InjectConfig):
        if f.name == "excitation":  # gate's old name: read, not shown
            continue
        flag = FLAGS.get(f.name, f"--{f.name.replace('_', '-')}")
        assert f" {flag} " in text or f" {flag}/" in text or f"{flag}," in text, (command, flag)
    assert "--input-size" in text and "--size " not in text and "--image-size" not in text


def test_units_means_unit_types_everywhere():
    for command in ("compare", "experiment"):
        assert "unit types" in runner.invoke(app, [command, "--help"], terminal_width=200).stdout
    for command in ("inspect", "prune-se"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).stdout
        assert "--unit-names" in text and "--units " not in text


NET = """
import sys
sys.path.insert(0, {tiny!r})
from torch import nn
from tiny_models import DataDependentGate


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), DataDependentGate())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        x = x + self.body(x)
        return self.fc(x.mean((2, 3)))
"""


def test_an_untraceable_model_is_fine_tuned_from_its_spec_with_leaf(tmp_path):
    (tmp_path / "net.py").write_text(NET.format(tiny=str(TINY.parent)))
    args = ["finetune", f"{tmp_path / 'net.py'}:Net", "--data", "digits", "--out", str(tmp_path / "run")]
    args += ["--epochs", "1", "--se-epochs", "0", "--input-size", "8", "--r", "2"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--leaf DataDependentGate" in refused.stderr
    done = runner.invoke(app, [*args, "--leaf", "DataDependentGate"])
    assert done.exit_code == 0, done.output
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["options"]["leaf_modules"] == ["DataDependentGate"] and recipe["options"]["r"] == 2


def test_a_saved_retrofit_refuses_injection_options(tmp_path):
    se_inject.save(se_inject.inject(se_inject.load_model(f"{TINY}:FunctionalResNet"), r=4), tmp_path / "s")
    result = runner.invoke(app, ["finetune", str(tmp_path / "s"), "--data", "digits", "--out", "x", "--r", "8"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"se-inject: error: --r: {tmp_path / 's'} is a saved retrofit; injection options apply to a model to inject"
    ]


def test_compare_arms_are_built_on_the_injection_options_given():
    spec = f"{TINY}:FunctionalResNet"
    args = ["compare", spec, "--units", "se,eca", "--include", "stages.2.*", "--batch", "1", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--repeats", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["results"]
    assert [r["options"] for r in measured] == [
        {"include": ["stages.2.*"], "unit": "se"},
        {"include": ["stages.2.*"], "unit": "eca"},
    ]
    assert [r["units"] for r in measured] == [1, 1]  # one block in stages.2


def test_bench_leaves_the_batch_default_to_the_api(monkeypatch):
    seen = []

    def fake_bench(model, config, **kwargs):
        seen.append(kwargs["batches"])
        raise se_inject.ConfigError("stop here")

    monkeypatch.setattr("se_inject.measure.bench.bench", fake_bench)
    spec = f"{TINY}:FunctionalResNet"
    runner.invoke(app, ["bench", spec])
    runner.invoke(app, ["bench", spec, "--batch", "1,16"])
    assert seen == [None, (1, 16)]  # an explicit 1,16 stays 1,16 on any device
    assert default_batches(torch.device("cuda")) == (256,) and default_batches(torch.device("cpu")) == (1, 16)


def test_the_dataset_head_rule_is_the_apis():
    built = load_model_for_data("resnet18", 7)
    assert built.fc.out_features == 7
    with pytest.raises(se_inject.ConfigError, match="num_classes: expected 0"):
        load_model_for_data("resnet18", 7, num_classes=-1)
