"""Rule files and style files are read by one reader: the same problem gets the same words in both,
naming the file, the entry and the field."""

from __future__ import annotations

import pytest

from se_inject.config import parse_styles
from se_inject.errors import ConfigError, RuleError
from se_inject.graph.untraceable import parse_untraceable
from se_inject.placement.rules import parse_rules

GOOD = {
    "rule": "[[rule]]\nname = 'a'\npattern = 'residual_add'\npositions = { standard = 'branch_output' }\n",
    "style": "[[style]]\nname = 'a'\noptions = { r = 8 }\n",
    "untraceable": "[[untraceable]]\nname = 'pkg.a'\nkind = 'module'\nreason = 'checks its input in Python'\n",
}
NAMES = {"rule": "a", "style": "a", "untraceable": "pkg.a"}
READ = {
    "rule": (parse_rules, RuleError),
    "style": (parse_styles, ConfigError),
    "untraceable": (parse_untraceable, RuleError),
}
KINDS = list(READ)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[{kind}]\nname=", "f.toml: not valid TOML"),
        (
            "title = 'x'\n{good}",
            "f.toml: field 'title': unknown top-level key; a {kind} file holds [[{kind}]] tables only",
        ),
        ("", "f.toml: field '{kind}': no {kind}s: expected one or more [[{kind}]] tables"),
        ("{kind} = [1]\n", "f.toml: {kind} '#1': a {kind} must be a table ([[{kind}]])"),
        ("[[{kind}]]\ndescription = 'x'\n", "f.toml: {kind} '#1': field 'name': every {kind} needs"),
        ("{good}code = 'import os'\n", "f.toml: {kind} '{name}': field 'code': unknown field; fields are "),
        (
            "{good}{good}",
            "f.toml: {kind} '{name}': field 'name': a {kind} of this name is already defined in this file",
        ),
        ("x = " + "[" * 2000 + "]" * 2000, "f.toml: "),
    ],
)
def test_the_same_problem_gets_the_same_words(kind, text, words):
    parse, error = READ[kind]
    with pytest.raises(error) as caught:
        parse(text.format(kind=kind, good=GOOD[kind]), "f.toml")
    assert str(caught.value).startswith(words.format(kind=kind, name=NAMES[kind])), str(caught.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_good_file_is_read(kind):
    parse, _ = READ[kind]
    assert [entry.name for entry in parse(GOOD[kind], "f.toml")] == [NAMES[kind]]
