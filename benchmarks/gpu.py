"""What SE costs on a GPU: the plain network, its SE retrofit, the optimised retrofit and timm's hand-built
SE twin, at each batch size, in fp32 and bf16, NCHW and channels_last, eager and compiled, for inference
and for a training step.

Every model of one setting (dtype, memory layout, compilation, mode, batch) is timed interleaved in this
process with ``se_inject.measure.bench.time_interleaved`` (the order rotates every round, CUDA is
synchronised around each call); a model's figure is the median over rounds of its time divided by the
plain network's in the same round, with the 25th-75th percentile of those per-round ratios as its
spread. The optimised retrofit (``se_inject.optimize_for_inference``) folds BatchNorm and is timed for
inference only, and a training step at batch 2 and above. A setting that fails (out of memory, a compiler error) is recorded with its one-line
error and the others run.

    python benchmarks/gpu.py --out benchmarks/gpu.json                  # on a CUDA machine (ResNet-50)
    python benchmarks/gpu.py --batches 256 --dtypes bf16 --layouts channels_last
    python benchmarks/gpu.py --dry                                      # on the CPU, tiny sizes (the suite runs it)

``--dry`` runs every setting on the CPU with the ResNet-50 at 32x32, batches 1 and 2, two rounds, and
``torch.compile`` with its ``eager`` backend (the compiled path without the compiler's minutes): it
checks that the script runs as it is, not what a GPU measures.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

import se_inject
from se_inject.errors import first_line
from se_inject.measure.bench import Spread, time_interleaved, train_step, twin_of

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = ("inference", "training")
MODELS = ("plain", "retrofit", "optimized", "twin")


@dataclass(frozen=True)
class Setting:
    mode: str
    dtype: str
    layout: str
    compiled: bool
    batch: int


@dataclass
class Row:
    """One model in one setting: its time over the plain network's (None where it was not timed)."""

    setting: Setting
    model: str
    ratio: Spread | None
    plain_ms: float | None  # the plain network's median time per call in this setting
    error: str | None = None


def build(name: str, r: int) -> dict[str, nn.Module]:
    """The four models, with random weights: plain, its retrofit at the standard position, the retrofit
    optimised for inference, and timm's hand-built SE twin (where timm has one)."""
    torch.manual_seed(0)
    plain = timm.create_model(name)
    retrofit = se_inject.inject(plain, r=r)
    models = {"plain": plain, "retrofit": retrofit, "optimized": se_inject.optimize_for_inference(retrofit)}
    twin = twin_of(name)
    if twin is not None:
        models["twin"] = timm.create_model(twin)
    return models


