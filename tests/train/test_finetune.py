"""Fine-tuning on the digits set: it learns, it checkpoints, it resumes exactly, it runs on 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FunctionalResNet

import se_inject
from se_inject.errors import ConfigError, DataError
from se_inject.train.data import digits
from se_inject.train.finetune import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    FinetuneConfig,
    _param_groups,
    finetune,
    fit_head,
    se_parameters,
)

ROOT = Path(__file__).parents[2]
SPEC = f"{ROOT / 'tests' / 'tiny_models.py'}:FunctionalResNet"


@pytest.fixture(scope="module")
def data():
    return digits(image_size=16)


def test_a_short_run_learns_and_writes_everything(data, tmp_path):
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, input_size=16, model_name=SPEC)
    config = FinetuneConfig(epochs=3, se_epochs=1, lr=0.1, full_lr_scale=1.0, batch_size=64)
    result = finetune(model, data, tmp_path / "run", config)
    assert result.accuracy["after fine-tuning"] > 0.3  # chance is 0.1
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [(r["epoch"], r["phase"], r["world_size"]) for r in lines] == [(1, "se", 1), (2, "full", 1), (3, "full", 1)]
    assert {"train_loss", "val_acc", "images_per_s", "lr"} <= set(lines[0])
    assert (tmp_path / "run" / CHECKPOINT_FILE).is_file()
    loaded = se_inject.load(tmp_path / "run", trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), result.model.eval()(x))


def test_the_se_phase_trains_only_the_units_and_keeps_batchnorm_statistics(data, tmp_path):
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, init="paper", input_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".se_" in k for k in changed)  # running_mean/var of BN unchanged too


@pytest.mark.parametrize(
    "unit, options, zero_start",
    [
        ("eca", {}, "conv.weight"),
        ("gc", {"fusion": "both"}, "mlp_add.fc2.weight"),
        ("cbam", {}, "spatial.conv.bn.weight"),
    ],
)
def test_the_unit_phase_trains_any_units_weights_and_nothing_else(data, tmp_path, unit, options, zero_start):
    """Every unit type trains through the same phases: here the first (units only), whose gradients
    reach the units that start as the identity (their first layers are random, the last zero)."""
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), unit=unit, unit_options=options, r=4, input_size=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=1, lr=0.1))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(f".{unit}_" in k for k in changed)
    assert any(k.endswith(zero_start) for k in changed)  # a weight the preserve start zeroed has moved


def test_the_head_is_fitted_to_the_classes_and_decay_spares_biases_and_norms():
    model = FunctionalResNet(num_classes=1000)
    new = fit_head(model, 10)
    assert model.head.out_features == 10 and len(new) == 2
    assert fit_head(model, 10) == []
    decay, no_decay, _, _ = _param_groups(list(model.parameters()), set(), FinetuneConfig(weight_decay=1e-4), 0.1)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4


def test_the_units_take_their_own_learning_rate_and_weight_decay():
    """unit_lr_scale multiplies the phase's rate for the units' weights alone; unit_weight_decay decays
    their weights, not their biases; the backbone keeps the phase's rate and weight decay."""
    model = se_inject.inject(FunctionalResNet(), r=4)
    units = {id(p) for p in se_parameters(model)}
    config = FinetuneConfig(unit_lr_scale=10.0, weight_decay=1e-4, unit_weight_decay=0.0)
    groups = _param_groups(list(model.parameters()), units, config, 0.05)
    backbone, units_groups = groups[:2], groups[2:]
    assert {g["lr"] for g in backbone} == {0.05} and {g["lr"] for g in units_groups} == {0.5}
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0, 0.0, 0.0]
    assert {id(p) for g in units_groups for p in g["params"]} == units
    assert not units & {id(p) for g in backbone for p in g["params"]}
    default = _param_groups(list(model.parameters()), units, FinetuneConfig(), 0.05)
    assert [g["weight_decay"] for g in default] == [1e-4, 0.0, 1e-4, 0.0]
    assert [g["lr"] for g in default] == pytest.approx([0.05, 0.05, 0.005, 0.005])  # the units' default: 0.1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"epochs": 0}, "epochs"),
        ({"se_epochs": 4}, "se_epochs"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"unit_optimizer": "lamb"}, "unit_optimizer"),
        ({"lr": 0}, "lr"),
        ({"unit_lr_scale": 0}, "unit_lr_scale"),
        ({"unit_weight_decay": -1.0}, "unit_weight_decay"),
        ({"schedule": "poly"}, "schedule"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        FinetuneConfig(**kwargs)


def test_runs_are_not_overwritten_and_resume_needs_a_checkpoint(data, tmp_path):
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, input_size=16)
    with pytest.raises(DataError, match="no checkpoint to resume from"):
        finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1), resume=True)
    finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0))
    with pytest.raises(DataError, match="already holds a run; pass resume=True"):
        finetune(model, data, tmp_path / "run", FinetuneConfig(epochs=1))
    with pytest.raises(ConfigError, match="no SE units"):
        finetune(FunctionalResNet(), data, tmp_path / "plain", FinetuneConfig(epochs=1, se_epochs=1))


def _cli(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "se_inject",
        "finetune",
        SPEC,
        "--data",
        "digits",
        "--input-size",
        "16",
        "--r",
        "4",
        "--lr",
        "0.1",
        "--full-lr-scale",
        "1",
        "--batch-size",
        "32",
        *args,
    ]


