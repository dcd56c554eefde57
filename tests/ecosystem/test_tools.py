"""A retrofit is an ordinary module to the tools that run on models (#26): torch.fx, graph-mode and
dynamic quantization, torchvision's feature extraction, vmap, torch.compile'd inputs and checkpoints,
FrozenBatchNorm2d folding; TorchScript is refused in one line. (torch.compile, torch.export and ONNX
with onnxruntime are in tests/test_interop.py.) Units carry random weights: a tool that dropped or
bypassed one would change the outputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from conftest import randomize_batchnorm, randomize_units
from torch import nn

import se_inject
from se_inject.errors import NotScriptableError
from se_inject.io.models import load_checkpoint

UNITS = ["se", "eca", "ceca", "ese", "gc", "cbam"]


def _retrofit(unit: str = "se") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_batchnorm(se_inject.load_model("resnet18", num_classes=10)).eval()
    injected = randomize_units(se_inject.inject(model, unit=unit, input_size=32)).eval()
    return injected, torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("unit", UNITS)
def test_symbolic_trace_computes_the_retrofit(unit: str) -> None:
    injected, x = _retrofit(unit)
    traced = torch.fx.symbolic_trace(injected)
    unit_names = [name for name, m in injected.named_modules() if isinstance(m, se_inject.ChannelUnit)]
    called = [str(n.target) for n in traced.graph.nodes if n.op == "call_module"]
    # the units' layers are module calls a pass can see
    assert all(any(target.startswith(unit + ".") for target in called) for unit in unit_names)
    with torch.no_grad():  # GC's attention conv runs as a module call here, as a matrix product eagerly
        torch.testing.assert_close(traced(x), injected(x))


def test_feature_extractor_returns_the_units_features() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    injected, x = _retrofit()
    extractor = create_feature_extractor(injected, {"layer2.1.se_2_2": "unit", "layer4": "last"})
    with torch.no_grad():
        features = extractor(x)
        torch.testing.assert_close(features["last"], injected.forward_features(x))
    assert features["unit"].shape == (2, 128, 4, 4)


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def test_graph_mode_quantization() -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    injected, x = _retrofit()
    prepared = _quiet(prepare_fx, copy.deepcopy(injected), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        prepared(x)
        quantized = _quiet(convert_fx, prepared)
        got, expected = quantized(x), injected(x)
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantized.modules())
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.5  # int8: close, not equal
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.9


def test_dynamic_quantization_swaps_the_units_layers() -> None:
    injected, x = _retrofit()
    quantized = _quiet(torch.ao.quantization.quantize_dynamic, copy.deepcopy(injected), {nn.Linear}, dtype=torch.qint8)
    unit = quantized.layer1[0].se_1_1
    assert type(unit.fc1).__module__.startswith("torch.ao.nn.quantized.dynamic")
    with torch.no_grad():
        got, expected = quantized(x), injected(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_a_hook_on_a_units_layer_runs() -> None:
    """Pruning and inspection tools hook a unit's layers: the unit then calls them as modules."""
    injected, x = _retrofit()
    seen = []
    injected.layer1[0].se_1_1.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        injected(x)
    assert seen == [torch.Size([2, 4])]


def test_vmap_over_single_images() -> None:
    injected, x = _retrofit()
    with torch.no_grad():
        per_image = torch.func.vmap(lambda image: injected(image.unsqueeze(0)).squeeze(0))(x)
        torch.testing.assert_close(per_image, injected(x), rtol=1e-5, atol=1e-5)


def test_torchscript_is_refused_in_one_line() -> None:
    injected, _ = _retrofit()
    with pytest.raises(NotScriptableError, match="TorchScript is deprecated; use torch.export"):
        torch.jit.script(injected)


def test_a_compiled_model_is_retrofitted_through_the_module_it_wraps() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(se_inject.load_model("resnet18", num_classes=10)).eval()
    compiled = torch.compile(model)
    result = se_inject.retrofit(compiled, input_size=32)
    assert type(result.model).__name__ == "ResNet" and len(result.report.sites) == 8
    assert any("torch.compile wrapper" in note for note in result.report.notes)
    assert se_inject.check_outputs(model, result.model, input_size=32) == 0.0


@pytest.mark.parametrize("prefixes", [("_orig_mod.",), ("module.",), ("_orig_mod.", "module.")])
def test_a_wrapped_models_checkpoint_loads(prefixes: tuple[str, ...], tmp_path) -> None:
    torch.manual_seed(0)
    source = se_inject.load_model("resnet18", num_classes=10)
    state = source.state_dict()
    for prefix in reversed(prefixes):
        state = {prefix + k: v for k, v in state.items()}
    path = tmp_path / "wrapped.pth"
    torch.save(state, path)
    fresh = load_checkpoint(se_inject.load_model("resnet18", num_classes=10), path)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), source.state_dict().values(), strict=True)
    )


def test_frozen_batchnorm_folds_into_the_squeeze() -> None:
    """torchvision's pretrained detection backbones use FrozenBatchNorm2d: optimize_for_inference folds it."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d).double()
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for name, low, high in (("running_mean", -1, 1), ("running_var", 0.5, 2), ("weight", 0.5, 1.5)):
                getattr(m, name).copy_(torch.empty(m.running_mean.shape).uniform_(low, high, generator=generator))
    injected = randomize_units(se_inject.inject(model, input_size=32)).eval()
    fast = se_inject.optimize_for_inference(injected)
    assert len(se_inject.optimized_units(fast)) == 16
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got, expected = fast(x), injected(x)
    assert (got - expected).abs().max() <= 1e-8 * expected.abs().max()  # float64: the sums in another order
    unit = fast.get_submodule(se_inject.optimized_units(fast)[-1])
    with torch.no_grad():  # the folded path is the one that runs: a wrong fold changes the outputs
        unit.fold_weight.mul_(1.5)
        assert (fast(x) - expected).abs().max() > 1e-6 * expected.abs().max()
