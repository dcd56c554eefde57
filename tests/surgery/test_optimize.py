"""optimize_for_inference: the squeeze taken before the block's last 1x1 conv computes what the plain
retrofit computes (float64, random BatchNorm statistics and unit weights, both starts), on every
bottleneck family of the suite, and changes nothing of the model it is given."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from conftest import assert_unchanged, randomize_batchnorm, randomize_units, snapshot
from tiny_models import FunctionalResNet, InplaceResNet

import se_inject
from se_inject.errors import ConfigError, InvalidModelError
from se_inject.measure.bench import bench
from se_inject.surgery.optimize import optimize_for_inference, optimized_units
from se_inject.units.base import ChannelUnit
from se_inject.units.fold import SqueezeFold
from se_inject.units.se import SqueezeExcite

# every bottleneck family the suite has: the last conv of each block is 1x1, so every unit folds
BOTTLENECKS = {
    "tiny torchvision-style (out += identity, shared inplace ReLU)": (InplaceResNet, 32),
    "timm resnet26 (Bottleneck)": (lambda: timm.create_model("resnet26", num_classes=10), 64),
    "timm resnet26d (avg-pool shortcut)": (lambda: timm.create_model("resnet26d", num_classes=10), 64),
    "timm resnext26ts (byobnet, BatchNormAct2d without act)": (lambda: timm.create_model("resnext26ts"), 64),
    "torchvision resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=10), 64),
}


# every unit configuration whose squeeze folds: a pooled linear map (the identity for GC's context)
FOLDING = {
    "se": {"unit": "se"},
    "ese": {"unit": "ese"},
    "eca": {"unit": "eca"},
    "eca, 9 taps over 32 channels": {"unit": "eca", "unit_options": {"kernel_size": 9}},
    "ceca, 9 taps": {"unit": "ceca", "unit_options": {"kernel_size": 9}},
    "ge over the whole map, MLP": {"unit": "ge"},
    "ge over the whole map, no MLP": {"unit": "ge", "unit_options": {"mlp": False}, "init": "paper"},
    "gc attention, add": {"unit": "gc"},
    "gc attention, scale": {"unit": "gc", "unit_options": {"fusion": "scale"}},
    "gc mean, both": {"unit": "gc", "unit_options": {"fusion": "both", "pooling": "avg"}},
}
# and those that must not: pooling that does not commute with a conv, or no pooled squeeze at all
NOT_FOLDING = {
    "se, max squeeze": {"unit": "se", "squeeze": "max"},
    "ge, windows": {"unit": "ge", "unit_options": {"extent": 2}},
    "ge, learned gather": {"unit": "ge", "unit_options": {"extra_params": True}, "input_size": 32},
    "cbam": {"unit": "cbam"},
}


def _retrofit(build, init: str = "paper", **options) -> torch.nn.Module:
    model = randomize_batchnorm(build().double().eval())
    options = {"init": init} | options
    return randomize_units(se_inject.inject(model, r=4, **options)).eval()


@pytest.mark.parametrize("init", ["preserve", "paper"])
@pytest.mark.parametrize("family", list(BOTTLENECKS))
def test_the_optimized_retrofit_computes_what_the_retrofit_computes(family, init):
    build, size = BOTTLENECKS[family]
    retrofitted = _retrofit(build, init)
    units = [name for name, m in retrofitted.named_modules() if isinstance(m, SqueezeExcite)]
    optimized = optimize_for_inference(retrofitted)
    assert optimized_units(optimized) == units  # every bottleneck unit folds
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = retrofitted(x), optimized(x)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    # the folded path is the one that runs: a wrong folded matrix changes the outputs
    unit = optimized.get_submodule(units[-1])
    with torch.no_grad():
        unit.fold_weight.mul_(1.5)
        assert not torch.allclose(optimized(x), expected, rtol=1e-6, atol=0)


def test_the_model_given_is_not_changed_and_training_mode_computes_the_retrofit():
    retrofitted = _retrofit(InplaceResNet, "paper")
    before, code = snapshot(retrofitted), [m.code for m in retrofitted.modules() if hasattr(m, "code")]
    optimized = optimize_for_inference(retrofitted)
    assert_unchanged(retrofitted, before)
    assert [m.code for m in retrofitted.modules() if hasattr(m, "code")] == code
    assert not any(m.training for m in optimized.modules())
    assert optimized.state_dict().keys() == retrofitted.state_dict().keys()  # the folded matrices are not saved
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    optimized.train()
    retrofitted.train()
    with torch.no_grad():  # batch statistics: the units pool their own input again
        torch.testing.assert_close(optimized(x), retrofitted(x), rtol=0, atol=0)


def test_weights_changed_in_training_are_folded_again_at_eval():
    retrofitted = _retrofit(InplaceResNet, "paper")
    optimized = optimize_for_inference(retrofitted)
    optimized.train()
    with torch.no_grad():  # what a training step would do: new unit and BatchNorm weights
        for model in (optimized, retrofitted):
            randomize_units(model, seed=7)
            randomize_batchnorm(model, seed=8)
    optimized.eval()
    retrofitted.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = retrofitted(x)
        assert (optimized(x) - expected).abs().max() <= 1e-9 * expected.abs().max()


@pytest.mark.parametrize("case", list(FOLDING))
def test_every_unit_with_a_pooled_linear_squeeze_folds_exactly(case):
    """float64, random BatchNorm statistics and unit weights: the optimised copy computes the retrofit, again
    after every weight changed, and the folded matrix is what runs (scaled by hand, the outputs change)."""
    retrofitted = _retrofit(InplaceResNet, **FOLDING[case])
    units = [name for name, m in retrofitted.named_modules() if isinstance(m, ChannelUnit)]
    optimized = optimize_for_inference(retrofitted)
    assert optimized_units(optimized) == units and len(units) == 4
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(optimized(x), retrofitted(x))
        for model in (optimized, retrofitted):  # new weights everywhere the fold reads: it folds again
            randomize_units(model, seed=7)
            randomize_batchnorm(model, seed=8)
        expected = retrofitted(x)
        _close(optimized(x), expected)
        optimized.get_submodule(units[0]).fold_weight.mul_(1.5)
        assert not torch.allclose(optimized(x), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["gc attention, add", "gc attention, scale"])
def test_gcs_attention_pooled_as_a_compiler_sees_it_is_the_retrofits(case, monkeypatch):
    """Under torch.compile GC pools the narrow map by reductions instead of bmm: the same values (float64,
    run eagerly with is_compiling() true, as test_under_a_compiler_... does)."""
    retrofitted = _retrofit(InplaceResNet, **FOLDING[case])
    optimized = optimize_for_inference(retrofitted)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = retrofitted(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        _close(optimized(x), expected)
        optimized.get_submodule(optimized_units(optimized)[0]).fold_attn.mul_(3.0)  # the path that runs
        assert not torch.allclose(optimized(x), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", list(FOLDING))
def test_every_folding_unit_trained_in_eval_mode_gets_the_gradients_of_the_retrofit(case):
    """Where a gradient is wanted, the live weights layer by layer (ECA's band, GC's attention from the
    narrow map): the unit's, the block's last conv's and its BatchNorm's gradients are the retrofit's."""
    retrofitted = _retrofit(InplaceResNet, **FOLDING[case])
    optimized = optimize_for_inference(retrofitted)
    unit_name = optimized_units(optimized)[-1]
    block = unit_name.rsplit(".", 1)[0]
    watched = [n for n, _ in optimized.named_parameters() if n.startswith(unit_name + ".")]
    watched += [f"{block}.conv3.weight", f"{block}.bn3.weight", f"{block}.bn3.bias"]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (retrofitted, optimized):
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append({name: model.get_parameter(name).grad for name in watched})
    for name in watched:
        if name.endswith("conv_attn.bias"):  # a constant added to every logit: the softmax drops it
            assert grads[0][name].abs().max() < 1e-9 and grads[1][name] is None
            continue
        assert grads[1][name] is not None and grads[1][name].abs().sum() > 0, name
        _close(grads[1][name], grads[0][name])


