"""An experiment's arms that differ in how the units are fine-tuned (their learning rate, an SE phase of
their own), each paired with the one control; --resume adding seeds and arms; each arm's movement."""

from __future__ import annotations

import json
import shutil

import pytest
from test_experiment import TUNING, _data, _model
from typer.testing import CliRunner

import se_inject.train.finetune as finetune_module
from se_inject.cli.app import app
from se_inject.errors import ConfigError, ResumeMismatchError
from se_inject.train.config import ExperimentConfig, FinetuneConfig
from se_inject.train.experiment import EXPERIMENT_FILE, Arm, arms, experiment

pytestmark = pytest.mark.filterwarnings(
    "ignore::se_inject.train.finetune.UntrainedModelWarning",
    "ignore::se_inject.train.finetune.UnitsDidNotLearnWarning",
    "ignore::se_inject.train.finetune.StartChangedModelWarning",
)

ONE_SEED = ExperimentConfig(seeds=(0,), latency_batch=0)


def test_tuning_axes_and_candidates_make_arms_with_their_own_settings():
    chosen = arms(inits=["preserve"], unit_lr_scales=[1, 100], candidates=[{"init": "zero", "unit_lr_scale": 30}])
    assert [(a.label, a.options, a.tuning) for a in chosen[1:]] == [
        ("init=preserve unit_lr_scale=1", {"init": "preserve"}, {"unit_lr_scale": 1}),
        ("init=preserve unit_lr_scale=100", {"init": "preserve"}, {"unit_lr_scale": 100}),
        ("init=zero unit_lr_scale=30", {"init": "zero"}, {"unit_lr_scale": 30}),
    ]
    shared = FinetuneConfig(epochs=3, se_epochs=1)
    longer = Arm("x", {}, {"se_epochs": 3}).finetune_config(shared)
    assert (longer.epochs, longer.se_epochs) == (5, 3)  # the same two full epochs after a longer SE phase
    assert chosen[2].finetune_config(shared).unit_lr_scale == 100 and chosen[0].finetune_config(shared) == shared


@pytest.mark.parametrize(
    "arm, match",
    [
        (Arm("a", {}, {"lr": 1.0}), "'lr' is not a setting an arm may change"),
        (Arm("a", {}, {"unit_lr_scale": -1.0}), "arm 'a': unit_lr_scale: must be positive"),
        (Arm("a", {}, {"se_epochs": -1}), "arm 'a': se_epochs: must be at least 0"),
    ],
)
def test_an_arms_bad_setting_is_refused_before_anything_is_written(tmp_path, arm, match):
    with pytest.raises(ConfigError, match=match):
        experiment(_model(), _data(), tmp_path / "exp", [Arm("control", None), arm], TUNING, ONE_SEED)
    assert not (tmp_path / "exp").exists()


def test_arms_with_other_se_phases_see_the_controls_batches_in_the_full_phase(tmp_path):
    """se_epochs 0 and 2 against a control with 1: every full-phase epoch is fed the control's batches
    (FinetuneConfig.data_epoch), so the comparison stays paired; each arm trains the same full phase."""
    result = experiment(_model(), _data(), tmp_path / "exp", arms(se_epochs=[0, 2]), TUNING, ONE_SEED)
    assert [a.same_data for a in result.arms] == [True, True, True]
    records = {
        a.label: json.loads(next((tmp_path / "exp" / "runs").glob(f"*{a.label}*/seed0/record.json")).read_text())
        for a in result.arms
    }
    full = {
        label: [d for d, p in zip(r["digests"], r["phases"], strict=True) if p == "full"]
        for label, r in records.items()
    }
    assert full["se_epochs=0"] == full["se_epochs=2"] == full["control"] and len(full["control"]) == 1
    assert records["se_epochs=2"]["phases"] == ["se", "se", "full"]
    # a misaligned pairing is caught: the control's full epoch against an SE epoch differs
    se = [
        d for d, p in zip(records["se_epochs=2"]["digests"], records["se_epochs=2"]["phases"], strict=True) if p == "se"
    ]
    assert se[0] != full["control"][0]


def test_each_arm_reports_how_far_its_units_moved(tmp_path):
    chosen = arms(inits=["preserve"], unit_lr_scales=[1, 1000])
    result = experiment(_model(), _data(), tmp_path / "exp", chosen, TUNING, ONE_SEED)
    control, slow, fast = result.arms
    assert control.units_learned is None and control.unit_movement is None
    assert slow.units_learned is not None and fast.units_learned is not None
    assert 0 <= slow.units_learned.mean <= fast.units_learned.mean <= 1
    assert set(fast.unit_movement) == set(slow.unit_movement) and len(fast.unit_movement) > 1  # per stage
    assert max(fast.unit_movement.values()) > 100 * max(slow.unit_movement.values()) > 0
    assert "units_learned" in json.loads(json.dumps(result.to_dict()))["arms"][1]


