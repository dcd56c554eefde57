import json

import torch
from conftest import assert_unchanged, snapshot
from tiny_models import FunctionalResNet
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.measure.bench import bench, time_interleaved, twin_of


def test_twins_are_timms_hand_built_se_models():
    assert twin_of("resnet50") == "seresnet50"
    assert twin_of("resnext50_32x4d") == "seresnext50_32x4d"
    assert twin_of("vgg16") is None and twin_of("torchvision:resnet50") is None and twin_of(None) is None


def test_interleaved_timing_rotates_the_order():
    calls = []
    times = time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=3,
        warmup=1,
        device=torch.device("cpu"),
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_bench_reports_medians_and_ratios_and_leaves_the_model_alone():
    model, twin = FunctionalResNet(), FunctionalResNet()
    before = snapshot(model)
    report = bench(model, twin=twin, batches=(1, 2), size=32, repeats=2, warmup=1, train=True, r=4)
    assert {(t.model, t.mode, t.batch) for t in report.timings} == {
        (m, mode, b) for m in ("original", "injected", "twin") for mode in ("inference", "train step") for b in (1, 2)
    }
    assert all(t.median_ms > 0 and t.images_per_s > 0 for t in report.timings)
    ratios = report.ratios()
    assert len(ratios) == 4 and all(r["injected/original"] > 0 and r["injected/twin"] > 0 for r in ratios)
    assert_unchanged(model, before)
    assert json.loads(json.dumps(report.to_dict()))["threads"] == torch.get_num_threads()


def test_the_cli_benches_a_users_model():
    from pathlib import Path

    spec = f"{Path(__file__).parents[1] / 'tiny_models.py'}:FunctionalResNet"
    result = CliRunner().invoke(
        app, ["bench", spec, "--r", "4", "--input-size", "32", "--batch", "2", "--repeats", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["twin"] is None and [r["batch"] for r in data["ratios"]] == [2]


def test_compile_compiles_every_model_it_times(monkeypatch):
    """Compiled against compiled: a compiled retrofit beside an eager original would flatter the retrofit."""
    import torch._inductor.config as inductor_config

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda model, *args, **kwargs: compiled.append(model))
    report = bench(
        FunctionalResNet(), twin=FunctionalResNet(), batches=(1,), size=32, repeats=2, warmup=0, compile=True, r=4
    )
    assert len(compiled) == 3 and len({id(m) for m in compiled}) == 3 and report.compiled
    assert any(isinstance(m, se_inject.SqueezeExcite) for m in compiled[1].modules())
    assert inductor_config.freezing is False  # weight freezing is switched off again afterwards


def test_the_cli_says_in_one_line_when_there_is_nothing_to_optimize():
    from pathlib import Path

    spec = f"{Path(__file__).parents[1] / 'tiny_models.py'}:FunctionalResNet"  # basic blocks end with a 3x3 conv
    result = CliRunner().invoke(app, ["bench", spec, "--r", "4", "--input-size", "32", "--batch", "2", "--optimize"])
    assert result.exit_code == 2 and "nothing to fold" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
