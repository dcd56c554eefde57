"""Controlled experiments on tiny models and data: the control and the retrofit arms see the same
batches for a seed (augmentation included), the statistics over seeds are the textbook ones, a killed
experiment resumes to the same numbers, and the JSON has its shape."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from tiny_models import FunctionalResNet
from torch.utils.data import Dataset, TensorDataset
from typer.testing import CliRunner

import se_inject.train.finetune as finetune_module
from se_inject.cli.app import app
from se_inject.errors import ConfigError, DataError, ResumeMismatchError
from se_inject.train.config import ExperimentConfig, FinetuneConfig
from se_inject.train.data import DataSplits, SeededSamples
from se_inject.train.experiment import EXPERIMENT_FILE, arms, experiment
from se_inject.train.stats import Summary, paired_difference, t_quantile

# the tiny models are untrained: finetune says so before an SE phase, which is expected here
pytestmark = pytest.mark.filterwarnings("ignore::se_inject.train.finetune.UntrainedModelWarning")

TUNING = FinetuneConfig(epochs=2, se_epochs=1, batch_size=16, lr=0.05)
QUICK = ExperimentConfig(seeds=(0, 1, 2), latency_batch=0)


class NoisyImages(Dataset):
    """Images with random noise drawn from torch's global RNG at every access: a random augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index] + 0.1 * torch.randn_like(self.images[index]), self.labels[index]


def _data(train: int = 48, val: int = 24, classes: int = 3) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(train + val) % classes
    images = torch.randn(train + val, 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
    return DataSplits(
        NoisyImages(images[:train], labels[:train]),
        TensorDataset(images[train:], labels[train:]),
        [str(c) for c in range(classes)],
        16,
    )


def _model() -> FunctionalResNet:
    torch.manual_seed(0)
    return FunctionalResNet(num_classes=3)


def test_arms_are_the_control_then_the_product_then_the_candidates():
    chosen = arms(
        positions=["standard", "post"], inits=["preserve", "zero"], candidates=[{"r": 8, "include": ["stages.2.*"]}]
    )
    assert [a.label for a in chosen] == [
        "control",
        "position=standard init=preserve",
        "position=standard init=zero",
        "position=post init=preserve",
        "position=post init=zero",
        "r=8 include=['stages.2.*']",
    ]
    assert (
        chosen[0].is_control
        and chosen[0].options is None
        and chosen[2].options == {"position": "standard", "init": "zero"}
    )
    assert [a.label for a in arms()] == ["control", "default"]


def test_t_quantiles_and_intervals_are_the_textbook_ones():
    for df, expected in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)
    values = [0.90, 0.92, 0.95, 0.91, 0.93]
    summary = Summary.of(values)
    half = 2.7764451 * statistics.stdev(values) / math.sqrt(5)
    assert summary.mean == pytest.approx(0.922) and summary.std == pytest.approx(statistics.stdev(values))
    assert (summary.low, summary.high) == pytest.approx((0.922 - half, 0.922 + half), abs=1e-6)
    difference = paired_difference([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])
    assert difference.mean == pytest.approx(0.1) and difference.n == 3 and not difference.excludes_zero
    assert Summary.of([0.5]).low is None  # one seed: no interval
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([0.1], [0.1, 0.2])


def test_seeded_samples_do_not_depend_on_what_the_rng_did_before():
    data = _data()
    first = SeededSamples(data.train, seed=3, epoch=1)
    a = first[5][0]
    torch.randn(1000)  # a model's dropout, a unit's random init ...
    assert torch.equal(SeededSamples(data.train, seed=3, epoch=1)[5][0], a)
    assert not torch.equal(SeededSamples(data.train, seed=3, epoch=2)[5][0], a)
    state = torch.get_rng_state()
    first[7]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


