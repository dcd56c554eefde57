"""An experiment's directory is data it can trust: a refused start changes nothing on disk, --force
replaces only the old experiment's own files, --resume never takes a run recorded under another
specification, and an experiment file with implausible records is refused in one line naming the field."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_experiment import _data, _model
from typer.testing import CliRunner

from se_inject.cli.app import app
from se_inject.errors import ConfigError, DataError, InvalidModelError, ResumeMismatchError
from se_inject.io.layout import EXPERIMENT_FILE, RECORD_FILE
from se_inject.train.config import ExperimentConfig, FinetuneConfig
from se_inject.train.experiment import arms, experiment

pytestmark = pytest.mark.filterwarnings("ignore::se_inject.train.finetune.UntrainedModelWarning")

CONFIG = ExperimentConfig(seeds=(0, 1), latency_batch=0)
OLD = FinetuneConfig(epochs=1, se_epochs=0, batch_size=16, lr=0.05)
NEW = FinetuneConfig(epochs=1, se_epochs=0, batch_size=16, lr=0.2)
CHOSEN = arms(inits=["preserve"])


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished experiment (learning rate 0.05): copied by each test that changes it."""
    out = tmp_path_factory.mktemp("finished") / "exp"
    result = experiment(_model(), _data(), out, CHOSEN, OLD, CONFIG)
    return out, result


def _copy(finished, tmp_path: Path) -> Path:
    out = tmp_path / "exp"
    shutil.copytree(finished[0], out)
    return out


def test_force_then_resume_never_reports_the_old_runs(finished, tmp_path):
    out = _copy(finished, tmp_path)
    old_runs = json.loads((out / EXPERIMENT_FILE).read_text())["runs"]
    forced = experiment(_model(), _data(), out, CHOSEN, NEW, CONFIG, force=True)
    state = json.loads((out / EXPERIMENT_FILE).read_text())
    assert state["spec"]["finetune"]["lr"] == 0.2
    assert all(state["runs"][k]["spec"] != old_runs[k]["spec"] for k in old_runs)  # every run trained again
    resumed = experiment(_model(), _data(), out, CHOSEN, NEW, CONFIG, resume=True)
    assert [a.accuracies for a in resumed.arms] == [a.accuracies for a in forced.arms]
    with pytest.raises(ResumeMismatchError, match="another finetune"):
        experiment(_model(), _data(), out, CHOSEN, OLD, CONFIG, resume=True)


def test_a_refused_forced_start_changes_nothing_on_disk(finished, tmp_path):
    out = _copy(finished, tmp_path)
    before = tree(out)
    with pytest.raises(ConfigError, match="none could be injected"):  # refused after the checks, before any write
        experiment(_model(), _data(), out, arms(candidates=[{"r": 128}]), NEW, CONFIG, force=True)
    assert tree(out) == before
    (out / "runs" / "00_control" / "seed0" / "notes.md").write_text("mine")
    with pytest.raises(DataError, match=r"holds runs/00_control/seed0/notes.md, which se_inject did not write"):
        experiment(_model(), _data(), out, CHOSEN, NEW, CONFIG, force=True)
    assert tree(out) == {**before, "runs/00_control/seed0/notes.md": b"mine"}


def test_force_never_replaces_a_folder_that_holds_no_experiment(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DataError, match="not an experiment directory se_inject wrote"):
        experiment(_model(), _data(), out, CHOSEN, NEW, CONFIG, force=True)
    assert tree(out) == {"a.jpg": b"\xff\xd8"}


def test_resume_refuses_a_run_record_of_another_specification(finished, tmp_path):
    """A record left by another specification in a run's folder (an old experiment's) is not taken."""
    out = _copy(finished, tmp_path)
    other = tmp_path / "other"
    experiment(_model(), _data(), other, CHOSEN, NEW, CONFIG)
    state = json.loads((out / EXPERIMENT_FILE).read_text())
    del state["runs"]["init=preserve|1"]  # not recorded in the file: resume reads the run's own record
    (out / EXPERIMENT_FILE).write_text(json.dumps(state))
    record = out / "runs" / "01_init=preserve" / "seed1" / RECORD_FILE
    shutil.copy(other / "runs" / "01_init=preserve" / "seed1" / RECORD_FILE, record)
    with pytest.raises(DataError, match="field 'record.spec': the run was recorded under another specification"):
        experiment(_model(), _data(), out, CHOSEN, OLD, CONFIG, resume=True)


def _tampered(state: dict, how: str) -> str:
    run = state["runs"]["control|0"]
    if how == "accuracy 5.0":
        run["accuracy"] = 5.0
        return "runs.control|0.accuracy': 5.0 is out of range"
    if how == "missing key":
        del run["digests"]
        return "runs.control|0.digests': missing"
    if how == "wrong type":
        run["seconds"] = "fast"
        return "runs.control|0.seconds': expected a number"
    if how == "NaN":
        run["start_accuracy"] = float("nan")
        return "runs.control|0.start_accuracy': expected a number"
    if how == "a run of another arm":
        state["runs"]["position=post|0"] = copy.deepcopy(run)
        return "runs.position=post|0': not a run of this experiment"
    if how == "another spec's run":
        run["spec"] = "0" * 16
        return "runs.control|0.spec': the run was recorded under another specification"
    if how == "latency":
        state["latency"] = {"init=preserve": [1.0, -2.0, 3.0]}
        return "latency.init=preserve[1]': -2.0 is out of range"
    state["base"] = {"accuracy": "high"}
    return "base.accuracy': expected a number"