@pytest.mark.parametrize("case", list(NOT_FOLDING))
def test_units_whose_squeeze_does_not_commute_with_a_conv_are_refused(case):
    retrofitted = se_inject.inject(InplaceResNet(), r=4, init="paper", **NOT_FOLDING[case])
    with pytest.raises(ConfigError, match="nothing to fold; use the model as it is"):
        optimize_for_inference(retrofitted)
    unit = next(m for m in retrofitted.modules() if isinstance(m, ChannelUnit))
    if isinstance(unit, SqueezeFold):  # asked directly, the unit says why
        block = retrofitted.layer1[0]
        with pytest.raises(ConfigError, match="cannot squeeze before a conv: (only an average|its gather)"):
            unit.squeeze_through(block.conv3, block.bn3)


def test_models_with_nothing_to_fold_are_refused_in_one_line():
    basic = se_inject.inject(FunctionalResNet(), r=4)  # 3x3 convs end its blocks
    with pytest.raises(ConfigError, match="no unit of this model both reads BatchNorm of a 1x1 conv"):
        optimize_for_inference(basic)
    with pytest.raises(ConfigError, match=r"already optimised \(4 units fold\)"):
        optimize_for_inference(optimize_for_inference(se_inject.inject(InplaceResNet(), r=4)))
    with pytest.raises(InvalidModelError, match="expected an nn.Module"):
        optimize_for_inference("resnet50")  # type: ignore[arg-type]


