"""Timing a retrofitted model against its original and against timm's hand-built SE twin.

Models are timed interleaved (A B C A B C ...) in one process after a warm-up, so drifting clocks
and caches hit all of them alike, and the median of each is reported with the ratios
injected/original and injected/twin. CPU: inference at the given batch sizes. CUDA: inference
and a forward+backward training step, in bf16 and channels_last.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from se_inject.api import retrofit
from se_inject.config import InjectConfig
from se_inject.graph.channels import input_channels


def twin_of(name: str | None) -> str | None:
    """timm's hand-built SE version of ``name`` (resnet50 -> seresnet50), if timm has one."""
    import timm

    if not name or ":" in name:
        return None
    candidate = f"se{name.split('.')[0]}"
    return candidate if timm.is_model(candidate) else None


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

    def median(self, model: str, mode: str, batch: int) -> float | None:
        return next((t.median_ms for t in self.timings if (t.model, t.mode, t.batch) == (model, mode, batch)), None)

    def ratios(self) -> list[dict]:
        rows = []
        for mode, batch in dict.fromkeys((t.mode, t.batch) for t in self.timings):
            injected, original, twin = (self.median(m, mode, batch) for m in ("injected", "original", "twin"))
            rows.append(
                {
                    "mode": mode,
                    "batch": batch,
                    "injected/original": injected / original if injected and original else None,
                    "injected/twin": injected / twin if injected and twin else None,
                }
            )
        return rows

    def to_dict(self) -> dict:
        return {**asdict(self), "ratios": self.ratios()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Run each step ``warmup`` times, then ``repeats`` rounds of A B C ...; seconds per call."""
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
    return times


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():  # no_grad, not inference_mode: compiled graphs are shared with training
            return model(x)

    return run


def _train_step(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], object]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run() -> object:
        with autocast:
            loss = nn.functional.cross_entropy(model(x).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return run


def bench(
    original: nn.Module,
    config: InjectConfig | None = None,
    *,
    twin: nn.Module | None = None,
    batches: Sequence[int] = (1, 16),
    size: int = 224,
    repeats: int = 20,
    warmup: int = 3,
    train: bool | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    **options,
) -> BenchReport:
    """Time ``original``, its injection with ``config``/``options`` and an optional ``twin``, interleaved.

    On CUDA the models run in bf16 and channels_last and ``train`` (default: on) adds a training
    step. ``compile`` runs every model under torch.compile (inductor, weights frozen for inference),
    so the ratios compare compiled with compiled. Nothing of ``original`` changes.

    Example::

        report = se_inject.bench(timm.create_model("resnet50"), twin=timm.create_model("seresnet50"), r=16)
        report.ratios()   # [{'mode': 'inference', 'batch': 1, 'injected/original': 1.03, 'injected/twin': 0.99}, ...]
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    train = cuda if train is None else train
    base = copy.deepcopy(original).eval()
    channels = input_channels(base)
    injected = retrofit(base, config, input_size=size, **options).model.eval()
    models = {"original": base, "injected": injected}
    if twin is not None:
        models["twin"] = copy.deepcopy(twin).eval()
    for model in models.values():
        model.to(device)
        if cuda:
            model.to(torch.bfloat16).to(memory_format=torch.channels_last)
    if compile:  # all of them: a compiled retrofit against an eager original would flatter the retrofit
        for model in models.values():
            model.compile()  # in place (these are copies): the module keeps train() and its type
        _inductor_freezing(True)  # inference graphs take the weights as constants: prepacked convolutions
    try:
        return _run(models, batches, size, repeats, warmup, train, device, compile, channels)
    finally:
        if compile:
            _inductor_freezing(False)


def _inductor_freezing(enabled: bool) -> None:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = enabled


def _run(models, batches, size, repeats, warmup, train, device, compile, channels: int) -> BenchReport:
    cuda = device.type == "cuda"
    report = BenchReport(str(device), torch.get_num_threads(), size, compile)
    dtype = torch.bfloat16 if cuda else torch.float32
    for batch in batches:
        x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        plans = [("inference", {n: _inference(m, x) for n, m in models.items()})]
        if train:
            plans.append(("train step", {n: _train_step(m, x, device) for n, m in models.items()}))
        for mode, steps in plans:
            for m in models.values():
                m.train(mode == "train step")
            seconds = time_interleaved(steps, repeats, warmup, device)
            for name, values in seconds.items():
                median = statistics.median(values)
                report.timings.append(Timing(name, mode, batch, median * 1e3, batch / median, len(values)))
    return report
