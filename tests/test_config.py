import dataclasses

import pytest

from se_inject.config import POSITIONS, InjectConfig
from se_inject.errors import ConfigError, SEInjectError


def test_defaults_are_the_papers_resnet_setting_with_the_preserving_init():
    config = InjectConfig()
    assert (config.position, config.r, config.squeeze, config.gate, config.act, config.bias) == (
        "standard",
        16,
        "avg",
        "sigmoid",
        "relu",
        False,
    )
    assert config.rounding == "floor" and config.init == "preserve" and config.stages is None
    assert (config.reduce_from, config.hidden, config.style) == ("channels", None, "paper")
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
        ({"excitation": "softmax"}, "gate"),
        ({"gate": "softmax"}, "gate"),
        ({"gate": "tanh", "excitation": "relu"}, "gate"),
        ({"act": "swish"}, "act"),
        ({"reduce_from": "output"}, "reduce_from"),
        ({"hidden": 0}, "hidden"),
        ({"style": "no_such_style"}, "style"),
        ({"include": [""]}, "include"),
        ({"exclude": 3}, "exclude"),
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


def test_a_style_fills_what_is_not_given_and_explicit_options_win():
    config = InjectConfig(style="efficientnet", r=8, act="gelu")
    assert (config.r, config.act, config.gate, config.bias, config.rounding, config.reduce_from) == (
        8,
        "gelu",
        "sigmoid",
        True,
        "round_even",
        "block_input",
    )
    assert InjectConfig(style="regnety").position == "inner"
    assert InjectConfig(style="timm", bias=False).bias is False  # an explicit paper value still wins
    assert InjectConfig(excitation="tanh").gate == "tanh"  # the former name of gate


def test_user_styles_are_data_checked_before_anything_is_registered(tmp_path):
    import se_inject

    good = tmp_path / "good.toml"
    good.write_text('[[style]]\nname = "wide_se"\ndescription = "r 4, SiLU"\noptions = { r = 4, act = "silu" }\n')
    se_inject.load_style_file(good)
    assert (InjectConfig(style="wide_se").r, InjectConfig(style="wide_se").act) == (4, "silu")
    with pytest.raises(ConfigError, match="already defined"):
        se_inject.load_style_file(good)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[style]]\nname = "ok_one"\noptions = { r = 2 }\n[[style]]\nname = "bad"\noptions = { init = "paper" }\n'
    )
    with pytest.raises(ConfigError, match=r"bad.toml: style 'bad': field 'options.init': a style sets position"):
        se_inject.load_style_file(bad)
    assert "ok_one" not in se_inject.styles()  # nothing of a bad file is registered
    worse = tmp_path / "worse.toml"
    worse.write_text('[[style]]\nname = "worse"\noptions = { gate = "softmax" }\n')
    with pytest.raises(ConfigError, match=r"style 'worse': field 'options': gate: 'softmax' is not one of"):
        se_inject.load_style_file(worse)