def test_bench_times_the_optimized_retrofit_beside_the_others():
    report = bench(InplaceResNet(), batches=(2,), size=32, repeats=2, warmup=1, train=True, r=4, optimize=True)
    timed = {(t.model, t.mode) for t in report.timings}
    assert ("optimized", "inference") in timed and ("optimized", "train step") not in timed  # it trains as the retrofit
    inference = next(row for row in report.ratios() if row["mode"] == "inference")
    assert inference["optimized/original"] > 0 and inference["optimized/injected"] > 0
    assert inference["optimized/twin"] is None


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_load_state_dict_in_eval_mode_changes_what_the_optimized_copy_computes():
    """Loading weights into the optimised copy (in eval mode, where the folded path runs) is followed at once."""
    retrofitted = _retrofit(InplaceResNet, "paper")
    optimized = optimize_for_inference(retrofitted)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        optimized(x)  # the fold of the old weights is in use
        randomize_units(retrofitted, seed=11)
        randomize_batchnorm(retrofitted, seed=12)
        for p in retrofitted.parameters():
            p.mul_(1.1)  # the convs folded into the squeeze change too
    optimized.load_state_dict(retrofitted.state_dict())
    with torch.no_grad():
        _close(optimized(x), retrofitted.eval()(x))


def test_training_in_eval_mode_gives_every_weight_its_gradient_and_the_step_is_followed():
    retrofitted = _retrofit(InplaceResNet, "paper")
    optimized = optimize_for_inference(retrofitted)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    unit_name = optimized_units(optimized)[-1]
    block = unit_name.rsplit(".", 1)[0]
    watched = [f"{unit_name}.fc1.weight", f"{block}.conv3.weight", f"{block}.bn3.weight"]
    grads = []
    for model in (retrofitted.eval(), optimized.eval()):  # eval mode: BatchNorm's running statistics
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append({name: model.get_parameter(name).grad for name in watched})
    for name in watched:
        assert grads[1][name] is not None and grads[1][name].abs().sum() > 0, name
        _close(grads[1][name], grads[0][name])
    for model in (retrofitted, optimized):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        _close(optimized(x), retrofitted(x))  # after the step the folded path computes the new weights