def test_control_and_retrofit_arms_see_the_same_batches_for_a_seed(tmp_path):
    result = experiment(_model(), _data(), tmp_path / "exp", arms(inits=["preserve", "paper"]), TUNING, QUICK)
    state = json.loads((tmp_path / "exp" / EXPERIMENT_FILE).read_text())
    for seed in QUICK.seeds:
        control = state["runs"][f"control|{seed}"]["digests"]
        assert control[0] is None and control[1] is not None  # the control's SE phase trains nothing: its head is kept
        for label in ("init=preserve", "init=paper"):
            digests = state["runs"][f"{label}|{seed}"]["digests"]
            assert digests[0] is not None and digests[1] == control[1]  # the same order and the same noise
    assert len({state["runs"][f"control|{s}"]["digests"][1] for s in QUICK.seeds}) == 3  # seeds differ
    assert all(arm.same_data for arm in result.arms)
    # the reported statistics are those of the recorded per-seed accuracies
    control = [state["runs"][f"control|{s}"]["accuracy"] for s in QUICK.seeds]
    for arm in result.arms[1:]:
        mine = [state["runs"][f"{arm.label}|{s}"]["accuracy"] for s in QUICK.seeds]
        assert arm.accuracies == mine and arm.accuracy == Summary.of(mine)
        assert arm.difference == paired_difference(mine, control)
    # preserve starts as the base itself; the paper's start does not
    assert result.arms[1].start_accuracy.mean == result.base_accuracy
    data = json.loads(json.dumps(result.to_dict()))
    assert {"model", "device", "seeds", "level", "base_accuracy", "arms", "verdicts", "finetune", "seconds"} <= set(
        data
    )
    assert {"label", "options", "accuracies", "accuracy", "difference", "same_data", "units_learned", "params_added",
            "flops_increase", "latency", "training", "forgetting"} <= set(data["arms"][1])  # fmt: skip
    assert set(data["arms"][1]["difference"]) == {"n", "mean", "std", "low", "high", "level"}
    assert len(data["verdicts"]) == 2 and data["arms"][0]["difference"] is None


def test_a_killed_experiment_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    chosen = arms(inits=["paper"])
    config = ExperimentConfig(seeds=(0, 1), latency_batch=0)
    whole = experiment(_model(), _data(), tmp_path / "whole", chosen, TUNING, config)

    real_epoch, calls = finetune_module._train_epoch, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the control's two trained epochs, the first arm's SE epoch, then a kill mid-run
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "_train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        experiment(_model(), _data(), tmp_path / "killed", chosen, TUNING, config)
    monkeypatch.setattr(finetune_module, "_train_epoch", real_epoch)
    state = json.loads((tmp_path / "killed" / EXPERIMENT_FILE).read_text())
    assert sorted(state["runs"]) == ["control|0", "control|1"]  # the arm's run stopped inside its second epoch
    with pytest.raises(DataError, match="already holds an experiment"):
        experiment(_model(), _data(), tmp_path / "killed", chosen, TUNING, config)
    resumed = experiment(_model(), _data(), tmp_path / "killed", chosen, TUNING, config, resume=True)
    assert [a.accuracies for a in resumed.arms] == [a.accuracies for a in whole.arms]
    with pytest.raises(ResumeMismatchError, match="cannot resume this experiment with another finetune"):
        experiment(
            _model(),
            _data(),
            tmp_path / "killed",
            chosen,
            FinetuneConfig(epochs=2, se_epochs=1, lr=0.1),
            config,
            resume=True,
        )


