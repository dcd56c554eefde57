"""Shared fixtures: models built once per session (injection never changes them, which the
tests check), and helpers to compare a model before and after."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models.py sits beside the tests
sys.path.insert(0, str(Path(__file__).parent / "ecosystem"))  # the works-with matrix


def snapshot(model: nn.Module) -> dict:
    """Everything injection must leave alone: every tensor's value, every training flag, the tree."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["ids"] == before["ids"]
    assert after["state"].keys() == before["state"].keys()
    for key, tensor in before["state"].items():
        if tensor.is_meta:
            assert after["state"][key].shape == tensor.shape
        else:
            assert torch.equal(after["state"][key], tensor), key


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine weights in every BatchNorm, in place: timm zero-initialises
    the last BN of a block, and a zero there hides a misplaced unit."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for tensor, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2)):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
                if m.affine:
                    m.weight.copy_(torch.empty(m.weight.shape).uniform_(0.5, 1.5, generator=generator))
                    m.bias.copy_(torch.empty(m.bias.shape).uniform_(-0.5, 0.5, generator=generator))
    return model


def randomize_units(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random weights in every inserted unit, in place: a unit that starts as the identity hides its wiring."""
    from se_inject.units.base import ChannelUnit

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for unit in model.modules():
            if isinstance(unit, ChannelUnit):
                for p in unit.parameters():
                    p.copy_(torch.empty(p.shape).normal_(0, 0.5, generator=generator))
    return model


_MODEL_CACHE: dict[tuple[str, str], nn.Module] = {}


@pytest.fixture(scope="session")
def zoo():
    """``zoo(spec, device)``: a model built once per session by se_inject.load_model."""
    from se_inject import load_model

    def get(spec: str, device: str = "meta") -> nn.Module:
        key = (spec, device)
        if key not in _MODEL_CACHE:
            torch.manual_seed(0)
            _MODEL_CACHE[key] = load_model(spec, device=device)
        return _MODEL_CACHE[key]

    return get
