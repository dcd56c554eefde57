"""Adversarial cases: tampered recipes, destructive saves, hostile models, malformed input.

Each case asserts the exact promise the README makes:
- the CLI prints one line on stderr (no traceback) and exits with code 2;
- the API raises the named ``SEInjectError`` subclass;
- the user's model is bit for bit unchanged (tensors, flags, hooks, attributes);
- nothing outside the target is touched;
- no code named by a tampered recipe runs (a marker file that must not appear).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, snapshot
from tiny_models import FunctionalResNet
from torch import nn
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.errors import (
    ArtifactError,
    CheckpointError,
    ConfigError,
    DataError,
    InvalidModelError,
    ModelSpecError,
    RuleError,
    UntrustedCodeError,
)
from se_inject.io.layout import RECIPE_FILE, WEIGHTS_FILE
from se_inject.train.data import DataSplits, digits
from se_inject.train.finetune import FinetuneConfig, finetune

runner = CliRunner()
TINY = Path(__file__).parent / "tiny_models.py"


def fails_in_one_line(args: list[str], match: str) -> str:
    """Run the CLI; assert exit 2, one stderr line containing ``match``, no traceback; the line."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("se-inject: error: ") and match in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to prove nothing was touched."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A real saved model (timm resnet18 source, 32x32) to tamper with."""
    torch.manual_seed(0)
    model = se_inject.load_model("resnet18", num_classes=10)
    target = tmp_path_factory.mktemp("saved") / "se_resnet18"
    se_inject.save(se_inject.inject(model, r=16, input_size=32, model_name="resnet18"), target)
    return target


def tampered(saved: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of ``saved`` whose recipe has ``changes`` applied (None deletes a key)."""
    target = tmp_path / "tampered"
    target.mkdir(parents=True)
    (target / WEIGHTS_FILE).write_bytes((saved / WEIGHTS_FILE).read_bytes())
    data = json.loads((saved / RECIPE_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (target / RECIPE_FILE).write_text(json.dumps(data))
    return target


@pytest.fixture()
def evil(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A model file and an importable module that each create a marker file when imported."""
    marker = tmp_path / "PWNED"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nfrom torch import nn\ndef build():\n    return nn.Conv2d(3, 8, 3)\n"
    (tmp_path / "evil_file.py").write_text(code)
    (tmp_path / "evil_module.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "evil_file.py", marker


# --- 1. recipes are data ---------------------------------------------------------------------------


@pytest.mark.parametrize("source_kind", ["file", "module"])
def test_a_recipe_naming_code_does_not_run_it(saved, tmp_path, evil, source_kind):
    evil_file, marker = evil
    source = f"{evil_file}:build" if source_kind == "file" else "evil_module:build"
    directory = tampered(saved, tmp_path, source=source)
    with pytest.raises(
        UntrustedCodeError, match="is Python code, which loading would import and run; .*trust_code=True"
    ):
        se_inject.load(directory)
    assert not marker.exists()
    fails_in_one_line(["inspect", str(directory), "--data", "digits", "--out", str(tmp_path / "o")], "--trust-code")
    fails_in_one_line(["finetune", str(directory), "--data", "digits", "--out", str(tmp_path / "f")], "--trust-code")
    fails_in_one_line(["prune-se", str(directory), "--data", "digits", "--out", str(tmp_path / "p")], "--trust-code")
    assert not marker.exists() and not (tmp_path / "o").exists() and not (tmp_path / "f").exists()


def test_trusting_code_is_what_runs_it(saved, tmp_path, evil):
    """The positive control of the marker: with trust_code the same recipe does import the file."""
    evil_file, marker = evil
    directory = tampered(saved, tmp_path, source=f"{evil_file}:build")
    with pytest.raises(se_inject.SEInjectError):  # a Conv2d has no residual blocks: refused after the import
        se_inject.load(directory, trust_code=True)
    assert marker.exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"checkpoint": "/etc/passwd"}, "model_kwargs.checkpoint"),
        ({"pretrained": True}, "model_kwargs.pretrained"),
        ({"num_classes": "10"}, "model_kwargs.num_classes"),
        ({"num_classes": -5}, "model_kwargs.num_classes"),
        ({"drop_path_rate": 0.1}, "model_kwargs.drop_path_rate"),
    ],
)
def test_model_kwargs_pass_an_allow_list(saved, tmp_path, kwargs, field):
    with pytest.raises(ArtifactError, match=f"field '{field}'"):
        se_inject.load(tampered(saved, tmp_path, model_kwargs=kwargs))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"format_version": 99}, "newer than this se_inject reads"),
        ({"format_version": "1"}, "field 'format_version'"),
        ({"surprise": 1}, "field 'surprise' is not a recipe field"),
        ({"input_size": [10**9, 10**9]}, "field 'input_size[0]'"),
        ({"input_size": "224"}, "field 'input_size'"),
        ({"sites": [{"name": "x", "evil": 1}]}, "field 'sites[0]'"),
        ({"sites": "all"}, "field 'sites'"),
        ({"options": {"position": "everywhere"}}, "field 'options.position'"),
        ({"options": {"exec": "rm -rf /"}}, "field 'options.exec'"),
        ({"pruned": ["not.a.unit"]}, "field 'pruned'"),
        ({"source": ".foo:bar"}, "field 'source'"),
        ({"head": {"name": "fc", "in_features": 512, "out_features": -1}}, "field 'head.out_features'"),
        ({"source_file": {"path": "/x.py", "sha256": "nope"}}, "field 'source_file"),
    ],
)
def test_every_recipe_field_is_checked_before_anything_is_built(saved, tmp_path, changes, field):
    with pytest.raises(ArtifactError, match=field.replace("[", r"\[").replace("]", r"\]")):
        se_inject.load(tampered(saved, tmp_path, **changes))


@pytest.mark.parametrize("text", ['{"options": NaN}', "[" * 100_000 + "]" * 100_000, "\x00\x01binary", ""])
def test_malformed_recipe_json_is_one_error(saved, tmp_path, text):
    directory = tampered(saved, tmp_path)
    (directory / RECIPE_FILE).write_text(text)
    with pytest.raises(ArtifactError, match="recipe.json"):
        se_inject.load(directory)


def test_rules_named_by_a_recipe_are_read_only_as_capped_regular_files(saved, tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    for path, match in (
        ("/dev/zero", "not a regular file"),
        (str(big), "over the"),
        (str(tmp_path), "not a regular file"),
    ):
        options = {**json.loads((saved / RECIPE_FILE).read_text())["options"], "rules": [path]}
        with pytest.raises(RuleError, match=match):
            se_inject.load(tampered(saved, tmp_path / Path(path).name.replace(".", "_"), options=options))


@pytest.fixture()
def tmp_cwd(tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_a_model_file_source_loads_from_any_directory_and_may_import_its_siblings(tmp_path, tmp_cwd, monkeypatch):
    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "blocks.py").write_text((TINY).read_text())
    (tmp_path / "mynets" / "net.py").write_text(
        "from blocks import FunctionalResNet\n\ndef build():\n    return FunctionalResNet(num_classes=10)\n"
    )
    torch.manual_seed(0)
    model = se_inject.load_model("../mynets/net.py:build")
    se_model = se_inject.inject(model, r=4, input_size=16, model_name="../mynets/net.py:build")
    se_inject.save(se_model, tmp_path / "saved")
    recipe = json.loads((tmp_path / "saved" / RECIPE_FILE).read_text())
    assert recipe["source"] == f"{tmp_path / 'mynets' / 'net.py'}:build" and len(recipe["source_file"]["sha256"]) == 64
    monkeypatch.chdir(tmp_path / "saved")  # another directory: the recorded absolute path still finds the file
    loaded = se_inject.load(tmp_path / "saved", trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), se_model.eval()(x))
    with (tmp_path / "mynets" / "net.py").open("a") as handle:
        handle.write("# edited\n")
    with pytest.warns(se_inject.SourceChangedWarning, match="has changed since"):
        se_inject.load(tmp_path / "saved", trust_code=True)


# --- 2. saves never destroy --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected():
    torch.manual_seed(0)
    return se_inject.inject(FunctionalResNet(), r=4, input_size=16)


@pytest.mark.parametrize(
    "target, why", [(".", "working directory"), ("..", "holds the working directory"), ("/", "root")]
)
def test_force_refuses_the_working_directory_its_parents_and_the_root(injected, tmp_cwd, target, why):
    (tmp_cwd / "precious.txt").write_text("keep")
    before = tree(tmp_cwd.parent)
    with pytest.raises(ArtifactError, match=f"refused, .*{why}"):
        se_inject.save(injected, target, force=True)
    assert tree(tmp_cwd.parent) == before


def test_the_cli_save_to_dot_with_force_deletes_nothing(tmp_cwd):
    (tmp_cwd / "precious.txt").write_text("keep")
    fails_in_one_line(["resnet18", "--save", ".", "--force"], "working directory")
    assert tree(tmp_cwd) == {"precious.txt": b"keep"}


def test_force_refuses_the_home_directory(injected, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ArtifactError, match="home directory"):
        se_inject.save(injected, home, force=True)
    assert tree(home) == {".bashrc": b"x"}


def test_force_refuses_a_directory_that_is_not_an_se_inject_save(injected, tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ArtifactError, match="not a directory se_inject wrote"):
        se_inject.save(injected, target, force=True)
    assert tree(target) == {"a.jpg": b"\xff\xd8"}


def test_force_keeps_files_se_inject_did_not_write_in_its_own_directory(injected, tmp_path):
    se_inject.save(injected, tmp_path / "saved")
    (tmp_path / "saved" / "notes.md").write_text("mine")
    before = tree(tmp_path / "saved")
    with pytest.raises(ArtifactError, match="files se_inject did not write .*notes.md"):
        se_inject.save(injected, tmp_path / "saved", force=True)
    assert tree(tmp_path / "saved") == before


def test_a_forced_save_that_fails_midway_leaves_the_old_directory_whole(injected, tmp_path, monkeypatch):
    se_inject.save(injected, tmp_path / "saved")
    before = tree(tmp_path / "saved")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(ArtifactError, match="No space left"):
        se_inject.save(injected, tmp_path / "saved", force=True)
    assert tree(tmp_path / "saved") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no staging or lock left behind


def test_save_without_force_never_replaces_even_an_empty_directory(injected, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        se_inject.save(injected, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "under_file", "symlink", "nul", "not_a_path"])
def test_save_targets_that_cannot_be_directories_are_refused(injected, tmp_path, kind):
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    target, match = {
        "file": (tmp_path / "file", "not a directory"),
        "under_file": (tmp_path / "file" / "model", "cannot create the directory"),
        "symlink": (tmp_path / "link", "symbolic link"),
        "nul": (str(tmp_path / "a\0b"), "not a usable path"),
        "not_a_path": (42, "expected a path"),
    }[kind]
    with pytest.raises(ArtifactError, match=match):
        se_inject.save(injected, target, force=True)
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "real").iterdir()) == []


def test_an_unwritable_place_is_one_error(injected, tmp_path, monkeypatch):
    """A read-only parent (simulated: this suite may run as root, which ignores permissions)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ArtifactError, match="Permission denied"):
        se_inject.save(injected, tmp_path / "ro" / "model")
    assert not (tmp_path / "ro").exists()  # the parents it created for the save are gone again


def test_finetune_onto_a_saved_model_needs_force(injected, tmp_path):
    se_inject.save(injected, tmp_path / "saved")
    before = tree(tmp_path / "saved")
    data = digits(image_size=16)
    with pytest.raises(ArtifactError, match="already exists; .*force"):
        finetune(copy.deepcopy(injected), data, tmp_path / "saved", FinetuneConfig(epochs=1, se_epochs=0))
    assert tree(tmp_path / "saved") == before
    fails_in_one_line(
        ["prune-se", str(tmp_path / "saved"), "--data", "digits", "--out", str(tmp_path / "saved")], "already exists"
    )


# --- 3. the CLI's one line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        (["resnet18", "--stages", "1-999999999999"], "out of range"),
        (["resnet18", "--stages", "4-2"], "is empty"),
        (["resnet18", "--r", "99999999999999999999"], "out of range"),
        (["resnet18", "--r", "1-5000"], "more than 1000 values"),
        (["resnet18", "--input-size", "-3"], "--input-size"),
        (["resnet18", "--input-size", "100000"], "input_size"),
        ([":"], "model spec ':'"),
        ([".foo:bar"], "relative names are not allowed"),
        (["resnet18.no_such_tag"], "has no pretrained tag 'no_such_tag'"),
        (["torchvision:"], "torchvision:NAME"),
        (["resnet18", "--num-classes", "-1"], "--num-classes"),
        (["bench", "resnet18", "--batch", "0"], "--batch: expected positive integers"),
        (["bench", "resnet18", "--batch", "-4"], "--batch"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--workers", "-1"], "workers: must be at least 0"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--nproc", "0"], "--nproc"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--weight-decay", "-1"], "weight_decay"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--lr", "inf"], "lr: expected a finite number"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--batch-size", "0"], "batch_size"),
        (["finetune", "resnet18", "--data", "digits", "--out", "x", "--input-size", "0"], "--input-size"),
        (["inspect", "nowhere", "--data", "digits", "--out", "x", "--unit-names", ","], "--unit-names"),
    ],
)
def test_malformed_numbers_and_names(args, match, tmp_cwd):
    fails_in_one_line(args, match)
    assert list(tmp_cwd.iterdir()) == []


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
        (b"a = " + b"[" * 50_000 + b"]" * 50_000, "rules"),
        (b"[[rule]]\nname = 'x'\npattern = 'nope'\n", "'nope' is not a pattern kind"),
    ],
)
def test_rules_files_that_are_binary_deep_or_wrong(content, match, tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(content)
    fails_in_one_line(["resnet18", "--rules", str(path)], match)


def test_a_rules_path_that_is_a_device_is_refused_at_once():
    fails_in_one_line(["resnet18", "--rules", "/dev/zero"], "not a regular file")


@pytest.mark.parametrize(
    "body, match",
    [
        ("1 / 0", "ZeroDivisionError"),
        ("import sys\nsys.exit(3)", "SystemExit"),
        ("import no_such_module_xyz", "No module named"),
    ],
)
def test_model_files_that_fail_on_import(tmp_path, body, match):
    (tmp_path / "bad.py").write_text(body + "\n")
    fails_in_one_line([f"{tmp_path / 'bad.py'}:build"], match)
    with pytest.raises(ModelSpecError, match=match):
        se_inject.load_model(f"{tmp_path / 'bad.py'}:build")


def test_a_module_that_raises_on_import(tmp_path, monkeypatch):
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fails_in_one_line(["raising_mod:build"], "broken at import")


@pytest.mark.parametrize(
    "state, match",
    [
        ({1: torch.zeros(1)}, "is not a parameter name"),
        ({"conv1.weight": torch.zeros(2, 2, device="meta")}, "meta tensor"),
        ({"conv1.weight": torch.zeros(2, 2).to_sparse()}, "only dense tensors"),
    ],
)
def test_checkpoints_with_odd_contents(tmp_path, state, match):
    path = tmp_path / "ck.pth"
    torch.save(state, path)
    fails_in_one_line(["resnet18", "--checkpoint", str(path)], match)


def test_a_checkpoint_whose_dtype_cannot_hold_the_weights_is_refused_not_cast(tmp_path):
    state = {
        k: (v.to(torch.int32) if k == "fc.bias" else v)
        for k, v in se_inject.load_model("resnet18").state_dict().items()
    }
    torch.save(state, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="'fc.bias' is torch.int32 but the model holds torch.float32"):
        se_inject.load_model("resnet18", checkpoint=tmp_path / "ints.pth")
    fails_in_one_line(["resnet18", "--checkpoint", str(tmp_path / "ints.pth")], "cannot be carried over")


def test_a_checkpoint_with_another_head_needs_num_classes(tmp_path):
    torch.save(se_inject.load_model("resnet18", num_classes=10).state_dict(), tmp_path / "ten.pth")
    fails_in_one_line(["resnet18", "--checkpoint", str(tmp_path / "ten.pth")], "fc.weight (10, 512) vs (1000, 512)")
    result = runner.invoke(
        app, ["resnet18", "--checkpoint", str(tmp_path / "ten.pth"), "--num-classes", "10", "--json"]
    )
    assert result.exit_code == 0, result.output


def test_a_callable_that_takes_no_num_classes(tmp_path):
    (tmp_path / "net.py").write_text("from torch import nn\ndef build():\n    return nn.Conv2d(3, 8, 3)\n")
    fails_in_one_line([f"{tmp_path / 'net.py'}:build", "--num-classes", "10"], "does not take num_classes")


def test_the_version_answers():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"se-inject {se_inject.__version__}"


# --- 4. the API's exception types --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["resnet18", 3, None, torch.zeros(3)])
def test_what_is_not_a_module_is_refused(model):
    with pytest.raises(InvalidModelError, match="expected an nn.Module"):
        se_inject.inject(model)


class Unpicklable(FunctionalResNet):
    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()


def test_a_model_that_cannot_be_copied_is_refused_untouched():
    model = Unpicklable()
    before = snapshot(model)
    with pytest.raises(InvalidModelError, match="cannot be copied .*lock"):
        se_inject.inject(model, input_size=16)
    assert_unchanged(model, before)


@pytest.mark.parametrize("size", [10**7, (16, 0), "224", 2.5, (1, 2, 3)])
def test_absurd_input_sizes(size):
    with pytest.raises(ConfigError, match="input_size"):
        se_inject.report(FunctionalResNet(), input_size=size)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda d: se_inject.load(str(d) + "\0x"), ArtifactError, "not a usable path"),
        (lambda d: se_inject.load(d, model="resnet18"), ConfigError, "expected a fresh nn.Module"),
        (lambda d: se_inject.load(d, device="gpu9"), ConfigError, "device: 'gpu9' is not a device"),
        (lambda d: se_inject.load(d, trust_code="yes"), ConfigError, "trust_code"),
        (lambda d: se_inject.load(d / "missing"), ArtifactError, "no such directory"),
        (lambda d: se_inject.apply(d, "resnet18"), ConfigError, "expected an nn.Module"),
        (lambda d: se_inject.save(d, d), ConfigError, "expected an nn.Module made by se_inject"),
        (lambda d: se_inject.load_model("resnet18", device="warp"), ConfigError, "device"),
    ],
)
def test_api_entry_points_raise_se_inject_errors(saved, call, error, match):
    with pytest.raises(error, match=match):
        call(saved)


class TinyBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 16, 3, padding=1), TinyBlock(16)

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


class TwoNames(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.first = nn.Conv2d(3, 16, 3, padding=1), TinyBlock(16)
        self.second = self.first  # one block registered under two names

    def forward(self, x):
        return self.second(self.first(self.stem(x)))


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
    return model.eval()


@pytest.mark.parametrize("cls", [CalledTwice, TwoNames])
def test_a_shared_block_gets_one_shared_unit(cls):
    """A block called twice (shared weights) keeps sharing: its unit is inside it, used by every call."""
    model = _randomised(cls())
    before = snapshot(model)
    result = se_inject.retrofit(model, r=4, input_size=8, init="paper")
    assert_unchanged(model, before)
    assert [u.name for u in result.report.sites] == [
        next(n for n, m in model.named_children() if isinstance(m, TinyBlock)) + ".se_1_1"
    ]
    se_model = result.model.eval()
    block = se_model.block if cls is CalledTwice else se_model.first
    if cls is TwoNames:
        assert se_model.second is se_model.first
    with torch.no_grad():
        unit = block.se_1_1
        for p in unit.parameters():
            p.normal_()
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        se_model.double()
        twin = _randomised(cls()).double()
        twin.load_state_dict({k: v for k, v in se_model.state_dict().items() if ".se_" not in k})

        def through(blk, h):  # the block by hand, with the unit on its branch (position standard)
            branch = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(h)))))
            return F.relu(h + unit(branch))

        tb = twin.block if cls is CalledTwice else twin.first
        expected = through(tb, through(tb, twin.stem(x)))
        assert torch.allclose(se_model(x), expected, rtol=0, atol=1e-12)
    assert result.report.totals.params_added == result.report.totals.eq5_params == 2 * 16 * 4


