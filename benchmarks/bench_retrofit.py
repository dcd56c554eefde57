"""How long a retrofit takes and how much memory the report needs, for a large ResNet.

Run:  python benchmarks/bench_retrofit.py [--model resnet152] [--repeat 5]

Timing: each step of se_inject.retrofit on the meta device (trace + shapes/FLOPs, plan, insert,
dry run, report), median of ``--repeat`` runs, next to a baseline taken in the same process:
one forward of the same meta model under torch's own FlopCounterMode, as anyone would count FLOPs
(what any FLOP report costs at least).

Memory: peak resident memory of fresh processes (ru_maxrss), so imports are counted the same
way in each: importing only; the report-only run on meta (what ``se-inject MODEL`` does); and,
for scale, building the model with real weights and reporting on it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from se_inject.config import InjectConfig
from se_inject.io.models import load_model
from se_inject.placement.plan import plan_units
from se_inject.placement.sites import analyse
from se_inject.surgery.report import build_report
from se_inject.surgery.rewrite import LocalTraces, build_injected, dry_run

_CHILD = """
import resource, sys, json
import torch, timm, se_inject
mode, model = sys.argv[1], sys.argv[2]
if mode != "import":
    net = se_inject.load_model(model, device="meta" if mode == "meta" else "cpu")
    se_inject.report(net, position="standard", r=16)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def time_steps(model_name: str, repeat: int) -> dict[str, float]:
    config = InjectConfig(position="standard", r=16)
    samples: dict[str, list[float]] = {}

    def clock(name: str, start: float) -> float:
        now = time.perf_counter()
        samples.setdefault(name, []).append(now - start)
        return now

    for _ in range(repeat):
        model = load_model(model_name, device="meta")
        t = time.perf_counter()
        with torch.no_grad(), FlopCounterMode(display=False):
            model(torch.zeros(1, 3, 224, 224, device="meta"))
        clock("baseline: one FLOP-counted forward", t)
        t0 = t = time.perf_counter()
        analysis = analyse(model, 224)
        t = clock("trace + shapes/FLOPs + site search", t)
        traces = LocalTraces(model, analysis.gm.graph, config.leaf_modules)
        plan = plan_units(analysis, config, traces.obstacle)
        t = clock("plan (with the local traces of the blocks)", t)
        injected = build_injected(model, plan, traces, config)
        t = clock("insert (copy + local rewrites)", t)
        flops_after, unit_flops = dry_run(injected, plan, analysis.input_shape)
        t = clock("dry run (FLOPs after, every unit ran)", t)
        build_report(model_name, config, analysis, plan, model, injected, flops_after, unit_flops)
        t = clock("report", t)
        clock("total: trace + insert + report", t0)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_rss(mode: str, model_name: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, model_name], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet152")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        f"{args.model}, position=standard, r=16, input 224x224, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.repeat}"
    )
    steps = time_steps(args.model, args.repeat)
    baseline = steps["baseline: one FLOP-counted forward"]
    for name, seconds in steps.items():
        print(f"  {name:42s} {seconds * 1e3:8.1f} ms  {seconds / baseline:6.2f}x baseline")

    imports, meta, real = (peak_rss(mode, args.model) for mode in ("import", "meta", "real"))
    weights = sum(p.numel() * p.element_size() for p in load_model(args.model, device="meta").parameters())
    mib = 2**20
    print("peak resident memory (fresh process each):")
    rows = [
        ("imports only", imports, ""),
        ("report on meta (what se-inject does)", meta, f"+{(meta - imports) / mib:.1f} MiB over imports"),
        ("report with real weights", real, f"+{(real - imports) / mib:.1f} MiB over imports"),
        ("the model's weights alone", weights, ""),
    ]
    for label, size, extra in rows:
        print(f"  {label:42s} {size / mib:8.1f} MiB  {extra}")


if __name__ == "__main__":
    main()
