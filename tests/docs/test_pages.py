"""The README and the docs run: every command they show (```bash blocks, and ``$ `` lines of output
blocks) and every Python block is executed here, page by page in one working folder, as a reader
would run them; a command this file does not know fails the suite until it says how it runs.

The pages that train (fine-tuning, inspection) run in the slow suite (``-m slow``), from their own
start; the rest runs by default."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from se_inject.cli.app import app
from se_inject.io.sources import SOURCES
from se_inject.units.base import UNITS

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TRAINING_PAGES = ("guides/finetune.md", "guides/inspect.md")

RUN = "run"  # run as written
CI = "ci"  # .ci/run runs it (the install, the suite, the linters)
BENCHMARK = "benchmark"  # a measurement of minutes to hours: its --help runs here, the figures carry their date
NETWORK = "network"  # needs the network (a package index, the Hub): not run here; CI installs the plain way; the Hub tests use a local cache
SLOW_SUITE = "slow suite"  # the suite's long coverage: the tests themselves, run with -m slow, not from here
ONE_SEED = "one seed"  # an experiment of most of an hour: run with --seeds 1 (the arms, the table, not the figures)
TEXTURES_EXPERIMENT = (
    "se-inject experiment resnet18 --data textures --base-epochs 3 --out runs/exp-textures --seeds 5 --epochs 3 "
    "--se-epochs 1 --unit-optimizer same --unit-lr-scale 1 --inits preserve --unit-lr-scales 1,10,30,100 "
    "--candidate init=paper,unit_lr_scale=1 --candidate init=zero,unit_lr_scale=1 "
    "--candidate init=preserve,unit_optimizer=adamw,unit_lr_scale=0.02 "
    "--candidate init=preserve,unit_optimizer=adamw,unit_lr_scale=0.1"
)
HOW = {
    TEXTURES_EXPERIMENT: ONE_SEED,
    'pip install -e ".[test]"': CI,
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu": NETWORK,
    "python -m pytest -q": CI,
    "python -m pytest -q -m slow": SLOW_SUITE,
    "se-inject push se_resnet18 me/se-resnet18": NETWORK,
    "ruff check . && ruff format --check . && mypy": CI,
    "mkdocs build --strict": CI,
    "python benchmarks/bench_retrofit.py": BENCHMARK,
    "python benchmarks/zoo.py": BENCHMARK,
    "python benchmarks/twins.py --workers 2": BENCHMARK,
    "python benchmarks/units.py": BENCHMARK,
    "python benchmarks/optimize.py --batch 16": BENCHMARK,
    "python benchmarks/train_step.py": BENCHMARK,
    "python benchmarks/train_step.py --batch 16 --repeats 24 --threads 2 --out benchmarks/train_step.json": BENCHMARK,
    "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=8589934592 python benchmarks/train_step.py --batch 16 "
    "--repeats 24 --threads 2 --out benchmarks/train_step_kept_memory.json": BENCHMARK,
    "python benchmarks/units.py --optimize --compile --batches 16 --repeats 40 --threads 2 "
    "--out benchmarks/units_optimized.json": BENCHMARK,
    "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=8589934592 python benchmarks/units.py --optimize "
    "--compile --batches 16 --repeats 40 --threads 2 --out benchmarks/units_optimized_kept_memory.json": BENCHMARK,
    "python benchmarks/startup.py": BENCHMARK,
    "python benchmarks/gpu.py --out benchmarks/gpu.json": BENCHMARK,
    "python benchmarks/eager_b1.py": BENCHMARK,
}


def _benchmark_help(script: str) -> int:
    """``script --help``'s exit status, from :func:`_benchmark_helps`."""
    return _benchmark_helps()[script]


def _script(command: str) -> str:
    """The Python script a benchmark command runs (after ``python``; environment settings may come first)."""
    words = shlex.split(command)
    return words[words.index("python") + 1]


@functools.cache
def _benchmark_helps() -> dict[str, int]:
    """Every benchmark script the pages show, run with ``--help`` as its own ``__main__``, all in one fresh
    process: each imports torch and timm first (4 s), which a process per script paid again."""
    scripts = sorted({_script(command) for command, how in HOW.items() if how == BENCHMARK})
    code = (
        "import json, runpy, sys\n"
        "codes = {}\n"
        "for script in sys.argv[1:]:\n"
        "    sys.argv = [script, '--help']\n"
        "    try:\n"
        "        runpy.run_path(script, run_name='__main__')\n"
        "        codes[script] = 0\n"
        "    except SystemExit as stop:\n"
        "        codes[script] = stop.code or 0\n"
        "print(json.dumps(codes))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *scripts], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(codes) == scripts, codes
    return codes


def blocks(page: Path) -> Iterator[tuple[str, str]]:
    """(language, text) of each fenced block of ``page``, in order."""
    yield from re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def commands(language: str, text: str) -> list[str]:
    """The commands of a block: each line of a bash block (continuations joined, comments dropped), or
    the ``$ `` lines of an output block."""
    if language == "bash":
        lines = text.replace("\\\n", " ").splitlines()
        found = [re.split(r"\s+#", line)[0] for line in lines if not line.lstrip().startswith("#")]
    elif language in ("", "text"):
        found = [line[2:] for line in text.splitlines() if line.startswith("$ ")]
    else:
        return []
    return [" ".join(line.split()) for line in found if line.strip()]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT / "docs")) if page != README else "README.md"