def step(model: nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype | None) -> Callable[[], object]:
    """One call of ``model`` on ``x``: a forward without gradients, or forward, backward and an SGD step,
    under autocast to ``dtype`` (None: fp32)."""
    device = x.device.type
    if mode == "inference":

        def infer() -> object:
            with torch.no_grad(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model(x)

        return infer
    return train_step(model, x, x.device, dtype or torch.float32)


def measure(
    models: dict[str, nn.Module],
    setting: Setting,
    size: int,
    device: torch.device,
    repeats: int,
    warmup: int,
    backend: str,
) -> list[Row]:
    """Every model in ``setting``, interleaved, as ratios to the plain network's time."""
    names = [n for n in models if not (n == "optimized" and setting.mode == "training")]
    layout = LAYOUTS[setting.layout]
    placed = {}
    for name in names:
        model = copy.deepcopy(models[name]).to(device, memory_format=layout)
        model.train(setting.mode == "training")
        placed[name] = torch.compile(model, backend=backend) if setting.compiled else model
    x = torch.randn(setting.batch, 3, size, size, device=device).contiguous(memory_format=layout)
    steps = {name: step(model, x, setting.mode, DTYPES[setting.dtype]) for name, model in placed.items()}
    try:
        times = time_interleaved(steps, repeats, warmup, device)
    finally:  # each setting compiles afresh: no recompilation limit carries over to the next (or to a caller)
        if setting.compiled:
            torch._dynamo.reset()
    plain = times["plain"]
    plain_ms = 1000 * sorted(plain)[len(plain) // 2]
    return [Row(setting, name, Spread.paired(times[name], plain), plain_ms) for name in names if name != "plain"]


def settings(args: argparse.Namespace) -> list[Setting]:
    """Every combination asked for; a training step needs two images or more (BatchNorm cannot normalise
    one value per channel)."""
    return [
        Setting(mode, dtype, layout, compiled, batch)
        for mode, dtype, layout, compiled, batch in itertools.product(
            args.modes, args.dtypes, args.layouts, args.compile, args.batches
        )
        if mode == "inference" or batch > 1
    ]


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table: one line per setting, one column per model (median [q1, q3])."""
    by_setting: dict[Setting, dict[str, Row]] = {}
    for row in rows:
        by_setting.setdefault(row.setting, {})[row.model] = row
    header = "| mode | dtype | layout | compiled | batch | plain ms | retrofit | optimized | twin |"
    lines = [header, "|" + "---|" * 9]
    for setting, found in by_setting.items():
        error = next((r.error for r in found.values() if r.error), None)
        cells = [str(found[m].ratio) if m in found and found[m].ratio else "-" for m in MODELS[1:]]
        plain = next((f"{r.plain_ms:.2f}" for r in found.values() if r.plain_ms), "-")
        s = setting
        head = f"| {s.mode} | {s.dtype} | {s.layout} | {'yes' if s.compiled else 'no'} | {s.batch} | {plain} |"
        lines.append(head + (f" {error} | | |" if error else " " + " | ".join(cells) + " |"))
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batches", default="1,64,256", help="batch sizes, comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--layouts", default="nchw,channels_last", help="nchw and/or channels_last")
    parser.add_argument("--modes", default="inference,training", help="inference and/or training")
    parser.add_argument("--compile", default="eager,compiled", help="eager and/or compiled (torch.compile)")
    parser.add_argument("--size", type=int, default=224, help="input size")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per setting (compilation happens here)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="CPU, ResNet-50 at 32x32, batches 1,2, two rounds")
    parser.add_argument("--out", default=None, help="write the rows as JSON here (and the table beside it, .md)")
    args = parser.parse_args(argv)
    if args.dry:  # the dry run's sizes, where not given
        given = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}
        dry = {"model": "resnet50", "batches": "1,2", "size": 32, "repeats": 2, "warmup": 1, "device": "cpu"}
        for name, value in dry.items():
            setattr(args, name, given.get(name, value))
    args.batches = [int(b) for b in args.batches.split(",")]
    for name, allowed in (
        ("dtypes", DTYPES),
        ("layouts", LAYOUTS),
        ("modes", MODES),
        ("compile", ("eager", "compiled")),
    ):
        values = getattr(args, name).split(",")
        if not values or set(values) - set(allowed):
            parser.error(f"--{name}: expected some of {', '.join(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, [v == "compiled" for v in values] if name == "compile" else values)
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --dry for the CPU check")
    models = build(args.model, args.r)
    backend = "eager" if args.dry else "inductor"
    rows: list[Row] = []
    started = time.perf_counter()
    for setting in settings(args):
        try:
            rows += measure(models, setting, args.size, device, args.repeats, args.warmup, backend)
        except (RuntimeError, torch.OutOfMemoryError) as err:  # this setting only: the others still run
            rows.append(Row(setting, "plain", None, None, first_line(err)[:120]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(table([r for r in rows if r.setting == setting]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        meta = {
            "model": args.model,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1),
            "dry": args.dry,
        }
        Path(args.out).write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))
        Path(args.out).with_suffix(".md").write_text(table(rows) + "\n")
    return rows


if __name__ == "__main__":
    main()
