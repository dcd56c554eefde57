"""Controlled retrofit experiments: does SE help this model on this data?

A retrofit's accuracy means little without a control. :func:`experiment` takes a trained model (or
first trains it for a stated budget), then fine-tunes

- a **control** arm: the same model without units, on exactly the retrofit arms' schedule, and
- **retrofit** arms: positions, r values, units, starts (``init``), styles, block selections, and
  how the units are fine-tuned (their learning rate, an SE-only phase of their own: :data:`ARM_TUNING`),

each once per seed. Arm and control with one seed see the same data order (a function of the seed
and epoch), the same augmentation (each sample's drawn under RNGs seeded from seed, epoch and index)
and the same new head; the runs record a digest of every batch they were fed and the result says
whether the arms' digests equal the control's. Per arm it reports the accuracy over seeds (mean,
standard deviation), the difference to the control paired by seed with a t interval, the cost
(weights, FLOPs, inference and training-step time over the base's, measured interleaved by
:func:`se_inject.measure.compare`), how far the units moved from their start (the share out of the
identity band) and, given the original task's validation data, how much of it was forgotten.

Every run is a :func:`~se_inject.train.finetune.finetune` run in its own directory, checkpointed
every epoch; ``experiment.json`` records each finished run. ``resume=True`` continues a killed
experiment where it stopped: finished runs are read back, the interrupted one resumes from its
checkpoint, bit for bit; arms and seeds may be added then (only the new runs train), nothing else
may differ (the refusal names the field).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import nn

from se_inject.api import retrofit
from se_inject.errors import ConfigError, DataError, InvalidModelError, SEInjectError, first_line
from se_inject.io.files import as_path, write_text_atomic
from se_inject.io.heads import classifier
from se_inject.io.layout import CHECKPOINT_FILE, EXPERIMENT_FILE, RECORD_FILE
from se_inject.measure.bench import Spread
from se_inject.measure.compare import Candidate, compare, label_of
from se_inject.measure.compare import candidates as option_candidates
from se_inject.runtime import rank_and_world, resolve_device
from se_inject.train.config import ARM_TUNING, ExperimentConfig, FinetuneConfig
from se_inject.train.data import DataSplits
from se_inject.train.finetune import (
    evaluate,
    evaluation_options,
    finetune,
    run_fingerprint,
    validation_loader,
)
from se_inject.train.records import RunRecord, check_out, read_record, read_state, remove_experiment, spec_digest
from se_inject.train.stats import Summary, paired_difference

CONTROL = "control"


@dataclass(frozen=True)
class Arm:
    """One arm: a label, the injection options (``se_inject.inject``'s keywords; ``None`` for the control)
    and the fine-tuning settings of its own (:data:`ARM_TUNING`) over the experiment's."""

    label: str
    options: dict[str, Any] | None
    tuning: dict[str, Any] | None = None

    @property
    def is_control(self) -> bool:
        return self.options is None

    def finetune_config(self, shared: FinetuneConfig) -> FinetuneConfig:
        """The experiment's settings with this arm's own; an arm's ``se_epochs`` comes before the shared
        full phase (``epochs`` grows by the difference), so every arm trains everything equally long.

        Examples:
            >>> Arm("se", {}, {"se_epochs": 2}).finetune_config(FinetuneConfig(epochs=3, se_epochs=1)).epochs
            4
        """
        own = dict(self.tuning or {})
        phase = own.get("se_epochs")
        if isinstance(phase, int) and not isinstance(phase, bool) and phase >= 0:  # else FinetuneConfig refuses it
            own["epochs"] = shared.epochs - shared.se_epochs + phase
        return replace(shared, **own) if own else shared


def arms(
    *,
    positions: Sequence[str] = (),
    rs: Sequence[int] = (),
    units: Sequence[str] = (),
    inits: Sequence[str] = (),
    styles: Sequence[str] = (),
    unit_lr_scales: Sequence[float] = (),
    se_epochs: Sequence[int] = (),
    candidates: Sequence[Mapping[str, Any]] = (),
    base: Mapping[str, Any] | None = None,
) -> list[Arm]:
    """The control, then every combination of the values given (an axis left empty keeps the default),
    then each of ``candidates``; with nothing given, one arm with the default retrofit. The injection
    axes build the units; ``unit_lr_scales`` and ``se_epochs`` vary how each is fine-tuned, and a
    candidate may hold those settings (:data:`ARM_TUNING`) beside its injection options.

    Examples:
        >>> [a.label for a in arms(inits=["preserve", "paper"])]
        ['control', 'init=preserve', 'init=paper']
        >>> [a.label for a in arms(unit_lr_scales=[1, 100], candidates=[{"init": "zero"}])]
        ['control', 'unit_lr_scale=1', 'unit_lr_scale=100', 'init=zero']
    """
    found = [Arm(CONTROL, None)]
    tuning_axes = [(name, list(v)) for name, v in (("unit_lr_scale", unit_lr_scales), ("se_epochs", se_epochs)) if v]
    settings = [dict(zip((n for n, _ in tuning_axes), c, strict=True)) for c in product(*(v for _, v in tuning_axes))]
    if any((positions, rs, units, inits, styles, tuning_axes)) or not candidates:  # nothing given: the default
        built = option_candidates(positions=positions, rs=rs, units=units, inits=inits, styles=styles, base=base)
        for candidate, own in product(built, settings):
            label = " ".join(part for part in (candidate.label, label_of(own)) if part and part != "default")
            found.append(Arm(label or "default", candidate.options, own or None))
    for given in candidates:
        own = {k: v for k, v in given.items() if k in ARM_TUNING}
        options = {k: v for k, v in given.items() if k not in ARM_TUNING}
        found.append(Arm(label_of(given), {**(base or {}), **options}, own or None))
    return found


@dataclass
class ArmResult:
    """One arm over all seeds. Accuracies are fractions; the difference is to the control, seed by seed."""

    label: str
    options: dict[str, Any] | None
    seeds: list[int]
    accuracies: list[float]
    accuracy: Summary
    start_accuracy: Summary
    difference: Summary | None  # None for the control
    same_data: bool  # every epoch both trained was fed the same batches as the control's
    seconds: float  # training time, all seeds
    tuning: dict[str, Any] | None = None  # the arm's own fine-tuning settings (Arm.tuning)
    params_added: int = 0
    params_increase: float = 0.0
    flops_increase: float = 0.0
    latency: Spread | None = None  # inference time over the base's at ExperimentConfig.latency_batch
    training: Spread | None = None  # a training step's time over the base's, measured with the latency
    units_learned: Summary | None = None  # the share of units out of the identity band at the end, over seeds
    unit_movement: dict[str, float] | None = None  # stage -> movement of its units from their start, mean of seeds
    reference_accuracy: Summary | None = None
    forgetting: Summary | None = None  # base accuracy on the reference set minus the arm's, per seed
    error: str | None = None  # the arm could not be injected


@dataclass
class ExperimentResult:
    """The control and the arms. ``to_dict()`` is the JSON form; :meth:`verdicts` says what the seeds show."""

    model: str
    device: str
    seeds: list[int]
    level: float
    base_accuracy: float | None  # None: the base's head had another number of classes
    base_reference_accuracy: float | None
    latency_batch: int
    arms: list[ArmResult]
    out: Path
    finetune: dict[str, Any]
    seconds: float

    @property
    def control(self) -> ArmResult:
        return self.arms[0]

    def verdicts(self) -> list[str]:
        """One line per retrofit arm: its difference to the control and whether the seeds resolve it."""
        lines = []
        n = len(self.seeds)
        for arm in self.arms[1:]:
            if arm.error is not None or arm.difference is None:
                continue
            d = arm.difference
            text = f"{arm.label}: {100 * d.mean:+.2f} points vs the control"
            if d.low is None or d.high is None:
                lines.append(text + " (one seed: no interval; run more seeds)")
            elif d.std == 0 and d.mean == 0:
                lines.append(f"{arm.label}: the control's accuracy with every one of the {n} seeds")
            elif d.excludes_zero:
                better = "better" if d.mean > 0 else "worse"
                lines.append(text + f", {self.level:.0%} interval [{100 * d.low:+.2f}, {100 * d.high:+.2f}]: {better}")
            else:
                lines.append(
                    text + f", {self.level:.0%} interval [{100 * d.low:+.2f}, {100 * d.high:+.2f}] includes 0: "
                    f"{n} seeds do not resolve a difference"
                )
            if not arm.same_data:
                lines.append(
                    f"{arm.label}: WARNING its batches differed from the control's: the comparison is not paired"
                )
        return lines

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["verdicts"] = self.verdicts()
        return data


# --- the experiment's file --------------------------------------------------------------------------


def _weights_digest(model: nn.Module) -> str:
    """A digest of every tensor of ``model``: an experiment resumes only from the same base."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if not tensor.is_meta:
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _spec(
    model: nn.Module, data: DataSplits, chosen: list[Arm], tuning: FinetuneConfig, config: ExperimentConfig
) -> dict:
    """What a resumed experiment must share with the one in ``out``."""
    fingerprint = run_fingerprint(model, data, tuning)
    return {
        "model": fingerprint["model"],
        "weights": _weights_digest(model),
        "data": fingerprint["data"],
        "finetune": {k: v for k, v in asdict(tuning).items() if k not in ("seed", "workers", "device")},
        "experiment": {k: v for k, v in asdict(config).items() if k not in ("latency_repeats", "seeds")},
        "arms": [{"label": a.label, "options": a.options, "tuning": a.tuning} for a in chosen],
        "seeds": list(config.seeds),
    }


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)[:80] or "arm"


def _run_dir(out: Path, arm: Arm, index: int, seed: int) -> Path:
    return out / "runs" / f"{index:02d}_{_slug(arm.label)}" / f"seed{seed}"


# --- running ------------------------------------------------------------------------------------------


def _check_inputs(model: object, data: object, reference: object) -> None:
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"model: expected an nn.Module (build one with se_inject.load_model), got {type(model).__name__}"
        )
    for name, value in (("data", data), ("reference", reference)):
        if not isinstance(value, DataSplits) and (name == "data" or value is not None):
            raise DataError(f"{name}: expected the data as se_inject.load_data returns it, got {type(value).__name__}")


def _check_tuning(arm: Arm, shared: FinetuneConfig) -> None:
    """An arm's own settings: only :data:`ARM_TUNING`, the control none, each checked as FinetuneConfig checks it."""
    if arm.tuning is None:
        return
    if not isinstance(arm.tuning, Mapping) or arm.is_control:
        raise ConfigError(f"arms: arm {arm.label!r}: tuning must map settings to values, and the control has none")
    unknown = sorted(set(arm.tuning) - set(ARM_TUNING))
    if unknown:
        raise ConfigError(
            f"arms: arm {arm.label!r}: {unknown[0]!r} is not a setting an arm may change (one of {', '.join(ARM_TUNING)})"
        )
    try:
        arm.finetune_config(shared)
    except ConfigError as err:
        raise ConfigError(f"arms: arm {arm.label!r}: {err}") from None


def _check_arms(chosen: Sequence[Arm], shared: FinetuneConfig) -> list[Arm]:
    if isinstance(chosen, (str, bytes, Mapping)) or not isinstance(chosen, Sequence):
        raise ConfigError(f"arms: expected a list of arms made by se_inject.arms(), got {type(chosen).__name__}")
    chosen = list(chosen)
    for arm in chosen:
        if not isinstance(arm, Arm):
            raise ConfigError(f"arms: expected arms made by se_inject.arms(), got {arm!r:.60}")
        if arm.options is not None and (
            not isinstance(arm.options, Mapping) or not all(isinstance(k, str) for k in arm.options)
        ):
            raise ConfigError(
                f"arms: arm {arm.label!r}: options must map option names to values, got {arm.options!r:.60}"
            )
    for arm in chosen:
        _check_tuning(arm, shared)
    if not chosen or not chosen[0].is_control:
        raise ConfigError("arms: the first arm must be the control (options None); build them with se_inject.arms()")
    if not any(not a.is_control for a in chosen):
        raise ConfigError("arms: nothing but the control; give positions, r values, units, inits, styles or candidates")
    labels = [a.label for a in chosen]
    if len(set(labels)) != len(labels) or any(a.is_control for a in chosen[1:]):
        raise ConfigError(f"arms: expected one control and distinct labels, got {labels}")
    return chosen


@dataclass(frozen=True)
class _Pending:
    """A run still to do: an arm with a seed, in its directory."""

    key: str  # "LABEL|SEED" in experiment.json
    arm: Arm
    seed: int
    directory: Path


def _accuracy(model: nn.Module, data: DataSplits, tuning: FinetuneConfig, device: torch.device) -> float:
    """``model``'s accuracy on ``data``'s validation set, evaluated as a fine-tuning run evaluates."""
    return evaluate(model, validation_loader(data.val, tuning), device, **evaluation_options(tuning, device))[1]


def experiment(
    model: nn.Module,
    data: DataSplits,
    out: str | Path,
    arms: Sequence[Arm],
    finetune_config: FinetuneConfig | None = None,
    config: ExperimentConfig | None = None,
    *,
    reference: DataSplits | None = None,
    model_name: str | None = None,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = False,
    console: Any = None,
    on_run: Callable[[str, int, RunRecord], None] | None = None,
) -> ExperimentResult:
    """Fine-tune a control and retrofit ``arms`` of ``model`` on ``data``, each once per seed; compare.

    ``model`` is trained (or trained first for ``config.base_epochs``) and never changed: every run
    starts from a copy. Every arm is injected before anything trains, so a bad arm stops the
    experiment at once; each run is a fine-tuning run in ``out/runs/ARM/seedN``. ``reference`` is the
    original task's data: each final model is scored on its validation set (forgetting).
    ``on_run(label, seed, record)`` is called after each run.

    Example::

        data = se_inject.load_data("digits")
        chosen = se_inject.arms(inits=["preserve", "paper", "zero"])
        result = se_inject.experiment(model, data, "runs/exp", chosen, FinetuneConfig(epochs=2, se_epochs=0))
        result.verdicts()   # ['init=preserve: +0.31 points vs the control, 95% interval [-0.4, +1.0] includes 0: ...']
    """
    tuning = finetune_config or FinetuneConfig()
    config = config or ExperimentConfig()
    if not isinstance(tuning, FinetuneConfig) or not isinstance(config, ExperimentConfig):
        raise ConfigError("finetune_config and config: expected a FinetuneConfig and an ExperimentConfig")
    _check_inputs(model, data, reference)
    chosen = _check_arms(arms, tuning)
    out = as_path(out, "out", DataError)
    state_path = out / EXPERIMENT_FILE
    replaced = check_out(out, resume, force)
    if reference is not None and reference.num_classes != data.num_classes:
        raise ConfigError(
            f"reference: the original task's data has {reference.num_classes} classes and the fine-tuning data "
            f"{data.num_classes}; forgetting is measured with one head, so they must match"
        )
    started = time.perf_counter()
    rank, world = rank_and_world()
    base = copy.deepcopy(model).cpu()
    costs = _inject_all(base, chosen, data, model_name, tuning.head)
    spec = _spec(base, data, chosen, tuning, config)
    digest = spec_digest(spec)
    state: dict[str, Any] = {"spec": spec, "runs": {}, "base": {}, "latency": {}, "training": {}}
    if resume:  # the arms it had keep their places (and folders); those added follow
        state = read_state(state_path, spec, {a.label: a.finetune_config(tuning).epochs for a in chosen})
        had = [a["label"] for a in state["spec"].get("arms", [])]
        chosen = sorted(chosen, key=lambda a: had.index(a.label) if a.label in had else len(had))
        spec = state["spec"] = _spec(base, data, chosen, tuning, config)
    # everything is checked: only now is anything written (a forced start first removes the old experiment)
    if rank == 0:
        remove_experiment(out, replaced)
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        torch.distributed.barrier()

    def save() -> None:  # the first process alone writes the experiment's file
        if rank == 0:
            write_text_atomic(state_path, json.dumps(state, indent=1))

    save()
    device = resolve_device(tuning.device)
    base = _trained_base(base, data, out, tuning, config, resume, force, show_progress, console)
    if "accuracy" not in state["base"]:
        state["base"] = _score_base(base, data, reference, tuning, device)
        save()
    pending = [
        _Pending(key, arm, seed, _run_dir(out, arm, index, seed))
        for index, arm in enumerate(chosen)
        if "error" not in costs.get(arm.label, {})
        for seed in config.seeds
        if (key := f"{arm.label}|{seed}") not in state["runs"]
    ]
    runs = _Runs(base, data, reference, tuning, model_name, digest, resume, show_progress and rank == 0, console)
    _train_runs(runs, pending, state, save, on_run)
    unmeasured = [a for a in chosen[1:] if "error" not in costs[a.label] and a.label not in state["latency"]]
    if config.latency_batch and unmeasured and rank == 0:
        _measure_time(state, base, unmeasured, data, config, tuning, model_name)
        save()
    return _result(state, chosen, costs, config, tuning, model_name or type(model).__name__, str(device), out, started)


@dataclass
class _Runs:
    """What every run of an experiment shares."""

    base: nn.Module
    data: DataSplits
    reference: DataSplits | None
    tuning: FinetuneConfig
    model_name: str | None
    digest: str
    resume: bool
    show_progress: bool
    console: Any


def _train_runs(
    runs: _Runs,
    pending: list[_Pending],
    state: dict[str, Any],
    save: Callable[[], None],
    on_run: Callable[[str, int, RunRecord], None] | None,
) -> None:
    """Train this process's share of ``pending`` (under torchrun each process takes every world-th run
    and trains it alone, one GPU per process), recording each; then read what the others finished."""
    rank, world = rank_and_world()
    mine = pending[rank::world]
    for number, run in enumerate(mine, 1):
        epochs = run.arm.finetune_config(runs.tuning).epochs
        record = read_record(run.directory, runs.digest, epochs) if runs.resume else None
        if record is None:
            if runs.show_progress and runs.console is not None:  # which run the bars below belong to
                runs.console.print(f"[bold]{run.arm.label}[/], seed {run.seed} (run {number} of {len(mine)})")
            again = runs.resume and (run.directory / CHECKPOINT_FILE).is_file()
            record = _run_arm(
                runs.base,
                run,
                again,
                runs.data,
                runs.tuning,
                runs.reference,
                runs.model_name,
                runs.show_progress,
                runs.console,
            )
            record.process, record.spec = rank, runs.digest
            write_text_atomic(run.directory / RECORD_FILE, json.dumps(asdict(record)))
        state["runs"][run.key] = asdict(record)
        save()
        if on_run is not None:
            on_run(run.arm.label, run.seed, record)
    if world > 1:  # every process reads what the others finished
        torch.distributed.barrier()
        for run in pending:
            found = read_record(run.directory, runs.digest, run.arm.finetune_config(runs.tuning).epochs)
            assert found is not None, run.directory  # written by the process that ran it, before the barrier
            state["runs"][run.key] = asdict(found)
        save()


def _score_base(base: nn.Module, data: DataSplits, reference: DataSplits | None, tuning, device) -> dict:
    """The base's accuracy on the data (and the reference data); ``None`` where it has no head, or one with
    another number of classes (each run then fits a new head, seeded as the run is)."""
    found = classifier(base, tuning.head)
    if found is None or found[1].out_features != data.num_classes:  # headless, or another task's head
        return {"accuracy": None, "reference_accuracy": None}
    scores: dict[str, float | None] = {"reference_accuracy": None}
    scores["accuracy"] = _accuracy(copy.deepcopy(base).to(device), data, tuning, device)
    if reference is not None:
        scores["reference_accuracy"] = _accuracy(copy.deepcopy(base).to(device), reference, tuning, device)
    return scores


def _inject_all(
    base: nn.Module, chosen: list[Arm], data: DataSplits, model_name: str | None, head: str | None
) -> dict[str, dict]:
    """Every retrofit arm injected once, before anything trains: its cost, or its one-line error."""
    costs: dict[str, dict] = {}
    for arm in chosen[1:]:
        assert arm.options is not None
        try:
            report = retrofit(base, input_size=data.image_size, model_name=model_name, head=head, **arm.options).report
        except SEInjectError as err:
            costs[arm.label] = {"error": first_line(err)}
            continue
        totals = report.totals
        costs[arm.label] = {
            "params_added": totals.params_added,
            "params_increase": totals.params_increase,
            "flops_increase": totals.flops_increase,
        }
    if all("error" in c for c in costs.values()):
        raise ConfigError(f"arms: none could be injected: {next(iter(costs.values()))['error']}")
    return costs


def _trained_base(base, data, out, tuning, config, resume, force, show_progress, console) -> nn.Module:
    """The base every arm starts from: ``base`` itself, or after ``config.base_epochs`` of plain training
    (a fine-tuning run without units in ``out/base``, resumed like the arms' runs)."""
    if not config.base_epochs:
        return base
    base_dir = out / "base"
    trained = copy.deepcopy(base)
    base_tuning = replace(
        tuning, epochs=config.base_epochs, se_epochs=0, lr=config.base_lr, full_lr_scale=1.0, seed=config.base_seed
    )
    again = resume and (base_dir / CHECKPOINT_FILE).is_file()
    finetune(
        trained,
        data,
        base_dir,
        base_tuning,
        resume=again,
        force=not again,
        show_progress=show_progress,
        console=console,
    )
    return trained.cpu()


def _run_arm(base, run: _Pending, again, data, tuning, reference, model_name, show_progress, console) -> RunRecord:
    """One arm with one seed: a fine-tuning run in its directory, resumed from its checkpoint when ``again``."""
    arm, seed, run_dir = run.arm, run.seed, run.directory
    torch.manual_seed(seed)  # a unit's random start (init="paper") differs by seed
    model = copy.deepcopy(base)
    if arm.options is not None:
        model = retrofit(
            model, input_size=data.image_size, model_name=model_name, head=tuning.head, **arm.options
        ).model
    result = finetune(
        model,
        data,
        run_dir,
        replace(arm.finetune_config(tuning), seed=seed),
        resume=again,
        force=not again,
        show_progress=show_progress,
        console=console,
        control=arm.is_control,
        distributed=False,  # alone in its process, also under torchrun
    )
    trained = [h for h in result.history if h.get("trained", True)]
    # the speed of the epochs that train everything: the same work in every arm (an SE phase trains units only)
    timed = [h for h in trained if h["phase"] == "full"] or trained
    movement = result.movement
    reference_accuracy = None
    if reference is not None:
        device = resolve_device(tuning.device)
        reference_accuracy = _accuracy(model, reference, tuning, device)
    accuracy = result.accuracy["after fine-tuning"]
    assert accuracy is not None  # at least one epoch ran
    return RunRecord(
        accuracy=accuracy,
        start_accuracy=result.accuracy["after injection"] or 0.0,
        images_per_s=statistics.fmean(h["images_per_s"] for h in timed) if timed else None,
        seconds=sum(h["seconds"] for h in result.history),
        digests=[h.get("data_digest") for h in result.history],
        reference_accuracy=reference_accuracy,
        phases=[h["phase"] for h in result.history],
        units_learned=movement.learned if movement else None,
        unit_movement={str(k): v for k, v in movement.by_stage().items()} if movement else None,
    )


def _measure_time(state, base, unmeasured: list[Arm], data, config, tuning, model_name) -> None:
    """The inference time and a training step's time of each arm's model over the base's, measured
    interleaved by compare() at ``config.latency_batch`` (once per distinct model: arms that differ in
    their fine-tuning alone share it), into ``state``'s ``latency`` and ``training``."""
    keys = {arm.label: json.dumps(arm.options, sort_keys=True, default=str) for arm in unmeasured}
    models: dict[str, Candidate] = {}
    for arm in unmeasured:
        models.setdefault(keys[arm.label], Candidate(arm.label, dict(arm.options or {})))
    measured = compare(
        base,
        list(models.values()),
        model_name=model_name,
        batches=(config.latency_batch,),
        size=data.image_size,
        repeats=config.latency_repeats,
        train=True,
        device=resolve_device(tuning.device),
    )
    found = {r.label: r for r in measured.measured()}
    batch = config.latency_batch
    for arm in unmeasured:
        result = found.get(models[keys[arm.label]].label)
        if result is not None:
            for kind, spread in (("latency", result.latency[batch]), ("training", result.train[batch])):
                state[kind][arm.label] = [spread.median, spread.q1, spread.q3]


def _by_phase(record: RunRecord) -> dict[str, list[str | None]]:
    """A run's batch digests per phase, in order (a record of an earlier version: all in one)."""
    phases = record.phases or ["full"] * len(record.digests)
    found: dict[str, list[str | None]] = {"se": [], "full": []}
    for phase, digest in zip(phases, record.digests, strict=True):
        found[phase].append(digest)
    return found


def _same_data(arm: list[RunRecord], control: list[RunRecord]) -> bool:
    """Whether, seed by seed, every epoch both trained was fed the same batches (within each phase, so
    that an arm with another SE phase is compared in its full phase with the control's)."""
    for mine, theirs in zip(arm, control, strict=True):
        ours, its = _by_phase(mine), _by_phase(theirs)
        for phase in ("se", "full"):
            for a, b in zip(ours[phase], its[phase], strict=False):
                if a is not None and b is not None and a != b:
                    return False
    return True


def _mean_movement(per_seed: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each stage's movement, the mean over the seeds that measured it (None: the arm has no units)."""
    measured = [m for m in per_seed if m]
    stages = dict.fromkeys(stage for m in measured for stage in m)
    return {stage: statistics.fmean(m[stage] for m in measured if stage in m) for stage in stages} or None


def _result(state, chosen, costs, config, tuning, name, device, out, started) -> ExperimentResult:
    seeds = list(config.seeds)
    runs = {key: RunRecord(**value) for key, value in state["runs"].items()}
    control = [runs[f"{CONTROL}|{s}"] for s in seeds]
    base_reference = state["base"].get("reference_accuracy")
    results = []
    for arm in chosen:
        cost = costs.get(arm.label, {})
        if "error" in cost:
            empty = Summary(0, 0.0, None, None, None, config.level)
            results.append(
                ArmResult(
                    arm.label, arm.options, seeds, [], empty, empty, None, True, 0.0, arm.tuning, error=cost["error"]
                )
            )
            continue
        mine = [runs[f"{arm.label}|{s}"] for s in seeds]
        accuracies = [r.accuracy for r in mine]
        learned = [r.units_learned for r in mine if r.units_learned is not None]
        references = [r.reference_accuracy for r in mine if r.reference_accuracy is not None]
        latency, training = state["latency"].get(arm.label), state["training"].get(arm.label)
        results.append(
            ArmResult(
                arm.label,
                arm.options,
                seeds,
                accuracies,
                Summary.of(accuracies, config.level),
                Summary.of([r.start_accuracy for r in mine], config.level),
                None if arm.is_control else paired_difference(accuracies, [c.accuracy for c in control], config.level),
                _same_data(mine, control),
                sum(r.seconds for r in mine),
                arm.tuning,
                params_added=cost.get("params_added", 0),
                params_increase=cost.get("params_increase", 0.0),
                flops_increase=cost.get("flops_increase", 0.0),
                latency=Spread(*latency) if latency else None,
                training=Spread(*training) if training else None,
                units_learned=Summary.of(learned, config.level) if learned else None,
                unit_movement=_mean_movement([r.unit_movement for r in mine]),
                reference_accuracy=Summary.of(references, config.level) if references else None,
                forgetting=Summary.of([base_reference - v for v in references], config.level)
                if references and base_reference is not None
                else None,
            )
        )
    return ExperimentResult(
        name,
        device,
        seeds,
        config.level,
        state["base"]["accuracy"],
        base_reference,
        config.latency_batch,
        results,
        out,
        {k: v for k, v in asdict(tuning).items() if k != "seed"},
        time.perf_counter() - started,
    )


def plot(result: ExperimentResult, path: str | Path) -> Path:
    """Accuracy difference to the control (points, with the interval over seeds as error bars) against
    the added inference time where it was measured, else the added weights; one point per arm."""
    from se_inject.measure.compare import check_plot_target

    target = check_plot_target(path)
    from matplotlib.figure import Figure  # a bare Figure draws with Agg: pyplot's backend is left alone

    measured = [a for a in result.arms[1:] if a.error is None and a.difference is not None]
    by_latency = all(a.latency is not None for a in measured)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for arm in measured:
        d = arm.difference
        assert d is not None
        x: float = arm.params_added
        xerr = None
        if by_latency and arm.latency:  # the latency's interquartile range as horizontal bars
            x = 100 * (arm.latency.median - 1)
            xerr = [[x - 100 * (arm.latency.q1 - 1)], [100 * (arm.latency.q3 - 1) - x]]
        low = 100 * (d.mean - d.low) if d.low is not None else 0
        high = 100 * (d.high - d.mean) if d.high is not None else 0
        ax.errorbar([x], [100 * d.mean], yerr=[[low], [high]], xerr=xerr, fmt="o", capsize=4, label=arm.label)
    ax.axhline(0, color="grey", linewidth=1, linestyle="--")
    ax.margins(x=0.25, y=0.15)
    ax.legend(fontsize=8)
    ax.set_xlabel(f"added inference time at batch {result.latency_batch} (%)" if by_latency else "added weights")
    ax.set_ylabel(f"accuracy - control (points), {result.level:.0%} interval over {len(result.seeds)} seeds")
    ax.set_title(f"{result.model}: retrofit arms against the control")
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    return target
