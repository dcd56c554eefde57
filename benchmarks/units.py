"""What each unit adds to ResNet-50: weights, FLOPs and measured CPU latency, as the README's units table.

Every unit is retrofitted at the standard position (r = 16 where r applies, each unit's own
conventions and default options, preserve start) into one ResNet-50 with random weights, and all
nine models (the original and eight retrofits) are timed interleaved in this process with
``se_inject.measure.bench.time_interleaved`` (the order rotates every round). A unit's latency figure is
the median over rounds of its time divided by the original's time in the same round, with the
25th-75th percentile of those per-round ratios as its spread.

    python benchmarks/units.py --out benchmarks/units.json            # batch 1 and 16, about 2 minutes
    python benchmarks/units.py --batches 1 --repeats 60 --threads 2

``--optimize`` times each retrofit after ``se_inject.optimize_for_inference`` where its units fold (the
output says which did; CBAM's do not), having checked that the optimised copy computes what the
retrofit computes; ``--compile`` times every model under ``torch.compile`` with its defaults, as a
user calls it (compiling nine ResNet-50s takes about ten minutes on 2 cores):

    python benchmarks/units.py --optimize --compile --batches 16 --repeats 40 --threads 2 \
        --out benchmarks/units_optimized.json

``--units se,ese`` times only those retrofits beside the original (more rounds in the same time).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import se_inject
from se_inject.errors import ConfigError
from se_inject.measure.bench import time_interleaved
from se_inject.units.base import UNITS, ChannelUnit

ORDER = ["se", "ese", "eca", "ceca", "gc", "ge", "cbam", "lcbam"]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def _inference(model: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            return model(x)

    return run


def _optimized(retrofit: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """The optimised copy of ``retrofit`` and how many units fold (the retrofit and 0 where none does),
    checked against the retrofit on a random input first."""
    try:
        optimized = se_inject.optimize_for_inference(retrofit)
    except ConfigError:
        return retrofit, 0
    # checked in float64 (in float32 the two round apart by 1e-3 through a random network's 16 blocks), with
    # random unit weights: the preserve start's zero last layer would hide a wrong gate
    probe = copy.deepcopy(retrofit).double()
    with torch.no_grad():
        for unit in (m for m in probe.modules() if isinstance(m, ChannelUnit)):
            for weight in unit.parameters():
                weight.normal_(0, 0.05)
        x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
        expected = probe(x)
        difference = float((se_inject.optimize_for_inference(probe)(x) - expected).abs().max() / expected.abs().max())
    assert difference < 1e-9, f"the optimised copy differs from the retrofit by {difference:.1e} in float64"
    return optimized, len(se_inject.optimized_units(optimized))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=0, help="rounds per batch (default: 40 at batch 1, 12 above)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--optimize", action="store_true", help="time each retrofit optimised where its units fold")
    parser.add_argument("--compile", action="store_true", help="time every model under torch.compile's defaults")
    parser.add_argument(
        "--units", default=",".join(ORDER), help="the units to retrofit, comma-separated (default: all)"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.units.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ORDER))
    if unknown or not chosen:
        parser.error(f"--units: {', '.join(unknown) or 'none given'}: not among {', '.join(ORDER)}")
    units = [name for name in ORDER if name in chosen]
    if args.threads:
        torch.set_num_threads(args.threads)
    assert set(ORDER) == set(UNITS), "a unit is missing from the benchmark"
    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes each block's last BatchNorm weight, which would zero every unit's input
    original = timm.create_model(args.model, zero_init_last=False).eval()
    results = {}
    models = {"original": original}
    for unit in units:
        retrofit = se_inject.retrofit(original, unit=unit, model_name=args.model)
        totals = retrofit.report.totals
        results[unit] = {
            "params_added": totals.params_added,
            "params_increase": totals.params_increase,
            "flops_added": totals.flops_after - totals.flops_before,
            "flops_increase": totals.flops_increase,
            "closed_form_agrees": retrofit.report.eq5_agrees,
            "latency": {},
        }
        models[unit] = retrofit.model.eval()
        if args.optimize:
            models[unit], results[unit]["optimized_units"] = _optimized(models[unit])
            results[unit]["units"] = sum(isinstance(m, ChannelUnit) for m in retrofit.model.modules())
    if args.compile:
        # every model is its own compiled graph: the shared timm forwards recompile once per model
        torch._dynamo.config.recompile_limit = 4 * len(models)
        models = {name: torch.compile(model) for name, model in models.items()}
    started = time.perf_counter()
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224)
        repeats = args.repeats or (40 if batch == 1 else 12)

        steps = {n: _inference(m, x) for n, m in models.items()}
        seconds = time_interleaved(steps, repeats, warmup=3, device=torch.device("cpu"))
        base = seconds["original"]
        for unit in units:
            ratios = [t / b for t, b in zip(seconds[unit], base, strict=True)]
            q1, median, q3 = quartiles(ratios)
            results[unit]["latency"][str(batch)] = {
                "ratio_median": median,
                "ratio_q1": q1,
                "ratio_q3": q3,
                "unit_ms": statistics.median(seconds[unit]) * 1e3,
                "original_ms": statistics.median(base) * 1e3,
                "rounds": repeats,
            }
        print(f"batch {batch}: original {statistics.median(base) * 1e3:.1f} ms", flush=True)
    summary = {
        "model": args.model,
        "optimized": args.optimize,
        "compiled": args.compile,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "units": results,
    }
    for unit in units:
        r = results[unit]
        cells = [
            f"{unit:6s}",
            f"+{r['params_added']:>10,} ({r['params_increase']:.2%})",
            f"+{r['flops_added'] / 1e9:.3f} GFLOPs ({r['flops_increase']:.2%})",
        ]
        if args.optimize:
            cells.append(f"{r['optimized_units']}/{r['units']} folded")
        for batch, lat in r["latency"].items():
            cells.append(f"b{batch} {lat['ratio_median']:.3f} [{lat['ratio_q1']:.3f}, {lat['ratio_q3']:.3f}]")
        print("  ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