def test_resume_adds_seeds_and_arms_and_trains_only_the_new_runs(one_seed, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    shutil.copytree(one_seed, out)
    first = experiment(_model(), _data(), out, arms(inits=["preserve"]), TUNING, ONE_SEED, resume=True)
    trained: list[str] = []
    real = finetune_module.finetune

    def counted(model, data, run_dir, *args, **kwargs):
        trained.append(f"{run_dir.parent.name}/{run_dir.name}")
        return real(model, data, run_dir, *args, **kwargs)

    monkeypatch.setattr("se_inject.train.experiment.finetune", counted)
    more = ExperimentConfig(seeds=(0, 1), latency_batch=0)
    wider = arms(inits=["paper", "preserve"])  # a new arm, given before the old one: the old keeps its folder
    resumed = experiment(_model(), _data(), out, wider, TUNING, more, resume=True)
    assert sorted(trained) == [
        "00_control/seed1",
        "01_init=preserve/seed1",
        "02_init=paper/seed0",
        "02_init=paper/seed1",
    ]
    assert [a.label for a in resumed.arms] == ["control", "init=preserve", "init=paper"]
    assert [a.accuracies[0] for a in resumed.arms[:2]] == [a.accuracies[0] for a in first.arms]
    trained.clear()
    again = experiment(_model(), _data(), out, wider, TUNING, more, resume=True)  # nothing left to train
    assert trained == [] and [a.accuracies for a in again.arms] == [a.accuracies for a in resumed.arms]


@pytest.fixture(scope="module")
def one_seed(tmp_path_factory):
    """A finished experiment (the control and init=preserve, seed 0): copied by each test that resumes it."""
    out = tmp_path_factory.mktemp("one_seed") / "exp"
    experiment(_model(), _data(), out, arms(inits=["preserve"]), TUNING, ONE_SEED)
    return out


@pytest.mark.parametrize(
    "change, named",
    [
        (
            {"tuning": FinetuneConfig(epochs=2, se_epochs=1, batch_size=16, lr=0.2)},
            r"finetune\.lr \(0\.05 then, 0\.2 now\)",
        ),
        ({"chosen": arms(inits=["paper"])}, r"arms: 'init=preserve' is not among them \(--resume may add arms"),
        ({"chosen": arms(inits=["preserve"], rs=[2])}, r"arms: 'init=preserve' is not among them"),
        ({"config": ExperimentConfig(seeds=(1,), latency_batch=0)}, r"seeds: 0 is not among them"),
        (
            {"config": ExperimentConfig(seeds=(0,), latency_batch=0, level=0.9)},
            r"experiment\.level \(0\.95 then, 0\.9 now\)",
        ),
    ],
)
def test_resume_refuses_another_specification_naming_the_field(one_seed, tmp_path, change, named):
    out = tmp_path / "exp"
    shutil.copytree(one_seed, out)
    before = (out / EXPERIMENT_FILE).read_text()
    kwargs = {"chosen": arms(inits=["preserve"]), "tuning": TUNING, "config": ONE_SEED, **change}
    with pytest.raises(ResumeMismatchError, match=f"cannot resume this experiment with another {named}"):
        experiment(_model(), _data(), out, kwargs["chosen"], kwargs["tuning"], kwargs["config"], resume=True)
    assert (out / EXPERIMENT_FILE).read_text() == before


def test_the_command_takes_the_tuning_axes_and_refuses_a_bad_candidate_in_one_line(tmp_path):
    from pathlib import Path

    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    common = ["experiment", spec, "--data", "digits", "--input-size", "16", "--seeds", "1", "--epochs", "1",
              "--se-epochs", "0", "--latency-batch", "0", "--json"]  # fmt: skip
    result = CliRunner().invoke(
        app,
        [
            *common,
            "--out",
            str(tmp_path / "a"),
            "--unit-lr-scales",
            "30",
            "--se-phases",
            "1",
            "--candidate",
            "init=zero,unit_lr_scale=30",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["label"] for a in data["arms"]] == [
        "control", "unit_lr_scale=30.0 se_epochs=1", "init=zero unit_lr_scale=30.0"
    ]  # fmt: skip
    assert data["arms"][1]["tuning"] == {"unit_lr_scale": 30.0, "se_epochs": 1}
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "b"), "--candidate", "init=zero,lr=3"])
    assert bad.exit_code == 2 and len(bad.stderr.splitlines()) == 1
    assert "--candidate: lr: not an injection option nor one of se_epochs, unit_optimizer, unit_lr_scale" in bad.stderr
    assert not (tmp_path / "b").exists()
