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
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from se_inject.data import DataSplits
from se_inject.errors import ConfigError, DataError
from se_inject.saving import recipe_of, write_model_files
from se_inject.unit import SqueezeExcite

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. ``epochs`` in all, the first ``se_epochs`` of them training SE units only.

    Example::

        FinetuneConfig(epochs=6, se_epochs=2, lr=0.05, optimizer="sgd", schedule="cosine")
    """

    epochs: int = field(default=3, metadata={"help": "epochs in all"})
    se_epochs: int = field(default=1, metadata={"help": "first epochs that train the SE units only"})
    batch_size: int = field(default=64, metadata={"help": "images per step (per process)"})
    lr: float = field(default=0.05, metadata={"help": "learning rate of the SE phase"})
    full_lr_scale: float = field(default=0.1, metadata={"help": "learning rate of the full phase, times lr"})
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata={"help": "sgd (momentum 0.9) or adamw"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (not on biases and norms)"})
    schedule: Literal["step", "cosine"] = field(default="cosine", metadata={"help": "decay within each phase"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda when there is one"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on CUDA (bf16 where supported)"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on CUDA"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, shuffling and dropout"})
    workers: int = field(default=0, metadata={"help": "data-loading worker processes"})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: need at least 1, got {self.epochs}")
        if not 0 <= self.se_epochs <= self.epochs:
            raise ConfigError(f"se_epochs: must be between 0 and epochs ({self.epochs}), got {self.se_epochs}")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("lr", "full_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: {self.optimizer!r} is not one of sgd, adamw")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"schedule: {self.schedule!r} is not one of step, cosine")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")

    def phase(self, epoch: int) -> str:
        return "se" if epoch < self.se_epochs else "full"


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one metrics object per epoch
    accuracy: dict[str, float | None]  # before retrofit, after injection, after fine-tuning
    out: Path


# --- distributed ---------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SE_INJECT_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        if backend == "gloo":  # processes share the CPU cores: no oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return dist.get_rank(), dist.get_world_size()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


# --- the model -----------------------------------------------------------------------------------

def se_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, SqueezeExcite) for p in m.parameters()]


def classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's classifier: timm's get_classifier(), else its last Linear layer."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    names = {id(m): name for name, m in model.named_modules()}
    if isinstance(head, nn.Linear) and id(head) in names:
        return names[id(head)], head
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def fit_head(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """Resize the classifier to ``num_classes`` if needed; the new head's parameters (to train)."""
    found = classifier(model)
    if found is None:
        raise ConfigError("the model has no Linear classifier to fit to the dataset's classes")
    name, head = found
    if head.out_features == num_classes:
        return []
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return list(new.parameters())


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norm scales
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(config: FinetuneConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    groups = _param_groups(params, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=lr)


def _make_scheduler(config: FinetuneConfig, optimizer: torch.optim.Optimizer, epochs: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(epochs * 2 / 3)), gamma=0.1)


@contextlib.contextmanager
def _frozen_norms(model: nn.Module, frozen: bool) -> Iterator[None]:
    """In the SE phase BatchNorm runs in eval mode: its statistics stay those of the trained model."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    for m in norms:
        m.eval()
    yield


# --- one epoch -----------------------------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False, channels_last: bool = False) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` over ``loader``, in eval mode (the flag is restored)."""
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp):
                logits = model(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    model.train(was_training)
    return loss_sum / max(total, 1), correct / max(total, 1)


def _train_epoch(model, loader, optimizer, device, config, phase, progress) -> dict[str, float]:
    model.train()
    with _frozen_norms(model, phase == "se"):
        seen, correct, loss_sum, start = 0, 0, 0.0, time.perf_counter()
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported())
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if device.type == "cuda" and config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.amp):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += labels.numel()
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            progress(labels.numel(), loss_sum / seen, correct / seen, seen / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / seconds if seconds else 0.0, "seconds": seconds}


# --- checkpoints ------------------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --- the run ------------------------------------------------------------------------------------------

