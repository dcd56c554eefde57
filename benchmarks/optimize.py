"""optimize_for_inference under torch.compile's defaults: plain ResNet-50, its SE retrofit and the
optimised retrofit, compiled with ``torch.compile`` as a user calls it (no weight freezing, which
``se-inject bench --compile`` turns on), timed interleaved in one process.

Each ratio is the median over rounds of one model's time over another's in the same round (the
order rotates every round), with the 25th-75th percentile of those per-round ratios. The weights are
random, with random BatchNorm statistics and unit weights, so that no zero hides a unit; the script
checks that the optimised copy computes what the retrofit computes before it times anything.

    python benchmarks/optimize.py --batch 16 --repeats 40 --out benchmarks/optimize_b16.json
    python benchmarks/optimize.py --batch 1 --repeats 60
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import timm
import torch

import se_inject
from se_inject.measure.bench import Spread, time_interleaved


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.empty_like(m.running_mean).normal_(0, 0.1, generator=generator))
                m.running_var.copy_(torch.empty_like(m.running_var).uniform_(0.5, 1.5, generator=generator))
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.empty_like(m.bias).normal_(0, 0.1, generator=generator))
    return model


def _inference(model: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eager", action="store_true", help="time the models without torch.compile")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the same random network and input every run: the printed difference reproduces
    plain = _randomized(timm.create_model(args.model).eval())
    retrofit = se_inject.inject(plain, position="standard", r=16)
    with torch.no_grad():
        for unit in retrofit.modules():
            if isinstance(unit, se_inject.SqueezeExcite):
                unit.fc1.weight.normal_(0, 0.05)
                unit.fc2.weight.normal_(0, 0.05)
    retrofit.eval()
    optimized = se_inject.optimize_for_inference(retrofit)
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        expected = retrofit(x)
        difference = float((optimized(x) - expected).abs().max() / expected.abs().max())
        # both against float64: what float32 rounding costs each on this (chaotic, random) network
        exact = copy.deepcopy(retrofit).double()(x.double())
        scale = exact.abs().max()
        rounding = {
            name: float((model(x).double() - exact).abs().max() / scale)
            for name, model in (("retrofit", retrofit), ("optimized", optimized))
        }
    models = {"plain": plain, "retrofit": retrofit, "optimized": optimized}
    started = time.perf_counter()
    if not args.eager:
        models = {name: torch.compile(model) for name, model in models.items()}
    seconds = time_interleaved(
        {name: _inference(m, x) for name, m in models.items()}, args.repeats, 3, torch.device("cpu")
    )
    ratios = {
        f"{a}/{b}": Spread.paired(seconds[a], seconds[b])
        for a, b in (("retrofit", "plain"), ("optimized", "plain"), ("optimized", "retrofit"))
    }
    result = {
        "model": args.model,
        "batch": args.batch,
        "compiled": not args.eager,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "optimized_units": len(se_inject.optimized_units(optimized)),
        "relative_difference": difference,
        "float32_error": rounding,
        "seconds": round(time.perf_counter() - started, 1),
        "ratios": {name: {"median": s.median, "q1": s.q1, "q3": s.q3} for name, s in ratios.items()},
    }
    for name, spread in ratios.items():
        print(f"{'compiled' if not args.eager else 'eager'} batch {args.batch}: {name} {spread}")
    print(
        f"{result['optimized_units']} units optimised; relative difference {difference:.1e} (against float64: "
        f"retrofit {rounding['retrofit']:.1e}, optimised {rounding['optimized']:.1e}); {result['seconds']} s"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
