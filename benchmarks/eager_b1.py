"""Where the optimised SE retrofit's eager batch-1 time goes: plain ResNet-50 against copies of its
optimised retrofit whose units do less, timed interleaved in one process.

Variants (each a copy of the optimised retrofit of timm's ResNet-50, standard position, r=16):

- ``plain_copy``: a second copy of plain ResNet-50, the control: its ratio is what this machine's noise
  and the round order alone give;
- ``structure``: every unit only adds the residual it replaces (the blocks as fx graph modules, the
  units' module calls and the fold check before each call remain);
- ``gate_only``: every unit computes its gate (pooling, both small products, sigmoid) and then only adds
  the residual: the floor of an eager unit of this form, one whose scaling were free;
- ``kernels``: the unit's kernels (pooling, two small matrix products, activation, gate, fused product)
  called with no Python check around them;
- ``kernels_mv``: the same with the pooling and the small products as matrix-vector products (fewer
  kernel dispatches);
- ``early``: the pooling and the first product taken right after the tensor they read is written (a
  hook on the block's ``aa`` layer), the rest in the unit;
- ``checked_twice``: the optimised retrofit with every unit checking its fold again inside the call;
- ``optimized``: the optimised retrofit as ``se_inject.optimize_for_inference`` returns it.

Each ratio is the median over rounds of a variant's time over plain ResNet-50's in the same round (the
order rotates every round) with the 25th-75th percentile of those per-round ratios. Unit weights are
random, and each variant is checked against the optimised retrofit before anything is timed. Last, the
units' kernels are timed alone, one unit after the other on the inputs each receives in the model,
beside the residual additions they replace, and broken down by ATen operation (torch.profiler).

    python benchmarks/eager_b1.py --repeats 300 --threads 2 --out benchmarks/eager_b1.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import types
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import se_inject
from se_inject.measure.bench import Spread, time_interleaved
from se_inject.units.se import SqueezeExcite

Forward = Callable[..., torch.Tensor]


def _structure(unit: SqueezeExcite, x: torch.Tensor, residual: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return x.add_(residual)


def _hidden(unit: SqueezeExcite, source: torch.Tensor) -> torch.Tensor:
    """The folded first layer on the pooled conv input: what every variant that computes the gate starts from."""
    return F.linear(source.mean((2, 3)), unit.fold_weight, unit.fold_bias)


def _gate(unit: SqueezeExcite, hidden: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(F.linear(hidden.relu_(), unit.fc2.weight)).view(1, -1, 1, 1)


def _gate_only(unit: SqueezeExcite, x: torch.Tensor, residual: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    _gate(unit, _hidden(unit, source))
    return x.add_(residual)


def _kernels(unit: SqueezeExcite, x: torch.Tensor, residual: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(residual, x, _gate(unit, _hidden(unit, source)), value=2.0, out=x)  # the preserve gate's 2


def _kernels_mv(unit: SqueezeExcite, x: torch.Tensor, residual: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    channels, positions = source.shape[1], source.shape[2] * source.shape[3]
    pooled = torch.mv(source.view(channels, positions), _uniform(positions))
    hidden = torch.addmv(unit.fold_bias, unit.fold_weight, pooled)
    gate = torch.mv(unit.fc2.weight, hidden.relu_()).sigmoid_().view(1, -1, 1, 1)
    return torch.addcmul(residual, x, gate, value=2.0, out=x)


_UNIFORM: dict[int, torch.Tensor] = {}


def _uniform(positions: int) -> torch.Tensor:
    if positions not in _UNIFORM:
        _UNIFORM[positions] = torch.full((positions,), 1.0 / positions)
    return _UNIFORM[positions]


def _late(unit: SqueezeExcite, x: torch.Tensor, residual: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(residual, x, _gate(unit, unit.early_hidden), value=2.0, out=x)


def _units(model: nn.Module) -> list[SqueezeExcite]:
    return [m for m in model.modules() if isinstance(m, SqueezeExcite)]


def _with_forward(optimized: nn.Module, forward: Forward) -> nn.Module:
    model = copy.deepcopy(optimized)
    for unit in _units(model):
        unit.forward = types.MethodType(forward, unit)
    return model


def _early(optimized: nn.Module) -> nn.Module:
    """The pooling and the first product on the block's ``aa`` output (the last conv's input) as it is written."""
    model = _with_forward(optimized, _late)
    for name in _optimized_blocks(model):
        block = model.get_submodule(name)
        (unit,) = _units(block)

        def pool(layer: nn.Module, args: object, output: torch.Tensor, unit: SqueezeExcite = unit) -> None:
            unit.early_hidden = _hidden(unit, output)

        block.aa.register_forward_hook(pool)
    return model


def _optimized_blocks(model: nn.Module) -> list[str]:
    return [name.rsplit(".", 1)[0] for name in se_inject.optimized_units(model)]


def _checked_twice(optimized: nn.Module) -> nn.Module:
    model = copy.deepcopy(optimized)
    for unit in _units(model):
        unit.folds_checked = None
    return model


def build(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    # zero_init_last=False: timm zeroes each block's last BatchNorm weight, which would zero every unit's
    # input and folded weights and make the check below vacuous
    plain = timm.create_model("resnet50", zero_init_last=False).eval()
    retrofit = se_inject.inject(plain, position="standard", r=16)
    with torch.no_grad():
        for unit in _units(retrofit):  # no zero hides a unit; small, so the gates stay near 1
            unit.fc1.weight.normal_(0, 0.05)
            unit.fc2.weight.normal_(0, 0.05)
    optimized = se_inject.optimize_for_inference(retrofit.eval())
    return {
        "plain": plain,
        "plain_copy": copy.deepcopy(plain),
        "structure": _with_forward(optimized, _structure),
        "gate_only": _with_forward(optimized, _gate_only),
        "kernels": _with_forward(optimized, _kernels),
        "kernels_mv": _with_forward(optimized, _kernels_mv),
        "early": _early(optimized),
        "checked_twice": _checked_twice(optimized),
        "optimized": optimized,
    }


def check(models: dict[str, nn.Module], x: torch.Tensor) -> float:
    """The largest difference of any unit-computing variant from the optimised retrofit, over its largest output."""
    with torch.no_grad():
        expected = models["optimized"](x)
        worst = 0.0
        for name in ("kernels", "kernels_mv", "early", "checked_twice"):
            got = models[name](x)
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
        # the control and the floor compute what the model each stands beside computes, bit for bit
        same = torch.equal(models["plain_copy"](x), models["plain"](x))
        same = same and torch.equal(models["gate_only"](x), models["structure"](x))
    if worst > 1e-4 or not same:
        raise SystemExit(f"a variant computes something else than the model it stands for ({worst:.2e})")
    return worst


UnitInputs = list[tuple[SqueezeExcite, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def unit_inputs(optimized: nn.Module, x: torch.Tensor) -> UnitInputs:
    """Each unit with a copy of what it receives in the model: its input, the residual and the conv's input."""
    inputs: UnitInputs = []

    def keep(unit: nn.Module, args: tuple, kwargs: dict) -> None:
        assert isinstance(unit, SqueezeExcite)
        inputs.append((unit, (args[0].clone(), args[1].clone(), kwargs["source"].clone())))

    hooks = [unit.register_forward_pre_hook(keep, with_kwargs=True) for unit in _units(optimized)]
    with torch.no_grad():
        optimized(x)
    for hook in hooks:
        hook.remove()
    return inputs