def finetune(
    model: nn.Module,
    data: DataSplits,
    out: str | Path,
    config: FinetuneConfig | None = None,
    *,
    original: nn.Module | None = None,
    resume: bool = False,
    show_progress: bool = False,
    console: Any = None,
) -> FinetuneResult:
    """Fine-tune an injected ``model`` on ``data``, writing checkpoints, metrics and the model to ``out``.

    ``original`` (the model before injection, same head) adds "before retrofit" to the accuracy
    table. Resuming needs ``out`` to hold a checkpoint of the same run.

    Example::

        model = se_inject.inject(se_inject.load_model("resnet18", num_classes=10), r=16)
        result = se_inject.finetune(model, se_inject.load_data("digits"), "runs/digits", FinetuneConfig(epochs=3))
        result.accuracy   # {'before retrofit': None, 'after injection': ..., 'after fine-tuning': ...}
    """
    config = config or FinetuneConfig()
    rank, world = _distributed()
    device = resolve_device(config.device)
    out = Path(out)
    checkpoint_path, metrics_path = out / CHECKPOINT_FILE, out / METRICS_FILE
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if resume and not checkpoint_path.is_file():
        raise DataError(f"{checkpoint_path}: no checkpoint to resume from")
    if not resume and checkpoint_path.exists():
        raise DataError(f"{out} already holds a run; pass resume=True (CLI: --resume) or choose another --out")
    if config.se_epochs and not se_parameters(model):
        raise ConfigError("se_epochs: the model holds no SE units to train on their own; set se_epochs=0")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    head_params = fit_head(model, data.num_classes)
    if head_params and hasattr(model, "se_inject_recipe"):
        recipe = recipe_of(model)
        model.se_inject_recipe = replace(recipe, model_kwargs={**recipe.model_kwargs, "num_classes": data.num_classes})
    if original is not None and fit_head(original, data.num_classes):
        # the same new head on both, so "before retrofit" and "after injection" compare the bodies
        classifier(original)[1].load_state_dict(classifier(model)[1].state_dict())
    model.to(device)
    if device.type == "cuda" and config.channels_last:
        model.to(memory_format=torch.channels_last)

    train_sampler = DistributedSampler(data.train, world, rank, shuffle=True, seed=config.seed) if world > 1 else None
    val_loader = DataLoader(data.val, batch_size=config.batch_size * 2, num_workers=config.workers)
    cuda_opts = {"amp": config.amp, "channels_last": config.channels_last} if device.type == "cuda" else {}

    accuracy: dict[str, float | None] = {"before retrofit": None, "after injection": None, "after fine-tuning": None}
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        history, accuracy, start_epoch = state["history"], state["accuracy"], state["epoch"] + 1
    else:
        if original is not None:
            accuracy["before retrofit"] = evaluate(original.to(device), val_loader, device, **cuda_opts)[1]
        accuracy["after injection"] = evaluate(model, val_loader, device, **cuda_opts)[1]

    ddp: nn.Module = model
    optimizer = scheduler = None
    current_phase = None
    for epoch in range(start_epoch, config.epochs):
        phase = config.phase(epoch)
        if phase != current_phase:
            trainable = se_parameters(model) + head_params if phase == "se" else list(model.parameters())
            for p in model.parameters():
                p.requires_grad_(phase == "full")
            for p in trainable:
                p.requires_grad_(True)
            phase_epochs = config.se_epochs if phase == "se" else config.epochs - config.se_epochs
            lr = config.lr if phase == "se" else config.lr * config.full_lr_scale
            optimizer = _make_optimizer(config, trainable, lr)
            scheduler = _make_scheduler(config, optimizer, phase_epochs)
            if state is not None and state["phase"] == phase and state["epoch"] + 1 == epoch:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            if state is not None:
                _set_rng_state(state["rng"])
                state = None
            current_phase = phase
            if world > 1:  # DDP registers the parameters that require grad when it is built
                ddp = nn.parallel.DistributedDataParallel(model)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)  # shuffle order = f(seed, epoch)
        loader = DataLoader(
            data.train, batch_size=config.batch_size, sampler=train_sampler, shuffle=train_sampler is None,
            generator=generator if train_sampler is None else None, num_workers=config.workers, drop_last=False,
        )
        with _progress(show_progress and rank == 0, console, f"epoch {epoch + 1}/{config.epochs} ({phase})", len(loader.dataset) // world) as progress:
            metrics = _train_epoch(ddp, loader, optimizer, device, config, phase, progress)
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_loss, val_acc = evaluate(model, val_loader, device, **cuda_opts)
        record = {"epoch": epoch + 1, "phase": phase, **metrics, "val_loss": val_loss, "val_acc": val_acc,
                  "lr": lr_used, "world_size": world, "device": str(device)}
        history.append(record)
        accuracy["after fine-tuning"] = val_acc
        if rank == 0:  # checkpoint first: the metrics log is rewritten from its history
            _write_atomic(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "epoch": epoch, "phase": phase, "history": history, "accuracy": accuracy,
                 "config": asdict(config)},
                checkpoint_path,
            )
            tmp = metrics_path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
            os.replace(tmp, metrics_path)
            if hasattr(model, "se_inject_recipe"):
                write_model_files(model, out)
        if world > 1:
            dist.barrier()
    for p in model.parameters():
        p.requires_grad_(True)
    return FinetuneResult(model, history, accuracy, out)


@contextlib.contextmanager
def _progress(enabled: bool, console: Any, title: str, total: int):
    if not enabled:
        yield lambda *args: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
        TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(title, total=total, stats="")

        def advance(n: int, loss: float, acc: float, speed: float) -> None:
            bar.update(task, advance=n, stats=f"loss {loss:.3f}  acc {acc:.1%}  {speed:,.0f} img/s")

        yield advance
