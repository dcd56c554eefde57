"""The directory writer every save goes through: races, the lock file, permissions and a full disk.

Each test asserts the promise itself: the user's files are all still there with their bytes, the old
save is whole, and nothing of se_inject's is left behind.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import FunctionalResNet

import se_inject
import se_inject.io.saving as saving
from se_inject.errors import ArtifactError
from se_inject.io.files import write_directory
from se_inject.io.layout import OWNED_FILES, RECIPE_FILE, WEIGHTS_FILE
from se_inject.train.data import digits
from se_inject.train.finetune import FinetuneConfig, finetune


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def injected():
    torch.manual_seed(0)
    return se_inject.inject(FunctionalResNet(), r=4, input_size=16)


def _saving_with(monkeypatch, meanwhile):
    """se_inject.save with ``meanwhile()`` run after the model is written and before the swap."""
    real = saving.write_model_files

    def write_then_interfere(model, directory, extra_metadata=None, weights="all"):
        real(model, directory, extra_metadata, weights)
        meanwhile()

    monkeypatch.setattr(saving, "write_model_files", write_then_interfere)


@pytest.mark.parametrize(
    "interference",
    ["new file", "owned file rewritten", "owned file removed"],
)
def test_a_forced_save_never_deletes_what_was_written_into_the_target_meanwhile(
    injected, tmp_path, monkeypatch, interference
):
    target = tmp_path / "saved"
    se_inject.save(injected, target)
    old = tree(target)

    def meanwhile() -> None:
        if interference == "new file":
            (target / "notes.md").write_text("written by the user during the save")
        elif interference == "owned file rewritten":
            (target / RECIPE_FILE).write_text('{"edited": true}')
        else:
            (target / WEIGHTS_FILE).unlink()

    _saving_with(monkeypatch, meanwhile)
    with pytest.raises(ArtifactError, match="changed while the model was being written.*nothing was replaced"):
        se_inject.save(injected, target, force=True)
    expected = dict(old)
    if interference == "new file":
        expected["notes.md"] = b"written by the user during the save"
    elif interference == "owned file rewritten":
        expected[RECIPE_FILE] = b'{"edited": true}'
    else:
        del expected[WEIGHTS_FILE]
    assert tree(target) == expected  # the directory as the user left it: nothing deleted, nothing half-replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no staging or lock left behind


def test_a_forced_save_replaces_only_the_files_it_recorded(injected, tmp_path):
    """The normal case still replaces, and the old directory is removed file by file (not rmtree)."""
    target = tmp_path / "saved"
    se_inject.save(injected, target)
    changed = copy.deepcopy(injected)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    se_inject.save(changed, target, force=True)
    assert tree(target)[WEIGHTS_FILE] != b"" and sorted(os.listdir(target)) == sorted([WEIGHTS_FILE, RECIPE_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_the_writer_itself_refuses_a_swap_onto_a_changed_directory(tmp_path):
    """write_directory on its own, with a foreign file appearing while the new directory is written."""
    target = tmp_path / "out"
    target.mkdir()
    (target / RECIPE_FILE).write_text("old")

    def write(staging: Path) -> None:
        (staging / RECIPE_FILE).write_text("new")
        (target / "photo.jpg").write_bytes(b"\xff\xd8")

    with pytest.raises(ArtifactError, match="new: photo.jpg"):
        write_directory(target, write, force=True, owned=OWNED_FILES, marker=RECIPE_FILE)
    assert tree(target) == {RECIPE_FILE: b"old", "photo.jpg": b"\xff\xd8"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("forced", [False, True])
def test_a_lock_file_the_user_owns_is_never_deleted(injected, tmp_path, forced):
    lock = tmp_path / ".saved.se_inject.lock"
    lock.write_text("the user's own file")
    if forced:
        se_inject.save(injected, tmp_path / "saved")
    se_inject.save(injected, tmp_path / "saved", force=forced)
    assert lock.read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".saved.se_inject.lock", "saved"]


def test_a_lock_path_that_is_no_file_is_refused_in_one_error(injected, tmp_path):
    (tmp_path / ".saved.se_inject.lock").mkdir()
    with pytest.raises(ArtifactError, match="not a lock file"):
        se_inject.save(injected, tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and (tmp_path / ".saved.se_inject.lock").is_dir()


def test_a_lock_held_by_another_save_refuses_at_once(injected, tmp_path):
    import fcntl

    lock = tmp_path / ".saved.se_inject.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ArtifactError, match="in progress"):
            se_inject.save(injected, tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and lock.exists()


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, folder, file", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_directories_follow_the_users_umask(injected, tmp_path, mask, folder, file):
    with _umask(mask):
        se_inject.save(injected, tmp_path / "saved")
        se_inject.save(injected, tmp_path / "saved", force=True)
        run = finetune(
            copy.deepcopy(injected), digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0)
        )
    assert (tmp_path / "saved").stat().st_mode & 0o777 == folder
    for path in [*(tmp_path / "saved").iterdir(), *run.out.iterdir()]:
        assert path.stat().st_mode & 0o777 == file, path


# --- a full disk ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(tmp_path: Path, monkeypatch, how: str):
    """A folder on which writes run out of space: a real 1 MiB tmpfs where this process may mount
    one (it runs as root in CI), else the writers patched to fail as a full disk makes them fail."""
    place = tmp_path / "disk"
    place.mkdir()
    if how == "tmpfs":
        mounted = (
            os.geteuid() == 0
            and (
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(place)], capture_output=True)
            ).returncode
            == 0
        )
        if not mounted:
            pytest.skip("no tmpfs can be mounted here; the patched-writer case covers the same promise")
        try:
            yield place
        finally:
            subprocess.run(["umount", "-l", str(place)], check=False)
        return
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, message: "No space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    yield place


@pytest.mark.parametrize("how", ["tmpfs", "patched"])
def test_a_full_disk_during_a_save_is_one_error_and_the_old_save_is_intact(tmp_path, monkeypatch, how):
    small = se_inject.inject(FunctionalResNet(num_classes=2), r=4, input_size=16)
    with _small_disk(tmp_path, monkeypatch, how) as disk:
        target = disk / "saved"
        if how == "tmpfs":
            se_inject.save(small, target)  # fits: 420 kB
            big = copy.deepcopy(small)
            big.register_buffer("ballast", torch.zeros(128 * 1024))  # 512 kB more: does not fit beside the old one
            old = tree(target)
            with pytest.raises(ArtifactError, match="No space left"):
                se_inject.save(big, target, force=True)
            assert tree(target) == old
        else:
            with pytest.raises(ArtifactError, match="saved: cannot write the weights .*No space left"):
                se_inject.save(small, target)
            assert not target.exists()
        assert sorted(p.name for p in disk.iterdir()) == (["saved"] if how == "tmpfs" else [])


def test_a_full_disk_while_a_run_writes_its_checkpoint_is_one_error(injected, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ArtifactError, match="cannot write epoch 1: .*failed writing file"):
        finetune(
            copy.deepcopy(injected), digits(image_size=16), tmp_path / "run", FinetuneConfig(epochs=1, se_epochs=0)
        )


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from se_inject.cli.app import app

    with _small_disk(tmp_path, monkeypatch, "patched") as disk:
        result = CliRunner().invoke(app, ["resnet18", "--save", str(disk / "saved")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "No space left" in result.stderr and "Traceback" not in result.output


def test_a_forced_run_leaves_no_file_of_the_run_it_replaces(injected, tmp_path):
    """A control run (no units, so no model files) forced onto a retrofit's run: the old model files go,
    or se_inject.load(out) would load the old retrofit as if this run had written it."""
    from se_inject.io.layout import CHECKPOINT_FILE, METRICS_FILE

    data, config = digits(image_size=16), FinetuneConfig(epochs=1, se_epochs=0)
    finetune(copy.deepcopy(injected), data, tmp_path / "run", config)
    assert (tmp_path / "run" / RECIPE_FILE).is_file()
    finetune(FunctionalResNet(), data, tmp_path / "run", config, force=True)
    assert sorted(os.listdir(tmp_path / "run")) == [CHECKPOINT_FILE, METRICS_FILE]
    with pytest.raises(ArtifactError, match="recipe.json: missing"):
        se_inject.load(tmp_path / "run", model=FunctionalResNet())
