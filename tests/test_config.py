import dataclasses

import pytest

from se_inject.config import POSITIONS, InjectConfig
from se_inject.errors import ConfigError, SEInjectError


def test_defaults_are_the_papers_resnet_setting_with_the_preserving_init():
    config = InjectConfig()
    assert (config.position, config.r, config.squeeze, config.excitation, config.bias) == (
        "standard",
        16,
        "avg",
        "sigmoid",
        False,
    )
    assert config.rounding == "floor" and config.init == "preserve" and config.stages is None
    assert POSITIONS == ("standard", "pre", "post", "identity", "inner")


def test_lists_become_tuples_and_stages_are_sorted():
    config = InjectConfig(r=[8, 16, 16, 32], stages=[4, 2], leaf_modules="MyBlock")
    assert config.r == (8, 16, 16, 32)
    assert config.stages == (2, 4)
    assert config.leaf_modules == ("MyBlock",)
    assert InjectConfig(r=[8]).r == 8
    assert InjectConfig(stages=3).stages == (3,)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"position": "middle"}, "position"),
        ({"squeeze": "sum"}, "squeeze"),
        ({"excitation": "softmax"}, "excitation"),
        ({"rounding": "up"}, "rounding"),
        ({"init": "random"}, "init"),
        ({"r": 0}, "r"),
        ({"r": -4}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"r": []}, "r"),
        ({"r": [16, 0]}, "r"),
        ({"stages": [0]}, "stages"),
        ({"stages": [2, 2]}, "stages"),
        ({"stages": "2"}, "stages"),
        ({"stages": []}, "stages"),
        ({"bias": "yes"}, "bias"),
        ({"leaf_modules": [""]}, "leaf_modules"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}:") as info:
        InjectConfig(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SEInjectError)


def test_config_is_frozen_and_every_field_has_help():
    config = InjectConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 8
    help_text = InjectConfig.field_help()
    assert set(help_text) == {f.name for f in dataclasses.fields(InjectConfig)}
    assert all(help_text.values())
