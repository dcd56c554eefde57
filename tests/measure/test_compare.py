"""The compare API and command on tiny models: every candidate runs, every ratio is against the same
original, the spread and the noise verdict, memory, JSON, the plot. No timing is asserted: the
clock is replaced where the arithmetic is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FunctionalResNet
from typer.testing import CliRunner

import se_inject.measure.bench
import se_inject.measure.compare as compare_module
from se_inject.cli.app import app
from se_inject.errors import ConfigError
from se_inject.measure.compare import Candidate, PeakTensorMemory, Spread, candidates, compare

SPEC = f"{Path(__file__).parents[1] / 'tiny_models.py'}:FunctionalResNet"


def test_candidates_are_the_product_of_the_axes_given():
    found = candidates(positions=["standard", "pre"], rs=[4, 8], base={"stages": (2,)})
    assert [c.label for c in found] == [
        "position=standard r=4",
        "position=standard r=8",
        "position=pre r=4",
        "position=pre r=8",
    ]
    assert found[1].options == {"stages": (2,), "position": "standard", "r": 8}


def test_every_candidate_is_measured_against_the_same_original(monkeypatch):
    """The clock replaced: the original takes 10, 20, 30, 40 ms in its rounds and each candidate a fixed
    multiple of the original's round, so each paired ratio is exact whatever the drift."""
    factors = {"a": 1.1, "b": 1.5}

    def fake(steps, repeats, warmup, device, on_round=None):
        base = [0.01 * (i + 1) for i in range(repeats)]
        for i in range(repeats):
            on_round and on_round(i + 1)
        return {name: [t * factors.get(name, 1.0) for t in base] for name in steps}

    monkeypatch.setattr(
        se_inject.measure.bench, "time_interleaved", fake
    )  # inference (in blocks on fresh copies) and training
    rounds: list[tuple[str, int, int]] = []
    result = compare(
        FunctionalResNet(),
        [Candidate("a", {"position": "standard", "r": 4}), Candidate("b", {"unit": "eca"})],
        batches=(1, 2),
        size=16,
        repeats=4,
        train=True,
        progress=lambda what, done, total: rounds.append((what, done, total)),
    )
    a, b = result.results
    for batch in (1, 2):
        assert a.latency[batch].median == pytest.approx(1.1) and a.latency[batch].width == pytest.approx(0)
        assert b.train[batch].median == pytest.approx(1.5)
        assert result.original_ms[batch] == pytest.approx(25.0)  # the median of 10, 20, 30, 40
        assert a.images_per_s[batch] == pytest.approx(batch / 0.0275)
    assert a.units == 5 and b.params_added == 5 * 3  # five blocks; ECA's kernel is 3 at these widths
    assert rounds[-1] == ("train, batch 2", 16, 16) and len(rounds) == 16
    assert result.verdict(1).startswith("batch 1: fastest a (1.100 [1.100, 1.100]), clearly ahead of b")


def test_overlapping_spreads_are_no_winner():
    wide, close = Spread(1.02, 0.98, 1.10), Spread(1.03, 1.00, 1.08)
    assert wide.overlaps(close) and not Spread(1.2, 1.19, 1.21).overlaps(close)
    comparison = compare_module.Comparison("m", "cpu", 2, 16, (1,), {1: 5}, "x")
    comparison.results = [
        compare_module.CandidateResult("wide", {}, latency={1: wide}),
        compare_module.CandidateResult("close", {}, latency={1: close}),
    ]
    verdict = comparison.verdict(1)
    assert "no clear winner" in verdict and "wide, close" in verdict and "fastest" not in verdict.split(":")[1]
    assert Spread.of([1.0, 2.0, 3.0, 4.0, 5.0]) == Spread(3.0, 2.0, 4.0)


