import pytest
from torch import nn

from se_inject.errors import ModelSpecError
from se_inject.models import load_model


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
    source.write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3))\n"
    )
    model = load_model(f"{source}:build", device="meta")
    assert isinstance(model, nn.Sequential) and model[0].weight.is_meta


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet5o", r"unknown timm model 'resnet5o'; did you mean resnet50"),
        ("torchvision:resnet5o", r"unknown torchvision classification model 'resnet5o'; did you mean resnet50"),
        ("no_such_package_xyz:build", r"cannot import module 'no_such_package_xyz'"),
        ("tiny_models:FunctionalResNett", r"'tiny_models' has no callable 'FunctionalResNett'; did you mean FunctionalResNet"),
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
