"""One grammar for NAME=VALUE lists: --group, --candidate and --unit-option read values as the configs
declare them, refuse a name given twice, and a malformed value gets the same words whether it came
through one of them, a style file or a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import FunctionalResNet
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.cli.options import parse_candidate, parse_group, parse_unit_options
from se_inject.config import InjectConfig
from se_inject.errors import SEInjectError
from se_inject.grammar import field_types, parse_int_list, read_options, read_value
from se_inject.io.layout import RECIPE_FILE
from se_inject.io.styles import load_style_file

runner = CliRunner()


def test_values_are_read_as_their_fields_declare():
    types = field_types(InjectConfig)
    assert read_options("r=8,bias=yes,stages=2-4,hidden=none", types, "--x") == {
        "r": 8,
        "bias": True,
        "stages": (2, 3, 4),
        "hidden": None,
    }
    assert read_options("r=8|16|16|32,include=layer3.*|layer4.*", types, "--x") == {
        "r": (8, 16, 16, 32),
        "include": ("layer3.*", "layer4.*"),
    }
    assert read_value("maybe", bool, "bias") == "maybe"  # not a bool's form: the config refuses it in its words
    assert read_value("0.5", float, "gamma") == 0.5 and read_value("5", int | None, "kernel_size") == 5
    assert parse_int_list("1,3-4", "stages") == (1, 3, 4) and parse_int_list("16", "r") == 16


def test_a_name_given_twice_is_refused_everywhere():
    with pytest.raises(SEInjectError, match=r"--group: r is given twice \(r=8 and r=4\)"):
        parse_group("layer1.*:r=8,r=4")
    with pytest.raises(SEInjectError, match=r"--candidate: r is given twice"):
        parse_candidate("r=8,position=pre,r=4")
    with pytest.raises(SEInjectError, match=r"--unit-option: kernel_size is given twice"):
        parse_unit_options("eca", ["kernel_size=3", "kernel_size=5"])


def _saved_recipe(tmp_path: Path) -> Path:
    se_model = se_inject.inject(FunctionalResNet(), r=4, input_size=16)
    se_inject.save(se_model, tmp_path / "saved")
    return tmp_path / "saved" / RECIPE_FILE


def _through_each_entry(tmp_path: Path, option: str, value: str, toml_value: str, json_value: object) -> list[str]:
    """The error a malformed value gets through --group, --candidate, a style file and a recipe."""
    messages = []
    for parse in (lambda: InjectConfig.from_dict({"groups": [parse_group(f"layer1.*:{option}={value}")]}),
                  lambda: parse_candidate(f"{option}={value}")):  # fmt: skip
        with pytest.raises(SEInjectError) as caught:
            parse()
        messages.append(str(caught.value))
    style = tmp_path / "style.toml"
    style.write_text(f'[[style]]\nname = "mine_{option}"\noptions = {{ {option} = {toml_value} }}\n')
    with pytest.raises(SEInjectError) as caught:
        load_style_file(style)
    messages.append(str(caught.value))
    path = _saved_recipe(tmp_path)
    recipe = json.loads(path.read_text())
    recipe["options"][option] = json_value
    path.write_text(json.dumps(recipe))
    with pytest.raises(SEInjectError) as caught:
        se_inject.load(tmp_path / "saved", model=FunctionalResNet())
    messages.append(str(caught.value))
    return messages


@pytest.mark.parametrize(
    "option, value, toml_value, json_value, words",
    [
        ("bias", "maybe", '"maybe"', "maybe", "bias: expected True or False, got 'maybe'"),
        ("r", "0", "0", 0, "r: the reduction ratio must be an integer from 1 to 65536, got 0"),
        ("r", "99999999", "99999999", 99999999, "from 1 to 65536, got 99999999"),
    ],
)
def test_the_same_malformed_value_gets_the_same_words_through_every_entry(
    tmp_path, option, value, toml_value, json_value, words
):
    messages = _through_each_entry(tmp_path, option, value, toml_value, json_value)
    assert all(words in m for m in messages), messages


def test_a_unit_option_gets_the_same_words_from_the_cli_and_a_recipe(tmp_path):
    with pytest.raises(SEInjectError) as from_cli:
        se_inject.inject(FunctionalResNet(), unit="ge", unit_options=parse_unit_options("ge", ["mlp=maybe"]))
    se_model = se_inject.inject(FunctionalResNet(), r=4, unit="ge", input_size=16)
    se_inject.save(se_model, tmp_path / "saved")
    path = tmp_path / "saved" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    recipe["options"]["unit_options"] = {"mlp": "maybe"}
    path.write_text(json.dumps(recipe))
    with pytest.raises(SEInjectError) as from_recipe:
        se_inject.load(tmp_path / "saved", model=FunctionalResNet())
    words = "unit_options.mlp: expected True or False, got 'maybe'"
    assert words in str(from_cli.value) and words in str(from_recipe.value)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--group", "layer1.*:r=8,r=4"], "--group: r is given twice"),
        (["--group", "layer1.*:bias=maybe"], "bias: expected True or False, got 'maybe'"),
        (["--unit", "eca", "--unit-option", "kernel_size=3", "--unit-option", "kernel_size=5"], "given twice"),
        (["--at", "layer1.0.conv1", "--stages", "3"], "the 1 sites at= names lie in stages 1-1"),
    ],
)
def test_the_cli_refuses_each_in_one_line(args, match):
    result = runner.invoke(app, ["resnet18", *args])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert match in result.stderr, result.stderr


def test_compare_refuses_a_malformed_candidate_before_measuring():
    result = runner.invoke(app, ["compare", "resnet18", "--candidate", "bias=maybe"])
    assert result.exit_code == 2 and "bias: expected True or False, got 'maybe'" in result.stderr, result.output
