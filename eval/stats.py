"""Means with t-based 95% CIs, and paired per-episode deltas.

Values enter as one number per episode (an episode with several queries is averaged first), so the CI
over episodes is the cluster-robust CI with episodes as clusters (Miller 2024, "Adding Error Bars to
Evals"). Deltas pair episodes by key: the same episode under two rules.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

# Two-sided 95% quantiles of Student's t for df = 1..30 (standard table values).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom (table to 30, then the
    Cornish-Fisher expansion, accurate to about 1e-3)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with its standard error and 95% CI (None when n < 2)."""

    mean: float
    se: float | None
    ci95: tuple[float, float] | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci95 is not None and (self.ci95[0] > 0 or self.ci95[1] < 0)

    def to_dict(self) -> dict:
        return {"value": self.mean, "se": self.se, "ci95": list(self.ci95) if self.ci95 else None, "n": self.n}


def mean_ci(values: Iterable[float]) -> Estimate:
    """Mean and t-based 95% CI of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, None, None, 0)
    mean = math.fsum(xs) / n
    if n < 2:
        return Estimate(mean, None, None, 1)
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    se = math.sqrt(var / n)
    half = t975(n - 1) * se
    return Estimate(mean, se, (mean - half, mean + half), n)


def paired_delta(base: Mapping[K, float], other: Mapping[K, float]) -> Estimate:
    """Mean of other[k] - base[k] over the keys both hold with finite values, with its 95% CI."""
    diffs = []
    for k, b in base.items():
        o = other.get(k)
        if o is not None and math.isfinite(o) and b is not None and math.isfinite(b):
            diffs.append(o - b)
    return mean_ci(diffs)
