"""benchmarks/gpu.py runs as it is: its dry mode (CPU, tiny sizes, torch.compile with the eager backend)
times every model in every setting a GPU run times, and writes its rows and table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# the fast suite runs the eager paths (bf16 autocast, channels_last, inference and the training step) on a
# ResNet-26, which timm has no SE twin of; -m slow runs the whole dry grid on ResNet-50 (compiled, the twin)
FAST = ["--model", "resnet26", "--batches", "2", "--dtypes", "bf16", "--layouts", "channels_last", "--compile", "eager"]
GRIDS = [
    pytest.param(FAST, 2, {"retrofit", "optimized"}, id="eager-paths"),
    pytest.param(
        [], 2 * 2 * 2 + 2 * 2 * 2 * 2, {"retrofit", "optimized", "twin"}, id="whole-grid", marks=pytest.mark.slow
    ),
]


@pytest.mark.parametrize("options, count, models", GRIDS)
def test_the_gpu_benchmark_runs_dry_on_the_cpu(tmp_path, options, count, models):
    gpu = _script()
    out = tmp_path / "gpu.json"
    rows = gpu.main(["--dry", *options, "--out", str(out)])
    settings = {r.setting for r in rows}
    assert len(settings) == count  # no training step at batch 1
    assert all(s.batch > 1 for s in settings if s.mode == "training")
    assert all(r.error is None and r.ratio is not None and r.ratio.median > 0 for r in rows)
    for setting in settings:
        timed = {r.model for r in rows if r.setting == setting}
        expected = models - ({"optimized"} if setting.mode == "training" else set())
        assert timed == expected, setting
    written = json.loads(out.read_text())
    assert written["dry"] and len(written["rows"]) == len(rows)
    assert out.with_suffix(".md").read_text().count("\n") == len(settings) + 2


def test_bad_options_are_one_line(capsys):
    gpu = _script()
    with pytest.raises(SystemExit):
        gpu.arguments(["--dtypes", "fp8"])
    assert "--dtypes: expected some of fp32, bf16" in capsys.readouterr().err
