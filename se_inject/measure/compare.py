"""Comparing candidate retrofits on the user's own hardware, before any training.

Eq. 5 and FLOPs under-predict what a unit costs: global pooling needs the whole feature map before
any channel can be scaled, so SE's elementwise work is memory traffic. :func:`compare` measures it.
The original and every candidate (a set of injection options: a position, an r, a unit, a style,
a block selection) are built once and timed interleaved in one process (the order rotates every
round, see :func:`se_inject.measure.bench.time_interleaved`). Each candidate's figure is the median of its
time divided by the original's time *in the same round*, with the 25th-75th percentile of those
per-round ratios as its spread: drifting clocks and caches hit both sides of each ratio alike.

Where spreads overlap, the comparison says so instead of naming a winner (:meth:`Comparison.verdict`).

Peak memory: on CUDA, the allocator's peak (``torch.cuda.max_memory_allocated``) over one step; on
CPU, the peak bytes of the tensors alive during one inference forward, tracked at torch's
dispatcher (weights excluded; a training step is not tracked, autograd keeps tensors the tracker
cannot see).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from se_inject.api import retrofit
from se_inject.errors import ConfigError, SEInjectError, first_line
from se_inject.graph.channels import input_channels
from se_inject.io.files import as_path
from se_inject.measure.bench import (
    TIMED_SIZE,
    Spread,
    compiled,
    default_batches,
    example_input,
    place,
    rounds_per_batch,
    time_batches,
)
from se_inject.surgery.optimize import fold_squeezes

Progress = Callable[[str, int, int], None]  # (what is running, done, total)


@dataclass(frozen=True)
class Candidate:
    """One retrofit to measure: a label and the injection options (``se_inject.inject``'s keywords)."""

    label: str
    options: dict[str, Any]


def candidates(
    *,
    positions: Sequence[str] = (),
    rs: Sequence[int] = (),
    units: Sequence[str] = (),
    inits: Sequence[str] = (),
    styles: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """Every combination of the values given (an axis left empty keeps the default), on top of ``base``.
    A start (``inits``) costs the same as another; experiments compare them.

    Examples:
        >>> [c.label for c in candidates(positions=["standard", "pre"], units=["se", "eca"])]
        ['position=standard unit=se', 'position=standard unit=eca', 'position=pre unit=se', 'position=pre unit=eca']
    """
    axes = [
        (name, list(values))
        for name, values in (("position", positions), ("r", rs), ("unit", units), ("init", inits), ("style", styles))
        if values
    ]
    found = []
    for combination in itertools.product(*(values for _, values in axes)):
        options = dict(zip((name for name, _ in axes), combination, strict=True))
        found.append(Candidate(label_of(options), {**(base or {}), **options}))
    return found


@dataclass
class CandidateResult:
    """What one candidate costs, as ratios to the original (``None`` where it could not be built)."""

    label: str
    options: dict[str, Any]
    error: str | None = None
    units: int = 0
    params_added: int = 0
    params_increase: float = 0.0
    flops_increase: float = 0.0
    macs_increase: float = 0.0
    latency: dict[int, Spread] = field(default_factory=dict)  # batch -> inference time ratio
    train: dict[int, Spread] = field(default_factory=dict)  # batch -> training step time ratio
    images_per_s: dict[int, float] = field(default_factory=dict)  # batch -> inference throughput
    memory: dict[int, float] = field(default_factory=dict)  # batch -> peak memory ratio
    optimized_units: int = 0  # units that squeeze before their block's last 1x1 conv (compare(optimize=True))


@dataclass
class Comparison:
    """The original and the candidates, measured together. ``to_dict()`` is the JSON form."""

    model: str
    device: str
    threads: int
    size: int
    batches: tuple[int, ...]
    repeats: dict[int, int]  # batch -> rounds
    memory_kind: str
    optimized: bool = False  # candidates measured after optimize_for_inference where they fold
    compiled: bool = False  # every model timed under torch.compile
    original_ms: dict[int, float] = field(default_factory=dict)
    original_images_per_s: dict[int, float] = field(default_factory=dict)
    original_memory: dict[int, int] = field(default_factory=dict)  # batch -> peak bytes
    results: list[CandidateResult] = field(default_factory=list)

    def measured(self) -> list[CandidateResult]:
        return [r for r in self.results if r.error is None]

    def verdict(self, batch: int, mode: str = "inference") -> str:
        """Which candidate is fastest at ``batch`` (``inference`` or ``train``), or why the spread
        does not allow naming one."""
        table = [(r.label, (r.latency if mode == "inference" else r.train).get(batch)) for r in self.measured()]
        ranked = sorted(((label, s) for label, s in table if s is not None), key=lambda item: item[1].median)
        if not ranked:
            return f"batch {batch}: nothing measured"
        best_label, best = ranked[0]
        free = (
            "" if best.q1 > 1.0 else f"; its spread reaches the original's time ({best}), so its cost is not resolved"
        )
        if len(ranked) == 1:
            return f"batch {batch}: {best_label}: {best}{free}"
        runner_label, runner = ranked[1]
        if best.overlaps(runner):
            tied = [label for label, s in ranked if s.overlaps(best)]
            return (
                f"batch {batch}: no clear winner: the spreads of {', '.join(tied)} overlap "
                f"(fastest median {best_label} {best.median:.3f}, next {runner_label} {runner.median:.3f}); "
                "rerun with more --repeats on an idle machine to separate them"
            )
        return f"batch {batch}: fastest {best_label} ({best}), clearly ahead of {runner_label} ({runner}){free}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdicts"] = {str(b): self.verdict(b) for b in self.batches}
        return data


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of tensor storage alive while it is active, counting what ops create (weights
    and inputs created before are not counted). A storage is released when the last Python tensor
    on it dies, which is exact for inference and undercounts what autograd keeps for backward."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # data pointer -> [bytes, live tensors on it]
        self.current = 0
        self.peak = 0

    def _release(self, pointer: int) -> None:
        entry = self._live.get(pointer)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer == 0:
                continue
            entry = self._live.get(pointer)
            if entry is None:
                entry = self._live[pointer] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, pointer)
        return out


