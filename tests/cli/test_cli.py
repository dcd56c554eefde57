import json
import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from se_inject.cli.app import app
from se_inject.errors import ConfigError
from se_inject.grammar import parse_int_list

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_plan_and_overhead_table():
    result = invoke("resnet50", "--position", "standard", "--r", "16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "resnet50: 16 SE units at position standard, r=16, input 224x224" in out
    for row in ("56x56", "28x28", "14x14", "7x7"):
        assert row in out
    assert "2,514,944" in out  # Eq. 5 for resnet50 at r=16: (2/16)(3*256² + 4*512² + 6*1024² + 3*2048²)
    assert "Eq. 5 agrees exactly" in out and "meta device" in out


def test_sites_lists_every_unit():
    out = invoke("resnet18", "--sites", "--stages", "3-4", "--r", "8,32").stdout
    assert "layer3.0.se_3_1" in out and "layer4.1.se_4_2" in out and "layer1.0" not in out
    assert "resnet18: 4 SE units" in out and "r=8,32" in out


def test_json_report():
    result = invoke("resnet18", "--json", "--position", "inner", "--bias", "--input-size", "128")
    data = json.loads(result.stdout)
    assert data["model"] == "resnet18" and data["position"] == "inner" and data["input_size"] == [128, 128]
    assert len(data["sites"]) == 8 and data["eq5_agrees"] is True
    assert data["totals"]["params_added"] == data["totals"]["eq5_params"]


def test_styles_and_block_choice_from_the_command_line(tmp_path):
    result = invoke("resnet50", "--style", "timm", "--include", "layer4.*", "--exclude", "layer4.2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [u["name"] for u in data["sites"]] == ["layer4.0.se_4_1", "layer4.1.se_4_2"]
    assert {u["hidden"] for u in data["sites"]} == {128}
    styles = tmp_path / "mine.toml"
    styles.write_text('[[style]]\nname = "cli_style"\noptions = { r = 8, act = "silu", position = "inner" }\n')
    result = invoke("resnet18", "--style-file", str(styles), "--style", "cli_style", "--r", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["position"], data["r"]) == ("inner", 4)  # the style's position, the explicit r
    result = invoke("resnet18", "--at", "layer1.*.conv1", "--at", "layer4.1", "--json")
    assert result.exit_code == 0, result.output
    assert [u["name"] for u in json.loads(result.stdout)["sites"]] == [
        "layer1.0.se_1_1",
        "layer1.1.se_1_2",
        "layer4.1.se_2_1",
    ]


def test_user_model_from_a_file(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[1])!r})\n"
        "from tiny_models import FunctionalResNet as build\n"
    )
    result = invoke(f"{source}:build", "--r", "4", "--input-size", "32", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["sites"]) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet5o"], "unknown timm model 'resnet5o'; did you mean resnet50"),
        (["resnet50", "--r", "0"], "r: the reduction ratio must be an integer from 1 to 65536, got 0"),
        (["resnet50", "--r", "4096"], "r: r=4096 is wider than the 256 channels"),
        (["resnet50", "--position", "middle"], "position: 'middle' is not one of standard, pre, post, identity, inner"),
        (["resnet50", "--stages", "5"], "stages: stage 5 does not exist; this model has stages 1-4"),
        (["resnet50", "--r", "x"], "r: expected integers"),
        (
            ["vgg11", "--position", "identity"],
            "no place for an SE unit at position 'identity' (rules: residual): found 8 convolutions",
        ),
        (["resnet50", "--input-size", "0"], "--input-size"),
        (["resnet50", "--style", "sennet"], "style: 'sennet' is not a style; styles are paper, timm, efficientnet"),
        (["resnet50", "--include", "blocks.*"], "include: 'blocks.*' matches none of the 16 blocks"),
        (["resnet50", "--gate", "softmax"], "gate: 'softmax' is not one of sigmoid, hard_sigmoid, tanh, relu"),
        (["resnet50", "--style-file", "missing.toml"], "missing.toml"),
        (["resnet50", "--bogus"], "No such option: --bogus"),
        (["inject"], "Missing argument 'model'"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_code_2(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("se-inject: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_no_arguments_print_the_help():
    result = invoke()
    assert result.exit_code == 2 and "Commands:" in result.stdout and "finetune" in result.stdout


def test_parse_int_list():
    assert parse_int_list("16", "r") == 16
    assert parse_int_list("8,16, 32", "r") == (8, 16, 32)
    assert parse_int_list("2-4", "stages") == (2, 3, 4)
    assert parse_int_list("1,3-4", "stages") == (1, 3, 4)
    assert parse_int_list("-3", "r") == -3  # refused by InjectConfig, with the field named
    with pytest.raises(ConfigError, match="stages: expected integers"):
        parse_int_list("2..4", "stages")


def test_the_installed_command_in_a_real_process(tmp_path):
    command = [shutil.which("se-inject")] if shutil.which("se-inject") else [sys.executable, "-m", "se_inject"]
    done = subprocess.run([*command, "resnet18", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (
        json.loads(done.stdout)["totals"]["params_added"]
        == 2 * (2 * 64**2 + 2 * 128**2 + 2 * 256**2 + 2 * 512**2) // 16
    )
    failed = subprocess.run([*command, "resnet18", "--r", "0"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    # the hub's own warnings (logging, outside CliRunner's capture) must not reach the user either
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    failed = subprocess.run(
        [*command, "resnet18", "--pretrained"], capture_output=True, text=True, timeout=120, env=offline
    )
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "--checkpoint FILE" in failed.stderr


def test_checkpoint_check_and_save(tmp_path):
    import torch

    import se_inject

    torch.manual_seed(0)
    trained = se_inject.load_model("resnet18")
    torch.save(trained.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "se_resnet18"
    result = invoke(
        "resnet18", "--checkpoint", str(tmp_path / "resnet18.pth"), "--check", "--save", str(out), "--r", "8"
    )
    assert result.exit_code == 0, result.output
    assert "check: max |injected - original| = 0 on one batch in eval mode (preserve init)" in result.stdout
    assert f"saved to {out}/" in result.stdout
    loaded = se_inject.load(out)
    assert torch.equal(loaded.conv1.weight, trained.conv1.weight)  # the checkpoint's weights, not a fresh init
    again = invoke("resnet18", "--save", str(out))
    assert (
        again.exit_code == 2
        and "already exists; choose another directory or pass force=True (CLI: --force)" in again.stderr
    )
    forced = invoke("resnet18", "--save", str(out), "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["saved"] == str(out)


def test_pretrained_offline_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    result = invoke("resnet18", "--pretrained")
    assert result.exit_code == 2 and "--checkpoint FILE" in result.stderr and len(result.stderr.splitlines()) == 1


def test_help_and_version_do_not_load_torch():
    """`se-inject --help` and `--version` must answer at once: the CLI imports torch only in a command."""
    code = "import sys, se_inject.cli; import se_inject; se_inject.__version__; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    version = subprocess.run(
        [sys.executable, "-m", "se_inject", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.strip().startswith("se-inject ")


def test_the_public_api_loads_on_first_use():
    import se_inject

    assert callable(se_inject.inject) and se_inject.InjectConfig().r == 16 and "retrofit" in dir(se_inject)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        se_inject.__getattr__("nope")  # what `se_inject.nope` calls


def test_rules_lists_the_registries(tmp_path):
    out = invoke("rules").stdout
    for word in ("residual_add", "branch_concat", "depthwise", "conv_act", "after_spatial_conv", "pointwise_reduces"):
        assert word in out
    extra = tmp_path / "mine.toml"
    extra.write_text('[[rule]]\nname = "mine"\npattern = "conv_act"\npositions = { post = "after_activation" }\n')
    data = json.loads(invoke("rules", "--rules", str(extra), "--json").stdout)
    assert {k["name"] for k in data["patterns"]} == {
        "residual_add",
        "branch_concat",
        "dense_concat",
        "depthwise",
        "conv_act",
        "branch_sum",
    }
    assert {r["name"] for r in data["rules"]} >= {"residual", "inception", "plain", "mine"}
    assert next(k for k in data["patterns"] if k["name"] == "conv_act")["facts"] == {
        "kernel": "int",
        "depthwise": "bool",
        "pointwise_before": "bool",
        "pointwise_after": "bool",
        "reads_concat": "bool",
    }
    tresnet = [r for r in data["rules"] if "tresnet" in r["style"]]  # a family's rules, with their units' options
    assert {r["name"] for r in tresnet} == {"tresnet_basic", "tresnet_bottleneck"}
    assert next(r for r in tresnet if r["name"] == "tresnet_bottleneck")["options"] == {"r": 2}
    assert {s["name"] for s in data["styles"]} >= {"paper", "timm", "efficientnet", "mobilenetv3", "regnety"}
    assert next(s for s in data["styles"] if s["name"] == "regnety")["options"]["position"] == "inner"
    assert next(s for s in data["styles"] if s["name"] == "mixnet")["groups"] == [{"blocks": ["blocks.3.*"], "r": 4}]
    assert next(r for r in data["rules"] if r["name"] == "efficientnet_fused")["adds"] is True
    assert "efficientnet" in out and "round_even" in out  # the table lists the styles too


def test_groups_from_the_command_line():
    result = invoke(
        "resnet50", "--r", "8", "--group", "layer4.*:r=32,act=silu", "--group", "layer1.0|layer1.1:hidden=3", "--json"
    )
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)["sites"]
    assert [(u["r"], u["hidden"]) for u in sites[:3]] == [(8, 3), (8, 3), (8, 32)]
    assert {(u["r"], u["hidden"]) for u in sites if u["name"].startswith("layer4")} == {(32, 64)}
    for bad, message in (
        ("layer4.*", "--group: expected BLOCKS:OPTION=VALUE"),
        ("layer4.*:bias=maybe", "bias: expected True or False, got 'maybe'"),
    ):
        result = invoke("resnet50", "--group", bad)
        assert result.exit_code == 2 and message in result.stderr


def test_unit_and_its_options_from_the_command_line():
    result = invoke(
        "resnet50", "--unit", "gc", "--unit-option", "fusion=scale", "--unit-option", "pooling=avg", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["unit"] == "gc" and data["eq5_agrees"]
    # avg pooling, one transform of 2 C (C/16) + C/16 + C (biases) + 2 C/16 (LayerNorm) per block
    expected = sum(2 * c * (c // 16) + 3 * (c // 16) + c for c in [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3)
    assert data["totals"]["params_added"] == expected
    out = invoke("resnet18", "--unit", "eca", "--unit-option", "kernel_size=5").stdout
    assert "resnet18: 8 ECA units" in out and "eca's closed form agrees exactly" in out and "40" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("--unit", "nope"), "unit: 'nope' is not a registered unit"),
        (("--unit", "eca", "--unit-option", "kernel=3"), "unit_options.kernel: not an option of this unit"),
        (("--unit", "eca", "--unit-option", "kernel_size"), "--unit-option: expected NAME=VALUE"),
        (("--unit", "ge", "--unit-option", "mlp=false"), "has no last layer to start at zero"),
    ],
)
def test_a_bad_unit_is_one_line_and_exit_code_2(args, message):
    result = invoke("resnet18", *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_units_lists_every_unit_with_its_paper_and_options():
    data = json.loads(invoke("units", "--json").stdout)
    assert [u["name"] for u in data] == ["cbam", "ceca", "eca", "ese", "gc", "ge", "lcbam", "se"]
    eca = next(u for u in data if u["name"] == "eca")
    assert "1910.03151" in eca["paper"] and set(eca["options"]) == {"kernel_size", "gamma", "beta"}
    assert next(u for u in data if u["name"] == "ese")["conventions"] == {"gate": "hard_sigmoid", "bias": True}
    assert "Units (--unit NAME)" in invoke("units").stdout
