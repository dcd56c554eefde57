"""save / load / apply: bit-exact round trips, and every way an artifact can be wrong."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import FunctionalResNet

import se_inject
from se_inject.io.layout import RECIPE_FILE, WEIGHTS_FILE
from se_inject.io.recipe import Recipe

ROOT = Path(__file__).parents[2]

# Loads a saved directory in a fresh interpreter and prints the outputs on a fixed batch.
_LOAD_AND_RUN = """
import sys, torch, se_inject
model = se_inject.load(sys.argv[1])
x = torch.load(sys.argv[2])
torch.save(model(x), sys.argv[3])
"""


def _trained_like(model):
    """Give every SE unit non-trivial weights, as fine-tuning would (the round trip must carry them)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".se_" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return se_inject.load_model("resnet18").eval()


@pytest.mark.parametrize(
    "position", [p if p == "standard" else pytest.param(p, marks=pytest.mark.slow) for p in se_inject.POSITIONS]
)
def test_round_trip_in_a_fresh_process_is_bit_exact(resnet18, position, tmp_path):
    injected = _trained_like(
        se_inject.inject(resnet18, position=position, r=16, input_size=64, model_name="resnet18")
    ).eval()
    se_inject.save(injected, tmp_path / "saved")
    x = torch.randn(2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = injected(x)
    subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "saved"), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        cwd=ROOT,
    )
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_the_recipe_says_what_was_done(resnet18, tmp_path):
    injected = se_inject.inject(resnet18, position="inner", r=8, bias=True, input_size=64, model_name="resnet18")
    se_inject.save(injected, tmp_path / "saved")
    data = json.loads((tmp_path / "saved" / RECIPE_FILE).read_text())
    assert data["source"] == "resnet18" and data["input_size"] == [64, 64]
    assert data["options"]["position"] == "inner" and data["options"]["r"] == 8 and data["options"]["bias"] is True
    assert data["sites"][0] == {
        "name": "layer1.0.se_1_1",
        "rule": "residual",
        "stage": 1,
        "block": 1,
        "channels": 64,
        "hidden": 8,
        "r": 8,
    }
    assert set(data["versions"]) == {"torch", "timm", "se_inject"}
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted([WEIGHTS_FILE, RECIPE_FILE])


def test_a_users_own_module_loads_with_a_fresh_original(tmp_path):
    torch.manual_seed(0)
    original = FunctionalResNet().eval()
    injected = _trained_like(se_inject.inject(original, r=4, input_size=32)).eval()
    se_inject.save(injected, tmp_path / "mine")
    with pytest.raises(se_inject.ArtifactError, match="names no source model .* pass a fresh copy"):
        se_inject.load(tmp_path / "mine")
    loaded = se_inject.load(tmp_path / "mine", model=FunctionalResNet())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), injected(x))


def test_apply_reuses_a_recipe_and_refuses_another_architecture(resnet18, tmp_path):
    injected = se_inject.inject(resnet18, r=16, model_name="resnet18")
    se_inject.save(injected, tmp_path / "saved")
    again = se_inject.apply(tmp_path / "saved", se_inject.load_model("resnet18"))
    assert [n for n, m in again.named_modules() if isinstance(m, se_inject.SqueezeExcite)] == [
        n for n, m in injected.named_modules() if isinstance(m, se_inject.SqueezeExcite)
    ]
    with pytest.raises(
        se_inject.RecipeMismatchError, match="unit 3: recipe has .*layer2.0.se_2_1.* model gives .*layer1.2.se_1_3"
    ):
        se_inject.apply(tmp_path / "saved", se_inject.load_model("resnet34", device="meta"))
    recipe = Recipe.from_json((tmp_path / "saved" / RECIPE_FILE).read_text())
    assert se_inject.apply(recipe, se_inject.load_model("resnet18", device="meta")) is not None