# --- 5. the user's objects are never touched --------------------------------------------------------


class Hostile(FunctionalResNet):
    """A model whose forward counts and caches, with a hook that stores outputs and a train() that freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.cache: list = []
        self.stored: list = []
        self.register_forward_hook(lambda m, args, out: self.stored.append(out))

    def forward(self, x):
        self.calls += 1
        self.cache.append(x)
        return super().forward(x)

    def train(self, mode: bool = True):
        for p in self.parameters():
            p.requires_grad_(mode)
        return super().train(mode)


def test_analysis_leaves_no_trace_on_the_users_model():
    model = Hostile()
    flags = [p.requires_grad for p in model.parameters()]
    before = snapshot(model)
    hooks = dict(model._forward_hooks)
    se_inject.report(model, r=4, input_size=16)
    se_inject.inject(model, r=4, input_size=16)
    assert model.calls == 0 and model.cache == [] and model.stored == []
    assert [p.requires_grad for p in model.parameters()] == flags
    assert dict(model._forward_hooks) == hooks
    assert_unchanged(model, before)


def test_check_outputs_leaves_flags_alone():
    model = Hostile().train()
    se_model = se_inject.inject(model, r=4, input_size=16)
    se_inject.check_outputs(model, se_model, input_size=16)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_finetune_does_not_change_the_original_or_the_flags_it_found(tmp_path):
    torch.manual_seed(0)
    original = FunctionalResNet(num_classes=1000).eval()
    before = snapshot(original)
    se_model = se_inject.inject(original, r=4, input_size=16)
    se_model.stem[0].weight.requires_grad_(False)  # the user froze the stem
    flags = {n: p.requires_grad for n, p in se_model.named_parameters()}
    data = digits(image_size=16)
    result = finetune(
        se_model, data, tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=1, batch_size=128), original=original
    )
    assert_unchanged(original, before)
    assert original.head.out_features == 1000 and result.accuracy["before retrofit"] is not None
    assert {n: p.requires_grad for n, p in result.model.named_parameters() if n in flags} == flags


def test_plotting_leaves_matplotlib_s_backend_alone(tmp_path):
    import matplotlib

    from se_inject.inspect.excitation import ExcitationReport, UnitStats, plot

    backend = matplotlib.get_backend()
    report = ExcitationReport(
        ["a", "b"], 4, [UnitStats("x.se_1_1", 1, 1, 2, 2.0, [1.0, 1.0], [[1.0, 1.0]] * 2, [[0.0, 0.0]] * 2, 0.0, 1.0)]
    )
    plot(report, tmp_path)
    assert matplotlib.get_backend() == backend


def test_inspection_restores_mode_and_device():
    from torch.utils.data import DataLoader

    from se_inject.inspect.excitation import collect

    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, input_size=16).train()
    data = digits(image_size=16)
    collect(model, DataLoader(data.val, batch_size=64), data.classes, max_images=64)
    assert all(m.training for m in model.modules()) and next(model.parameters()).device.type == "cpu"


# --- 6. training input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"epochs": 2.5}, "epochs"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"workers": -1}, "workers"),
        ({"batch_size": True}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"full_lr_scale": float("nan")}, "full_lr_scale"),
        ({"amp": "yes"}, "amp"),
    ],
)
def test_invalid_hyper_parameters_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        FinetuneConfig(**kwargs)


def _splits(n_train: int, n_val: int = 8, poison: bool = False) -> DataSplits:
    from torch.utils.data import TensorDataset

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_train, 3, 16, 16, generator=generator)
    if poison:
        x[0] = float("nan")
    y = torch.arange(n_train) % 10
    xv, yv = torch.randn(n_val, 3, 16, 16, generator=generator), torch.arange(n_val) % 10
    return DataSplits(TensorDataset(x, y), TensorDataset(xv, yv), [str(i) for i in range(10)], 16)


def test_a_final_batch_of_one_image_is_not_fed_to_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, input_size=16)
    result = finetune(model, _splits(33), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0, batch_size=16))
    assert len(result.history) == 1


def test_a_dataset_too_small_to_train_is_refused_up_front(tmp_path):
    model = se_inject.inject(FunctionalResNet(), r=4, input_size=16)
    with pytest.raises(DataError, match="too few to train on"):
        finetune(model, _splits(1), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0))
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_without_saving_it(tmp_path):
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, input_size=16)
    with pytest.raises(
        se_inject.TrainingDivergedError, match=r"loss became nan at epoch 1, step \d+; nothing of this epoch was saved"
    ):
        finetune(model, _splits(32, poison=True), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0, batch_size=8))
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_truncated_image_is_found_before_training(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "data" / split / name / "x.jpg", quality=95)
    path = tmp_path / "data" / "train" / "b" / "x.jpg"
    path.write_bytes(path.read_bytes()[:400])  # the header survives: Image.verify() alone would pass it
    fails_in_one_line(
        ["finetune", "resnet18", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
        "x.jpg: unreadable image",
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, match",
    [(b"\x00" * 100, "cannot be read as a fine-tuning checkpoint"), (None, "not an se_inject fine-tuning checkpoint")],
)
def test_a_truncated_or_foreign_checkpoint_is_one_line(tmp_path, content, match):
    run = tmp_path / "run"
    run.mkdir()
    if content is None:
        torch.save({"weights": torch.zeros(2)}, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(content)
    fails_in_one_line(
        [
            "finetune",
            str(TINY) + ":FunctionalResNet",
            "--data",
            "digits",
            "--input-size",
            "16",
            "--out",
            str(run),
            "--resume",
        ],
        match,
    )


def test_pickle_is_never_used_for_a_recipe(saved, tmp_path):
    """A recipe.json holding a pickle's bytes is refused as JSON; nothing unpickles it."""
    directory = tampered(saved, tmp_path)
    (directory / RECIPE_FILE).write_bytes(pickle.dumps({"source": "os:system"}))
    with pytest.raises(ArtifactError, match="recipe"):
        se_inject.load(directory)


def test_a_failing_worker_under_nproc_is_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "net.py").write_text("def build():\n    raise RuntimeError('no such layer config')\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "se_inject",
            "finetune",
            f"{tmp_path / 'net.py'}:build",
            "--data",
            "digits",
            "--out",
            str(tmp_path / "run"),
            "--nproc",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "se-inject: error: calling " + f"{tmp_path / 'net.py'}:build() failed: RuntimeError: no such layer config"
    ]
    assert not (tmp_path / "run").exists()