def peak_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one inference forward of ``model`` on ``x``: the CUDA allocator's peak above what
    was allocated before (CUDA), or :class:`PeakTensorMemory`'s count (CPU)."""
    with torch.no_grad():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            before = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            model(x)
            torch.cuda.synchronize(x.device)
            return torch.cuda.max_memory_allocated(x.device) - before
        with PeakTensorMemory() as tracker:
            model(x)
        return tracker.peak


def _paired(seconds: dict[str, list[float]], name: str) -> Spread:
    return Spread.paired(seconds[name], seconds["original"])


def compare(
    model: nn.Module,
    candidates: Iterable[Candidate | Mapping[str, Any]],
    *,
    model_name: str | None = None,
    batches: Sequence[int] | None = None,
    size: int | None = None,
    repeats: int | Mapping[int, int] | None = None,
    warmup: int = 3,
    train: bool = False,
    device: str | torch.device = "cpu",
    optimize: bool = False,
    compile: bool = False,
    progress: Progress | None = None,
) -> Comparison:
    """Measure ``model`` and each candidate retrofit of it, interleaved, as ratios to ``model``.

    A candidate is a :class:`Candidate` or a mapping of injection options (labelled by them). One
    that cannot be injected (an r wider than the channels, say) is reported with its error and the
    others are measured. ``batches`` and ``size`` default as :func:`~se_inject.measure.bench.bench`'s do. ``repeats`` is the rounds per batch size (default: 50 at batch 1, 30 above);
    ``train`` adds a training step per model; ``optimize`` measures each candidate after
    :func:`~se_inject.surgery.optimize.optimize_for_inference` where it has units to fold
    (``optimized_units`` counts them); ``compile`` times every model under torch.compile (inductor,
    weights frozen; memory is tracked before, in eager mode); ``progress(what, done, total)`` is
    called after every round.
    Nothing of ``model`` changes.

    Example::

        result = se_inject.measure.compare(timm.create_model("resnet50"), se_inject.candidates(positions=["standard", "pre"]))
        result.results[0].latency[1]   # Spread(median=1.05, q1=1.04, q3=1.06): time over the original's
        result.verdict(1)              # the fastest, or "no clear winner: the spreads of ... overlap"
    """
    target = torch.device(device)
    batches = default_batches(target) if batches is None else batches
    size = TIMED_SIZE if size is None else size
    cuda = target.type == "cuda"
    chosen = [c if isinstance(c, Candidate) else Candidate(label_of(c), dict(c)) for c in candidates]
    if not chosen:
        raise ConfigError("candidates: nothing to compare; give positions, r values, units, styles or candidates")
    if not batches or any(b < 1 for b in batches):
        raise ConfigError(f"batches: expected positive batch sizes, got {list(batches)}")
    original = copy.deepcopy(model).eval()
    models: dict[str, nn.Module] = {"original": original}
    results = []
    for candidate in chosen:
        try:
            built = retrofit(original, input_size=size, model_name=model_name, **candidate.options)
        except SEInjectError as err:
            results.append(CandidateResult(candidate.label, candidate.options, error=first_line(err)))
            continue
        totals = built.report.totals
        result = CandidateResult(
            candidate.label,
            candidate.options,
            units=len(built.report.sites),
            params_added=totals.params_added,
            params_increase=totals.params_increase,
            flops_increase=totals.flops_increase,
            macs_increase=totals.macs_increase,
        )
        results.append(result)
        models[candidate.label] = built.model.eval()
        if optimize:  # in place: the candidate is compare's own model; one with nothing to fold is measured as built
            result.optimized_units = fold_squeezes(built.model)
    if len(models) == 1:
        raise ConfigError(f"candidates: none could be injected: {results[0].error}")
    place(models.values(), target)
    rounds = rounds_per_batch(repeats, batches)
    comparison = Comparison(
        model_name or type(model).__name__,
        str(target),
        torch.get_num_threads(),
        size,
        tuple(batches),
        rounds,
        "CUDA allocator peak over one inference forward"
        if cuda
        else "peak bytes of tensors alive during one inference forward (tracked at torch's dispatcher; weights excluded)",
        optimized=optimize,
        compiled=compile,
        results=results,
    )
    by_label = {r.label: r for r in results if r.error is None}
    channels = input_channels(original)
    inputs = {batch: example_input(batch, channels, size, target) for batch in batches}
    for batch, x in inputs.items():  # eager, before anything is compiled: the tracking mode sees every op
        comparison.original_memory[batch] = peak_memory(original, x)
        for label, result in by_label.items():
            result.memory[batch] = peak_memory(models[label], x) / max(1, comparison.original_memory[batch])
    with compiled(models.values(), compile):
        _time_all(models, inputs, rounds, warmup, train, target, compile, comparison, progress)
    return comparison