def test_an_existing_directory_is_kept_unless_forced(resnet18, tmp_path):
    injected = se_inject.inject(resnet18, r=16, model_name="resnet18")
    target = tmp_path / "saved"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(se_inject.ArtifactError, match="already exists; .* force=True"):
        se_inject.save(injected, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(se_inject.ArtifactError, match="not a directory se_inject wrote .*keep.txt"):
        se_inject.save(injected, target, force=True)  # --force never deletes what se_inject did not write
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    (target / "keep.txt").unlink()
    se_inject.save(injected, target, force=True)  # an empty directory may be filled
    se_inject.save(injected, target, force=True)  # and an se_inject save replaced
    assert sorted(p.name for p in target.iterdir()) == sorted([WEIGHTS_FILE, RECIPE_FILE])


def test_a_failed_save_leaves_nothing_behind(resnet18, tmp_path, monkeypatch):
    injected = se_inject.inject(resnet18, r=16, model_name="resnet18")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(se_inject.ArtifactError, match="saved: cannot write the directory: disk full"):
        se_inject.save(injected, tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []


def test_only_injected_models_with_weights_can_be_saved(resnet18, tmp_path):
    with pytest.raises(se_inject.ArtifactError, match="not made by se_inject"):
        se_inject.save(resnet18, tmp_path / "a")
    meta = se_inject.inject(se_inject.load_model("resnet18", device="meta"))
    with pytest.raises(se_inject.ArtifactError, match="meta device"):
        se_inject.save(meta, tmp_path / "b")


@pytest.fixture()
def saved(resnet18, tmp_path):
    se_inject.save(se_inject.inject(resnet18, r=16, model_name="resnet18"), tmp_path / "saved")
    return tmp_path / "saved"


def test_missing_and_damaged_files(saved, tmp_path):
    with pytest.raises(se_inject.ArtifactError, match="no such directory"):
        se_inject.load(tmp_path / "nothing")
    weights = saved / WEIGHTS_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(se_inject.ArtifactError, match="cannot be read as safetensors .* damaged or truncated"):
        se_inject.load(saved)
    weights.unlink()
    with pytest.raises(se_inject.ArtifactError, match="model.safetensors: missing"):
        se_inject.load(saved)
    (saved / RECIPE_FILE).write_text("{not json")
    with pytest.raises(se_inject.ArtifactError, match="recipe.json: not valid JSON"):
        se_inject.load(saved)
    (saved / RECIPE_FILE).unlink()
    with pytest.raises(se_inject.ArtifactError, match="recipe.json: missing"):
        se_inject.load(saved)


def test_weights_that_do_not_fit_are_named(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / WEIGHTS_FILE))
    state["fc.weight"] = torch.zeros(3, 512)
    del state["layer1.0.se_1_1.fc1.weight"]
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(
        se_inject.ArtifactError,
        match=r"1 missing: layer1.0.se_1_1.fc1.weight; 1 of another shape: fc.weight \(3, 512\) vs \(1000, 512\)",
    ):
        se_inject.load(saved)


def test_reinjection_is_detected(resnet18):
    injected = se_inject.inject(resnet18, r=16)
    with pytest.raises(se_inject.AlreadyInjectedError, match="already holds 8 SE units inserted by se_inject"):
        se_inject.inject(injected)


def test_conventions_groups_and_at_survive_save_and_load(resnet18, tmp_path):
    """A style, groups of blocks with their own options and at= are data in the recipe: load rebuilds
    the same units (a gate, an activation or a width rebuilt otherwise would not load or not match)."""
    options = {
        "style": "mobilenetv3",
        "groups": [{"blocks": ["layer4.*"], "r": 8, "act": "silu"}],
        "exclude": ["layer1.1"],
        "input_size": 64,
        "model_name": "resnet18",
    }
    injected = _trained_like(se_inject.inject(resnet18, **options)).eval()
    se_inject.save(injected, tmp_path / "styled")
    loaded = se_inject.load(tmp_path / "styled").eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded(x), injected(x))
    assert type(loaded.layer4[0].se_4_1.act).__name__ == "SiLU" and type(loaded.layer2[0].se_2_1.act).__name__ == "ReLU"
    at = se_inject.inject(resnet18, at=["layer2.*.conv1"], input_size=64, model_name="resnet18")
    se_inject.save(_trained_like(at).eval(), tmp_path / "at")
    assert torch.equal(se_inject.load(tmp_path / "at").eval()(x), at.eval()(x))
