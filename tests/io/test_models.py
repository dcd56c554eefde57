import pytest
from torch import nn

from se_inject.errors import ModelSpecError
from se_inject.io.models import load_model


def test_timm_name_on_meta_allocates_no_weights():
    model = load_model("resnet18", device="meta")
    assert type(model).__name__ == "ResNet"
    assert all(p.is_meta for p in model.parameters())


def test_torchvision_name():
    model = load_model("torchvision:resnet18", device="meta")
    assert type(model).__module__.startswith("torchvision")


def test_module_callable():
    model = load_model("tiny_models:FunctionalResNet")
    assert type(model).__name__ == "FunctionalResNet"


def test_file_callable(tmp_path):
    source = tmp_path / "my_net.py"
    source.write_text("import torch.nn as nn\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n")
    model = load_model(f"{source}:build", device="meta")
    assert isinstance(model, nn.Sequential) and model[0].weight.is_meta


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet5o", r"unknown timm model 'resnet5o'; did you mean resnet50"),
        ("torchvision:resnet5o", r"unknown torchvision image model 'resnet5o'; did you mean resnet50"),
        ("no_such_package_xyz:build", r"cannot import module 'no_such_package_xyz'"),
        (
            "tiny_models:FunctionalResNett",
            r"'tiny_models' has no callable 'FunctionalResNett'; did you mean FunctionalResNet",
        ),
        ("os:getcwd", r"os:getcwd\(\) returned str, not an nn.Module"),
        ("missing_file.py:build", r"no such file: 'missing_file.py'"),
        ("", r"empty model name"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model(spec, device="meta")


def test_failures_inside_user_code_are_reported(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ModelSpecError, match="importing .*broken.py' failed: RuntimeError: boom"):
        load_model(f"{broken}:build")
    raising = tmp_path / "raising.py"
    raising.write_text("def build():\n    raise ValueError('bad width')\n")
    with pytest.raises(ModelSpecError, match=r"raising.py:build\(\) failed: ValueError: bad width"):
        load_model(f"{raising}:build")


# --- trained weights ---------------------------------------------------------------------------

import os  # noqa: E402

import torch  # noqa: E402

from se_inject.errors import CheckpointError  # noqa: E402
from se_inject.io.models import load_checkpoint, read_checkpoint  # noqa: E402


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(3)
    model = load_model("resnet18")
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(model.state_dict(), folder / "plain.pth")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, folder / "wrapped.pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, folder / "ddp.pth")
    from safetensors.torch import save_model

    save_model(model, str(folder / "weights.safetensors"))
    return model, folder


@pytest.mark.parametrize("name", ["plain.pth", "wrapped.pt", "ddp.pth", "weights.safetensors"])
def test_checkpoints_load_into_the_original_before_injection(trained, name):
    model, folder = trained
    loaded = load_model("resnet18", checkpoint=folder / name)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused: loading it would run code"):
        read_checkpoint(tmp_path / "evil.pth")


def test_damaged_and_mismatched_checkpoints_are_reported_per_key(trained, tmp_path):
    model, folder = trained
    blob = (folder / "weights.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")
    (tmp_path / "cut.pth").write_bytes((folder / "plain.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot be read by torch.load"):
        read_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"does not fit ResNet: 96 missing: .*layer1.2"):
        load_checkpoint(load_model("resnet34"), folder / "plain.pth")
    with pytest.raises(
        CheckpointError,
        match=r"2 of another shape: fc.bias \(1000,\) vs \(10,\), fc.weight \(1000, 512\) vs \(10, 512\)",
    ):
        load_checkpoint(_resnet18_10_classes(), folder / "plain.pth")


def _resnet18_10_classes():
    import timm

    return timm.create_model("resnet18", num_classes=10)


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face hub offline, with an empty local cache of its own (whatever the machine's network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_pretrained_without_a_network_points_to_checkpoint(offline_hub):
    with pytest.raises(ModelSpecError, match="cannot fetch pretrained weights for 'resnet18': .*--checkpoint FILE"):
        load_model("resnet18", pretrained=True)
    with pytest.raises(ModelSpecError, match="choose one"):
        load_model("resnet18", pretrained=True, checkpoint="x.pth")


def test_models_whose_constructor_reads_weights_still_build_on_meta():
    model = load_model("torchvision:regnet_x_400mf", device="meta")  # its init copies tensors
    assert all(p.is_meta for p in model.parameters())


def test_pretrained_weights_in_the_local_cache_load_offline(offline_hub):
    """--pretrained reads timm's own hub cache when there is no network (here: a cache the test writes)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    reference = timm.create_model("resnet18")
    repo = offline_hub / ("models--" + reference.pretrained_cfg["hf_hub_id"].replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    model = load_model("resnet18", pretrained=True)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_an_unresolvable_hub_is_known_at_once_unless_a_proxy_resolves_names(monkeypatch):
    from se_inject.io.sources.timm_models import _PROXY_VARIABLES, _hub_unreachable

    for variable in _PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 6761)
    assert _hub_unreachable() == "no network (hub.invalid cannot be resolved)"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert _hub_unreachable() is None


def test_optional_constructor_arguments_reach_only_constructors_that_take_them(tmp_path):
    """The model file is imported once: no import just to look at the signature, then another to build."""
    counter = tmp_path / "imports"
    (tmp_path / "nets.py").write_text(
        f"import pathlib\nwith pathlib.Path({str(counter)!r}).open('a') as f:\n    f.write('x')\n"
        "from torch import nn\n"
        "def plain():\n    return nn.Linear(4, 1000)\n"
        "def headed(num_classes=1000):\n    return nn.Linear(4, num_classes)\n"
    )
    plain = load_model(f"{tmp_path / 'nets.py'}:plain", optional_kwargs={"num_classes": 10})
    assert plain.out_features == 1000 and counter.read_text() == "x"
    headed = load_model(f"{tmp_path / 'nets.py'}:headed", optional_kwargs={"num_classes": 10})
    assert headed.out_features == 10
    assert load_model("resnet18", device="meta", optional_kwargs={"num_classes": 10}).fc.out_features == 10
    with pytest.raises(ModelSpecError, match="does not take num_classes"):  # a required argument stays required
        load_model(f"{tmp_path / 'nets.py'}:plain", num_classes=10)


def test_a_constructor_reading_values_builds_on_meta_by_building_for_real(tmp_path):
    source = tmp_path / "reads_values.py"
    source.write_text(
        "import torch, torch.nn as nn\n"
        "def build():\n"
        "    rates = torch.linspace(0, 0.1, 3).tolist()  # as timm's drop-path schedules do\n"
        "    net = nn.Sequential(nn.Conv2d(3, 4, 3))\n"
        "    net.scale = float(net[0].weight.abs().sum().item() > 0) + rates[0]\n"
        "    return net\n"
    )
    model = load_model(f"{source}:build", device="meta")
    assert model[0].weight.is_meta and model.scale == 1.0


def test_a_constructor_failing_for_another_reason_on_meta_says_why(tmp_path):
    source = tmp_path / "bad_shapes.py"
    source.write_text(
        "import torch, torch.nn as nn\n"
        "def build():\n"
        "    torch.ones(2, 3) @ torch.ones(2, 3)\n"
        "    return nn.Conv2d(3, 4, 3)\n"
    )
    with pytest.raises(ModelSpecError, match=r"build\(\) failed: RuntimeError: .*reduction dim"):
        load_model(f"{source}:build", device="meta")
