"""benchmarks/train_step.py runs as it is, on a small network: its gradient check, the interleaved training
steps and the units' gate gradients timed three ways."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "train_step.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_training_step_benchmark_runs_on_a_small_network(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    options = ["--model", "resnet26", "--twin", "", "--batch", "2", "--size", "64", "--repeats", "2"]
    result = _script().main([*options, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["gradient_difference"] < 1e-10  # the units' own backward gives autograd's gradients
    assert set(result["ratios"]) == {
        "retrofit/plain",
        "retrofit, autograd ops/plain",
        "retrofit/retrofit, autograd ops",
    }
    assert all(r["median"] > 0 for r in result["ratios"].values())
    assert set(result["gate_gradients_ms"]) == {
        "chunked rows (channel_dots, the units')",
        "batched product (einsum)",
        "product map and sum",
    }
    assert "the 8 units' gate gradients alone at batch 2" in capsys.readouterr().out
