"""Inspecting a small fine-tuned model on digits: statistics, plots, pruning."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import FunctionalResNet
from torch.utils.data import DataLoader
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.inspect.excitation import (
    collect,
    max_output_change,
    plot,
    prune_units,
    write_json,
)
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, finetune
from se_inject.units.se import ChannelScale

SPEC = f"{Path(__file__).parents[1] / 'tiny_models.py'}:FunctionalResNet"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    data = digits(image_size=16)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, init="paper", input_size=16, model_name=SPEC)
    out = tmp_path_factory.mktemp("run") / "se"
    finetune(model, data, out, FinetuneConfig(epochs=2, se_epochs=1, lr=0.1, full_lr_scale=1.0))
    with torch.no_grad():  # one unit made constant on purpose: sigmoid(0) = 0.5 whatever the input
        model.stages[2][0].se_3_1.fc1.weight.zero_()
    return model.eval(), data, DataLoader(data.val, batch_size=128)


def test_statistics_have_the_right_shapes_and_ranges(trained):
    model, data, loader = trained
    report = collect(model, loader, data.classes)
    assert report.images == len(data.val) and [u.name for u in report.units] == [
        "stages.0.0.se_1_1",
        "stages.0.1.se_1_2",
        "stages.1.0.se_2_1",
        "stages.1.1.se_2_2",
        "stages.2.0.se_3_1",
    ]
    for unit in report.units:
        assert len(unit.mean) == unit.channels and len(unit.class_mean) == 10
        assert all(len(row) == unit.channels for row in unit.class_mean + unit.class_std)
        assert all(0 < v < 1 for v in unit.mean) and all(s >= 0 for row in unit.class_std for s in row)
        assert 0 <= unit.saturation <= 1 and unit.gate_range == 1.0
    constant = report.units[-1]
    assert constant.saturation == pytest.approx(1.0) and all(v == pytest.approx(0.5) for v in constant.mean)
    assert report.suggestions(0.999) == ["stages.2.0.se_3_1"]
    # the class means average back to the overall mean, weighted by class size
    counts = torch.bincount(data.val.tensors[1], minlength=10).double()
    unit = report.units[0]
    weighted = (torch.tensor(unit.class_mean) * counts[:, None]).sum(0) / counts.sum()
    torch.testing.assert_close(weighted, torch.tensor(unit.mean, dtype=torch.float64))


def test_plots_and_json_are_written(trained, tmp_path):
    model, data, loader = trained
    report = collect(model, loader, data.classes, max_images=128)
    files = [write_json(report, tmp_path), *plot(report, tmp_path)]
    assert [f.name for f in files] == [
        "excitation.json",
        "excitation_1_1.png",
        "excitation_2_1.png",
        "excitation_3_1.png",
        "saturation.png",
    ]
    assert all(f.stat().st_size > 1000 for f in files[1:])
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files[1:])
    data_json = json.loads(files[0].read_text())
    assert data_json["images"] == 128 and len(data_json["units"]) == 5


def test_pruning_a_constant_gate_keeps_outputs_and_saves_eq5(trained, tmp_path):
    model, data, loader = trained
    report = collect(model, loader, data.classes)
    pruned = prune_units(copy.deepcopy(model), report, ["stages.2.0.se_3_1"])
    assert isinstance(pruned.model.stages[2][0].se_3_1, ChannelScale)
    assert pruned.params_saved == 2 * 64 * 16 and pruned.params_saved == pruned.eq5_saved  # Eq. 5: 2 C^2 / r
    assert max_output_change(model, pruned.model, loader) <= 1e-5  # the stated tolerance
    se_inject.save(pruned.model, tmp_path / "pruned")
    again = se_inject.load(tmp_path / "pruned", trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(x), pruned.model.eval()(x))
    with pytest.raises(se_inject.ConfigError, match="'nope' is not an SE unit"):
        prune_units(copy.deepcopy(model), report, ["nope"])


def test_inspect_and_prune_from_the_cli(trained, tmp_path):
    model, _, _ = trained
    se_inject.save(model, tmp_path / "saved")
    runner = CliRunner()
    args = [
        "inspect",
        str(tmp_path / "saved"),
        "--data",
        "digits",
        "--input-size",
        "16",
        "--out",
        str(tmp_path / "insp"),
        "--threshold",
        "0.999",
    ]
    refused = runner.invoke(app, args)  # the recipe's source is a .py file: code runs only when trusted
    assert refused.exit_code == 2 and "--trust-code" in refused.stderr and len(refused.stderr.splitlines()) == 1
    result = runner.invoke(app, [*args, "--trust-code"])
    assert result.exit_code == 0, result.output
    assert "stages.2.0.se_3_1" in result.stdout and (tmp_path / "insp" / "saturation.png").is_file()
    result = runner.invoke(
        app,
        [
            "prune-se",
            str(tmp_path / "saved"),
            "--data",
            "digits",
            "--input-size",
            "16",
            "--out",
            str(tmp_path / "pruned"),
            "--threshold",
            "0.999",
            "--trust-code",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "removed 1 unit(s): stages.2.0.se_3_1; params saved 2,048 (Eq. 5: 2,048)" in result.stdout
    assert math.isclose(float(result.stdout.split("max |output change| ")[1].split(";")[0]), 0.0, abs_tol=1e-5)


def test_pruning_a_unit_with_bias_reports_eq5_with_its_bias():
    """Eq. 5 has one owner (the report's): with bias a unit holds 2 C^2 / r + C / r + C weights."""
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, bias=True, input_size=16)
    data = digits(image_size=16)
    report = collect(model, DataLoader(data.val, batch_size=128), data.classes, max_images=128)
    unit = model.stages[2][0].se_3_1
    pruned = prune_units(copy.deepcopy(model), report, ["stages.2.0.se_3_1"])
    c, r = unit.channels, unit.r
    assert pruned.params_saved == pruned.eq5_saved == 2 * c * c // r + c // r + c


