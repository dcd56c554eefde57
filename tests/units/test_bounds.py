"""Every unit option is bounded where configs are validated: a small recipe, style file, flag, group
or candidate cannot make se_inject allocate gigabytes, compute with NaN or denormals, or work for minutes.
Each refusal comes before anything is built (the models here are on the meta device, or small)."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import FunctionalResNet
from typer.testing import CliRunner

import se_inject
from se_inject.cli.app import app
from se_inject.config import MAX_PATTERNS, InjectConfig
from se_inject.errors import SEInjectError
from se_inject.io.layout import RECIPE_FILE
from se_inject.measure.compare import Candidate, compare
from se_inject.train.experiment import arms

CASES = [  # unit, its options, the words of the refusal
    ("cbam", {"spatial_kernel": 99999}, "unit_options.spatial_kernel: 99999 is out of range (1 to 63)"),
    ("eca", {"kernel_size": 999999999}, "unit_options.kernel_size: 999999999 is out of range (1 to 255)"),
    ("eca", {"gamma": math.nan}, "unit_options.gamma: expected a finite number, got nan"),
    ("eca", {"beta": math.inf}, "unit_options.beta: expected a finite number, got inf"),
    ("eca", {"gamma": 1e-300}, "unit_options.gamma: 1e-300 is out of range (0.1 to 100.0)"),
    ("ge", {"extent": 1 << 20}, "unit_options.extent: 1048576 is out of range (0 to 256)"),
]
TEXT = {math.nan: "nan", math.inf: "inf"}


@pytest.fixture(scope="module")
def meta_resnet():
    return se_inject.load_model("resnet18", device="meta")


@pytest.mark.parametrize("unit, options, words", CASES)
def test_the_api_refuses_each_bound(meta_resnet, unit, options, words):
    with pytest.raises(SEInjectError, match=words.replace("(", r"\(").replace(")", r"\)")):
        se_inject.inject(meta_resnet, unit=unit, unit_options=options)


@pytest.mark.parametrize("unit, options, words", CASES)
def test_the_cli_refuses_each_bound_in_one_line(unit, options, words):
    ((name, value),) = options.items()
    result = CliRunner().invoke(app, ["resnet18", "--unit", unit, "--unit-option", f"{name}={TEXT.get(value, value)}"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert words in result.stderr


@pytest.mark.parametrize("unit, options, words", [c for c in CASES if all(math.isfinite(v) for v in c[1].values())])
def test_a_recipe_asking_for_an_unbounded_unit_is_refused_before_it_is_built(tmp_path, unit, options, words):
    se_inject.save(se_inject.inject(FunctionalResNet(), r=4, unit=unit, input_size=16), tmp_path / "saved")
    path = tmp_path / "saved" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    recipe["options"]["unit_options"] = options
    path.write_text(json.dumps(recipe))  # about 2 kB
    with pytest.raises(SEInjectError, match="field 'options.unit_options.*" + words.split(":")[1].split("(")[0]):
        se_inject.load(tmp_path / "saved", model=FunctionalResNet())


def test_eca_kernels_computed_from_gamma_and_beta_are_bounded_too(meta_resnet):
    with pytest.raises(SEInjectError, match="gamma=0.1 and beta=100.0 give a kernel of .* taps .* over 255"):
        se_inject.inject(meta_resnet, unit="eca", unit_options={"gamma": 0.1, "beta": 100.0})


def test_a_learned_global_gather_over_a_huge_map_is_refused(meta_resnet):
    with pytest.raises(SEInjectError, match="learned global gather over a 4096x4096 map"):
        se_inject.inject(meta_resnet, unit="ge", unit_options={"extra_params": True}, input_size=16384)


@pytest.mark.parametrize(
    "options, words",
    [
        ({"hidden": 10**9}, "hidden: expected a hidden width from 1 to 16384"),
        ({"r": 10**9}, "r: the reduction ratio must be an integer from 1 to 65536"),
        ({"stages": (10**9,)}, "stages: stage numbers go up to 1000"),
        ({"include": ["layer*"] * 20000}, "include: at most 1000 module name globs, got 20,000"),
        ({"groups": [{"blocks": ["layer*"] * 20000, "r": 8}]}, "groups[0].blocks: at most 1000"),
        ({"groups": [{"blocks": ["layer*"], "hidden": 10**9}]}, "hidden: expected a hidden width from 1 to 16384"),
    ],
)
def test_shared_options_are_bounded_for_groups_and_candidates_as_well(meta_resnet, options, words):
    with pytest.raises(SEInjectError) as caught:
        InjectConfig.from_dict(options)
    assert words in str(caught.value)
    with pytest.raises(SEInjectError) as caught:  # a candidate is checked as it is built, before anything is timed
        compare(FunctionalResNet(), [Candidate("c", options)], batches=(1,), repeats=2, size=16)
    assert words in str(caught.value)


def test_an_experiment_arm_with_an_unbounded_unit_is_refused_before_training(tmp_path):
    from se_inject.train.config import ExperimentConfig, FinetuneConfig
    from se_inject.train.data import digits

    chosen = arms(candidates=[{"unit": "cbam", "unit_options": {"spatial_kernel": 99999}}])
    with pytest.raises(SEInjectError, match="none could be injected: unit_options.spatial_kernel"):
        se_inject.experiment(FunctionalResNet(), digits(image_size=16), tmp_path / "exp", chosen, FinetuneConfig(epochs=1),
                             ExperimentConfig(seeds=(0,), latency_batch=0))  # fmt: skip
    assert not (tmp_path / "exp").exists()


def test_a_group_of_many_alternatives_is_bounded_and_duplicates_are_read_once(meta_resnet):
    """--group 'l*|l*|...' with 20,000 alternatives took 49 s, most of it printing one note per glob."""
    result = CliRunner().invoke(app, ["resnet18", "--group", "|".join(["layer*"] * (MAX_PATTERNS + 1)) + ":r=8"])
    assert result.exit_code == 2 and f"at most {MAX_PATTERNS}" in result.stderr, result.output
    config = InjectConfig.from_dict({"groups": [{"blocks": ["layer4.*"] * MAX_PATTERNS, "r": 8}]})
    assert config.groups[0].blocks == ("layer4.*",)
    report = se_inject.report(meta_resnet, config)
    assert sum("groups[0]" in note for note in report.notes) == 1
