"""What an experiment keeps on disk, and how it is read back without trusting it.

``OUT/experiment.json`` holds the experiment's specification (model, data, arms, settings) and every
finished run; each run also leaves ``record.json`` in its own folder. Both are data that may have been
edited, torn by a kill, or left by another experiment: :func:`read_state` and :func:`read_record`
check every field against this experiment's specification (every record carries its digest) and
refuse, naming the field, what does not fit. :func:`check_out` decides what a new start may do with
an existing ``OUT``, and lists the files a forced start replaces: only an experiment's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from se_inject.errors import DataError, ResumeMismatchError
from se_inject.io.files import read_text_file
from se_inject.io.layout import EXPERIMENT_FILE, OWNED_FILES, RECORD_FILE

MAX_EXPERIMENT_BYTES = 64 * 2**20
MAX_RECORD_BYTES = 2**20


@dataclass
class RunRecord:
    """What one finished run (an arm with a seed) left: read back when an experiment resumes."""

    accuracy: float
    start_accuracy: float  # right after injection (the control: the base itself)
    images_per_s: float | None  # mean over the epochs that trained everything (else over those that trained)
    seconds: float
    digests: list[str | None]  # per epoch, what it was fed (None: nothing trained that epoch)
    reference_accuracy: float | None = None
    process: int = 0  # which process trained it (under torchrun: its rank)
    spec: str = ""  # the digest of the experiment's shared specification it was trained under
    phases: list[str] | None = None  # per epoch, "se" or "full" (the batches are paired within a phase)
    units_learned: float | None = None  # the share of units out of the identity band at the end (None: no units)
    unit_movement: dict[str, float] | None = None  # stage -> mean movement of its units from their start


# The fields a record of an earlier version lacks; the others must all be there.
_OPTIONAL = ("reference_accuracy", "process", "phases", "units_learned", "unit_movement")
# The parts of an experiment's specification every run shares (its arms and seeds may grow on --resume).
SHARED_SPEC = ("model", "weights", "data", "finetune", "experiment")


def spec_digest(spec: dict[str, Any]) -> str:
    """The digest of the shared part of an experiment's specification, which every run's record carries."""
    shared = {k: spec[k] for k in SHARED_SPEC}
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def _refuse(path: Path, field: str, problem: str) -> DataError:
    return DataError(
        f"{path}: field '{field}': {problem}; it was not written by this experiment as it is (start over with --force)"
    )


def _number(path: Path, field: str, value: object, low: float, high: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _refuse(path, field, f"expected a number, got {value!r:.60}")
    if not low <= value <= high:
        raise _refuse(path, field, f"{value!r} is out of range ({low} to {high})")


def _check_fields(data: object, path: Path, where: str) -> None:
    """A record's fields: all there, of their types, within their ranges (not yet whose run it is)."""
    if not isinstance(data, dict):
        raise _refuse(path, where, "expected an object")
    known = {f.name for f in fields(RunRecord)}
    missing = sorted(k for k in known - set(data) if k not in _OPTIONAL)
    if missing or set(data) - known:
        name = missing[0] if missing else sorted(set(data) - known)[0]
        raise _refuse(path, f"{where}.{name}", "missing" if missing else "not a field of a run record")
    for name in ("accuracy", "start_accuracy"):
        _number(path, f"{where}.{name}", data[name], 0.0, 1.0)
    _number(path, f"{where}.reference_accuracy", data.get("reference_accuracy"), 0.0, 1.0, optional=True)
    _number(path, f"{where}.images_per_s", data["images_per_s"], 0.0, 1e9, optional=True)
    _number(path, f"{where}.seconds", data["seconds"], 0.0, 1e9)
    process = data.get("process", 0)
    if isinstance(process, bool) or not isinstance(process, int) or not 0 <= process < 1 << 16:
        raise _refuse(path, f"{where}.process", f"expected a process number, got {process!r:.60}")
    digests = data["digests"]
    if not isinstance(digests, list) or not all(d is None or (isinstance(d, str) and len(d) <= 128) for d in digests):
        raise _refuse(path, f"{where}.digests", "expected one digest (a string) or null per epoch")
    if not isinstance(data["spec"], str):
        raise _refuse(path, f"{where}.spec", f"expected a digest, got {data['spec']!r:.60}")
    phases = data.get("phases")
    if phases is not None and (not isinstance(phases, list) or not all(p in ("se", "full") for p in phases)):
        raise _refuse(path, f"{where}.phases", "expected one phase (se or full) per epoch")
    _number(path, f"{where}.units_learned", data.get("units_learned"), 0.0, 1.0, optional=True)
    movement = data.get("unit_movement")
    if movement is not None:
        if not isinstance(movement, dict) or len(movement) > 1000:
            raise _refuse(path, f"{where}.unit_movement", "expected the movement per stage")
        for stage, value in movement.items():
            _number(path, f"{where}.unit_movement.{stage:.40}", value, 0.0, 1e9)


