"""The examples are documentation: each must run as written, and the seeded ones print the numbers the
fine-tuning guide (docs/guides/finetune.md, docs/guides/inspect.md) shows."""

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
GUIDES = [Path(__file__).parent.parent / "docs" / "guides" / name for name in ("finetune.md", "inspect.md")]
SEEDED = ("train_digits_base.py", "finetune_digits.py", "inspect_digits.py")


def _run(path: Path, capsys, monkeypatch, tmp_path: Path, *args: str) -> str:
    # examples take optional arguments: none here, except where the default writes into the checkout
    target = [str(tmp_path / ("base.pth" if path.name == "train_digits_base.py" else "out"))]
    monkeypatch.setattr("sys.argv", [str(path), *(target if path.name != "finetune_digits.py" else []), *args])
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def _figures(text: str) -> list[str]:
    """An example's output without what is not seeded: paths, and the inference times it measures."""
    lines = [line for line in text.strip().splitlines() if not line.startswith(("runs in ", "wrote "))]
    lines = [re.sub(r"inference time x[0-9.]+", "inference time x*", line) for line in lines]
    return [re.sub(r"; weights in .*", "", line) for line in lines]


def guide_output(name: str) -> list[str]:
    """The output the guides show for ``python examples/NAME ...`` (a ```text block opening with that command)."""
    for block in "".join(g.read_text() for g in GUIDES).split("```")[1::2]:
        lines = block.splitlines()
        if lines[:1] == ["text"] and len(lines) > 1 and lines[1].startswith(f"$ python examples/{name}"):
            return _figures("\n".join(lines[2:]))
    raise AssertionError(f"the guides show no output of examples/{name}")


def check_against_readme(name: str, out: str) -> None:
    """The seeded numbers equal the guides' where the setting (versions, threads, CPU) is theirs."""
    shown, printed = guide_output(name), _figures(out)
    assert printed[-1].startswith("reproducible with ") and shown[-1].startswith("reproducible with "), printed
    if printed[-1] != shown[-1]:
        pytest.skip(f"another setting than the guides' ({printed[-1]} vs {shown[-1]}): other numbers are expected")
    assert printed == shown


# the two that train for minutes run in the slow suite (which also runs them twice in a row)
LONG = ("finetune_digits.py", "inspect_digits.py")


@pytest.mark.parametrize(
    "path", [pytest.param(p, marks=pytest.mark.slow) if p.name in LONG else p for p in EXAMPLES], ids=lambda p: p.name
)
def test_example_runs(path, capsys, monkeypatch, tmp_path, request):
    if path.name == "train_digits_base.py":  # trained once for this module (the fine-tuning test below uses it)
        tmp_path, out = request.getfixturevalue("digits_base")
    else:
        out = _run(path, capsys, monkeypatch, tmp_path)
    assert out.strip()
    if path.name == "retrofit_own_model.py":
        assert "max |injected - original| at insertion: 0.0" in out
        assert "all SE: True" in out
    if path.name == "inspect_digits.py":
        assert "pruned ['layers.0.se_1_1']" in out and "saturation" in out
    if path.name == "train_digits_base.py":
        assert float(out.split("val acc ")[1].split("%")[0]) > 50 and (tmp_path / "base.pth").is_file()  # chance: 10%
    if path.name == "finetune_digits.py":
        lines = out.splitlines()
        assert [line.split()[0] for line in lines[1:4]] == ["control", "r=8", "r=8"]
        assert sum(line.startswith("r=8 init=") and "control" in line for line in lines) == 2  # the verdicts
        start = next(line for line in lines if line.startswith("right after injection"))
        preserve, base = (part.split()[-1] for part in start.split(","))
        assert preserve == base  # the preserve start computes what the base computes
        assert float(base.rstrip("%")) > 50  # chance is 10%
    if path.name in SEEDED:
        check_against_readme(path.name, out)


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory) -> tuple[Path, str]:
    """The guide's trained base, as examples/train_digits_base.py makes it: (its folder, what it printed)."""
    import contextlib
    import io
    import sys

    folder = tmp_path_factory.mktemp("base")
    path = next(p for p in EXAMPLES if p.name == "train_digits_base.py")
    argv, sys.argv = sys.argv, [str(path), str(folder / "base.pth")]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = argv
    return folder, printed.getvalue()


def test_the_guides_finetune_makes_the_units_learn_with_the_defaults(digits_base, tmp_path):
    """The fine-tuning guide's command, as written (its defaults): the units leave the identity band, and
    nothing warns that they learned nothing. A change of default that stops them learning fails here."""
    import shlex

    from typer.testing import CliRunner

    from se_inject.cli.app import app

    text = GUIDES[0].read_text().replace("\\\n", " ")
    shown = re.search(r"^se-inject finetune resnet18 --checkpoint runs/resnet18_digits.pth .*$", text, flags=re.M)
    assert shown is not None, "the guide shows the README's fine-tune"
    command = shown.group(0).split("#")[0].replace("runs/resnet18_digits.pth", str(digits_base[0] / "base.pth"))
    command = command.replace("runs/digits", str(tmp_path / "digits"))
    result = CliRunner().invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    learned = re.search(
        r"units that moved out of the identity band \(> 1% of their input\): (\d+)% of (\d+)", result.output
    )
    assert learned is not None, result.output
    assert int(learned.group(1)) > 0 and "learned nothing" not in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("name", SEEDED)
def test_seeded_examples_print_the_same_numbers_twice_in_a_row(name, capsys, monkeypatch, tmp_path):
    path = next(p for p in EXAMPLES if p.name == name)
    first = _figures(_run(path, capsys, monkeypatch, tmp_path / "first"))
    assert _figures(_run(path, capsys, monkeypatch, tmp_path / "second")) == first


@pytest.mark.slow
def test_the_base_prints_the_readmes_number_for_each_thread_count(capsys, monkeypatch, tmp_path):
    """The fine-tuning guide gives the base's accuracy at 1, 2 and 4 threads: each run prints its own."""
    path = next(p for p in EXAMPLES if p.name == "train_digits_base.py")
    table = re.findall(r"^\| (\d) \| ([0-9.]+%) \|", GUIDES[0].read_text(), flags=re.MULTILINE)
    assert [t for t, _ in table] == ["1", "2", "4"], table
    for threads, accuracy in table:
        out = _run(path, capsys, monkeypatch, tmp_path / threads, "--threads", threads)
        if "CPU capability AVX512" not in out:
            pytest.skip("the guide's thread table was measured with CPU capability AVX512")
        assert f"val acc {accuracy}" in out, (threads, out)
