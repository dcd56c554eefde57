"""The Hub (#27 item 2), with no network: a push through an HfApi stand-in that writes what the Hub would
serve into a huggingface_hub cache laid out in a temporary directory, then loads from that cache with
HF_HUB_OFFLINE=1; ``local-dir:`` names; the model card and config.json; tampered repositories."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import randomize_batchnorm, randomize_units
from safetensors.torch import save_file
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.errors import ArtifactError, ConfigError, UntrustedCodeError


class FakeHubApi:
    """What ``HfApi`` does for a push, on a local cache: each upload is a commit the cache serves."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.created: list[tuple[str, bool]] = []

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False) -> str:
        self.created.append((repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: Path, revision: str | None, commit_message: str) -> None:
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        files = sorted(Path(folder_path).iterdir())
        commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for f in files:
            shutil.copy(f, snapshot / f.name)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHubApi:
    """An offline huggingface_hub whose cache is a temporary directory, and a stand-in HfApi writing to it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = FakeHubApi(cache)

    class HfApi:  # a class, as the real one is (transformers writes `HfApi | None` at import)
        def __new__(cls, token: str | None = None) -> FakeHubApi:  # type: ignore[misc]
            return api

    monkeypatch.setattr("huggingface_hub.HfApi", HfApi)
    return api


def _retrofit(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    base = randomize_batchnorm(timm.create_model("resnet18", num_classes=10)).eval()
    return base, randomize_units(se_inject.inject(base, r=8, input_size=64))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return se_inject.largest_difference(a.eval()(x), b.eval()(x)) == 0.0


def test_push_a_model_and_load_it_from_the_cache(hub: FakeHubApi) -> None:
    _, se = _retrofit()
    url = se_inject.push_to_hub(se, "me/se-resnet18", private=True)
    assert url == "https://huggingface.co/me/se-resnet18" and hub.created == [("me/se-resnet18", True)]
    loaded = se_inject.load("hf-hub:me/se-resnet18")  # offline: the cache alone
    assert _same(se, loaded)
    snapshot = se_inject.io.remote.resolve("hf-hub:me/se-resnet18")
    assert {p.name for p in snapshot.iterdir()} == {"recipe.json", "model.safetensors", "config.json", "README.md"}
    config = json.loads((snapshot / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 10 and "pretrained_cfg" in config
    assert config["se_inject"]["load"] == "se_inject.load('hf-hub:me/se-resnet18')"
    card = (snapshot / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: se_inject" in card and "squeeze-and-excitation" in card
    assert "| stage | feature map | units |" in card and "| 4 | 2x2 | 2 | 512 | 8 |" in card


def test_units_only_on_a_revision_onto_a_base_checkpoint(hub: FakeHubApi, tmp_path: Path) -> None:
    base, se = _retrofit()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    se_inject.save(se, tmp_path / "units", weights="units")
    se_inject.push_to_hub(tmp_path / "units", "me/se-units", revision="v1", base=tmp_path / "base.safetensors")
    snapshot = se_inject.io.remote.resolve("hf-hub:me/se-units@v1")
    assert json.loads((snapshot / "recipe.json").read_text())["weights"] == "units"  # pushed as saved
    assert (
        "base=<the base model or its checkpoint>"
        in json.loads((snapshot / "config.json").read_text())["se_inject"]["load"]
    )
    loaded = se_inject.load("hf-hub:me/se-units@v1", base=tmp_path / "base.safetensors")
    assert _same(se, loaded)
    with pytest.raises(ArtifactError, match="not in the local Hugging Face cache"):
        se_inject.load("hf-hub:me/se-units")  # main was never pushed, and the Hub cannot be reached


def test_local_dir_names_a_saved_directory(tmp_path: Path) -> None:
    _, se = _retrofit()
    se_inject.save(se, tmp_path / "se")
    assert _same(se, se_inject.load(f"local-dir:{tmp_path / 'se'}"))


def test_a_tampered_repository_runs_nothing(hub: FakeHubApi, tmp_path: Path) -> None:
    _, se = _retrofit()
    se_inject.push_to_hub(se, "me/tampered")
    snapshot = se_inject.io.remote.resolve("hf-hub:me/tampered")
    recipe = json.loads((snapshot / "recipe.json").read_text())
    (snapshot / "recipe.json").write_text(json.dumps({**recipe, "source": "evil.py:build"}))
    (snapshot / "evil.py").write_text("raise SystemExit('ran code from the repository')\n")
    (snapshot / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Net"}}))
    with pytest.raises(UntrustedCodeError, match="Python code, which loading would import and run"):
        se_inject.load("hf-hub:me/tampered")
    (snapshot / "recipe.json").write_text(json.dumps({**recipe, "rules": ["/etc/passwd"]}))
    with pytest.raises(ArtifactError, match="not a recipe field"):
        se_inject.load("hf-hub:me/tampered")
    outside = tmp_path / "secret.toml"
    outside.write_text("not = 'read'\n")
    (snapshot / "recipe.json").write_text(
        json.dumps({**recipe, "options": {**recipe["options"], "rules": [str(outside)]}})
    )
    with pytest.raises(ArtifactError, match="outside the repository"):
        se_inject.load("hf-hub:me/tampered")
    (snapshot / "recipe.json").write_text(json.dumps(recipe))
    assert _same(se, se_inject.load("hf-hub:me/tampered"))  # config.json and stray files are not read


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("hf-hub:no-slash", "expected owner/name"),
        ("hf-hub:a/b/c", "expected owner/name"),
        ("hf-hub:../x", "owner/name"),
    ],
)
def test_bad_hub_names_are_one_line(name: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        se_inject.load(name)


def test_a_transformers_retrofit_round_trips_through_the_hub(hub: FakeHubApi, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "hf")
    model = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "hf").eval()
    se = randomize_units(se_inject.inject(model, r=4, input_size=64))
    se_inject.save(se, tmp_path / "se")
    saved_config = json.loads((tmp_path / "se" / "config.json").read_text())
    assert saved_config["model_type"] == "resnet" and saved_config["se_inject"]["units"] == 4
    se_inject.push_to_hub(tmp_path / "se", "me/se-hf-resnet")
    loaded = se_inject.load("hf-hub:me/se-hf-resnet")
    assert type(loaded) is type(model) and loaded.config.to_dict() == se.config.to_dict()
    assert _same(se, loaded)


def test_the_push_command(hub: FakeHubApi, tmp_path: Path) -> None:
    _, se = _retrofit()
    se_inject.save(se, tmp_path / "se")
    result = CliRunner().invoke(app, ["push", str(tmp_path / "se"), "me/cli-push", "--save-weights", "units"])
    assert result.exit_code == 0, result.output
    assert "load with se_inject.load('hf-hub:me/cli-push')" in result.stdout
    assert (
        json.loads((se_inject.io.remote.resolve("hf-hub:me/cli-push") / "recipe.json").read_text())["weights"]
        == "units"
    )
    wrong = CliRunner().invoke(app, ["push", str(tmp_path / "se"), "not a repo"])
    assert wrong.exit_code == 2 and "expected owner/name" in wrong.output


def test_a_transformers_retrofit_from_a_config_object_loads_from_its_saved_config(tmp_path: Path) -> None:
    """No directory names the base: the config.json saved beside the weights rebuilds class and config."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=3)
    se = randomize_units(se_inject.inject(transformers.ConvNextForImageClassification(config).eval(), r=4))
    se_inject.save(se, tmp_path / "se")
    loaded = se_inject.load(tmp_path / "se")
    assert type(loaded) is type(se) and loaded.config.to_dict() == se.config.to_dict()
    assert _same(se, loaded)


def _publish_timm_base(hub: FakeHubApi, tmp_path: Path, repo_id: str) -> torch.nn.Module:
    """A timm model published as timm publishes (save_for_hf: config.json and model.safetensors)."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(4)
    base = randomize_batchnorm(timm.create_model("resnet18", num_classes=10)).eval()
    folder = tmp_path / "published"
    save_for_hf(base, str(folder), safe_serialization=True)
    hub.upload_folder(repo_id=repo_id, folder_path=folder, revision=None, commit_message="base")
    return base


def test_a_base_on_the_hub_is_a_model_source(hub: FakeHubApi, tmp_path: Path) -> None:
    """hf-hub:ORG/NAME builds the base with timm from the cache; a units-only save goes onto its weights."""
    base = _publish_timm_base(hub, tmp_path, "someone/resnet18-base")
    spec = "hf-hub:someone/resnet18-base"
    assert type(se_inject.load_model(spec, device="meta")).__name__ == "ResNet"
    published = se_inject.load_model(spec, pretrained=True).eval()
    assert _same(base, published)
    se = randomize_units(se_inject.retrofit(published, r=8, input_size=64, model_name=spec).model)
    se_inject.push_to_hub(se, "me/se-on-base", weights="units")
    card = (se_inject.io.remote.resolve("hf-hub:me/se-on-base") / "README.md").read_text()
    assert "base_model: someone/resnet18-base" in card
    assert _same(se, se_inject.load("hf-hub:me/se-on-base"))  # no base given: the published weights
