"""Hugging Face transformers vision models (#26): retrofitted without hand-found leaves.

The classes' untraceable parts are data (rules/tracing/transformers.toml), and the tracer calls a
model's forward with empty ``**kwargs``, through its decorators. Each model is built from a small
config with random weights, BatchNorm statistics randomised, compared in float64: the retrofit is
the identity at insertion, a unit with random weights changes the logits (so the equality is not
vacuous), the class, config and ``save_pretrained`` are kept, and se_inject's save/load is bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_unchanged, randomize_batchnorm, randomize_units, snapshot

import se_inject
from se_inject.errors import ModelSpecError, NoSitesError, UntraceableModelError
from se_inject.io.models import load_model

transformers = pytest.importorskip("transformers")

WIDTHS = {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}
MODELS = [
    # (id, config class, model class, config fields, injection options, units)
    ("resnet", "ResNetConfig", "ResNetForImageClassification", {"embedding_size": 8, **WIDTHS}, {}, 4),
    (
        "regnet",
        "RegNetConfig",
        "RegNetForImageClassification",
        {"embedding_size": 8, "groups_width": 8, "layer_type": "x", **WIDTHS},  # RegNetX: RegNetY has SE already
        {},
        4,
    ),
    ("convnext", "ConvNextConfig", "ConvNextForImageClassification", WIDTHS, {}, 4),
    # ConvNeXt V2's GRN is a channel gate of its own: a second unit is stacked only when asked
    ("convnextv2", "ConvNextV2Config", "ConvNextV2ForImageClassification", WIDTHS, {"existing": "stack"}, 4),
    ("mobilenet_v1", "MobileNetV1Config", "MobileNetV1ForImageClassification", {"depth_multiplier": 0.25}, {}, 27),
    ("mobilenet_v2", "MobileNetV2Config", "MobileNetV2ForImageClassification", {"depth_multiplier": 0.25}, {}, 10),
]


def _model(config_class: str, model_class: str, fields: dict, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(num_labels=5, layer_scale_init_value=1.0, **fields, **extra)
    model = randomize_batchnorm(_signal_carrying(getattr(transformers, model_class)(config))).double()
    return _calibrated(model).eval()


def _calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics of a batch of data, beside the random affine weights: random running means
    would drown a deep plain network's signal (MobileNetV1's 27 ReLU6 layers)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of the batch
    with torch.no_grad():
        model.train()(
            torch.randn(
                8, model.config.num_channels, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
            )
        )
    return model


def _signal_carrying(model: torch.nn.Module) -> torch.nn.Module:
    """He-initialised weights in place of transformers' small ones (std 0.02), and ConvNeXt's layer scale at 1
    (its 1e-6 start): otherwise the logits hardly depend on the input, and neither on a misplaced unit."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(
    ("config_class", "model_class", "fields", "options", "units"), [m[1:] for m in MODELS], ids=[m[0] for m in MODELS]
)
def test_transformers_model_retrofit_without_leaves(
    config_class: str, model_class: str, fields: dict, options: dict, units: int, tmp_path
) -> None:
    model = _model(config_class, model_class, fields)
    before = snapshot(model)
    result = se_inject.retrofit(model, input_size=64, r=4, **options)
    se = result.model.eval()
    assert len(result.report.sites) == units
    assert result.report.totals.eq5_params == result.report.totals.params_added
    assert type(se) is type(model) and se.config.to_dict() == model.config.to_dict()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert (_logits(model, x)[0] - _logits(model, x)[1]).abs().max() > 1e-2  # the logits depend on the input
    assert torch.equal(_logits(model, x), _logits(se, x))
    assert se_inject.check_outputs(model, se, input_size=64) == 0.0  # the whole ModelOutput, leaf by leaf
    assert_unchanged(model, before)
    # save_pretrained is the model's own, and still writes the model
    se.save_pretrained(tmp_path / "pretrained")
    assert (tmp_path / "pretrained" / "config.json").is_file()
    # a misplaced unit would show: with random weights the units change the logits
    randomize_units(se)
    assert (_logits(model, x) - _logits(se, x)).abs().max() > 1e-2
    # se_inject's own save and load: the units bit for bit
    se_inject.save(se, tmp_path / "se")
    loaded = se_inject.load(tmp_path / "se", model=_model(config_class, model_class, fields))
    assert type(loaded) is type(model)
    saved, back = se.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(_logits(se, x), _logits(loaded.eval(), x))


def test_a_regnet_with_se_already_is_not_given_a_second_unit() -> None:
    model = _model("RegNetConfig", "RegNetForImageClassification", {"embedding_size": 8, "groups_width": 8, **WIDTHS})
    with pytest.raises(NoSitesError, match="already has an SE-like gate"):
        se_inject.inject(model, input_size=64, r=4)


