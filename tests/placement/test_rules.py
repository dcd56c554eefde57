import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny_models import FunctionalResNet, VGGStack

import se_inject
from se_inject.errors import RuleError
from se_inject.placement.rules import (
    builtin_rules_dir,
    load_rules,
    parse_rules,
    read_rule_file,
)

ROOT = Path(__file__).parents[2]


def test_builtin_rules_cover_every_family():
    rules = {r.name: r for r in load_rules()}
    assert set(rules) == {
        "residual",
        "inception",
        "split_concat",
        "dense",
        "inverted_residual",
        "depthwise_separable",
        "plain",
    }
    assert rules["residual"].positions == {
        "standard": "branch_output",
        "pre": "branch_input",
        "post": "after_activation",
        "identity": "shortcut_output",
        "inner": "after_spatial_conv",
    }
    assert rules["plain"].fallback and rules["inverted_residual"].priority > rules["residual"].priority
    assert all(r.source.endswith(".toml") for r in rules.values())


GOOD = """
[[rule]]
name = "residual"
pattern = "residual_add"
priority = 20
positions = { standard = "after_activation" }
when = { min_branch_convs = 1 }
"""


@pytest.mark.parametrize(
    "text, field, problem",
    [
        (
            "[[rule]]\npattern = 'residual_add'\npositions = { standard = 'branch_output' }",
            "rule '#1': field 'name'",
            "non-empty string name",
        ),
        (
            GOOD.replace('pattern = "residual_add"', 'pattern = "attention"'),
            "rule 'residual': field 'pattern'",
            "'attention' is not a pattern kind",
        ),
        (GOOD.replace("standard =", "middle ="), "field 'positions.middle'", "not a position"),
        (
            GOOD.replace('"after_activation"', '"after_conv"'),
            "field 'positions.standard'",
            "'after_conv' is not an anchor of 'residual_add'",
        ),
        (GOOD.replace("min_branch_convs", "min_heads"), "field 'when.min_heads'", "'residual_add' has no fact 'heads'"),
        (
            GOOD.replace("min_branch_convs = 1", "min_branch_convs = 'one'"),
            "field 'when.min_branch_convs'",
            "expected an integer",
        ),
        (GOOD.replace("priority = 20", "priority = 'high'"), "field 'priority'", "expected an integer"),
        (GOOD + "code = 'import os'\n", "field 'code'", "unknown field"),
        (GOOD + GOOD, "rule 'residual': field 'name'", "already defined in this file"),
        ("[[rule]\nname=", "my.toml", "not valid TOML"),
        ("title = 'x'\n" + GOOD, "field 'title'", "unknown top-level key"),
        ("", "field 'rule'", "no rules"),
    ],
)
def test_malformed_rules_name_the_file_the_rule_and_the_field(text, field, problem):
    with pytest.raises(RuleError) as info:
        parse_rules(text, "my.toml")
    message = str(info.value)
    assert message.startswith("my.toml") and field in message and problem in message, message


def test_user_rule_files_override_and_extend(tmp_path):
    path = tmp_path / "post_only.toml"
    path.write_text(GOOD)
    rules = {r.name: r for r in load_rules([path])}
    assert rules["residual"].positions == {"standard": "after_activation"} and rules["residual"].source == str(path)
    report = se_inject.report(FunctionalResNet(), r=4, input_size=32, rules=[path])
    default = se_inject.report(FunctionalResNet(), r=4, position="post", input_size=32)
    assert [u.channels for u in report.sites] == [u.channels for u in default.sites]
    with pytest.raises(se_inject.NoSitesError, match="no placement rule supports position 'pre'"):
        se_inject.report(FunctionalResNet(), position="pre", r=4, input_size=32, rules=[path])


def test_a_rule_file_can_change_what_a_family_gets(tmp_path):
    path = tmp_path / "vgg_pre.toml"
    path.write_text(
        '[[rule]]\nname = "plain"\npattern = "conv_act"\nfallback = true\n'
        'positions = { standard = "after_activation" }\nwhen = { kernel = 3, max_kernel = 3 }\n'
    )
    assert len(se_inject.report(VGGStack(), r=4, input_size=32, rules=[path]).sites) == 4


def test_missing_or_malformed_user_files_fail_before_anything_is_built(tmp_path):
    with pytest.raises(RuleError, match="nope.toml: cannot read the rule file"):
        read_rule_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("residual_add", "attention"))
    with pytest.raises(RuleError, match=r"bad.toml: rule 'residual': field 'pattern'"):
        se_inject.inject(FunctionalResNet(), rules=[bad])


def test_the_cli_takes_rule_files(tmp_path):
    from typer.testing import CliRunner

    from se_inject.cli.app import app

    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("min_branch_convs", "min_heads"))
    result = CliRunner().invoke(app, ["resnet18", "--rules", str(bad)])
    assert result.exit_code == 2 and "field 'when.min_heads'" in result.stderr and len(result.stderr.splitlines()) == 1


def test_rule_files_are_data_only():
    for path in builtin_rules_dir().glob("*.toml"):
        for rule in read_rule_file(path):
            assert set(vars(rule)) == {
                "name",
                "pattern",
                "positions",
                "when",
                "priority",
                "fallback",
                "description",
                "source",
                "style",
                "options",
                "adds",
            }


def test_a_wheel_ships_the_rules(tmp_path):
    """A non-editable install must find the rules: they are packaged as se_inject/rules/*.toml."""
    pytest.importorskip("setuptools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.startswith(f"se_inject-{se_inject.__version__}-")  # the version comes from se_inject/_version.py
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {f"se_inject/rules/{p.relative_to(ROOT / 'rules').as_posix()}" for p in (ROOT / "rules").rglob("*.toml")}
    assert shipped <= set(names)  # every data file, the families' rules and the styles included