def test_the_folded_path_runs_where_no_gradient_is_wanted():
    """No grad mode, or frozen weights: the fold is used (its matrix changed by hand shows it)."""
    optimized = optimize_for_inference(_retrofit(InplaceResNet, "paper"))
    unit = optimized.get_submodule(optimized_units(optimized)[-1])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = optimized(x)
        unit.fold_weight.mul_(1.5)
        assert not torch.equal(optimized(x), before)
    optimized.requires_grad_(False)
    assert not torch.equal(optimized(x), before)  # grad mode on, but nothing to train
    optimized.requires_grad_(True)
    torch.testing.assert_close(optimized(x), before, rtol=1e-9, atol=0)  # gradients wanted: the unfolded path


def test_inside_the_models_call_the_units_trust_its_check_and_alone_they_check_themselves(monkeypatch):
    """The model's pre-hook checks every fold once per call; a unit called inside that call does not check
    again, a block called alone does (and follows a weight changed since), and a call that raises ends
    what the pre-hook checked."""
    retrofitted = _retrofit(InplaceResNet, "paper")
    optimized = optimize_for_inference(retrofitted)
    names = optimized_units(optimized)
    checks: list[SqueezeFold] = []
    refresh = SqueezeFold.refresh_fold
    monkeypatch.setattr(SqueezeFold, "refresh_fold", lambda unit: (checks.append(unit), refresh(unit))[1])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _close(optimized(x), retrofitted(x))
        assert len(checks) == len(names) == len(set(map(id, checks)))  # the pre-hook's, once each
        block = names[-1].rsplit(".", 1)[0]
        for model in (optimized, retrofitted):
            randomize_units(model, seed=3)
        h = torch.randn(2, *optimized.get_submodule(block).conv1.weight.shape[1:2], 8, 8, dtype=torch.float64)
        checks.clear()
        _close(optimized.get_submodule(block)(h), retrofitted.get_submodule(block)(h))  # alone: it checks
        assert checks == [optimized.get_submodule(names[-1])]
        with pytest.raises(RuntimeError):
            optimized(torch.randn(2, 5, 32, 32, dtype=torch.float64))  # the stem's conv refuses 5 channels
        checks.clear()
        _close(optimized.get_submodule(block)(h), retrofitted.get_submodule(block)(h))
        assert len(checks) == 1  # the call that raised no longer counts as checked


def test_under_a_compiler_the_folds_are_kept_current_outside_the_graph(monkeypatch):
    """What torch.compile traces (is_compiling() is true there) reads the folded matrices without a check;
    the model's pre-hook, which the compiler leaves out of the graph, refolds what changed. Run eagerly
    here in float64 against the retrofit; test_a_compiled_optimized_copy_follows_its_weights compiles."""
    retrofitted = _retrofit(InplaceResNet, "paper")
    optimized = optimize_for_inference(retrofitted)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _close(optimized(x), retrofitted(x))
        for model in (optimized, retrofitted):
            randomize_units(model, seed=5)
            randomize_batchnorm(model, seed=6)
        _close(optimized(x), retrofitted(x))
    unit = optimized.get_submodule(optimized_units(optimized)[-1])
    optimized(x).sum().backward()  # gradients wanted: the live weights, layer by layer
    assert unit.fc1.weight.grad is not None and unit.fc1.weight.grad.abs().sum() > 0


def test_a_compiled_optimized_copy_follows_its_weights():
    """torch.compile (aot_eager: dynamo's tracing, guards and graph breaks, without inductor's codegen)."""
    retrofitted = _retrofit(InplaceResNet, "paper").float()
    optimized = optimize_for_inference(retrofitted)
    compiled = torch.compile(optimized, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), retrofitted(x), rtol=1e-4, atol=1e-4)
        for model in (optimized, retrofitted):
            randomize_units(model, seed=9)
        torch.testing.assert_close(compiled(x), retrofitted(x), rtol=1e-4, atol=1e-4)
    optimized.load_state_dict(randomize_batchnorm(retrofitted, seed=10).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), retrofitted(x), rtol=1e-4, atol=1e-4)