def test_every_command_the_pages_show_is_run_here():
    shown = {c for page in PAGES for language, text in blocks(page) for c in commands(language, text)}
    unknown = [c for c in shown if c not in HOW and not c.startswith(("se-inject ", "python examples/"))]
    assert unknown == [], "say in HOW how the suite runs these"
    assert set(HOW) - shown == set(), "HOW lists commands no page shows"


@pytest.fixture(scope="module")
def readers_files(tmp_path_factory) -> Path:
    """The files the pages name as the reader's own: a trained checkpoint, their model's weights, an
    image folder."""
    folder = tmp_path_factory.mktemp("readers_files")
    (folder / "examples").symlink_to(ROOT / "examples")
    torch.manual_seed(0)
    import timm

    torch.save(timm.create_model("resnet50", num_classes=10).state_dict(), folder / "resnet50_trained.pth")
    torch.save(MyNet().state_dict(), folder / "mynet.pth")
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (folder / "imagenette" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(folder / "imagenette" / split / label / f"{i}.png")
    return folder


@pytest.fixture
def workspace(readers_files, tmp_path) -> Path:
    """A fresh working folder per page, holding the reader's files."""
    for path in readers_files.iterdir():
        (tmp_path / path.name).symlink_to(path)
    (tmp_path / "docs" / "figures").mkdir(parents=True)
    return tmp_path


class MyNet(nn.Module):
    """The pages' "your own module": a small residual net."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.bn1(self.conv1(x))
        return self.fc(x.mean((2, 3)))


def shown_errors(text: str) -> dict[str, str]:
    """The ``$ se-inject ...`` lines of an output block that show a mistake, with the one line shown for it."""
    lines = text.splitlines()
    return {
        " ".join(line[2:].split()): after
        for line, after in zip(lines, lines[1:], strict=False)
        if line.startswith("$ ") and after.startswith("se-inject: error: ")
    }


def run(command: str, folder: Path, error: str | None = None) -> str:
    """Run one command as the page shows it; what it printed. With ``error``, the command is a mistake the
    page shows: it must fail with exactly that one line."""
    if error is not None:
        result = CliRunner().invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 2 and result.stderr.splitlines() == [error], (command, result.output)
        return result.stderr
    how = HOW.get(command, RUN)
    if how == CI:
        ci = (ROOT / ".ci" / "run").read_text()
        for part in command.split(" && "):
            assert part.replace("pip install", "python -m pip install -q") in ci or part in ci, part
        return ""
    if how == BENCHMARK:
        assert _benchmark_help(_script(command)) == 0
        return ""
    if how in (NETWORK, SLOW_SUITE):
        return ""
    if how == ONE_SEED:
        command = command.replace("--seeds 5", "--seeds 1")
    args = shlex.split(command)
    if args[0] == "se-inject" and "--nproc" in args:  # the launcher re-runs the process's own command line
        args = ["python", "-m", "se_inject", *args[1:]]
    if args[0] == "se-inject":
        result = CliRunner().invoke(app, args[1:])
        assert result.exit_code == 0, (command, result.output)
        return result.stdout
    done = subprocess.run([sys.executable, *args[1:]], cwd=folder, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def run_page(page: Path, folder: Path, monkeypatch) -> list[tuple[str, str]]:
    """Every command and Python block of ``page``, in order, in ``folder``: (command, output) pairs.
    What a block registers (a unit, a model source) is forgotten after the page."""
    monkeypatch.chdir(folder)
    registered = dict(SOURCES), dict(UNITS)
    outputs = []
    try:
        for language, text in blocks(page):
            if language == "python":
                exec(compile(text, str(page), "exec"), {"MyNet": MyNet, "__name__": "__page__"})
            errors = shown_errors(text) if language in ("", "text") else {}
            for command in commands(language, text):
                outputs.append((command, run(command, folder, errors.get(command))))
    finally:
        SOURCES.clear(), SOURCES.update(registered[0])
        UNITS.clear(), UNITS.update(registered[1])
    return outputs


QUICK_PAGES = [p for p in PAGES if _name(p) not in TRAINING_PAGES]


@pytest.mark.parametrize("page", QUICK_PAGES, ids=_name)
def test_the_page_runs(page, workspace, monkeypatch):
    run_page(page, workspace, monkeypatch)


@pytest.mark.slow
def test_the_training_pages_run(tmp_path, workspace, monkeypatch):
    """Fine-tuning from the base the page trains, the same on an image folder, inspection and pruning."""
    retrofit = ROOT / "docs" / "guides" / "retrofit.md"
    run_page(retrofit, workspace, monkeypatch)  # se_resnet50, which the fine-tuning page continues
    for name in TRAINING_PAGES:
        run_page(ROOT / "docs" / name, workspace, monkeypatch)


def _shown_output(page: Path, command: str) -> list[str]:
    """The output block that follows the block holding ``command``."""
    found = list(blocks(page))
    for (language, text), (_, after) in zip(found, found[1:], strict=False):
        if command in commands(language, text):
            return [line.rstrip() for line in after.strip().splitlines()]
    raise AssertionError(f"{page.name} shows no output of {command}")


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "index.md"], ids=_name)
def test_the_quick_start_prints_what_the_page_shows(page):
    command = "se-inject resnet101 --position standard --r 16"
    printed = [line.rstrip() for line in run(command, ROOT).strip().splitlines()]
    assert printed == _shown_output(page, command)
