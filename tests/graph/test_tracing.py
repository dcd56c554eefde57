import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from tiny_models import NetWithUntraceableChild
from torch import nn

from se_inject.errors import ShapePropagationError, UntraceableModelError
from se_inject.graph.channels import input_channels
from se_inject.graph.flops import count_flops, count_flops_by_module, propagate
from se_inject.graph.shadow import ShapeOnlyBatchNorm, eval_mode, on_meta
from se_inject.graph.trace import SETracer, module_scope, register_leaf_module, trace
from se_inject.units.se import SqueezeExcite


class UntraceableRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else x


def test_untraceable_module_is_named_with_the_leaf_fix():
    with pytest.raises(UntraceableModelError) as info:
        trace(NetWithUntraceableChild())
    message = str(info.value)
    assert "'body.1' (DataDependentGate)" in message
    assert "leaf_modules=['DataDependentGate']" in message and "--leaf DataDependentGate" in message
    assert "\n" not in message


@pytest.mark.parametrize("leaf", ["DataDependentGate", "body.1"])
def test_leaf_modules_by_class_or_qualified_name_make_it_traceable(leaf):
    gm = trace(NetWithUntraceableChild(), leaf_modules=[leaf])
    assert "body.1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_untraceable_root_forward_says_so():
    with pytest.raises(UntraceableModelError, match="forward of UntraceableRoot itself"):
        trace(UntraceableRoot())


def test_timm_and_se_inject_leaves_are_not_traced_into():
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2), SqueezeExcite(8, r=2))
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert SETracer().is_leaf_module(model[1], "1")


def test_register_leaf_module_refuses_a_class_twice():
    with pytest.raises(ValueError, match="already a leaf module"):
        register_leaf_module(SqueezeExcite, "again")

    class Custom(nn.Module):
        pass

    assert register_leaf_module(Custom, "test") is Custom
    assert SETracer().is_leaf_module(Custom(), "x")


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, double: bool = False):
        y = self.conv(x)
        if double:  # a Python flag with a default: traced with the default fixed
            y = y * 2
        return y


def test_defaulted_flags_are_fixed_to_their_defaults():
    model = Flagged()
    gm = trace(model)
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(gm(x), model(x))
    assert not any(n.target is torch.mul or n.target == "mul" for n in gm.graph.nodes)


def test_module_scope_records_the_modules_around_each_node():
    gm = trace(NetWithUntraceableChild(), leaf_modules=["DataDependentGate"])
    scopes = {n.name: module_scope(n) for n in gm.graph.nodes}
    assert scopes["body_0"] == ("body",)
    assert scopes["conv"] == ()


def test_propagate_records_shapes_and_flops_on_fake_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1))
    before = [p.detach().clone() for p in model.parameters()]
    gm = trace(model)
    total = propagate(gm, (2, 3, 10, 10))
    shapes = {n.target: n.meta["shape"] for n in gm.graph.nodes if n.op == "call_module"}
    assert shapes == {"0": (2, 8, 10, 10), "1": (2, 8, 10, 10), "2": (2, 16, 10, 10)}
    conv_macs = 2 * 100 * 8 * 3 * 9 + 2 * 100 * 16 * 8
    assert total.total == 2 * conv_macs  # flop_counter's convention: 2 FLOPs per multiply-add
    assert total.macs == conv_macs and total.elementwise == 0  # the BatchNorm counts nothing
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_meta_models_are_analysed_without_allocating_weights():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))
    assert on_meta(model)
    gm = trace(model)
    assert propagate(gm, (1, 3, 32, 32)).total > 0
    assert all(p.is_meta for p in model.parameters())


def test_se_unit_flops_include_pooling_and_scaling():
    se = SqueezeExcite(32, r=4, init="paper")
    flops = count_flops(se, (1, 32, 7, 7))
    pool, fcs, scale = 32 * 49, 2 * (2 * 32 * 8), 32 * 49
    assert flops == pool + fcs + scale


def test_shape_errors_name_the_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(5, 2))
    with pytest.raises(ShapePropagationError, match=r"node .*2.*failed"):
        propagate(trace(model), (1, 3, 8, 8))


def test_eval_mode_restores_each_flag():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Dropout())
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_in_channels_come_from_the_first_convolution():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
    assert input_channels(seq, trace(seq)) == 1 and input_channels(seq) == 1

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 5, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.weight)

    assert input_channels(Functional()) == 5


