"""Every path that writes a model writes one se_inject.load rebuilds (10-class heads included);
concurrent saves to one directory; kills at the model-write step of an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app

ROOT = Path(__file__).parent.parent
TINY = ROOT / "tests" / "tiny_models.py"
runner = CliRunner()


def ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def ten_class_checkpoint(tmp_path_factory) -> Path:
    """A resnet18 "fine-tuned" to 10 classes: random weights and BatchNorm statistics, a 10-way head."""
    torch.manual_seed(0)
    model = se_inject.load_model("resnet18", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
    path = tmp_path_factory.mktemp("ck") / "resnet18_10.pth"
    torch.save(model.state_dict(), path)
    return path


def test_cli_checkpoint_with_num_classes_then_save_then_load(ten_class_checkpoint, tmp_path):
    out = ok(
        "resnet18",
        "--checkpoint",
        str(ten_class_checkpoint),
        "--num-classes",
        "10",
        "--input-size",
        "32",
        "--check",
        "--save",
        str(tmp_path / "se"),
    )
    assert "check: max |injected - original| = 0" in out
    loaded = se_inject.load(tmp_path / "se")
    assert loaded.fc.out_features == 10
    original = se_inject.load_model("resnet18", num_classes=10, checkpoint=ten_class_checkpoint)
    assert same_outputs(loaded, original)  # preserve init: the saved retrofit computes the trained model
    recipe = json.loads((tmp_path / "se" / "recipe.json").read_text())
    assert recipe["head"] == {"name": "fc", "in_features": 512, "out_features": 10}
    assert recipe["model_kwargs"] == {"num_classes": 10}


def test_load_save_load_keeps_the_head(ten_class_checkpoint, tmp_path):
    ok("resnet18", "--checkpoint", str(ten_class_checkpoint), "--num-classes", "10", "--save", str(tmp_path / "a"))
    first = se_inject.load(tmp_path / "a")
    se_inject.save(first, tmp_path / "b")
    second = se_inject.load(tmp_path / "b")
    assert second.fc.out_features == 10 and same_outputs(first, second)


def _finetune(source: str, out: Path, *extra: str) -> None:
    ok(
        "finetune",
        source,
        "--data",
        "digits",
        "--input-size",
        "16",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--se-epochs",
        "1",
        "--batch-size",
        "128",
        *extra,
    )


def test_finetune_then_prune_then_load(ten_class_checkpoint, tmp_path):
    _finetune(
        "resnet18", tmp_path / "run", "--r", "8", "--checkpoint", str(ten_class_checkpoint), "--num-classes", "10"
    )
    tuned = se_inject.load(tmp_path / "run")
    assert tuned.fc.out_features == 10
    out = ok(
        "prune-se",
        str(tmp_path / "run"),
        "--data",
        "digits",
        "--input-size",
        "16",
        "--out",
        str(tmp_path / "pruned"),
        "--unit-names",
        "layer1.0.se_1_1",
    )
    assert "removed 1 unit(s): layer1.0.se_1_1" in out
    pruned = se_inject.load(tmp_path / "pruned")
    assert type(pruned.layer1[0].se_1_1).__name__ == "ChannelScale" and pruned.fc.out_features == 10
    weights = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in pruned.state_dict().items())


def test_finetune_of_a_saved_directory_then_load(ten_class_checkpoint, tmp_path):
    ok("resnet18", "--checkpoint", str(ten_class_checkpoint), "--num-classes", "10", "--save", str(tmp_path / "se"))
    _finetune(str(tmp_path / "se"), tmp_path / "run")
    tuned = se_inject.load(tmp_path / "run")
    assert tuned.fc.out_features == 10
    assert not same_outputs(tuned, se_inject.load(tmp_path / "se"), size=16)  # it did train


def test_a_users_callable_without_num_classes_is_fine_tuned_and_reloaded(tmp_path):
    (tmp_path / "net.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TINY.parent)!r})\nfrom tiny_models import FunctionalResNet\n\n"
        "def build():\n    return FunctionalResNet(num_classes=1000)\n"
    )
    source = f"{tmp_path / 'net.py'}:build"
    _finetune(source, tmp_path / "run", "--r", "4")
    loaded = se_inject.load(tmp_path / "run", trust_code=True)  # build() makes 1000 classes; the recipe's head is 10
    assert loaded.head.out_features == 10
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in loaded.state_dict().items())


# --- concurrency -----------------------------------------------------------------------------------

_SAVE = """
import sys, torch, se_inject
sys.path.insert(0, sys.argv[3])
from tiny_models import FunctionalResNet
torch.manual_seed(int(sys.argv[2]))
model = se_inject.inject(FunctionalResNet(), r=4, input_size=16)
force = sys.argv[4] == "force"
open(sys.argv[5], "a").close()  # ready
while not __import__("os").path.exists(sys.argv[6]):  # start together
    pass
outcomes = []
for _ in range(int(sys.argv[7])):
    try:
        se_inject.save(model, sys.argv[1], force=force)
        outcomes.append("saved")
    except se_inject.ArtifactError as err:
        outcomes.append("refused: " + str(err))
