"""Detectors and segmenters (#26): a part of the model retrofitted, the whole model kept.

torchvision's detectors cannot be traced whole; ``target`` retrofits their backbone inside a copy of
the whole detector: identical outputs at insertion (eval), finite losses and gradients in the units
(train, with targets), save/load bit for bit, by spec and by object. Small inputs, random weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import assert_unchanged, randomize_batchnorm, snapshot

import se_inject
from se_inject.errors import ConfigError, UntraceableModelError
from se_inject.io.models import load_model
from se_inject.units.base import ChannelUnit

SMALL = {"min_size": 96, "max_size": 128}  # the detectors' own resize: small images, fast forwards


def _detector(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model(f"torchvision:{name}", **kwargs)
    return randomize_batchnorm(model).eval()


def _images(count: int = 2, size: int = 96) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size + 16 * i, generator=generator) for i in range(count)]


def _targets(count: int = 2, keypoints: bool = False, masks: bool = False) -> list[dict[str, torch.Tensor]]:
    targets = []
    for _ in range(count):
        target = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
        if masks:
            target["masks"] = torch.zeros(1, 96, 96, dtype=torch.uint8)
            target["masks"][0, 12:70, 10:60] = 1
        if keypoints:
            target["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0]] * 17])
        targets.append(target)
    return targets


def _unit_grads(model: torch.nn.Module) -> list[float]:
    return [
        float(p.grad.abs().sum()) if p.grad is not None else 0.0
        for m in model.modules()
        if isinstance(m, ChannelUnit)
        for p in m.parameters()
    ]


# every box kept (random weights score low): equal outputs at insertion are then boxes, not empty lists
R_CNN = {**SMALL, "box_score_thresh": 0.0}
ONE_STAGE = {**SMALL, "score_thresh": 0.0}
DETECTORS = [
    pytest.param("fasterrcnn_resnet50_fpn", R_CNN, {}, id="faster_rcnn"),
    pytest.param("maskrcnn_resnet50_fpn", R_CNN, {"masks": True}, id="mask_rcnn", marks=pytest.mark.slow),
    pytest.param("keypointrcnn_resnet50_fpn", R_CNN, {"keypoints": True}, id="keypoint_rcnn", marks=pytest.mark.slow),
    pytest.param("retinanet_resnet50_fpn", ONE_STAGE, {}, id="retinanet", marks=pytest.mark.slow),
    pytest.param("fcos_resnet50_fpn", ONE_STAGE, {}, id="fcos", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "kwargs", "extra"), DETECTORS)
def test_detector_backbone_retrofit_keeps_outputs_and_trains(name: str, kwargs: dict, extra: dict) -> None:
    model = _detector(name, **kwargs)
    before = snapshot(model)
    result = se_inject.retrofit(model, target="backbone.body", input_size=96, model_name=f"torchvision:{name}")
    se = result.model
    assert type(se) is type(model)
    assert len(result.report.sites) == 16 and result.report.totals.eq5_params == result.report.totals.params_added
    assert result.report.sites[0].name == "backbone.body.layer1.0.se_1_1"
    assert [s.stage for s in result.report.stages] == [1, 2, 3, 4]
    images = _images()
    with torch.no_grad():
        expected, got = model(images), se.eval()(images)
    assert all(len(found["boxes"]) for found in expected)
    assert se_inject.largest_difference(expected, got) == 0.0
    assert_unchanged(model, before)
    # train mode, with targets: finite losses, and the units' last layers get gradients
    se.train()
    losses = se(_images(), _targets(**extra))
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    assert any(g > 0 for g in _unit_grads(se))


def test_a_misplaced_unit_changes_the_detector() -> None:
    """The equality above is not vacuous: units with random weights change the boxes."""
    model = _detector("fcos_resnet50_fpn", **ONE_STAGE)
    se = se_inject.inject(model, target="backbone.body")
    from conftest import randomize_units

    randomize_units(se)
    with torch.no_grad():
        assert se_inject.largest_difference(model(_images()), se.eval()(_images())) > 0


def test_detector_by_spec_saves_and_loads_bit_for_bit(tmp_path) -> None:
    spec = "torchvision:fasterrcnn_resnet50_fpn"
    model = _detector("fasterrcnn_resnet50_fpn", **R_CNN)
    se = se_inject.retrofit(model, target="backbone.body", input_size=96, model_name=spec).model
    from conftest import randomize_units

    randomize_units(se)
    se_inject.save(se, tmp_path / "det")
    loaded = se_inject.load(tmp_path / "det")
    assert type(loaded) is type(model)
    saved, back = se.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    # the spec's defaults resize to 800 and keep boxes over 0.05: as the saved one was built
    loaded.transform.min_size, loaded.transform.max_size = (96,), 128
    loaded.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        assert se_inject.largest_difference(se.eval()(_images()), loaded(_images())) == 0.0


def test_an_untraceable_detector_names_the_parts_to_target() -> None:
    model = _detector("fasterrcnn_resnet50_fpn", **SMALL)
    with pytest.raises(UntraceableModelError, match=r"target=\['backbone'\].*--target backbone"):
        se_inject.inject(model, input_size=96)
    auto = se_inject.retrofit(model, target="auto", input_size=96)
    assert auto.parts.keys() == {"backbone"} and len(auto.report.sites) == 16


def test_target_errors_are_one_line() -> None:
    model = _detector("fcos_resnet50_fpn", **SMALL)
    with pytest.raises(ConfigError, match="names no submodule"):
        se_inject.inject(model, target="backbone.bodyy")
    with pytest.raises(ConfigError, match="lies inside"):
        se_inject.inject(model, target=["backbone", "backbone.body"])
    with pytest.raises(ConfigError, match="not one feature map|never called"):
        se_inject.inject(model, target="head")


SEGMENTERS = [
    pytest.param("deeplabv3_resnet50", "backbone", 16, id="deeplabv3"),
    pytest.param("fcn_resnet50", "backbone", 16, id="fcn", marks=pytest.mark.slow),
    pytest.param("lraspp_mobilenet_v3_large", "backbone", None, id="lraspp", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "target", "units"), SEGMENTERS)
def test_segmenter_retrofit(name: str, target: str, units: int | None, tmp_path) -> None:
    model = _detector(name, num_classes=3)
    result = se_inject.retrofit(model, target=target, input_size=64, model_name=f"torchvision:{name}")
    if units is not None:  # dilated ResNet backbones: four stages, as the plain ResNet
        assert len(result.report.sites) == units
        assert [s.stage for s in result.report.stages] == [1, 2, 3, 4]
        assert result.report.sites[-1].name == "backbone.layer4.2.se_4_3"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert se_inject.largest_difference(model(x), result.model.eval()(x)) == 0.0
    result.model.train()
    out = result.model(x)["out"]
    torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 64, 64))).backward()
    assert any(g > 0 for g in _unit_grads(result.model))


def test_dilated_resnets_keep_four_stages() -> None:
    """timm's output_stride and torchvision's replace_stride_with_dilation: stages follow the network."""
    import timm

    for model in (
        timm.create_model("resnet50", output_stride=8),
        torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]),
    ):
        plain = se_inject.report(model, input_size=64, r=(4, 8, 16, 32))
        assert [s.stage for s in plain.stages] == [1, 2, 3, 4]
        assert [s.r for s in plain.stages] == [4, 8, 16, 32]
        names = [u.name for u in plain.sites]
        assert "layer3.0.se_3_1" in names and "layer4.2.se_4_3" in names
        staged = se_inject.report(model, input_size=64, stages=[3, 4])
        assert {u.name.split(".")[0] for u in staged.sites} == {"layer3", "layer4"}