def test_input_channels_come_from_the_config() -> None:
    """One input channel (the stem's check would refuse three): the config's num_channels, not a guess."""
    model = _model("ResNetConfig", "ResNetForImageClassification", {"embedding_size": 8, "num_channels": 1, **WIDTHS})
    se = se_inject.inject(model, input_size=32, r=4)
    assert se_inject.check_outputs(model, se, input_size=32) == 0.0
    with pytest.raises(Exception, match="channel"):
        se_inject.check_outputs(model, se, input_size=32, in_chans=3)


def test_an_untraceable_part_is_named_with_the_target_that_works(monkeypatch) -> None:
    """Without the tracing data, the stem stops the trace: the error names it and the part to target."""
    import se_inject.graph.trace as trace_module

    monkeypatch.setattr(trace_module, "untraceable_classes", frozenset)
    model = _model("ResNetConfig", "ResNetForImageClassification", {"embedding_size": 8, **WIDTHS})
    with pytest.raises(UntraceableModelError, match=r"'resnet.embedder'.*target=\['resnet.encoder'\]"):
        se_inject.inject(model, input_size=64, r=4)
    auto = se_inject.retrofit(model, target="auto", input_size=64, r=4)
    assert list(auto.parts) == ["resnet.encoder"] and len(auto.report.sites) == 4


@pytest.fixture
def saved_resnet(tmp_path):
    """A local directory as save_pretrained writes it: config.json and model.safetensors."""
    model = _model("ResNetConfig", "ResNetForImageClassification", {"embedding_size": 8, **WIDTHS}).float()
    model.save_pretrained(tmp_path / "resnet")
    return tmp_path / "resnet", model


def test_a_local_directory_is_a_model_source(saved_resnet, tmp_path) -> None:
    directory, model = saved_resnet
    spec = f"transformers:{directory}"
    built = load_model(spec)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values(), strict=True))
    assert load_model(spec, device="meta").config.num_labels == 5  # the plan's shapes, no weights read
    assert load_model(spec, num_classes=3).classifier[-1].out_features == 3  # a new head for the user's classes
    se = se_inject.retrofit(built, input_size=32, model_name=spec, r=4).model
    randomize_units(se)
    se_inject.save(se, tmp_path / "se")
    loaded = se_inject.load(tmp_path / "se")  # rebuilt from the recorded directory: no model= needed
    saved, back = se.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    # the configuration changed since the save: rebuilt from what is there now, with a warning
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "id2label": {str(i): f"c{i}" for i in range(5)}}))
    with pytest.warns(se_inject.SourceChangedWarning, match="has changed since"):
        se_inject.load(tmp_path / "se")


def test_a_model_type_is_a_model_source() -> None:
    model = load_model("transformers:resnet", device="meta", num_classes=7)
    assert type(model).__name__ == "ResNetForImageClassification" and model.config.num_labels == 7
    report = se_inject.report(model, model_name="transformers:resnet")
    assert len(report.sites) == 16  # ResNet-50's 3 + 4 + 6 + 3 blocks


def test_files_are_data(saved_resnet) -> None:
    directory, _ = saved_resnet
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Net"}}))
    with pytest.raises(ModelSpecError, match="auto_map names code"):
        load_model(f"transformers:{directory}")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(ModelSpecError, match="pickle"):
        load_model(f"transformers:{directory}")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("transformers:resnett", "did you mean resnet"),
        ("transformers:bert", "no image classifier"),
        ("transformers:no/such/dir", "no config.json"),
        ("transformers:", "expected transformers:TYPE"),
    ],
)
def test_bad_specs_are_one_line(spec: str, words: str) -> None:
    with pytest.raises(ModelSpecError, match=words):
        load_model(spec, device="meta")


def test_the_command_line_takes_a_directory_and_in_chans(tmp_path) -> None:
    from typer.testing import CliRunner

    from se_inject.cli.app import app

    model = _model("ResNetConfig", "ResNetForImageClassification", {"embedding_size": 8, "num_channels": 1, **WIDTHS})
    model.float().save_pretrained(tmp_path / "gray")
    spec = f"transformers:{tmp_path / 'gray'}"
    result = CliRunner().invoke(app, [spec, "--r", "4", "--check", "--input-size", "32"])
    assert result.exit_code == 0, result.output
    assert "4 SE units" in result.stdout and "max |injected - original| = 0" in result.stdout
    wrong = CliRunner().invoke(app, [spec, "--r", "4", "--check", "--input-size", "32", "--in-chans", "3"])
    assert wrong.exit_code == 2 and "--in-chans" in wrong.output and "Traceback" not in wrong.output
