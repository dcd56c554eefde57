"""Did the units learn: how far each unit moved from its start (se_inject.train.movement), at the end of
fine-tuning and in every epoch's metrics, with a warning when none left the identity band."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import FunctionalResNet

import se_inject
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, UnitsDidNotLearnWarning, finetune
from se_inject.train.movement import IDENTITY_BAND, MovementReport, UnitMovement, measure_movement, unit_snapshot


def _moved_one(model: torch.nn.Module, name: str, by: float) -> None:
    unit = dict(model.named_modules())[name]
    with torch.no_grad():
        for p in unit.parameters():
            p.add_(by * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))


def test_a_unit_that_changed_moved_and_the_others_did_not():
    """One unit's weights changed: it alone moved; the preserve start is the identity exactly, the residual
    the rewrite fuses into a unit left out (a misread residual would give every unit an effect)."""
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4).eval()
    start = unit_snapshot(model)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    still = measure_movement(model, start, x)
    assert [u.moved for u in still.units] == [0.0] * len(start) and [u.effect for u in still.units] == [0.0] * len(
        start
    )
    changed = next(iter(start))
    _moved_one(model, changed, 3.0)
    report = measure_movement(model, start, x)
    moved = {u.name: u.moved for u in report.units}
    assert moved[changed] > IDENTITY_BAND and all(v == 0.0 for n, v in moved.items() if n != changed)
    assert report.learned == 1 / len(start) and report.images == 8
    assert next(u for u in report.units if u.name == changed).effect > IDENTITY_BAND


def test_the_figure_leaves_the_model_as_it_was():
    """Measuring runs the model in eval mode under hooks: flags, hooks and outputs are as before."""
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4).train()
    start = unit_snapshot(model)
    _moved_one(model, next(iter(start)), 1.0)
    x = torch.randn(4, 3, 16, 16)
    before = model.eval()(x)
    model.train()
    measure_movement(model, start, x)
    assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model.eval()(x), before)


def test_the_summary_the_stages_and_the_warning():
    report = MovementReport([UnitMovement("a.se_1_1", 1, 0.002, 0.1), UnitMovement("b.se_2_1", 2, 0.004, 0.1)])
    assert report.by_stage() == {1: 0.002, 2: 0.004} and report.learned == 0.0
    assert "0% of 2" in report.summary() and "--unit-lr-scale" in report.warning()
    assert MovementReport([UnitMovement("a.se_1_1", 1, 0.5, 0.5)]).warning() is None


@pytest.fixture(scope="module")
def data():
    return digits(image_size=16)


@pytest.mark.parametrize(
    "unit_optimizer, scale, learns", [("same", 1.0, False), ("same", 100.0, True), ("adamw", 0.1, True)]
)
def test_finetune_says_whether_the_units_learned(tmp_path, data, unit_optimizer, scale, learns):
    """At the backbone's rate and optimizer the identity-start units of a tiny net stay in the band, and the
    run warns with the fix; at 100 times it, or under AdamW at a tenth of it (the defaults), they leave it.
    Every epoch's metrics carry the figure."""
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(num_classes=10), r=4)
    config = FinetuneConfig(epochs=1, se_epochs=0, lr=0.5, unit_optimizer=unit_optimizer, unit_lr_scale=scale)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = finetune(model, data, tmp_path / "run", config)
    assert result.movement is not None and (result.movement.learned > 0) == learns
    assert result.history[-1]["units_learned"] == result.movement.learned
    assert set(result.history[-1]["unit_movement"]) == {"1", "2", "3"}
    warned = [w for w in caught if issubclass(w.category, UnitsDidNotLearnWarning)]
    assert bool(warned) == (not learns) and any("--unit-lr-scale" in n for n in result.warnings) == (not learns)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny network trained on the digits (3 epochs of plain training): well above chance."""
    torch.manual_seed(0)
    model = FunctionalResNet(num_classes=10)
    import tempfile

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finetune(model, data, folder, FinetuneConfig(epochs=3, se_epochs=0, lr=0.2), control=True)
    return model.eval()


def _start_warnings(model, original, data, tmp_path, init):
    from se_inject.train.finetune import StartChangedModelWarning, UntrainedModelWarning

    injected = se_inject.inject(model, r=4, init=init)
    seen: list = []

    class Stop(Exception):
        pass

    def first_step(*args, **kwargs):  # the warnings are decided before the first step: stop there
        raise Stop

    import se_inject.train.finetune as module

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(module, "_train_epoch", first_step)
        with pytest.raises(Stop):
            finetune(injected, data, tmp_path / init, FinetuneConfig(epochs=1, se_epochs=1), original=original)
    seen = [w.category for w in caught if issubclass(w.category, (StartChangedModelWarning, UntrainedModelWarning))]
    return seen


def test_the_start_warnings_are_decided_before_training(trained, data, tmp_path):
    """A trained base broken by the paper's start, an untrained base, and a clean preserve start (no
    warning): each said before the first training step."""
    from se_inject.train.finetune import StartChangedModelWarning, UntrainedModelWarning

    assert _start_warnings(trained, trained, data, tmp_path, "paper") == [StartChangedModelWarning]
    assert _start_warnings(trained, trained, data, tmp_path, "preserve") == []
    torch.manual_seed(0)
    untrained = FunctionalResNet(num_classes=10)
    assert _start_warnings(untrained, untrained, data, tmp_path, "preserve") == [UntrainedModelWarning]
    assert _start_warnings(untrained, untrained, data, tmp_path, "paper") == [UntrainedModelWarning]