def check_record(data: object, path: Path, where: str, digest: str, epochs: int) -> RunRecord:
    """A run's record as :func:`experiment` wrote it for this specification (``digest``) and number of
    epochs, or a DataError naming the field that is not."""
    _check_fields(data, path, where)
    assert isinstance(data, dict)  # checked above
    if len(data["digests"]) != epochs:
        raise _refuse(path, f"{where}.digests", f"expected one digest per epoch ({epochs})")
    if data.get("phases") is not None and len(data["phases"]) != epochs:
        raise _refuse(path, f"{where}.phases", f"expected one phase per epoch ({epochs})")
    if data["spec"] != digest:
        raise _refuse(path, f"{where}.spec", "the run was recorded under another specification of the experiment")
    return RunRecord(**data)


def read_state(path: Path, spec: dict[str, Any], epochs: dict[str, int]) -> dict:
    """The experiment file in ``out``: first every field checked for what it is (types, ranges), then the
    whole against this experiment's specification (the settings, its arms and seeds, each run's digest).
    ``epochs`` holds each arm's number of epochs, by label."""
    try:
        state = json.loads(read_text_file(path, limit=MAX_EXPERIMENT_BYTES, what="experiment file"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not an se_inject experiment file ({err.msg}); start over with --force") from None
    if not isinstance(state, dict) or not {"spec", "runs", "base", "latency"} <= set(state):
        raise DataError(f"{path}: not an se_inject experiment file (no spec or runs); start over with --force")
    runs, base, latency = state["runs"], state["base"], state["latency"]
    training = state.setdefault("training", {})  # an experiment of an earlier version measured none
    if not isinstance(runs, dict):
        raise _refuse(path, "runs", "expected an object of runs")
    for key, record in runs.items():
        _check_fields(record, path, f"runs.{key}")
    if not isinstance(base, dict) or set(base) - {"accuracy", "reference_accuracy"}:
        raise _refuse(path, "base", "expected the base's accuracy and reference accuracy")
    for name, value in base.items():
        _number(path, f"base.{name}", value, 0.0, 1.0, optional=True)
    for kind, spreads in (("latency", latency), ("training", training)):
        if not isinstance(spreads, dict):
            raise _refuse(path, kind, "expected an object of time ratios")
        for label, spread in spreads.items():
            if not isinstance(spread, list) or len(spread) != 3:
                raise _refuse(path, f"{kind}.{label}", "expected an arm's [median, q1, q3]")
            for i, value in enumerate(spread):
                _number(path, f"{kind}.{label}[{i}]", value, 1e-6, 1e6)
    check_spec(state["spec"], spec, path)
    keys, digest = {f"{label}|{seed}" for label in epochs for seed in spec["seeds"]}, spec_digest(spec)
    for key, record in runs.items():
        if key not in keys:
            raise _refuse(path, f"runs.{key}", "not a run of this experiment's arms and seeds")
        check_record(record, path, f"runs.{key}", digest, epochs[key.rpartition("|")[0]])
    for kind, spreads in (("latency", latency), ("training", training)):
        unknown = sorted(set(spreads) - set(list(epochs)[1:]))
        if unknown:
            raise _refuse(path, f"{kind}.{unknown[0]}", "not an arm of this experiment")
    return state


def _first_difference(then: Any, now: Any, where: str) -> str | None:
    """The first field, as ``where.sub.field (THEN then, NOW now)``, in which two settings differ."""
    if isinstance(then, dict) and isinstance(now, dict):
        for key in [*now, *(k for k in then if k not in now)]:
            found = _first_difference(then.get(key), now.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    return None if then == now else f"{where} ({json.dumps(then)[:60]} then, {json.dumps(now)[:60]} now)"


def check_spec(saved: object, now: dict[str, Any], path: Path) -> None:
    """Refuse to resume with another specification, naming the field: only the workers and the device
    may change, and arms and seeds may be added (not dropped, nor an arm's options changed)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("arms", []), list):
        raise _refuse(path, "spec", "expected the experiment's specification (an object)")
    written: dict[str, Any] = json.loads(json.dumps(saved))
    now = json.loads(json.dumps(now))  # tuples as lists, as the file has them
    difference = next((d for key in SHARED_SPEC if (d := _first_difference(written.get(key), now[key], key))), None)
    arms_now = {a["label"]: a for a in now["arms"]}
    for arm in written.get("arms", []):
        label = str(arm.get("label") if isinstance(arm, dict) else arm)[:60]
        if difference is None and label not in arms_now:
            difference = f"arms: {label!r} is not among them (--resume may add arms, not drop them)"
        elif difference is None:
            difference = _first_difference(arm, arms_now[label], f"arm {label!r}")
    dropped = [s for s in written.get("seeds", []) if s not in now["seeds"]]
    if difference is None and dropped:
        difference = f"seeds: {dropped[0]!r} is not among them (--resume may add seeds, not drop them)"
    if difference:
        raise ResumeMismatchError(
            f"{path}: cannot resume this experiment with another {difference}; --resume may add arms and seeds and "
            "change the number of workers and the device; start over with --force or choose another --out"
        )


def check_out(out: Path, resume: bool, force: bool) -> list[Path]:
    """Refuse, before anything is written, an ``out`` that holds another experiment or other files; with
    ``force``, the files of the experiment there that a new start replaces (nothing of the user's)."""
    state_path = out / EXPERIMENT_FILE
    if resume:
        if not state_path.is_file():
            raise DataError(f"{state_path}: no experiment to resume")
        return []
    if not out.exists():
        return []
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{out}: not a directory; choose a new --out")
    if not any(out.iterdir()):
        return []
    if not force:
        if state_path.exists():
            raise DataError(
                f"{out} already holds an experiment; pass resume=True (--resume), force=True (--force), or another --out"
            )
        raise DataError(f"{out}: not empty; choose a new --out")
    if not state_path.is_file():
        raise DataError(
            f"{out}: not an experiment directory se_inject wrote (no {EXPERIMENT_FILE}); --force replaces only those"
        )
    return _experiment_files(out)


def _run_files(directory: Path) -> set[str]:
    """The names a run directory may hold: the run's files, its record and their temporary files."""
    names = {*OWNED_FILES, RECORD_FILE}
    return names | {f".{name}.tmp" for name in names}


def _experiment_files(out: Path) -> list[Path]:
    """Every file of the experiment in ``out`` (its file, the base run, each arm's runs); a DataError naming
    the first thing se_inject did not write there, which a forced start would otherwise delete."""
    found = [out / EXPERIMENT_FILE]
    allowed = {EXPERIMENT_FILE, f".{EXPERIMENT_FILE}.tmp", "base", "runs"}

    def foreign(path: Path) -> DataError:
        return DataError(
            f"{out}: refused, it holds {path.relative_to(out)}, which se_inject did not write; --force replaces "
            "only an experiment's own files: move it away or choose another --out"
        )

    def run_directory(directory: Path) -> None:
        for path in directory.iterdir():
            if path.name not in _run_files(directory) or not path.is_file() or path.is_symlink():
                raise foreign(path)
            found.append(path)

    for path in out.iterdir():
        if path.name not in allowed or path.is_symlink() or (path.is_dir() != (path.name in ("base", "runs"))):
            raise foreign(path)
        if path.name == f".{EXPERIMENT_FILE}.tmp":
            found.append(path)
    if (out / "base").is_dir():
        run_directory(out / "base")
    if (out / "runs").is_dir():
        for arm in (out / "runs").iterdir():
            if not arm.is_dir() or arm.is_symlink():
                raise foreign(arm)
            for seed in arm.iterdir():
                if not seed.is_dir() or seed.is_symlink() or not seed.name.startswith("seed"):
                    raise foreign(seed)
                run_directory(seed)
    return found


def remove_experiment(out: Path, files: list[Path]) -> None:
    """Delete the old experiment's files (those :func:`_experiment_files` listed), then its emptied folders."""
    for path in files:
        path.unlink(missing_ok=True)
    folders = {parent for p in files for parent in p.parents if out in parent.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # a folder something else wrote into meanwhile is kept
            folder.rmdir()


def read_record(run_dir: Path, digest: str, epochs: int) -> RunRecord | None:
    """The record a finished run left in its directory (``None``: it did not finish, or its write was torn);
    a record of another specification or of another shape is a DataError: a run is never taken from
    another experiment."""
    path = run_dir / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text_file(path, limit=MAX_RECORD_BYTES, what="run record"))
    except json.JSONDecodeError:
        return None  # a torn file: the run is trained again from its checkpoint
    return check_record(data, path, "record", digest, epochs)
