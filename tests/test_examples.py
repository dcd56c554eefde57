"""The examples are documentation: each must run as written."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys, monkeypatch, tmp_path):
    # examples take optional arguments: none here, except where the default writes into the checkout
    monkeypatch.setattr(
        "sys.argv", [str(path), *([str(tmp_path / "base.pth")] if path.name == "train_digits_base.py" else [])]
    )
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
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


README = Path(__file__).parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    parts = README.read_text().split("```")
    return [p[len(language) + 1 :] for p in parts[1::2] if p.startswith(language + "\n")]


def test_readme_python_runs(capsys):
    api_example = _blocks("python")[0]  # the API example; the workflow block needs your files
    exec(compile(api_example, str(README), "exec"), {})
    assert capsys.readouterr().out.splitlines()[0] == "1024 1024"


def test_ci_runs_the_readme_quick_start():
    quick_start = _blocks("bash")[0].strip().splitlines()
    ci = (README.parent / ".ci" / "run").read_text()
    assert len(quick_start) == 2
    set_up, tests = quick_start
    for command in (*set_up.split(" && "), tests):
        assert command.replace("pip install", "python -m pip install -q") in ci or command in ci, command