def test_prune_api_returns_a_pruned_copy_with_its_cost_and_accuracy(trained):
    from conftest import assert_unchanged, snapshot

    model, data, _ = trained
    before = snapshot(model)
    result = se_inject.prune(model, data, ["stages.2.0.se_3_1"])
    assert_unchanged(model, before)
    assert isinstance(result.model.stages[2][0].se_3_1, ChannelScale) and result.removed == ["stages.2.0.se_3_1"]
    assert result.params_saved == result.eq5_saved == 2 * 64 * 16
    assert result.max_output_change <= 1e-5 and result.accuracy_after == pytest.approx(result.accuracy_before, abs=0.01)
    with pytest.raises(se_inject.ConfigError, match="threshold"):
        se_inject.prune(model, data, threshold=2.0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # an untrained tiny model: finetune says so
def test_inspect_measures_how_far_the_units_moved_from_the_runs_start(tmp_path):
    """With the fine-tuning run's folder, each unit against the start its checkpoint kept (a unit put back
    to its start: exactly 0); without it, each unit's distance from the identity; the CLI shows both."""
    torch.manual_seed(0)
    data = digits(image_size=16)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, init="paper", input_size=16, model_name=SPEC)
    start = copy.deepcopy(model.stages[0][0].se_1_1.state_dict())
    finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=1, lr=0.5))
    from_start = se_inject.unit_movement(model, data, tmp_path / "run")
    assert from_start is not None and not from_start.from_identity and len(from_start.units) == 5
    assert all(u.moved > 0 for u in from_start.units)
    model.stages[0][0].se_1_1.load_state_dict(start)  # back to where it began
    again = se_inject.unit_movement(model, data, tmp_path / "run")
    assert again is not None
    moved = {u.name: u.moved for u in again.units}
    assert moved["stages.0.0.se_1_1"] == 0 and sum(v > 0 for v in moved.values()) == 4
    no_start = se_inject.unit_movement(model, data)  # a paper start is far from the identity
    assert no_start is not None and no_start.from_identity and no_start.learned == 1.0
    fresh = se_inject.unit_movement(se_inject.inject(FunctionalResNet(num_classes=10), r=4, input_size=16), data)
    assert fresh is not None and fresh.learned == 0.0 and max(fresh.by_stage().values()) == 0.0  # preserve
    assert se_inject.unit_movement(FunctionalResNet(num_classes=10), data) is None
    args = ["inspect", str(tmp_path / "run"), "--data", "digits", "--input-size", "16", "--out", str(tmp_path / "i"),
            "--trust-code"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "units that moved out of the identity band" in result.stdout and "moved" in result.stdout
    written = json.loads((tmp_path / "i" / "excitation.json").read_text())["movement"]
    assert written["from_identity"] is False and len(written["units"]) == 5