def test_value_dependent_leaves_fall_back_to_real_tensors_but_not_on_meta():
    model = NetWithUntraceableChild()
    gm = trace(model, leaf_modules=["DataDependentGate"])
    assert propagate(gm, (1, 3, 8, 8)).total > 0
    assert {n.target: n.meta["shape"] for n in gm.graph.nodes if n.op == "call_module"}["body.1"] == (1, 8, 8, 8)
    with torch.device("meta"):
        meta_model = NetWithUntraceableChild()
    with pytest.raises(ShapePropagationError, match="depends on tensor values, which the meta device does not have"):
        propagate(trace(meta_model, leaf_modules=["DataDependentGate"]), (1, 3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch_norm_answered_by_shape_gives_what_its_kernel_gives(dtype, memory_format):
    """ShapeOnlyBatchNorm skips batch norm's meta kernel; the tensors it returns must look the same."""
    bn = nn.BatchNorm2d(16, device="meta", dtype=dtype).eval()
    x = torch.empty(2, 16, 5, 7, device="meta", dtype=dtype).to(memory_format=memory_format)
    expected = torch.ops.aten.native_batch_norm(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5
    )
    with ShapeOnlyBatchNorm():
        got = torch.ops.aten.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5)
    for mine, kernels in zip(got, expected, strict=True):
        assert (mine.shape, mine.dtype, mine.stride(), mine.device) == (
            kernels.shape,
            kernels.dtype,
            kernels.stride(),
            kernels.device,
        )


def test_batch_norm_that_does_not_fit_still_fails_under_shape_only():
    bn = nn.BatchNorm2d(16, device="meta").eval()
    with ShapeOnlyBatchNorm(), pytest.raises(RuntimeError):
        bn(torch.empty(2, 8, 5, 5, device="meta"))


def test_training_batch_norm_runs_its_real_kernel_under_shape_only():
    torch.manual_seed(0)
    bn, x = nn.BatchNorm2d(4), torch.randn(3, 4, 5, 5)
    expected = copy.deepcopy(bn)(x)
    with ShapeOnlyBatchNorm():
        assert torch.equal(bn(x), expected)
    assert bn.num_batches_tracked.item() == 1


def test_flops_by_module_add_up_to_the_total():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1))
    total, per_module = count_flops_by_module(model, (1, 3, 10, 10))
    assert total.total == count_flops(model, (1, 3, 10, 10)) == per_module[""].total
    assert per_module["0"].total == 2 * 100 * 8 * 3 * 9 and per_module["2"].total == 2 * 100 * 16 * 8
    assert per_module["2"].macs == 100 * 16 * 8
    assert per_module["0"].total + per_module["2"].total == total.total and "1" not in per_module


def _returns_a_dict(forward):
    """A decorator with a (*args, **kwargs) wrapper, as transformers' @can_return_tuple."""
    import functools

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        as_tuple = kwargs.pop("return_tuple", False)
        out = forward(self, *args, **kwargs)
        return tuple(out.values()) if as_tuple else out

    return wrapper


class PassesItsKwargsOn(nn.Module):
    """A root forward that takes **kwargs and hands them to a child, behind a decorator."""

    def __init__(self):
        super().__init__()
        self.body = KwargsChild()

    @_returns_a_dict
    def forward(self, pixels, labels=None, *, scale=1.0, **kwargs):
        return {"out": self.body(pixels, **kwargs) * scale}


class KwargsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, **kwargs):
        for _ in kwargs:  # iterating a proxy of **kwargs is what fails
            pass
        return self.conv(x)


def test_a_root_with_kwargs_behind_a_decorator_traces_as_called_with_one_input():
    model = PassesItsKwargsOn().eval()
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"][0] == "pixels"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x)["out"], model(x)["out"])


LIBRARY_CODE = """
import torch.nn.functional as F
from torch import nn


def pad_like_tensorflow(x, size):
    return F.pad(x, (0, int(x.shape[-1]) % size))  # int() of a proxy fails: a function to call as one node


class Stem(nn.Module):
    def forward(self, x):
        if x.shape[1] != 3:  # control flow on a proxy fails: a module to keep whole
            raise ValueError("three channels")
        return x


class Pad(nn.Module):
    def forward(self, x):
        return pad_like_tensorflow(x, 2)
"""


