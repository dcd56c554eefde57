"""What a training step of a retrofit costs over the plain network, with the units' own training path
(``ChannelScaleAdd``'s backward and the squeeze whose backward is a broadcast view) and without it
(autograd's ``mean`` and ``addcmul``, as before this path existed), beside timm's hand-built twin.

Every model takes a forward, backward and SGD step on the same batch (``se_inject.measure.bench.train_step``),
timed interleaved in this process (the order rotates every round); each ratio is the median over rounds of
one model's time over the plain network's in the same round, with the 25th-75th percentile of those
per-round ratios. Before timing, the script checks that both paths give the same gradients (float64, with
random unit weights, relative to the largest). Last, it times the units' gate gradients alone (``sum(g * x)``
over positions, on random maps of the sizes the units see at this batch) three ways: as the units take it on
the CPU (``se_inject.units.parts.channel_dots``: a chunk of rows at a time into a small buffer that stays in the
cache), as one batched product of one-row matrices (``einsum``, which the units used before and still use on
CUDA), and as a product map and its sum.

    python benchmarks/train_step.py --batch 16 --repeats 24 --threads 2 --out benchmarks/train_step.json

Under glibc's defaults every map above 32 MB is fresh memory at every step; the JSON records the allocator's
settings (``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set in the environment keep freed memory
for reuse: the cost guide's second run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch

import se_inject
from se_inject.measure.bench import Spread, time_interleaved, train_step
from se_inject.units import parts
from se_inject.units.base import ChannelUnit


@contextlib.contextmanager
def autograd_ops() -> Iterator[None]:
    """The units computed with autograd's own mean and addcmul (the training path switched off)."""
    records, sums = parts._records_product, parts._sums_for_backward
    try:
        parts._records_product = lambda x, s: False
        parts._sums_for_backward = lambda x: False
        yield
    finally:
        parts._records_product, parts._sums_for_backward = records, sums


def _unfused(step: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with autograd_ops():
            return step()

    return run


def _gradients(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).logsumexp(1).sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _random_units(retrofit: torch.nn.Module) -> torch.nn.Module:
    """A copy whose units' weights are random: the preserve start's zero last layer would hide a wrong gate."""
    probe = copy.deepcopy(retrofit)
    with torch.no_grad():
        for unit in (m for m in probe.modules() if isinstance(m, ChannelUnit)):
            for weight in unit.parameters():
                weight.normal_(0, 0.05)
    return probe


def _difference(retrofit: torch.nn.Module, x: torch.Tensor) -> float:
    """The largest gradient difference between the two paths, relative to the largest gradient (float64)."""
    fused = _gradients(retrofit, x)
    with autograd_ops():
        plain = _gradients(retrofit, x)
    scale = max(float(g.abs().max()) for g in plain)
    return max(float((a - b).abs().max()) for a, b in zip(fused, plain, strict=True)) / scale


def _gate_gradients_ms(retrofit: torch.nn.Module, x: torch.Tensor, repeats: int = 9) -> dict[str, float]:
    """Milliseconds for the units' gate gradients, all units one after the other (median of ``repeats``)."""
    shapes: list[torch.Size] = []
    units = [m for m in retrofit.modules() if isinstance(m, ChannelUnit)]
    hooks = [u.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape)) for u in units]
    probe = copy.deepcopy(retrofit).eval()  # eval: the shapes without touching the model's running statistics
    with torch.no_grad():
        probe(x)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    maps = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for shape in shapes]
    ways: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "chunked rows (channel_dots, the units')": parts.channel_dots,
        "batched product (einsum)": lambda g, m: torch.einsum("bchw,bchw->bc", g, m),
        "product map and sum": lambda g, m: (g * m).sum((2, 3)),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():  # as in a backward pass that records nothing (channel_dots chunks only then)
        for g, m in maps[:1]:  # the three compute the same sums, up to rounding
            for way in ways.values():
                torch.testing.assert_close(way(g, m), (g * m).sum((2, 3)), rtol=1e-4, atol=1e-3)
        for _ in range(repeats):
            for name, way in ways.items():
                started = time.perf_counter()
                for g, m in maps:
                    way(g, m)
                times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(t) * 1e3, 1) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--twin", default="seresnet50")
    parser.add_argument("--unit", default="se")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes each block's last BatchNorm weight, which would zero every unit's input
    plain = timm.create_model(args.model, zero_init_last=False).train()
    retrofit = se_inject.inject(plain, unit=args.unit, r=16).train()  # the default start: preserve
    x = torch.randn(args.batch, 3, args.size, args.size)
    # in float64: in float32 the two paths' gradients round 6e-3 apart through a random network in training mode
    difference = _difference(_random_units(retrofit).double(), x[:2].double())
    models = {"plain": plain, "retrofit": retrofit, "retrofit, autograd ops": copy.deepcopy(retrofit)}
    if args.twin:
        models["twin"] = timm.create_model(args.twin).train()
    steps = {name: train_step(m, x, torch.device("cpu")) for name, m in models.items()}
    steps["retrofit, autograd ops"] = _unfused(steps["retrofit, autograd ops"])
    started = time.perf_counter()
    seconds = time_interleaved(steps, args.repeats, 2, torch.device("cpu"))
    ratios = {f"{name}/plain": Spread.paired(seconds[name], seconds["plain"]) for name in models if name != "plain"}
    ratios["retrofit/retrofit, autograd ops"] = Spread.paired(seconds["retrofit"], seconds["retrofit, autograd ops"])
    result = {
        "model": args.model,
        "unit": args.unit,
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "gradient_difference": difference,
        "seconds": round(time.perf_counter() - started, 1),
        # the allocator's settings: glibc's (MALLOC_*) decide whether a large map is fresh memory at every step
        "allocator_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "step_ms": {name: round(statistics.median(times) * 1e3, 1) for name, times in seconds.items()},
        "ratios": {name: {"median": s.median, "q1": s.q1, "q3": s.q3} for name, s in ratios.items()},
    }
    result["gate_gradients_ms"] = _gate_gradients_ms(retrofit, x)
    print(f"training step, batch {args.batch}: plain {result['step_ms']['plain']} ms (median)")
    for name, spread in ratios.items():
        print(f"training step, batch {args.batch}: {name} {spread}")
    units = sum(isinstance(m, ChannelUnit) for m in retrofit.modules())
    ways = ", ".join(f"{name} {ms} ms" for name, ms in result["gate_gradients_ms"].items())
    print(f"the {units} units' gate gradients alone at batch {args.batch}: {ways}")
    print(f"gradients of the two paths differ by {difference:.1e} of the largest; {result['seconds']} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
