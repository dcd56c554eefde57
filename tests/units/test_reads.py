"""Units declare the shared options they read: one set on purpose that a unit ignores is refused (through
the API, a recipe and the CLI), one a style or the unit's conventions bring is not; SqueezeExcite is a
GatedUnit, and a unit written by copying units/se.py works unchanged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_batchnorm, randomize_units
from tiny_models import FunctionalResNet
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.config import UNIT_SHAPING_FIELDS
from se_inject.errors import ConfigError
from se_inject.units import se as se_module
from se_inject.units.base import UNITS
from se_inject.units.parts import GatedUnit

# a value other than the paper's for each shared option (squeeze "max": "none" needs a 4-d gate)
SET_ON_PURPOSE = {
    "squeeze": "max",
    "gate": "hard_sigmoid",
    "act": "silu",
    "bias": True,
    "rounding": "ceil",
    "reduce_from": "block_input",
    "hidden": 3,
    "init": "paper",
}
BUILT_IN = ("se", "eca", "ceca", "ese", "cbam", "lcbam", "gc", "ge")


def test_every_shared_option_has_a_value_set_on_purpose_here():
    assert set(SET_ON_PURPOSE) == set(UNIT_SHAPING_FIELDS)


@pytest.mark.parametrize("unit", BUILT_IN)
@pytest.mark.parametrize("option", UNIT_SHAPING_FIELDS)
def test_an_option_the_unit_does_not_read_is_refused_one_it_reads_is_used(unit, option):
    reads = UNITS[unit].reads
    options = {"unit": unit, option: SET_ON_PURPOSE[option]}
    if option not in reads:
        with pytest.raises(ConfigError, match=rf"^{option}: the {unit} unit does not read {option} "):
            se_inject.inject(FunctionalResNet(), **options)
        return
    injected = se_inject.inject(FunctionalResNet(), **options)
    built = [m for m in injected.modules() if isinstance(m, UNITS[unit])]
    assert built, "the unit was not built"


def test_the_units_that_read_everything_and_those_without_a_bottleneck():
    assert UNITS["se"].reads == frozenset(UNIT_SHAPING_FIELDS)
    for unit in ("eca", "ceca", "ese"):
        assert UNITS[unit].reads == {"gate", "bias", "init"}
    for unit in ("cbam", "lcbam", "gc", "ge"):
        assert UNITS[unit].reads == set(UNIT_SHAPING_FIELDS) - {"squeeze"}


@pytest.mark.parametrize("unit", ["eca", "ese", "cbam"])
def test_what_a_style_or_the_units_conventions_bring_is_not_refused(unit):
    # timm's style sets act, rounding and more; ese's conventions set a hard sigmoid and bias
    se_inject.inject(FunctionalResNet(), unit=unit, style="timm")
    se_inject.inject(FunctionalResNet(), unit=unit)


def test_a_group_and_a_recipe_are_checked_the_same_way(tmp_path):
    with pytest.raises(ConfigError, match="squeeze: the eca unit does not read squeeze"):
        se_inject.inject(FunctionalResNet(), unit="eca", groups=[{"blocks": ["stages.1.*"], "squeeze": "max"}])
    se_inject.save(se_inject.inject(FunctionalResNet(), unit="eca"), tmp_path / "eca")
    recipe = json.loads((tmp_path / "eca" / "recipe.json").read_text())
    recipe["options"]["squeeze"] = "max"
    (tmp_path / "eca" / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(se_inject.SEInjectError, match="squeeze: the eca unit does not read squeeze"):
        se_inject.load(tmp_path / "eca", FunctionalResNet())


def test_the_cli_refuses_it_in_one_line():
    result = CliRunner().invoke(app, ["resnet18", "--unit", "eca", "--squeeze", "max"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "se-inject: error: squeeze: the eca unit does not read squeeze (it reads gate, bias, init); "
        "leave squeeze='max' out or choose a unit that reads it"
    ]


def test_squeeze_excite_is_a_gated_unit_with_its_keys_unchanged():
    unit = se_module.SqueezeExcite(64, 16, bias=True)
    assert isinstance(unit, GatedUnit)
    assert sorted(unit.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    x = torch.randn(2, 64, 5, 5)
    torch.nn.init.normal_(unit.fc2.weight)
    assert torch.allclose(unit(x), x * unit.excitation(x))
    assert torch.allclose(unit.excitation(x), 2 * torch.sigmoid(unit.logits(x)))  # preserve: the gate is 2 sigmoid


@pytest.fixture
def copied_se(tmp_path):
    """units/se.py copied as a user would to start a new unit, registered as 'my_se'."""
    source = (
        Path(se_module.__file__)
        .read_text()
        .replace('register_unit("se", SqueezeExcite)', 'register_unit("my_se", SqueezeExcite)')
    )
    assert 'register_unit("my_se"' in source
    (tmp_path / "my_se.py").write_text(source)
    spec = importlib.util.spec_from_file_location("my_se", tmp_path / "my_se.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    del UNITS["my_se"]


def test_a_unit_copied_from_se_py_works_unchanged(copied_se, tmp_path):
    torch.manual_seed(0)
    host = randomize_batchnorm(FunctionalResNet()).eval()
    ours = randomize_units(se_inject.inject(host, unit="se", r=4, init="paper")).double().eval()
    copy = se_inject.inject(host, unit="my_se", r=4, init="paper").double().eval()
    renamed = {k.replace(".se_", ".my_se_"): v for k, v in ours.state_dict().items()}  # units are named by type
    assert renamed.keys() == copy.state_dict().keys()
    copy.load_state_dict(renamed)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(ours(x), copy(x))
    report = se_inject.retrofit(host, unit="my_se", r=4).report
    assert report.eq5_agrees and report.totals.params_added == report.totals.eq5_params
    se_inject.save(copy, tmp_path / "saved")
    assert torch.equal(se_inject.load(tmp_path / "saved", host).double()(x), copy(x))