def test_costs_forgetting_and_bad_arms(tmp_path):
    data = _data()
    chosen = arms(candidates=[{"r": 4}, {"r": 128}])  # 128 is wider than every block
    config = ExperimentConfig(seeds=(0, 1), latency_batch=2, latency_repeats=2)
    result = experiment(
        _model(),
        data,
        tmp_path / "exp",
        chosen,
        FinetuneConfig(epochs=1, se_epochs=0, batch_size=16),
        config,
        reference=data,
    )
    good, bad = result.arms[1], result.arms[2]
    assert bad.error is not None and bad.error.startswith("r: r=128 is wider") and bad.accuracies == []
    assert good.params_added > 0 and good.flops_increase > 0 and good.latency is not None and good.latency.median > 0
    assert good.reference_accuracy is not None and good.forgetting is not None
    assert good.forgetting.mean == pytest.approx(result.base_reference_accuracy - good.reference_accuracy.mean)
    with pytest.raises(ConfigError, match="reference: the original task's data has 2 classes"):
        experiment(_model(), data, tmp_path / "other", chosen, TUNING, QUICK, reference=_data(classes=2))
    with pytest.raises(ConfigError, match="none could be injected"):
        experiment(_model(), data, tmp_path / "none", arms(candidates=[{"r": 128}]), TUNING, QUICK)
    with pytest.raises(ConfigError, match="nothing but the control"):
        experiment(_model(), data, tmp_path / "none", arms()[:1], TUNING, QUICK)
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()  # refused before writing


def test_the_experiment_command(tmp_path):
    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    out, plot = tmp_path / "exp", tmp_path / "exp.png"
    args = ["experiment", spec, "--data", "digits", "--out", str(out), "--epochs", "1", "--se-epochs", "0",
            "--seeds", "2", "--inits", "preserve", "--latency-batch", "0", "--batch-size", "128"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["label"] for a in data["arms"]] == ["control", "init=preserve"] and data["seeds"] == [0, 1]
    assert plot.read_bytes().startswith(b"\x89PNG")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2, again.output
    assert "already holds an experiment" in again.output
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "control" in resumed.stdout and "init=preserve: " in resumed.stdout and "2 seeds" in resumed.stdout
    bad = CliRunner().invoke(
        app, ["experiment", spec, "--data", "digits", "--out", str(tmp_path / "b"), "--seeds", "0"]
    )
    assert bad.exit_code == 2 and "--seeds" in bad.output


@pytest.mark.slow  # 24 s of torchrun; two-process training itself runs in the fast suite (test_finetune's gloo test)
def test_two_processes_spread_the_runs(tmp_path):
    """Under torchrun (--nproc 2, gloo on the CPU) each process trains every other run alone; the
    first process reports them all."""
    import subprocess
    import sys

    spec = f"{Path(__file__).parent.parent / 'tiny_models.py'}:FunctionalResNet"
    out = tmp_path / "exp"
    args = ["experiment", spec, "--data", "digits", "--out", str(out), "--epochs", "1", "--se-epochs", "0",
            "--seeds", "2", "--inits", "preserve", "--latency-batch", "0", "--batch-size", "128"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "se_inject", *args, "--nproc", "2", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(done.stdout)  # one report, from the first process
    assert [len(a["accuracies"]) for a in data["arms"]] == [2, 2]
    state = json.loads((out / EXPERIMENT_FILE).read_text())
    assert sorted(r["process"] for r in state["runs"].values()) == [0, 0, 1, 1]
    for metrics in out.glob("runs/*/seed*/metrics.jsonl"):
        assert all(json.loads(line)["world_size"] == 1 for line in metrics.read_text().splitlines())


def test_a_new_head_trains_in_every_se_phase_and_the_model_given_is_not_changed(tmp_path):
    from conftest import assert_unchanged, snapshot

    torch.manual_seed(0)
    model = FunctionalResNet(num_classes=10)  # the data has 3 classes: every run fits a new head
    before = snapshot(model)
    tuning = FinetuneConfig(epochs=1, se_epochs=1, batch_size=16)
    result = experiment(model, _data(), tmp_path / "exp", arms(), tuning, ExperimentConfig(seeds=(0,), latency_batch=0))
    assert_unchanged(model, before)
    assert result.base_accuracy is None  # a 10-class head cannot be scored on 3 classes
    state = json.loads((tmp_path / "exp" / EXPERIMENT_FILE).read_text())
    control, arm = state["runs"]["control|0"]["digests"], state["runs"]["default|0"]["digests"]
    assert control[0] is not None and control == arm  # the control's SE phase trains its new head, on the same batches
