"""How to fine-tune: :class:`FinetuneConfig`, validated once, each field with its help text.

Light on purpose (no torch): the command line builds its options from these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from se_inject.errors import ConfigError

# Settings a resumed run may change: they do not alter what the run computes (epochs may only grow:
# the phase in progress then follows its schedule over the new total).
RESUMABLE_CHANGES = ("epochs", "workers", "device", "amp", "channels_last", "save_weights")
# The fine-tuning settings an experiment's arm may set for itself: they change what the units learn, not
# what the control computes (a longer SE phase comes before the same full phase: FinetuneConfig.data_epoch).
ARM_TUNING = ("unit_optimizer", "unit_lr_scale", "unit_weight_decay", "unit_warmup_steps", "se_epochs")


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
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum, in [0, 1)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay (not on biases and norms)"})
    # The units' defaults come from the fine-tuning guide's experiment (docs/guides/finetune.md): the one
    # recipe tried under which the units left the identity band on both datasets without a resolved cost.
    unit_optimizer: Literal["same", "sgd", "adamw"] = field(
        default="adamw",
        metadata={
            "help": "the units' own optimizer (same: the run's): AdamW's steps do not shrink with the small "
            "gradients of units that start as the identity, where SGD's do"
        },
    )
    unit_lr_scale: float = field(
        default=0.1,
        metadata={
            "help": "the inserted units' learning rate, times the phase's, in both phases (with lr 0.05: AdamW at "
            "0.005 in the SE phase, 0.0005 in the full phase)"
        },
    )
    unit_weight_decay: float | None = field(
        default=None, metadata={"help": "weight decay of the units' weights (not their biases); default: weight_decay"}
    )
    unit_warmup_steps: int = field(
        default=0,
        metadata={"help": "the units' learning rate rises linearly from 0 over the run's first N steps (0: none)"},
    )
    schedule: Literal["step", "cosine"] = field(default="cosine", metadata={"help": "decay within each phase"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-entropy"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda when there is one"})
    amp: bool = field(default=True, metadata={"help": "mixed precision on CUDA (bf16 where supported)"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format on CUDA"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, shuffling and dropout"})
    workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    head: str | None = field(
        default=None,
        metadata={
            "help": "the classifier fitted to the dataset's classes, by module name (a Linear); default: the one "
            "the model declares (its recipe's, timm's get_classifier, a Linear named fc, classifier or head)"
        },
    )
    save_weights: Literal["all", "units"] = field(
        default="all",
        metadata={
            "help": "what the saved model holds: all weights, or units: only what the retrofit added or changed "
            "relative to its base (loaded onto that base: se_inject.load(DIR, base=...))"
        },
    )

    def __post_init__(self) -> None:
        for name, low in (
            ("epochs", 1),
            ("se_epochs", 0),
            ("batch_size", 1),
            ("seed", 0),
            ("workers", 0),
            ("unit_warmup_steps", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected a whole number, got {value!r}")
            if value < low:
                raise ConfigError(f"{name}: must be at least {low}, got {value}")
        if self.se_epochs > self.epochs:
            raise ConfigError(f"se_epochs: must be between 0 and epochs ({self.epochs}), got {self.se_epochs}")
        for name in ("lr", "full_lr_scale", "momentum", "weight_decay", "label_smoothing", "unit_lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        unit_decay = self.unit_weight_decay
        if unit_decay is not None and (
            isinstance(unit_decay, bool) or not isinstance(unit_decay, (int, float)) or not math.isfinite(unit_decay)
        ):
            raise ConfigError(f"unit_weight_decay: expected a finite number, got {unit_decay!r}")
        if unit_decay is not None and unit_decay < 0:
            raise ConfigError(f"unit_weight_decay: must be zero or positive, got {unit_decay}")
        for name in ("lr", "full_lr_scale", "unit_lr_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be zero or positive, got {self.weight_decay}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer: {self.optimizer!r} is not one of sgd, adamw")
        if self.unit_optimizer not in ("same", "sgd", "adamw"):
            raise ConfigError(f"unit_optimizer: {self.unit_optimizer!r} is not one of same, sgd, adamw")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"schedule: {self.schedule!r} is not one of step, cosine")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.head is not None and not (isinstance(self.head, str) and 0 < len(self.head) <= 1000):
            raise ConfigError(f"head: expected a module name such as 'fc', got {self.head!r}")
        if self.save_weights not in ("all", "units"):
            raise ConfigError(f"save_weights: {self.save_weights!r} is not one of all, units")
        for name in ("amp", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected True or False, got {getattr(self, name)!r}")

    def phase_epochs(self, phase: str) -> int:
        return self.se_epochs if phase == "se" else self.epochs - self.se_epochs

    def phase(self, epoch: int) -> str:
        return "se" if epoch < self.se_epochs else "full"

    def data_epoch(self, epoch: int) -> int:
        """The number the batches of ``epoch`` are drawn under: the full phase's epochs count from 0 and the
        SE phase's from -1 down, so runs with SE phases of different lengths (an experiment's ``se_epochs``
        axis) are fed the same batches in their full phases.

        Examples:
            >>> [FinetuneConfig(epochs=4, se_epochs=2).data_epoch(e) for e in range(4)]
            [-1, -2, 0, 1]
        """
        return -1 - epoch if epoch < self.se_epochs else epoch - self.se_epochs


@dataclass(frozen=True)
class ExperimentConfig:
    """How an experiment runs its arms, besides the fine-tuning each arm gets (a :class:`FinetuneConfig`
    shared by all arms; its ``seed`` is replaced by each of ``seeds``).

    Example::

        ExperimentConfig(seeds=(0, 1, 2, 3, 4), base_epochs=2, latency_batch=16)
    """

    seeds: tuple[int, ...] = field(
        default=(0, 1, 2, 3, 4), metadata={"help": "seeds: each arm runs once per seed, the control with the same ones"}
    )
    base_epochs: int = field(
        default=0,
        metadata={"help": "first train the given model this many epochs without units (0: it is already trained)"},
    )
    base_lr: float = field(default=0.05, metadata={"help": "learning rate of the base training"})
    base_seed: int = field(default=0, metadata={"help": "seed of the base training"})
    latency_batch: int = field(
        default=16, metadata={"help": "batch size at which each arm's inference time is measured (0: not measured)"}
    )
    latency_repeats: int = field(default=20, metadata={"help": "timed rounds of the latency measurement"})
    level: float = field(default=0.95, metadata={"help": "confidence level of the intervals over seeds"})

    def __post_init__(self) -> None:
        seeds = self.seeds
        if (
            not isinstance(seeds, tuple)
            or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
        ):
            raise ConfigError(f"seeds: expected a non-empty tuple of whole numbers, got {seeds!r}")
        if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds: expected distinct seeds from 0, got {list(seeds)}")
        for name, low in (("base_epochs", 0), ("base_seed", 0), ("latency_batch", 0), ("latency_repeats", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected a whole number of at least {low}, got {value!r}")
        if isinstance(self.base_lr, bool) or not isinstance(self.base_lr, (int, float)) or not self.base_lr > 0:
            raise ConfigError(f"base_lr: expected a positive number, got {self.base_lr!r}")
        if not 0 < self.level < 1:
            raise ConfigError(f"level: expected a confidence level between 0 and 1, got {self.level!r}")
