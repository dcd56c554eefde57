"""A unit type added from outside the package: registered here, it goes through every position,
the report (its own closed form against the weights added), save and load; nothing in se_inject
names it."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from tiny_models import FunctionalResNet
from torch import nn

import se_inject
from se_inject.units.base import UNITS, ChannelUnit


class LearnedScale(ChannelUnit):
    """``x * (1 + s)`` with ``s`` a learned per-channel vector starting at 0: the identity at insertion."""

    def __init__(self, channels: int, r: int, *, device=None, dtype=None) -> None:
        super().__init__(channels, r, hidden=0)
        self.s = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

    @classmethod
    def from_config(cls, channels, r, config, *, reduced=None, size=None, device=None, dtype=None) -> LearnedScale:
        return cls(channels, r, device=device, dtype=dtype)

    @classmethod
    def hidden_width(cls, channels, r, config, *, reduced=None) -> int:
        return 0

    def expected_params(self) -> Fraction:
        return Fraction(self.channels)

    @property
    def starts_as_identity(self) -> bool:
        return True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = x * (1 + self.s).view(1, -1, *([1] * (x.dim() - 2)))
        return y if residual is None else residual + y


@pytest.fixture(scope="module", autouse=True)
def registered():
    se_inject.register_unit("learned_scale", LearnedScale)
    yield
    del UNITS["learned_scale"]


def test_the_registry_refuses_a_name_twice_and_what_is_not_a_unit():
    with pytest.raises(ValueError, match="already registered"):
        se_inject.register_unit("learned_scale", LearnedScale)
    with pytest.raises(TypeError, match="not a subclass"):
        se_inject.register_unit("linear", nn.Linear)
    with pytest.raises(
        se_inject.ConfigError,
        match="unit: 'nope' is not a registered unit; units are cbam, ceca, eca, ese, gc, ge, lcbam, learned_scale, se",
    ):
        se_inject.inject(FunctionalResNet(), unit="nope", input_size=16)


@pytest.mark.parametrize("position", se_inject.POSITIONS)
def test_a_unit_from_outside_goes_through_every_position_the_report_save_and_load(position, tmp_path):
    torch.manual_seed(0)
    original = FunctionalResNet().eval()
    result = se_inject.retrofit(original, unit="learned_scale", position=position, input_size=16)
    units = [m for m in result.model.modules() if isinstance(m, ChannelUnit)]
    assert units and all(isinstance(m, LearnedScale) for m in units)
    report = result.report
    assert report.totals.params_added == report.totals.eq5_params == sum(u.channels for u in units)
    assert all(site.hidden == 0 for site in report.sites)
    assert se_inject.check_outputs(original, result.model, input_size=16) == 0.0  # the identity at insertion
    with torch.no_grad():
        for unit in units:
            unit.s.normal_()
    se_inject.save(result.model, tmp_path / "saved")
    loaded = se_inject.load(tmp_path / "saved", model=FunctionalResNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))
    assert se_inject.check_outputs(original, loaded, input_size=16) > 0  # the trained scales were carried over