def test_declared_classes_are_kept_whole_and_functions_are_one_node(monkeypatch):
    """rules/tracing entries, matched by qualified name; a function only where its module is loaded."""
    import sys
    import types

    import se_inject.graph.trace as trace_module
    import se_inject.graph.untraceable as untraceable

    library = types.ModuleType("a_library")  # a library's model code: its functions are module globals
    exec(LIBRARY_CODE, library.__dict__)
    Stem, Pad, pad_like_tensorflow = library.Stem, library.Pad, library.pad_like_tensorflow
    entries = untraceable.parse_untraceable(
        "[[untraceable]]\nname = 'a_library.Stem'\nkind = 'module'\nreason = 'checks channels'\n"
        "[[untraceable]]\nname = 'a_library.pad_like_tensorflow'\nkind = 'function'\nreason = 'pads by size'\n",
        "t.toml",
    )
    monkeypatch.setattr(untraceable, "load_untraceable", lambda: tuple(entries))
    monkeypatch.setattr(trace_module, "untraceable_classes", lambda: frozenset({"a_library.Stem"}))
    model = nn.Sequential(Stem(), Pad(), nn.Conv2d(3, 4, 3))
    assert untraceable.loaded_functions() == []  # the library is not loaded: nothing is imported for it
    monkeypatch.setitem(sys.modules, "a_library", library)
    assert untraceable.loaded_functions() == [pad_like_tensorflow]
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "2"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [pad_like_tensorflow]
    x = torch.randn(1, 3, 7, 7)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(UntraceableModelError, match="'0' \\(Stem\\)"):
        monkeypatch.setattr(trace_module, "untraceable_classes", frozenset)
        trace(model)


def test_the_shipped_tracing_data_is_valid():
    from se_inject.graph.untraceable import load_untraceable

    entries = load_untraceable()
    assert entries and all(e.reason for e in entries)
    assert len({e.name for e in entries}) == len(entries)


def test_a_declared_norm_is_kept_whole_and_is_an_activation_where_its_flag_says():
    """EvoNorm (rules/tracing/timm.toml, kind = "norm"): one node, a shape-keeping layer, and an activation
    only while its apply_act is true; activation_flag belongs to norms alone."""
    from timm.layers import EvoNorm2dB0, EvoNorm2dS0

    from se_inject.errors import RuleError
    from se_inject.graph.ops import is_activation, is_shape_keeping_layer
    from se_inject.graph.untraceable import parse_untraceable

    model = nn.Sequential(nn.Conv2d(3, 8, 3), EvoNorm2dS0(8, group_size=4), nn.Conv2d(8, 8, 1), EvoNorm2dB0(8))
    model[3].apply_act = False
    gm = trace(model)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    assert list(nodes) == ["0", "1", "2", "3"]  # each norm one node, not traced into
    assert is_activation(gm, nodes["1"]) and not is_activation(gm, nodes["3"])
    assert is_shape_keeping_layer(gm, nodes["1"]) and is_shape_keeping_layer(gm, nodes["3"])
    with pytest.raises(RuleError, match="t.toml: untraceable 'a.B': field 'activation_flag'"):
        parse_untraceable(
            "[[untraceable]]\nname = 'a.B'\nkind = 'module'\nactivation_flag = 'on'\nreason = 'r'\n", "t.toml"
        )


def test_a_sum_with_the_number_zero_is_the_tensor_itself():
    """MobileOne sums ``0`` for the branches it lacks (``out = 0; out += conv(x)``, ``out + 0``): the sums
    are dropped, so the conv, its norm and the activation read as one chain; a zero added to a tensor read
    elsewhere stays (dropping it would alias the two)."""
    from se_inject.graph.ops import normalize_inplace_adds

    class SingleBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            out = 0
            out += self.bn(self.conv(x))
            kept = x + 0  # x is read again below
            return self.act(out + 0) + kept + x

    gm = trace(SingleBranch())
    normalize_inplace_adds(gm.graph)
    gm.recompile()
    act = next(n for n in gm.graph.nodes if n.target == "act")
    assert act.args[0].target == "bn"
    zeros = [n for n in gm.graph.nodes if n.op == "call_function" and 0 in n.args]
    assert len(zeros) == 1 and zeros[0].args[0].op == "placeholder"
    x = torch.randn(2, 4, 5, 5)
    model = SingleBranch().eval()
    gm.load_state_dict(model.state_dict())
    assert torch.equal(gm.eval()(x), model(x))