def _time_all(models, inputs, rounds, warmup, train, device, compile, comparison, progress) -> None:
    """Time every model (``bench.time_batches``) and put each candidate's ratios to the original, and
    the throughputs, into ``comparison``."""
    by_label = {r.label: r for r in comparison.measured()}
    timed = time_batches(
        models, inputs, rounds, warmup, device, train=train, compile=compile, progress=progress, train_label="train"
    )
    for batch, mode, seconds in timed:
        for label, result in by_label.items():
            (result.latency if mode == "inference" else result.train)[batch] = _paired(seconds, label)
        if mode == "inference":
            median = statistics.median(seconds["original"])
            comparison.original_ms[batch] = median * 1e3
            comparison.original_images_per_s[batch] = batch / median
            for label, result in by_label.items():
                result.images_per_s[batch] = batch / statistics.median(seconds[label])


def label_of(options: Mapping[str, Any]) -> str:
    """A candidate's label: its options as ``name=value`` words ("default" for none)."""
    return " ".join(f"{k}={v}" for k, v in options.items()) or "default"


def check_plot_target(path: str | Path) -> Path:
    """``path`` as a PNG file that may be written: its folder exists, it is no folder itself, and matplotlib,
    which draws it, is installed (checked before any work, so that no result waits on a plot that fails)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("plots need matplotlib: pip install 'se-inject[plots]'")
    target = as_path(path, "--plot", ConfigError)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"--plot: expected a .png file name, got {str(target)!r}")
    if target.is_dir() or not target.parent.is_dir():
        raise ConfigError(f"--plot: {str(target)!r} is a folder, or its folder does not exist")
    return target


def plot(comparison: Comparison, path: str | Path, batch: int | None = None) -> Path:
    """Added latency (median and interquartile range, at ``batch``: default the first) against added
    weights, one point per candidate, as a PNG."""
    try:
        from matplotlib.figure import Figure  # a bare Figure draws with Agg: pyplot's backend is left alone
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'se-inject[plots]'") from None
    target = check_plot_target(path)
    batch = comparison.batches[0] if batch is None else batch
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for result in comparison.measured():
        spread = result.latency[batch]
        x, y = 100 * result.params_increase, 100 * (spread.median - 1)
        low, high = y - 100 * (spread.q1 - 1), 100 * (spread.q3 - 1) - y
        ax.errorbar([x], [y], yerr=[[low], [high]], fmt="o", capsize=3)
        ax.annotate(result.label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("weights added (% of the original)")
    ax.set_ylabel(f"latency added at batch {batch} (%, median and IQR)")
    ax.set_title(f"{comparison.model} on {comparison.device}")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    return target
