"""Fine-tuning a retrofitted model: SE units first, then everything, on CPU, GPU or many processes.

The schedule follows what a retrofit needs: a first phase (``se_epochs``) trains only the SE units
(and a classifier head that was resized for the dataset), with every other weight frozen and
BatchNorm in eval mode, so the trained network is not disturbed while the gates learn; then the
whole network trains at ``full_lr_scale`` times the learning rate. SGD with momentum 0.9 (the
paper's) or AdamW; step or cosine decay within each phase; no weight decay on biases and norms.

Every epoch ends with an atomic checkpoint (``checkpoint.pt``: model, optimizer, scheduler, RNG,
epoch), a line in ``metrics.jsonl`` and the model in the ``se_inject.save`` format, so a run killed
at any moment loses at most the epoch in progress and ``resume=True`` continues exactly. Under
``torchrun`` the model is wrapped in DistributedDataParallel with a DistributedSampler; rank 0 alone
writes files.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from se_inject.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    InvalidModelError,
    ResumeMismatchError,
    TrainingDivergedError,
    one_line,
)
from se_inject.graph.shadow import eval_mode
from se_inject.io.files import as_path, check_target, write_atomic, write_text_atomic
from se_inject.io.heads import classifier, fit_head
from se_inject.io.layout import CHECKPOINT_FILE, METRICS_FILE, OWNED_FILES, RECIPE_FILE, WEIGHTS_FILE
from se_inject.io.recipe import attached_recipe
from se_inject.io.saving import write_model_files
from se_inject.runtime import rank_and_world, resolve_device
from se_inject.train.config import RESUMABLE_CHANGES, FinetuneConfig
from se_inject.train.data import DataSplits, SeededSamples
from se_inject.train.movement import MovementReport, movement_from_start, probe_images, unit_snapshot
from se_inject.units.base import ChannelUnit


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one metrics object per epoch
    accuracy: dict[str, float | None]  # before retrofit, after injection, after fine-tuning
    out: Path
    warnings: list[str] = field(default_factory=list)  # what the user should know (shown by the CLI)
    movement: MovementReport | None = None  # how far the units moved from their start (None: no units)


class UntrainedModelWarning(UserWarning):
    """The model scores at chance before fine-tuning: an SE-only phase on it learns nothing."""


class StartChangedModelWarning(UserWarning):
    """Right after injection, before any training, the model scores below its original: units that do
    not start as the identity (``init="paper"`` or ``"zero"``) changed what it computes."""


class UnitsDidNotLearnWarning(UserWarning):
    """No unit moved out of the identity band during fine-tuning: the units added weights, not behaviour."""


# --- the model -----------------------------------------------------------------------------------


def se_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ChannelUnit) for p in m.parameters()]


def _param_groups(params: list[nn.Parameter], units: set[int], config: FinetuneConfig, lr: float) -> list[dict]:
    """The backbone's weights and the units' (their ``id`` in ``units``), each split into those that decay
    and biases and norm scales, which do not; the units at ``unit_lr_scale`` times ``lr``."""
    unit_decay = config.weight_decay if config.unit_weight_decay is None else config.unit_weight_decay
    groups = []
    for own, rate, decay in ((False, lr, config.weight_decay), (True, lr * config.unit_lr_scale, unit_decay)):
        mine = [p for p in params if (id(p) in units) == own]
        groups += [
            {"params": [p for p in mine if p.ndim > 1], "weight_decay": decay, "lr": rate, "units": own},
            {"params": [p for p in mine if p.ndim <= 1], "weight_decay": 0.0, "lr": rate, "units": own},
        ]
    return groups


class SplitOptimizer(torch.optim.Optimizer):
    """The backbone's parameter groups under one optimizer and the units' under another (``unit_optimizer``),
    seen as one: one schedule sets every group's rate, one state dict is checkpointed and restored."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        # the parts' own group dicts: a rate the schedule or the warm-up sets is the one the part steps with
        super().__init__([group for part in parts for group in part.param_groups], {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for part in self.parts:
            part.step()

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)


def _optimizer(kind: str, groups: list[dict], lr: float, config: FinetuneConfig) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def _make_optimizer(
    config: FinetuneConfig, params: list[nn.Parameter], lr: float, units: set[int]
) -> torch.optim.Optimizer:
    """The phase's optimizer: one, or the backbone's and the units' own (a :class:`SplitOptimizer`)."""
    groups = _param_groups(params, units, config, lr)
    own = [g for g in groups if g["units"]]
    kind = config.optimizer if config.unit_optimizer == "same" else config.unit_optimizer
    if kind == config.optimizer or not any(g["params"] for g in own):
        return _optimizer(config.optimizer, groups, lr, config)
    backbone = [g for g in groups if not g["units"]]
    return SplitOptimizer([_optimizer(config.optimizer, backbone, lr, config), _optimizer(kind, own, lr, config)])


def _make_scheduler(
    config: FinetuneConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The decay of one phase of ``epochs`` epochs, in closed form of the epoch within the phase.

    A closed form (a plain function, which LambdaLR does not store in its state) lets a resumed
    run with more epochs follow the longer schedule from where it stands.
    """
    total = max(1, epochs)
    if config.schedule == "cosine":

        def factor(t: int) -> float:
            return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    else:
        step = max(1, math.ceil(total * 2 / 3))

        def factor(t: int) -> float:
            return 0.1 ** (t // step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _frozen_norms(model: nn.Module, frozen: bool) -> Iterator[None]:
    """In the SE phase BatchNorm runs in eval mode: its statistics stay those of the trained model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    for m in norms:
        m.eval()
    yield


@contextlib.contextmanager
def _restored_flags(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` as it was, whatever happens in between."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --- one epoch -----------------------------------------------------------------------------------


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False, channels_last: bool = False
) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` over ``loader``, in eval mode (the flags are restored)."""
    total, correct, loss_sum = 0, 0, 0.0
    with eval_mode(model), torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return loss_sum / max(total, 1), correct / max(total, 1)


# the metrics of an epoch with nothing to train
_IDLE_EPOCH: dict[str, Any] = {
    "trained": False,
    "train_loss": None,
    "train_acc": None,
    "images_per_s": None,
    "seconds": 0.0,
    "data_digest": None,
}
DIGEST_STRIDE = 61  # every 61st value of each batch of images enters the digest: cheap, and any change of order,
# augmentation or normalisation changes it


def _digest_batch(digest: Any, images: torch.Tensor, labels: torch.Tensor) -> None:
    digest.update(labels.detach().cpu().numpy().tobytes())
    digest.update(images.detach().flatten()[::DIGEST_STRIDE].cpu().numpy().tobytes())


def validation_loader(dataset: Any, config: FinetuneConfig) -> DataLoader:
    """Batches of a validation set as a run evaluates them (twice the training batch: no gradients kept)."""
    return DataLoader(dataset, batch_size=config.batch_size * 2, num_workers=config.workers)


def evaluation_options(config: FinetuneConfig, device: torch.device) -> dict[str, bool]:
    """:func:`evaluate`'s options for a run: its mixed precision and memory format, on CUDA."""
    return {"amp": config.amp, "channels_last": config.channels_last} if device.type == "cuda" else {}


def _warm_up_units(optimizer: torch.optim.Optimizer, scheduled: list[float], steps: int, step: int) -> None:
    """The units' groups at ``step / steps`` of their scheduled rate during the run's first ``steps`` steps
    (``step`` counts from 1 over the run: an epoch's steps follow the earlier epochs', idle ones included)."""
    if step <= steps:
        for group, rate in zip(optimizer.param_groups, scheduled, strict=True):
            if group.get("units"):
                group["lr"] = rate * step / steps


def _train_epoch(model, loader, optimizer, device, config, phase, progress, epoch) -> dict[str, Any]:
    model.train()
    digest = hashlib.blake2b(digest_size=16)  # what the epoch was fed: experiments compare it across arms
    with _frozen_norms(model, phase == "se"):
        seen, correct, loss_sum, start = 0, 0, 0.0, time.perf_counter()
        scaler = torch.amp.GradScaler(
            "cuda", enabled=device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
        )
        scheduled = [group["lr"] for group in optimizer.param_groups]
        for step, (images, labels) in enumerate(loader, 1):
            _warm_up_units(optimizer, scheduled, config.unit_warmup_steps, epoch * len(loader) + step)
            _digest_batch(digest, images, labels)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if device.type == "cuda" and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.amp):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"the training loss became {value} at epoch {epoch + 1}, step {step}; nothing of this epoch was "
                    f"saved; lower the learning rate (now {optimizer.param_groups[0]['lr']:.3g}) and start again"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += labels.numel()
            loss_sum += value * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            progress(labels.numel(), loss_sum / seen, correct / seen, seen / (time.perf_counter() - start))
        for group, rate in zip(optimizer.param_groups, scheduled, strict=True):  # the schedule's rates again
            group["lr"] = rate
    seconds = time.perf_counter() - start
    return {
        "trained": True,
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_s": seen / seconds if seconds else 0.0,
        "seconds": seconds,
        "data_digest": digest.hexdigest(),
    }


# --- checkpoints and resuming ---------------------------------------------------------------------

CHECKPOINT_KEYS = frozenset(
    {"model", "optimizer", "scheduler", "rng", "epoch", "phase", "history", "accuracy", "config", "run"}
)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_fingerprint(model: nn.Module, data: DataSplits, config: FinetuneConfig) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the model (every tensor's name and shape,
    which also fixes r, units and head), the data and every setting outside RESUMABLE_CHANGES."""
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    recipe = attached_recipe(model)
    return {
        "model": hashlib.sha256(shapes.encode()).hexdigest()[:16],
        "source": getattr(recipe, "source", None),
        "r": (getattr(recipe, "options", None) or {}).get("r"),
        "data": {
            "classes": list(data.classes),
            "train": data.train_size,
            "val": data.val_size,
            "image_size": data.image_size,
            "normalization": list(data.normalization),
        },
        **{k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES},
    }


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume(state: dict[str, Any], model: nn.Module, data: DataSplits, config: FinetuneConfig, path: Path) -> None:
    """Refuse, in one line listing every difference, to resume a run with another model, data or settings."""
    saved, now = state["run"], run_fingerprint(model, data, config)
    differences = [f"{k}: {_describe(saved.get(k))} -> {_describe(now[k])}" for k in now if saved.get(k) != now[k]]
    completed = state["epoch"] + 1
    if config.epochs < completed:
        differences.append(f"epochs: {completed} already done, {config.epochs} asked for")
    if differences:
        raise ResumeMismatchError(
            f"{path}: cannot resume this run with other settings ({'; '.join(differences)}); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change (epochs only upward)"
        )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A fine-tuning checkpoint, read without running code; a damaged or foreign file is one ArtifactError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ArtifactError(
            f"{path}: cannot be read as a fine-tuning checkpoint ({one_line(err, 120)}); it is truncated, "
            "damaged or not se_inject's; start a new run in another --out"
        ) from None
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else ["everything"]
        raise ArtifactError(
            f"{path}: not an se_inject fine-tuning checkpoint (it lacks {', '.join(missing[:4])}); start a new run"
        )
    return state


def _model_epoch(out: Path) -> str | None:
    """The epoch tag of the model files in ``out`` (None: none there, or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(out / WEIGHTS_FILE), framework="pt") as handle:
            return (handle.metadata() or {}).get("se_inject_epoch")
    except Exception:
        return None


def _commit_epoch(
    model: nn.Module, out: Path, state: dict[str, Any], history: list[dict[str, Any]], weights: str
) -> None:
    """Write one epoch: model files and metrics first, then the checkpoint, which commits them.

    The model files carry the epoch and run they belong to; a run killed between the writes is
    repaired when it resumes (:func:`_repair_model_files`), so its model files are never stale.
    """
    try:
        if attached_recipe(model) is not None:
            epoch = {"se_inject_epoch": f"{state['run_id']}:{state['epoch']}"}
            write_model_files(model, out, extra_metadata=epoch, weights=weights)
        write_text_atomic(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        write_atomic(out / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
    except OSError as err:
        raise ArtifactError(f"{out}: cannot write epoch {state['epoch'] + 1}: {err.strerror or err}") from None
    except ArtifactError as err:  # the model files could not be written
        raise ArtifactError(f"{out}: cannot write epoch {state['epoch'] + 1}: {err}") from None
    except RuntimeError as err:  # torch.save's writer reports a full disk as "file write failed"
        raise ArtifactError(f"{out}: cannot write epoch {state['epoch'] + 1}: {one_line(err, 160)}") from None


def _repair_model_files(model: nn.Module, out: Path, state: dict[str, Any], weights: str) -> None:
    """After a kill between an epoch's writes: model files and metrics as the checkpoint says."""
    if attached_recipe(model) is None:
        return
    if _model_epoch(out) != f"{state['run_id']}:{state['epoch']}":
        _commit_epoch(model, out, state, state["history"], weights)


def _check_out(out: Path, resume: bool, force: bool) -> list[Path]:
    """Refuse an ``out`` this run may not write; the files of an earlier run or save there that starting
    over replaces (only se_inject's own: a folder holding anything else is refused)."""
    checkpoint = out / CHECKPOINT_FILE
    if resume:
        if not checkpoint.is_file():
            raise DataError(f"{checkpoint}: no checkpoint to resume from")
        return []
    if checkpoint.exists() and not force:
        raise DataError(
            f"{out} already holds a run; pass resume=True (CLI: --resume), force=True (--force) to start over, or choose another --out"
        )
    if os.path.lexists(out) and not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        marker = CHECKPOINT_FILE if checkpoint.is_file() else RECIPE_FILE  # a run, or a saved model
        check_target(out, force=force, owned=OWNED_FILES, marker=marker, what="--out")
        return [out / name for name in sorted(OWNED_FILES) if (out / name).is_file()]
    return []


def _start_over(out: Path, old: list[Path]) -> None:
    """Remove the earlier run's files: none of them may outlive the new run as if it had written them
    (a control run writes no model files, so an earlier retrofit's would be loaded from ``out``)."""
    for path in old:
        path.unlink(missing_ok=True)


def _loader_for(dataset: Any, config: FinetuneConfig, sampler: Any, epoch: int, world: int) -> DataLoader:
    """The training batches of ``epoch``: order a function of the seed and the epoch's number within its
    phase (:meth:`FinetuneConfig.data_epoch`), each sample's random augmentation a function of those and
    its index (:class:`SeededSamples`), whatever the model draws from the RNG in between; a last batch
    of a single image is dropped, since BatchNorm cannot normalise one value per channel in training."""
    per_process = len(dataset) // world if world > 1 else len(dataset)
    numbered = config.data_epoch(epoch)
    generator = torch.Generator().manual_seed(config.seed * 1000 + numbered)
    return DataLoader(
        SeededSamples(dataset, config.seed, numbered),
        batch_size=config.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        generator=generator if sampler is None else None,
        num_workers=config.workers,
        drop_last=per_process % config.batch_size == 1,
    )


def _check_data(data: DataSplits, world: int) -> None:
    if data.train_size < 2 * world:
        raise DataError(
            f"the training set holds {data.train_size} image(s): too few to train on ({2 * world} at least)"
        )
    if data.val_size < 1:
        raise DataError("the validation set is empty: accuracy cannot be measured")


START_DROP = 0.01  # a drop of accuracy right after injection, on the same images, that says the start broke it


def _chance(data: DataSplits) -> tuple[float, int]:
    """(the share of the validation set's most frequent class, the validation set's size)."""
    labels = data.val_labels()
    return max(labels.count(c) for c in set(labels)) / len(labels), len(labels)


def _at_chance(accuracy: float, data: DataSplits) -> bool:
    """Whether ``accuracy`` is no better than guessing the most frequent class (2 standard errors)."""
    chance, n = _chance(data)
    return accuracy <= chance + 2 * math.sqrt(chance * (1 - chance) / n)


def _start_warning(
    before: float | None, after: float | None, identity: bool, data: DataSplits
) -> tuple[str, type[Warning]] | None:
    """What the accuracy before and right after injection says before any training: an untrained
    backbone, a trained one the units' start broke, or neither (None). ``identity``: the units start as
    the identity, so the accuracy right after injection is the backbone's."""
    if after is None:
        return None
    chance = f"{_chance(data)[0]:.1%}"
    if before is not None and not _at_chance(before, data):
        # the same images before and after: a drop of more than a point (and two images) is the start's doing
        if after < before - max(START_DROP, 2 / _chance(data)[1]):
            return (
                f"the units' start changed the trained model: {before:.1%} before injection, {after:.1%} right after "
                "(they do not start as the identity); fine-tuning must first win that back: init='preserve' "
                "(--init preserve) starts them as the identity",
                StartChangedModelWarning,
            )
        return None
    if not _at_chance(before if before is not None else after, data):
        return None
    if before is None and not identity:
        return (
            f"the model scores {after:.1%} right after injection, no better than chance ({chance}), and its units do "
            "not start as the identity: either their start broke a trained backbone or the backbone is untrained; "
            "give the original (a model to inject, not a saved retrofit) or inject with init='preserve' to tell",
            StartChangedModelWarning,
        )
    return (
        f"the model scores {(before if before is not None else after):.1%} before fine-tuning, no better than "
        f"chance ({chance}): its backbone is untrained, so the SE-only phase has nothing to recalibrate (every "
        "gate stays at its start); start from trained weights (--checkpoint FILE)",
        UntrainedModelWarning,
    )


# --- the run ------------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    data: DataSplits,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    original: nn.Module | None = None,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = False,
    console: Any = None,
    control: bool = False,
    distributed: bool = True,
) -> FinetuneResult:
    """Fine-tune an injected ``model`` (in place) on ``data``, writing checkpoints, metrics and the model to ``out``.

    ``original`` (the model before injection) adds "before retrofit" to the accuracy table; it is
    evaluated on a copy and never changed. Resuming needs ``out`` to hold a checkpoint of the same
    run: another model, data or setting is refused (:data:`RESUMABLE_CHANGES` may differ). An
    existing ``out`` holding a saved model or run is started over only with ``force``.
    ``control`` marks an experiment's control arm, a model without units trained on the retrofit
    arms' schedule: its SE phase trains what theirs trains besides the units (a resized head), or
    nothing, and such epochs are recorded with ``trained: false``. With ``distributed=False`` this
    process trains alone even under torchrun (an experiment spreads its runs over the processes).

    Example::

        model = se_inject.inject(se_inject.load_model("resnet18", num_classes=10), r=16)
        result = se_inject.finetune(model, se_inject.load_data("digits"), "runs/digits", FinetuneConfig(epochs=3))
        result.accuracy   # {'before retrofit': None, 'after injection': ..., 'after fine-tuning': ...}
    """
    config = config or FinetuneConfig()
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config: expected a FinetuneConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module) or (original is not None and not isinstance(original, nn.Module)):
        raise InvalidModelError("model and original: expected nn.Module objects")
    rank, world = rank_and_world() if distributed else (0, 1)
    device = resolve_device(config.device)
    out = as_path(out, "out")
    old = _check_out(out, resume, force)
    _check_data(data, world)
    if config.se_epochs and not se_parameters(model) and not control:
        raise ConfigError("se_epochs: the model holds no SE units to train on their own; set se_epochs=0")
    state = read_checkpoint(out / CHECKPOINT_FILE) if resume else None
    with _restored_flags(model):
        return _run(model, data, out, config, original, state, rank, world, device, show_progress, console, old)


@dataclass
class _Run:
    """What the steps of one fine-tuning run share."""

    model: nn.Module
    data: DataSplits
    out: Path
    config: FinetuneConfig
    device: torch.device
    rank: int
    world: int
    head_params: list[nn.Parameter]
    val_loader: DataLoader
    cuda_opts: dict[str, bool]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy: dict[str, float | None] = field(
        default_factory=lambda: {"before retrofit": None, "after injection": None, "after fine-tuning": None}
    )
    notes: list[str] = field(default_factory=list)
    # the units' weights at the start of the run (by unit, then tensor), to measure how far they moved
    start_units: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.val_loader, self.device, **self.cuda_opts)

    def movement(self) -> MovementReport | None:
        """How far the units moved from their start, on the first validation images; None without units."""
        if not self.start_units:
            return None
        return movement_from_start(self.model, self.start_units, probe_images(self.data.val).to(self.device))


def _prepare(model, data, out, config, state, rank, world, device, old: list[Path]) -> _Run:
    """Seed, fit the head, check a resumed run against its checkpoint, clear an earlier run's files
    (``old``) and place the model."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    head_params = fit_head(model, data.num_classes, config.head)
    if state is not None:
        check_resume(state, model, data, config, out / CHECKPOINT_FILE)
    if rank == 0:
        _start_over(out, old)
        out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)
    val_loader = validation_loader(data.val, config)
    cuda_opts = evaluation_options(config, device)
    return _Run(model, data, out, config, device, rank, world, head_params, val_loader, cuda_opts)


def _resume(run: _Run, state: dict[str, Any]) -> int:
    """Continue from ``state``: weights, history and run identity; the model files repaired. The next epoch."""
    run.model.load_state_dict(state["model"])
    run.history, run.accuracy, run.run_id = state["history"], state["accuracy"], state["run_id"]
    run.start_units = state.get("start_units", {})  # a checkpoint of an earlier version has none
    if run.rank == 0:
        _repair_model_files(run.model, run.out, state, run.config.save_weights)
    return state["epoch"] + 1


def _measure_start(run: _Run, original: nn.Module | None) -> None:
    """Accuracy before the retrofit (on a copy of ``original``) and right after injection; the chance warning."""
    if original is not None:
        reference = copy.deepcopy(original)  # the user's original keeps its head, device and flags
        if fit_head(reference, run.data.num_classes, run.config.head):  # the same new head on both
            found = classifier(run.model, run.config.head)
            assert found is not None  # fit_head found it
            reference.set_submodule(found[0], copy.deepcopy(found[1]))
        run.accuracy["before retrofit"] = run.evaluate(reference.to(run.device))[1]
    run.accuracy["after injection"] = run.evaluate(run.model)[1]
    start = unit_snapshot(run.model)
    run.start_units = {name: {k: v.cpu() for k, v in unit.state_dict().items()} for name, unit in start.items()}
    # a new head scores at chance whatever the backbone: nothing can be told from the accuracy then
    if not run.head_params:
        identity = all(u.starts_as_identity for u in start.values())
        said = _start_warning(run.accuracy["before retrofit"], run.accuracy["after injection"], identity, run.data)
        if said is not None and (said[1] is not UntrainedModelWarning or run.config.se_epochs):
            run.notes.append(said[0])
            warnings.warn(said[0], said[1], stacklevel=4)


def _begin_phase(run: _Run, phase: str, epoch: int, state: dict[str, Any] | None):
    """Which parameters train, the optimizer and schedule of ``phase`` (restored from ``state`` when
    the run resumes inside it), the RNG of a resumed run, and DDP around the model."""
    config, model = run.config, run.model
    trainable = se_parameters(model) + run.head_params if phase == "se" else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(phase == "full")
    for p in trainable:
        p.requires_grad_(True)
    lr = config.lr if phase == "se" else config.lr * config.full_lr_scale
    optimizer = _make_optimizer(config, trainable, lr, {id(p) for p in se_parameters(model)})
    scheduler = _make_scheduler(config, optimizer, config.phase_epochs(phase))
    if state is not None and state["phase"] == phase and state["epoch"] + 1 == epoch:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the schedule, not the stored rate, sets this epoch's rate: with more epochs the phase's
        # schedule is longer (the same formula and value when nothing changed)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(scheduler.last_epoch)
    if state is not None:
        _set_rng_state(state["rng"])
    # DDP registers the parameters that require grad when it is built
    ddp: nn.Module = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    return optimizer, scheduler, ddp


def _checkpoint(run: _Run, optimizer, scheduler, epoch: int, phase: str) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "epoch": epoch,
        "phase": phase,
        "history": run.history,
        "accuracy": run.accuracy,
        "config": asdict(run.config),
        "run": run_fingerprint(run.model, run.data, run.config),
        "run_id": run.run_id,
        "start_units": run.start_units,
    }


def _run(model, data, out, config, original, state, rank, world, device, show_progress, console, old) -> FinetuneResult:
    run = _prepare(model, data, out, config, state, rank, world, device, old)
    start_epoch = 0
    if state is not None:
        start_epoch = _resume(run, state)
    else:
        _measure_start(run, original)
    train_sampler: DistributedSampler | None = (
        DistributedSampler(data.train, world, rank, shuffle=True, seed=config.seed) if world > 1 else None
    )
    current_phase = None
    movement: MovementReport | None = None
    for epoch in range(start_epoch, config.epochs):
        phase = config.phase(epoch)
        if phase != current_phase:
            optimizer, scheduler, ddp = _begin_phase(run, phase, epoch, state)
            state, current_phase = None, phase
        if train_sampler is not None:
            train_sampler.set_epoch(config.data_epoch(epoch))
        loader = _loader_for(data.train, config, train_sampler, epoch, world)
        title = f"epoch {epoch + 1}/{config.epochs} ({phase})"
        if any(p.requires_grad for p in model.parameters()):
            with _progress(show_progress and rank == 0, console, title, data.train_size // world) as progress:
                metrics = _train_epoch(ddp, loader, optimizer, device, config, phase, progress, epoch)
        else:  # a control arm's SE phase with its head kept: nothing to train (see finetune's control)
            metrics = _IDLE_EPOCH
        lr_used = optimizer.param_groups[0]["lr"]
        if metrics["trained"]:  # an idle phase has no schedule to follow
            scheduler.step()
        val_loss, val_acc = run.evaluate(model)
        movement = run.movement()
        run.history.append(
            {
                "epoch": epoch + 1,
                "phase": phase,
                **metrics,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr_used,
                "world_size": world,
                "device": str(device),
                # the share of units out of the identity band, and the mean movement per stage
                "units_learned": movement.learned if movement else None,
                "unit_movement": {str(k): v for k, v in movement.by_stage().items()} if movement else None,
            }
        )
        run.accuracy["after fine-tuning"] = val_acc
        if rank == 0:
            checkpoint = _checkpoint(run, optimizer, scheduler, epoch, phase)
            _commit_epoch(model, out, checkpoint, run.history, run.config.save_weights)
        if world > 1:
            dist.barrier()
    if movement is None:  # no epoch ran (a resumed run already complete): measured here, once
        movement = run.movement()
    warning = movement.warning() if movement else None
    if warning:
        run.notes.append(warning)
        warnings.warn(warning, UnitsDidNotLearnWarning, stacklevel=3)
    return FinetuneResult(model, run.history, run.accuracy, out, run.notes, movement)


@contextlib.contextmanager
def _progress(enabled: bool, console: Any, title: str, total: int):
    if not enabled:
        yield lambda *args: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(title, total=total, stats="")

        def advance(n: int, loss: float, acc: float, speed: float) -> None:
            bar.update(task, advance=n, stats=f"loss {loss:.3f}  acc {acc:.1%}  {speed:,.0f} img/s")

        yield advance