HOW = [
    "accuracy 5.0",
    "missing key",
    "wrong type",
    "NaN",
    "a run of another arm",
    "another spec's run",
    "latency",
    "base",
]


@pytest.mark.parametrize("how", HOW)
def test_an_implausible_experiment_file_is_refused_naming_the_field(finished, tmp_path, how):
    out = _copy(finished, tmp_path)
    state = json.loads((out / EXPERIMENT_FILE).read_text())
    expected = _tampered(state, how)
    (out / EXPERIMENT_FILE).write_text(json.dumps(state))
    before = tree(out)
    with pytest.raises(DataError, match=f"field '{expected}".replace("|", r"\|").replace("[", r"\[")):
        experiment(_model(), _data(), out, CHOSEN, OLD, CONFIG, resume=True)
    assert tree(out) == before


def test_the_cli_refuses_an_implausible_experiment_file_in_one_line(finished, tmp_path):
    """The fields are checked for what they are before anything else: no training, one line."""
    out = _copy(finished, tmp_path)
    state = json.loads((out / EXPERIMENT_FILE).read_text())
    state["runs"]["control|0"]["accuracy"] = 5.0
    state["spec"] = []  # implausible too: the first field refused is named
    (out / EXPERIMENT_FILE).write_text(json.dumps(state))
    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    args = ["experiment", spec, "--data", "digits", "--out", str(out), "--seeds", "2", "--inits", "preserve",
            "--latency-batch", "0", "--resume"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "field 'runs.control|0.accuracy': 5.0 is out of range" in result.stderr
    state["runs"]["control|0"]["accuracy"] = 0.5
    (out / EXPERIMENT_FILE).write_text(json.dumps(state))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "field 'spec': expected the experiment's specification" in result.stderr


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"model": "resnet18"}, InvalidModelError, "model: expected an nn.Module"),
        ({"data": "digits"}, DataError, "data: expected the data as se_inject.load_data returns it"),
        ({"arms": "init=paper"}, ConfigError, "arms: expected a list of arms"),
        ({"arms": ["control", "init=paper"]}, ConfigError, "arms: expected arms made by se_inject.arms"),
        ({"arms": "options"}, ConfigError, "arms: arm 'init=paper': options must map option names"),
        ({"reference": "digits"}, DataError, "reference: expected the data"),
    ],
)
def test_the_api_refuses_what_is_not_an_experiment_in_one_error(tmp_path, change, error, match):
    from se_inject.train.experiment import Arm

    kwargs = {"model": _model(), "data": _data(), "arms": CHOSEN, "reference": None}
    if change.get("arms") == "options":
        change = {"arms": [CHOSEN[0], Arm("init=paper", [("init", "paper")])]}  # type: ignore[arg-type]
    kwargs.update(change)
    with pytest.raises(error, match=match):
        experiment(kwargs["model"], kwargs["data"], tmp_path / "exp", kwargs["arms"], OLD, CONFIG,
                   reference=kwargs["reference"])  # fmt: skip
    assert not (tmp_path / "exp").exists()


def test_a_plot_without_matplotlib_is_refused_before_any_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    args = ["experiment", spec, "--data", "digits", "--out", str(tmp_path / "exp"), "--seeds", "1", "--json",
            "--plot", str(tmp_path / "exp.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "plots need matplotlib" in result.stderr, result.output
    assert not (tmp_path / "exp").exists()


def test_json_output_comes_before_a_plot_that_fails(finished, tmp_path, monkeypatch):
    """The command prints the result, then draws the plot: a plot that fails loses no result. (The
    experiment itself is the finished one: the order of the command's steps is what is tested.)"""
    import se_inject.train.experiment as module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "experiment", lambda *args, **kwargs: finished[1])
    monkeypatch.setattr(module, "plot", broken)
    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    args = ["experiment", spec, "--data", "digits", "--out", str(tmp_path / "exp"), "--seeds", "2",
            "--json", "--plot", str(tmp_path / "exp.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "No space left" in result.stderr, result.output
    assert [a["label"] for a in json.loads(result.stdout)["arms"]] == ["control", "init=preserve"]


def test_a_torchscript_model_is_one_line(tmp_path):
    import se_inject

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated (a FutureWarning) in recent torch
        scripted = torch.jit.script(_model())
    with pytest.raises(InvalidModelError, match="TorchScript module .* cannot be rewritten"):
        se_inject.inject(scripted, r=4, input_size=16)


def test_the_model_card_shows_the_experiments_arms_against_the_control(finished):
    """push_to_hub(..., experiment=result): the card's table is the finished experiment's, arm by arm."""
    import se_inject
    from se_inject.io.hub import model_card
    from se_inject.io.saving import current_recipe

    result = finished[1]
    se = se_inject.inject(_model(), r=4)
    card = model_card(current_recipe(se), se.se_inject_report, "me/x", result.to_dict())
    assert f"## Against a control ({len(result.seeds)} seeds" in card
    for arm in result.arms:
        assert f"| {arm.label} | {100 * arm.accuracy.mean:.2f} |" in card
    assert all(f"- {line}" in card for line in result.verdicts())
