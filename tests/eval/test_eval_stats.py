"""Statistics: t quantiles, mean CIs, paired deltas (exactly zero for identical inputs)."""

import math
import random

import pytest
from adapt_runtime.eval.stats import mean_ci, paired_delta, t975


def test_t975_decreases_towards_normal():
    qs = [t975(df) for df in range(1, 400)]
    assert all(a > b for a, b in zip(qs, qs[1:]))
    assert qs[-1] == pytest.approx(1.96, abs=0.01)
    assert t975(30) == pytest.approx(t975(31), abs=0.02)  # table and expansion join smoothly


@pytest.mark.parametrize("n", [2, 5, 40, 500], ids=lambda n: f"n{n}")
def test_mean_ci_contains_mean_and_shrinks(n):
    rng = random.Random(n)
    xs = [rng.gauss(1.0, 2.0) for _ in range(n)]
    est = mean_ci(xs)
    assert est.n == n and est.ci95[0] < est.mean < est.ci95[1]
    wider = mean_ci([x * 3 for x in xs])
    assert wider.ci95[1] - wider.ci95[0] == pytest.approx(3 * (est.ci95[1] - est.ci95[0]))


def test_mean_ci_ignores_non_finite_and_handles_tiny_samples():
    assert mean_ci([1.0, math.nan, None, 3.0]).n == 2
    assert mean_ci([2.0]).ci95 is None and mean_ci([]).n == 0


def test_paired_delta_of_identical_values_is_exactly_zero():
    rng = random.Random(0)
    base = {i: rng.random() for i in range(30)}
    d = paired_delta(base, dict(base))
    assert d.mean == 0.0 and d.ci95 == (0.0, 0.0) and not d.excludes_zero


@pytest.mark.parametrize("shift", [-0.25, 0.5], ids=["down", "up"])
def test_paired_delta_removes_between_episode_variance(shift):
    rng = random.Random(1)
    base = {i: rng.gauss(0, 10) for i in range(20)}
    other = {i: v + shift + rng.gauss(0, 1e-3) for i, v in base.items()}
    d = paired_delta(base, other)
    assert d.excludes_zero and d.ci95[0] < shift < d.ci95[1]
    unpaired = mean_ci(other.values())
    assert (d.ci95[1] - d.ci95[0]) < (unpaired.ci95[1] - unpaired.ci95[0]) / 100


def test_paired_delta_pairs_by_key_only():
    d = paired_delta({0: 1.0, 1: 2.0}, {1: 5.0, 2: 9.0})
    assert d.n == 1 and d.mean == 3.0
