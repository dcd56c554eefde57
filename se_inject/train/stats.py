"""Statistics over seeds: mean, spread and a confidence interval for a paired difference.

An experiment runs each arm with the same seeds as the control, so arm and control with one seed
see the same data order, augmentation and head initialisation: the difference per seed is paired,
and its mean gets Student's t interval with ``n - 1`` degrees of freedom. The t quantile is computed
here (Simpson's rule on the density, then bisection) rather than taken from scipy, which is not a
dependency of the core package.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (Simpson's rule from 0 to |x|)."""
    if df < 1:
        raise ValueError(f"df: expected at least 1 degree of freedom, got {df}")
    a = abs(x)
    h = a / intervals
    total = _t_density(0.0, df) + _t_density(a, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    half = total * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


@functools.lru_cache(maxsize=256)  # 60 bisection steps of a 4,000-interval integral: an experiment asks the same few
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 4)`` = 2.776)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p: expected a probability in [0.5, 1), got {p}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # heavy tails at df=1: the 97.5% point is 12.7
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Summary:
    """Mean of per-seed values, their sample standard deviation, and a ``level`` interval for the mean
    (``None`` with one seed: no spread can be estimated from one value)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    @classmethod
    def of(cls, values: Sequence[float], level: float = 0.95) -> Summary:
        if not values:
            raise ValueError("values: nothing to summarise")
        n, mean = len(values), statistics.fmean(values)
        if n == 1:
            return cls(1, mean, None, None, None, level)
        std = statistics.stdev(values)
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
        return cls(n, mean, std, mean - half, mean + half, level)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (a difference the seeds resolve)."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(values: Sequence[float], control: Sequence[float], level: float = 0.95) -> Summary:
    """Summary of ``values[i] - control[i]``: the arm's difference to the control, seed by seed."""
    if len(values) != len(control):
        raise ValueError(f"values and control: expected one value per seed each, got {len(values)} and {len(control)}")
    return Summary.of([v - c for v, c in zip(values, control, strict=True)], level)