# 28 s on 2 cores, for the suite's 12 minutes: a resume bit for bit stays in the fast suite
# (test_the_units_own_optimizer_steps_them_and_resumes_exactly, and tests/test_roundtrips.py's kill at the write)
@pytest.mark.slow
def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the same arithmetic in every run
    subprocess.run(_cli("--out", str(tmp_path / "whole"), "--epochs", "3"), check=True, env=env, capture_output=True)
    killed = subprocess.Popen(
        _cli("--out", str(tmp_path / "cut"), "--epochs", "3"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "cut" / CHECKPOINT_FILE
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # in epoch 2, or wherever it is: at most that epoch is lost
    killed.wait()
    assert checkpoint.exists()
    subprocess.run(
        _cli("--out", str(tmp_path / "cut"), "--epochs", "3", "--resume"), check=True, env=env, capture_output=True
    )
    whole, cut = (
        load_file(str(tmp_path / "whole" / "model.safetensors")),
        load_file(str(tmp_path / "cut" / "model.safetensors")),
    )
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / METRICS_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_two_processes_with_gloo(tmp_path):
    done = subprocess.run(
        _cli("--out", str(tmp_path / "ddp"), "--epochs", "2", "--nproc", "2", "--device", "cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "ddp" / METRICS_FILE).read_text().splitlines()]
    assert [r["world_size"] for r in lines] == [2, 2]
    assert "2 process(es) on cpu" in done.stdout
    se_inject.load(tmp_path / "ddp", trust_code=True)


def test_bad_data_stops_the_cli_before_training(tmp_path):
    from typer.testing import CliRunner

    from se_inject.cli.app import app

    args = ["finetune", SPEC, "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no such data directory" in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cuda_asked_for_without_cuda_is_a_clear_error():
    from se_inject.runtime import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device: cuda was asked for but torch sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_the_units_warm_up_over_the_runs_first_steps(data, tmp_path):
    """unit_warmup_steps: the units' rate rises linearly over the run's first steps (through the epochs), the
    backbone's does not, and the schedule's rate is back in place after the epoch."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4, input_size=16)
    seen: list[tuple[float, float]] = []

    def record(optimizer, args, kwargs):
        groups = optimizer.param_groups
        seen.append((groups[0]["lr"], next(g["lr"] for g in groups if g["units"])))

    steps_per_epoch = -(-data.train_size // 64)
    config = FinetuneConfig(epochs=2, se_epochs=0, lr=0.05, full_lr_scale=1.0, unit_lr_scale=10.0, unit_optimizer="same",
                            unit_warmup_steps=steps_per_epoch + 3, schedule="step")  # fmt: skip
    handle = register_optimizer_step_pre_hook(record)
    try:
        result = finetune(model, data, tmp_path / "run", config)
    finally:
        handle.remove()
    warmup = config.unit_warmup_steps
    assert len(seen) == 2 * steps_per_epoch
    assert [b for b, _ in seen] == [0.05] * len(seen)  # the backbone: the phase's rate throughout
    expected = [0.5 * min(1.0, step / warmup) for step in range(1, len(seen) + 1)]
    assert [u for _, u in seen] == pytest.approx(expected)  # across the epoch boundary, then the full rate
    assert [h["lr"] for h in result.history] == [0.05, 0.05]


def test_timms_optimizer_factory_with_layer_decay_keeps_working_on_a_retrofit():
    """timm's create_optimizer_v2 on a retrofit of a timm model: every weight in one group, each unit in its
    block's layer-decay group (the block's rate), the units' biases without weight decay."""
    import timm
    from timm.optim import create_optimizer_v2

    from se_inject.units import ChannelUnit

    model = se_inject.inject(timm.create_model("resnet18", num_classes=10), r=8)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, layer_decay=0.7)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sorted(group_of) == sorted(id(p) for p in model.parameters())  # each weight once
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, ChannelUnit)]
    assert len(units) == 8
    for name, unit in units:
        block = model.get_submodule(name.rsplit(".", 1)[0])
        for param in unit.parameters():
            assert group_of[id(param)]["lr_scale"] == group_of[id(block.conv1.weight)]["lr_scale"]
            assert group_of[id(param)]["weight_decay"] == (1e-4 if param.ndim > 1 else 0.0)
    assert len({g["lr_scale"] for g in optimizer.param_groups}) > 2  # the layers decay


def test_the_units_own_optimizer_steps_them_and_resumes_exactly(data, tmp_path):
    """unit_optimizer="adamw" under SGD: the units' groups step under AdamW, the backbone's under SGD, one
    schedule over both; a run stopped after its SE epoch and resumed ends with the uninterrupted run's
    weights, bit for bit (both parts' state is checkpointed)."""
    from se_inject.train.finetune import SplitOptimizer, _make_optimizer

    def model():
        torch.manual_seed(0)
        return se_inject.inject(FunctionalResNet(num_classes=10), r=4, input_size=16)

    config = FinetuneConfig(epochs=2, se_epochs=1, unit_optimizer="adamw", unit_lr_scale=0.02)
    built = model()
    optimizer = _make_optimizer(config, list(built.parameters()), 0.05, {id(p) for p in se_parameters(built)})
    assert isinstance(optimizer, SplitOptimizer)
    sgd, adamw = optimizer.parts
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in se_parameters(built)}
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.001, 0.001])
    whole = model()
    finetune(whole, data, tmp_path / "whole", config)
    stopped = model()
    finetune(stopped, data, tmp_path / "stopped", replace(config, epochs=1))
    finetune(stopped, data, tmp_path / "stopped", config, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), stopped.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    same = _make_optimizer(replace(config, unit_optimizer="sgd"), list(built.parameters()), 0.05, set())
    assert isinstance(same, torch.optim.SGD)
