"""Timing a retrofitted model against its original and against timm's hand-built SE twin.

Models are timed interleaved (A B C A B C ...) in one process after a warm-up, so drifting clocks
and caches hit all of them alike, and the median of each is reported with the ratios
injected/original and injected/twin. CPU: inference at the given batch sizes. CUDA: inference
and a forward+backward training step, in bf16 and channels_last.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from se_inject.api import retrofit
from se_inject.config import InjectConfig
from se_inject.errors import ConfigError
from se_inject.graph.channels import input_channels
from se_inject.surgery.optimize import optimize_for_inference


def twin_of(name: str | None) -> str | None:
    """timm's hand-built SE version of ``name`` (resnet50 -> seresnet50), if timm has one."""
    import timm

    if not name or ":" in name:
        return None
    candidate = f"se{name.split('.')[0]}"
    return candidate if timm.is_model(candidate) else None


@dataclass(frozen=True)
class Spread:
    """A ratio of two models' times: the median over rounds of the per-round ratio, and its
    interquartile range (each round times both models back to back, so drift cancels in the ratio)."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Spread:
        if len(ratios) == 1:
            return cls(ratios[0], ratios[0], ratios[0])
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(median, q1, q3)

    @classmethod
    def paired(cls, times: Sequence[float], baseline: Sequence[float]) -> Spread:
        return cls.of([t / b for t, b in zip(times, baseline, strict=True)])

    @property
    def width(self) -> float:
        return self.q3 - self.q1

    def overlaps(self, other: Spread) -> bool:
        return self.q1 <= other.q3 and other.q1 <= self.q3

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.q1:.3f}, {self.q3:.3f}]"


# the ratios a bench reports, where both models ran ("optimized": the retrofit after optimize_for_inference)
RATIOS = (
    "injected/original",
    "injected/twin",
    "optimized/original",
    "optimized/injected",
    "optimized/twin",
)


@dataclass(frozen=True)
class Timing:
    model: str
    mode: str  # "inference" or "train step"
    batch: int
    median_ms: float
    images_per_s: float
    runs: int


@dataclass
class BenchReport:
    """Medians per model and setting, and the ratios that matter."""

    device: str
    threads: int
    size: int
    compiled: bool
    timings: list[Timing] = field(default_factory=list)
    # (mode, batch, "A/B", one of RATIOS) -> the paired ratio and its spread
    spreads: dict[tuple[str, int, str], Spread] = field(default_factory=dict)

    def median(self, model: str, mode: str, batch: int) -> float | None:
        return next((t.median_ms for t in self.timings if (t.model, t.mode, t.batch) == (model, mode, batch)), None)

    def ratios(self) -> list[dict]:
        """Per mode and batch: each ratio's median over rounds, and its quartiles (``..._q1``, ``..._q3``)."""
        rows = []
        for mode, batch in dict.fromkeys((t.mode, t.batch) for t in self.timings):
            row: dict = {"mode": mode, "batch": batch}
            for name in RATIOS:
                spread = self.spreads.get((mode, batch, name))
                row[name] = spread.median if spread else None
                row[f"{name}_q1"] = spread.q1 if spread else None
                row[f"{name}_q3"] = spread.q3 if spread else None
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("spreads")  # tuple keys: the same numbers are in "ratios"
        return {**data, "ratios": self.ratios()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Run each step ``warmup`` times, then ``repeats`` rounds of A B C ...; seconds per call.
    ``on_round(n)`` is called after the n-th round (a progress bar)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(repeats):
        # rotate the order each round (A B C, B C A, ...): no model always runs after the same one
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            step = steps[name]
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round(round_ + 1)
    return times


# rounds per batch size when none are asked for: with these, two runs of `se-inject bench resnet50`
# on an idle 2-core machine gave ratios within 2% of each other (README, Performance)
DEFAULT_ROUNDS_BATCH_1 = 50
DEFAULT_ROUNDS = 30


def rounds_per_batch(repeats: int | Mapping[int, int] | None, batches: Sequence[int]) -> dict[int, int]:
    """Timed rounds for each batch size: ``repeats`` as given (one number for all, or per batch), or
    the defaults (more rounds at batch 1, whose calls are short)."""
    if repeats is None:
        return {b: DEFAULT_ROUNDS_BATCH_1 if b == 1 else DEFAULT_ROUNDS for b in batches}
    if isinstance(repeats, int):
        if repeats < 2:
            raise ConfigError(f"repeats: at least 2 rounds are needed for a spread, got {repeats}")
        return dict.fromkeys(batches, repeats)
    return {b: int(repeats[b]) for b in batches}


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():  # no_grad, not inference_mode: compiled graphs are shared with training
            return model(x)

    return run


def train_step(
    model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> Callable[[], object]:
    """Forward, backward and an SGD step, under autocast to ``dtype`` (default: bf16 on CUDA, none elsewhere;
    float32: none)."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run() -> object:
        with autocast:
            loss = nn.functional.cross_entropy(model(x).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return run


CPU_BATCHES, CUDA_BATCHES = (1, 16), (256,)
TIMED_SIZE = 224  # the input size timed when none is given: ImageNet's


def default_batches(device: torch.device) -> tuple[int, ...]:
    """The batch sizes timed when none are given: a GPU is timed at a batch that fills it."""
    return CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES


def bench(
    original: nn.Module,
    config: InjectConfig | None = None,
    *,
    twin: nn.Module | None = None,
    batches: Sequence[int] | None = None,
    size: int | None = None,
    repeats: int | Mapping[int, int] | None = None,
    warmup: int = 3,
    train: bool | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    optimize: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    **options,
) -> BenchReport:
    """Time ``original``, its injection with ``config``/``options`` and an optional ``twin``, interleaved.

    ``size`` is the input's spatial size (default 224). ``batches`` defaults to 1 and 16 on the CPU and to 256 on CUDA, where small batches time the
    launch overhead rather than the model. On CUDA the models run in bf16 and channels_last and
    ``train`` (default: on) adds a training step. ``compile`` runs every model under torch.compile (inductor, weights frozen for inference),
    so the ratios compare compiled with compiled. ``optimize`` also times the retrofit after
    :func:`~se_inject.surgery.optimize.optimize_for_inference` (inference only: in training mode it
    computes what the retrofit computes). Each ratio is the median of per-round ratios, with
    its interquartile range (``report.spreads``); ``progress(what, done, total)`` is called after every
    round. Nothing of ``original`` changes.

    Example::

        report = se_inject.measure.bench(timm.create_model("resnet50"), twin=timm.create_model("seresnet50"), r=16)
        report.ratios()   # [{'mode': 'inference', 'batch': 1, 'injected/original': 1.03, 'injected/twin': 0.99}, ...]
    """
    device = torch.device(device)
    train = device.type == "cuda" if train is None else train
    batches = default_batches(device) if batches is None else batches
    size = TIMED_SIZE if size is None else size
    base = copy.deepcopy(original).eval()
    channels = input_channels(base)
    injected = retrofit(base, config, input_size=size, **options).model.eval()
    models = {"original": base, "injected": injected}
    if optimize:
        models["optimized"] = optimize_for_inference(injected)
    if twin is not None:
        models["twin"] = copy.deepcopy(twin).eval()
    place(models.values(), device)
    with compiled(models.values(), compile):
        rounds = rounds_per_batch(repeats, batches)
        return _run(models, batches, size, rounds, warmup, train, device, compile, channels, progress)


@contextlib.contextmanager
def compiled(models: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Every one of ``models`` compiled in place (inductor), with weight freezing on while inside.

    All of them: a compiled retrofit timed against an eager original would flatter the retrofit.
    In place (callers pass copies): a module keeps ``train()`` and its type. Freezing makes the
    inference graphs take the weights as constants (prepacked convolutions); it is switched off again.
    """
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    for model in models:
        model.compile()
    inductor_config.freezing = True
    try:
        yield
    finally:
        inductor_config.freezing = False


def _run(models, batches, size, rounds, warmup, train, device, compile, channels: int, progress=None) -> BenchReport:
    report = BenchReport(str(device), torch.get_num_threads(), size, compile)
    inputs = {batch: example_input(batch, channels, size, device) for batch in batches}
    timed = time_batches(
        models,
        inputs,
        rounds,
        warmup,
        device,
        train=train,
        compile=compile,
        progress=progress,
        untrained=("optimized",),
    )  # an optimized retrofit trains as the retrofit does
    for batch, mode, seconds in timed:
        for name, values in seconds.items():
            median = statistics.median(values)
            report.timings.append(Timing(name, mode, batch, median * 1e3, batch / median, len(values)))
        for name in RATIOS:
            first, second = name.split("/")
            if first in seconds and second in seconds:
                report.spreads[(mode, batch, name)] = Spread.paired(seconds[first], seconds[second])
    return report


def place(models: Iterable[nn.Module], device: torch.device) -> None:
    """Move the timed models to ``device``, in place; on CUDA in bf16 and channels_last, as they run there."""
    for model in models:
        model.to(device)
        if device.type == "cuda":
            model.to(torch.bfloat16).to(memory_format=torch.channels_last)


def example_input(batch: int, channels: int, size: int, device: torch.device) -> torch.Tensor:
    """A random batch as the timed models run it: bf16 and channels_last on CUDA."""
    cuda = device.type == "cuda"
    x = torch.randn(batch, channels, size, size, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    return x.contiguous(memory_format=torch.channels_last) if cuda else x


def time_batches(
    models: dict[str, nn.Module],
    inputs: Mapping[int, torch.Tensor],
    rounds: Mapping[int, int],
    warmup: int,
    device: torch.device,
    *,
    train: bool,
    compile: bool,
    progress: Callable[[str, int, int], None] | None = None,
    train_label: str = "train step",
    untrained: Sequence[str] = (),
) -> Iterator[tuple[int, str, dict[str, list[float]]]]:
    """Every model timed interleaved at each batch size: inference (on fresh copies every
    RELAYOUT_EVERY rounds; compiled models as they are), then with ``train`` a training step of every
    model but those named in ``untrained``. Yields ``(batch, mode, seconds per model)``, the mode
    being "inference" or ``train_label``; ``progress(what, done, total)`` counts rounds over all of
    them. The models are left in eval mode."""
    done, total = 0, sum(rounds[b] for b in inputs) * (2 if train else 1)
    for batch, x in inputs.items():
        for mode in ("inference", train_label) if train else ("inference",):
            for m in models.values():
                m.train(mode != "inference")
            tick = None if progress is None else progress_ticker(progress, f"{mode}, batch {batch}", done, total)
            if mode == "inference":
                seconds = time_relaid(models, x, rounds[batch], warmup, device, relayout=not compile, on_round=tick)
            else:
                steps = {n: train_step(m, x, device) for n, m in models.items() if n not in untrained}
                seconds = time_interleaved(steps, rounds[batch], warmup, device, on_round=tick)
            done += rounds[batch]
            yield batch, mode, seconds
        for m in models.values():
            m.eval()


RELAYOUT_EVERY = 10  # rounds between fresh copies of the timed models


def time_relaid(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    rounds: int,
    warmup: int,
    device: torch.device,
    *,
    relayout: bool = True,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Inference timed interleaved, in blocks of RELAYOUT_EVERY rounds, each block on fresh deep copies
    of the models (``relayout``). Where a model's weights and buffers happen to lie in memory is fixed
    for a process and shifts a ratio by a few percent from one run to the next, however many rounds
    it has; fresh copies average over several layouts. Compiled models are timed as they are."""
    times: dict[str, list[float]] = {name: [] for name in models}
    done = 0
    current = models
    while done < rounds:
        block = min(RELAYOUT_EVERY, rounds - done) if relayout else rounds
        steps = {n: _inference(m, x) for n, m in current.items()}
        tick = None if on_round is None else functools.partial(_shifted, on_round, done)
        for name, values in time_interleaved(steps, block, warmup if done == 0 else 1, device, tick).items():
            times[name].extend(values)
        done += block
        if relayout and done < rounds:
            current = {n: copy.deepcopy(m) for n, m in models.items()}
    return times


def _shifted(on_round: Callable[[int], None], offset: int, round_: int) -> None:
    on_round(offset + round_)


def progress_ticker(
    progress: Callable[[str, int, int], None], what: str, start: int, total: int
) -> Callable[[int], None]:
    return lambda round_: progress(what, start + round_, total)