def _all_kernels(inputs: UnitInputs, forward: Forward = _kernels) -> None:
    with torch.no_grad():
        for unit, (unit_input, residual, source) in inputs:
            forward(unit, unit_input, residual, source)


def kernels_alone(inputs: UnitInputs, repeats: int, forward: Forward = _kernels) -> float:
    """Seconds the units' kernels (or another forward) take called one after the other, warm, on the inputs
    each receives in the model (median of ``repeats`` passes): what they cost without the convolutions
    between them."""
    passes = []
    for _ in range(repeats + 5):
        start = time.perf_counter()
        _all_kernels(inputs, forward)
        passes.append(time.perf_counter() - start)
    return sorted(passes[5:])[repeats // 2]


def kernels_by_operation(inputs: UnitInputs, passes: int = 50) -> dict[str, float]:
    """Microseconds per pass of the units' kernels alone, by ATen operation (torch.profiler's self time)."""
    from torch.profiler import profile

    _all_kernels(inputs)
    with profile() as prof:
        for _ in range(passes):
            _all_kernels(inputs)
    by_op = {event.key: event.self_cpu_time_total / passes for event in prof.key_averages()}
    return dict(sorted(by_op.items(), key=lambda item: -item[1]))


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build()
    x = torch.randn(1, 3, 224, 224)
    difference = check(models, x)
    steps = {name: _inference(model, x) for name, model in models.items()}
    start = time.perf_counter()
    times = time_interleaved(steps, repeats=args.repeats, warmup=5, device=torch.device("cpu"))
    rows = {f"{name}/plain": Spread.paired(times[name], times["plain"]) for name in models if name != "plain"}
    rows["optimized/checked_twice"] = Spread.paired(times["optimized"], times["checked_twice"])
    print(f"eager, batch 1, {torch.get_num_threads()} threads, {args.repeats} rounds; plain ResNet-50 "
          f"{1e3 * sorted(times['plain'])[len(times['plain']) // 2]:.1f} ms (median)")  # fmt: skip
    for name, spread in rows.items():
        print(f"  {name:26s} {spread}")
    inputs = unit_inputs(models["optimized"], x)
    alone = kernels_alone(inputs, args.repeats)
    adds = kernels_alone(inputs, args.repeats, _structure)
    by_op = kernels_by_operation(inputs)
    print(f"the {len(inputs)} units' kernels called alone, warm: {1e3 * alone:.2f} ms (median), the residual additions "
          f"they replace {1e3 * adds:.2f} ms; by operation (us):")  # fmt: skip
    print("  " + ", ".join(f"{name} {us:.0f}" for name, us in list(by_op.items())[:6]))
    if args.out:
        record = {
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "seconds": round(time.perf_counter() - start),
            "largest_difference": difference,
            "plain_ms": 1e3 * sorted(times["plain"])[len(times["plain"]) // 2],
            "kernels_alone_ms": 1e3 * alone,
            "residual_adds_alone_ms": 1e3 * adds,
            "kernels_alone_us_by_operation": {name: round(us, 1) for name, us in by_op.items()},
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "ratios": {name: {"median": s.median, "q1": s.q1, "q3": s.q3} for name, s in rows.items()},
        }
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