def test_a_real_run_measures_every_candidate_and_reports_what_cannot_be_built():
    result = compare(
        FunctionalResNet(),
        candidates(positions=["standard", "post"], units=["se", "cbam"]) + [Candidate("too wide", {"r": 64})],
        batches=(1, 2),
        size=16,
        repeats=3,
        warmup=1,
    )
    built = result.measured()
    assert [r.label for r in built] == [
        c.label for c in candidates(positions=["standard", "post"], units=["se", "cbam"])
    ]
    assert all(set(r.latency) == {1, 2} and all(s.q1 <= s.median <= s.q3 for s in r.latency.values()) for r in built)
    assert all(r.memory[b] > 0 for r in built for b in (1, 2)) and result.original_memory[2] > result.original_memory[1]
    assert result.results[-1].error.startswith("r: r=64 is wider than")
    data = json.loads(json.dumps(result.to_dict(), default=str))
    assert {"model", "device", "batches", "repeats", "memory_kind", "results", "verdicts", "original_ms"} <= set(data)
    assert set(data["results"][0]["latency"]["1"]) == {"median", "q1", "q3"}
    with pytest.raises(ConfigError, match="none could be injected"):
        compare(FunctionalResNet(), [{"r": 64}], size=16, repeats=2)
    with pytest.raises(ConfigError, match="nothing to compare"):
        compare(FunctionalResNet(), [], size=16)


def test_peak_tensor_memory_counts_what_is_alive_together():
    x = torch.zeros(1000)  # created before: not counted
    with torch.no_grad(), PeakTensorMemory() as tracker:
        a = x + 1  # 4,000 bytes
        b = a * 2  # 8,000 alive
        del a
        c = b.view(10, 100) + 0  # b and c: 8,000 alive
        d = c.relu_()  # in place: no new storage
        del b, c, d
        e = torch.ones(3000)  # 12,000 bytes alone
        del e
    assert tracker.peak == 12_000 and tracker.current == 0


def test_the_compare_command(tmp_path):
    runner = CliRunner()
    plot = tmp_path / "cost.png"
    args = ["compare", SPEC, "--positions", "standard,pre", "--units", "se,eca", "--batch", "1", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--repeats", "2", "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["results"]) == 4 and plot.read_bytes().startswith(b"\x89PNG")
    out = runner.invoke(app, [*args, "--repeats", "2", "--candidate", "include=stages.2.*,r=4"]).stdout
    assert "what each candidate adds" in out and "include=stages.2.*,r=4" in out and "batch 1:" in out
    bad = runner.invoke(app, ["compare", SPEC, "--candidate", "r"])
    assert bad.exit_code == 2 and "--candidate: expected NAME=VALUE" in bad.output
    bad = runner.invoke(app, ["compare", SPEC, "--units", "se", "--plot", str(tmp_path / "x.jpg")])
    assert bad.exit_code == 2 and "expected a .png" in bad.output


def test_optimize_measures_each_candidate_optimized_where_its_units_fold():
    from tiny_models import InplaceResNet

    chosen = candidates(positions=["standard", "pre"]) + candidates(units=["eca", "cbam"])
    result = compare(InplaceResNet(), chosen, batches=(2,), size=32, repeats=2, warmup=1, optimize=True)
    folded = {r.label: (r.optimized_units, r.units) for r in result.measured()}
    # standard: every unit reads BN(1x1 conv), ECA's too; pre: the block input; CBAM's spatial gate does not fold
    assert folded == {"position=standard": (4, 4), "position=pre": (0, 4), "unit=eca": (4, 4), "unit=cbam": (0, 4)}
    assert result.optimized and json.loads(json.dumps(result.to_dict(), default=str))["optimized"] is True
    out = CliRunner().invoke(
        app,
        ["compare", f"{Path(__file__).parents[1] / 'tiny_models.py'}:InplaceResNet", "--positions", "standard",
         "--batch", "2", "--input-size", "32", "--repeats", "2", "--optimize"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "optimized for inference (units that squeeze before the last 1x1 conv): position=standard 4/4" in out.stdout


def test_compile_compiles_every_model_and_tracks_memory_before(monkeypatch):
    """Compiled against compiled, as bench does; the memory tracking runs on the eager models first."""
    import torch._inductor.config as inductor_config

    compiled, tracked = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda model, *args, **kwargs: compiled.append(model))
    real_peak = compare_module.peak_memory
    monkeypatch.setattr(compare_module, "peak_memory", lambda m, x: tracked.append(len(compiled)) or real_peak(m, x))
    result = compare(FunctionalResNet(), candidates(positions=["standard", "post"]), batches=(1,), size=16,
                     repeats=2, warmup=0, compile=True)  # fmt: skip
    assert len(compiled) == 3 and len({id(m) for m in compiled}) == 3 and result.compiled
    assert tracked == [0, 0, 0]  # every model's memory was tracked before any was compiled
    assert inductor_config.freezing is False
    assert all(r.latency[1].median > 0 for r in result.measured())