print("\\n".join(outcomes))
"""


def _race(tmp_path: Path, target: Path, force: bool, processes: int, rounds: int) -> list[str]:
    go = tmp_path / "go"
    procs = []
    for i in range(processes):
        ready = tmp_path / f"ready{i}"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _SAVE,
                    str(target),
                    str(i),
                    str(TINY.parent),
                    "force" if force else "new",
                    str(ready),
                    str(go),
                    str(rounds),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(processes)) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        outputs.extend(out.splitlines())
    return outputs


def test_concurrent_saves_to_one_new_target_exactly_one_wins(tmp_path):
    target = tmp_path / "model"
    outcomes = _race(tmp_path, target, force=False, processes=3, rounds=1)
    assert outcomes.count("saved") == 1, outcomes
    refusals = [o for o in outcomes if o != "saved"]
    assert len(refusals) == 2 and all(
        ("already exists" in o or "in progress" in o or "created by another save" in o) for o in refusals
    ), refusals
    se_inject.load(target, model=__import__("tiny_models").FunctionalResNet())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging or lock left


@pytest.mark.slow  # 11 s; concurrent saves to one new target (exactly one wins) stay in the fast suite
def test_concurrent_forced_saves_never_leave_the_target_missing_or_half_written(tmp_path):
    from tiny_models import FunctionalResNet

    target = tmp_path / "model"
    se_inject.save(se_inject.inject(FunctionalResNet(), r=4, input_size=16), target)
    seen_missing, reads = [], []
    stop = threading.Event()

    def watch() -> None:
        # The promise is about the name: it always leads to a complete directory, the old or the new.
        # (A reader that opened the old directory itself just before the swap sees it emptied as the
        # old save is removed; so the watcher resolves the name anew for every look.)
        while not stop.is_set():
            if not target.is_dir():
                seen_missing.append("missing")
                continue
            try:
                recipe = json.loads((target / "recipe.json").read_text())  # opened by name: old or new, whole
            except FileNotFoundError:
                continue  # resolved into the old directory in the instant it was being emptied
            except ValueError:
                seen_missing.append("half-written recipe")
                continue
            reads.append(len(recipe["sites"]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcomes = _race(tmp_path, target, force=True, processes=3, rounds=4)
    finally:
        stop.set()
        watcher.join()
    assert seen_missing == [] and len(reads) > 10 and set(reads) == {5}
    assert "saved" in outcomes and all(o == "saved" or "in progress" in o for o in outcomes), outcomes
    se_inject.load(target, model=FunctionalResNet())


# --- kills at the model-write step ---------------------------------------------------------------------

_RUN = """
import os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import importlib
import se_inject
ft = importlib.import_module("se_inject.train.finetune")
from tiny_models import FunctionalResNet
from se_inject.train.data import digits

kill_at, when = int(sys.argv[3]), sys.argv[4]  # epoch (1-based) whose model write is interrupted; before/after
calls = []
real_write = ft.write_model_files

def write(model, directory, **kwargs):
    calls.append(1)
    if len(calls) == kill_at and when == "before":
        os._exit(9)
    real_write(model, directory, **kwargs)
    if len(calls) == kill_at and when == "after":
        os._exit(9)

ft.write_model_files = write
torch.manual_seed(0)
model = se_inject.inject(FunctionalResNet(), r=4, input_size=16, init="paper")
config = ft.FinetuneConfig(epochs=3, se_epochs=1, batch_size=64, lr=0.1, full_lr_scale=1.0)
ft.finetune(model, digits(image_size=16), sys.argv[1], config, resume=sys.argv[5] == "resume")
"""


def _run(out: Path, kill_at: int = 0, when: str = "none", resume: bool = False) -> int:
    return subprocess.run(
        [sys.executable, "-c", _RUN, str(out), str(TINY.parent), str(kill_at), when, "resume" if resume else "new"],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    ).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _run(out) == 0
    return out


def _model_files(out: Path) -> tuple[dict[str, torch.Tensor], str]:
    return load_file(str(out / "model.safetensors")), (out / "recipe.json").read_text()


@pytest.mark.parametrize(
    "kill_at, when",
    [pytest.param(2, "before", marks=pytest.mark.slow), (2, "after"), pytest.param(3, "after", marks=pytest.mark.slow)],
)
def test_a_kill_at_the_model_write_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, kill_at, when):
    out = tmp_path / "run"
    assert _run(out, kill_at, when) == 9
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == kill_at - 2  # the interrupted epoch was not committed
    assert _run(out, resume=True) == 0
    (whole, whole_recipe), (cut, cut_recipe) = _model_files(uninterrupted), _model_files(out)
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    assert whole_recipe == cut_recipe
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], whole[k]) for k in whole)


def test_resume_refuses_other_settings_in_one_line(uninterrupted, tmp_path):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "run")
    result = runner.invoke(
        app,
        [
            "finetune",
            f"{TINY}:FunctionalResNet",
            "--data",
            "digits",
            "--input-size",
            "16",
            "--out",
            str(tmp_path / "run"),
            "--resume",
            "--epochs",
            "3",
            "--r",
            "8",
            "--lr",
            "0.2",
        ],
    )
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    for difference in ("lr: 0.1 -> 0.2", "r: 4 -> 8", "full_lr_scale: 1.0 -> 0.1", "model: "):
        assert difference in result.stderr, result.stderr
    assert "only epochs, workers, device, amp, channels_last, save_weights may change" in result.stderr


def test_resume_with_more_epochs_continues(uninterrupted, tmp_path):
    import shutil

    from tiny_models import FunctionalResNet

    from se_inject.train.data import digits
    from se_inject.train.finetune import FinetuneConfig, finetune

    shutil.copytree(uninterrupted, tmp_path / "run")
    torch.manual_seed(0)
    model = se_inject.inject(FunctionalResNet(), r=4, input_size=16, init="paper")
    config = FinetuneConfig(epochs=4, se_epochs=1, batch_size=64, lr=0.1, full_lr_scale=1.0)
    result = finetune(model, digits(image_size=16), tmp_path / "run", config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    lrs = [r["lr"] for r in result.history]
    assert lrs[3] < lrs[2] < lrs[1] and lrs[3] > 0  # the full phase's cosine, stretched over three epochs
