"""Intervals and comparisons of eval/stats.py against references derived independently: values worked out by hand
from the closed formulas, the Wilson bounds as roots of their defining quadratic, the exact binomial coverage, the
analytic standard error of a paired mean difference, and a simulated coverage with a known difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elastic_jax.eval import stats


# ------------------------------------------------------------------------------------------------ Wilson
@pytest.mark.parametrize("correct, n, expected", [
    # 0 of 10: the upper bound is (z^2/n) / (1 + z^2/n) = 0.38416 / 1.38416.
    (0, 10, (0.0, 0.277540)),
    # 10 of 10: the lower bound is 1 / (1 + z^2/n) = 1 / 1.38416.
    (10, 10, (0.722460, 1.0)),
    # 5 of 10: centre 0.5, half width 1.96 / 1.38416 * sqrt(0.025 + 0.0096040) = 1.416021 * 0.186022 = 0.263411.
    (5, 10, (0.236589, 0.763411)),
    # 1 of 2: centre 0.5, half width 1.96 / 2.9208 * sqrt(0.125 + 0.240100) = 0.671049 * 0.604235 = 0.405472.
    (1, 2, (0.094528, 0.905472)),
])
def test_wilson_interval_hand_computed(correct, n, expected):
  assert stats.wilson_interval(correct, n) == pytest.approx(expected, abs=2e-6)


def _wilson_roots(correct: int, n: int, z: float) -> tuple[float, float]:
  """The p with (p_hat - p)^2 = z^2 p (1 - p) / n: roots of (n + z^2) p^2 - (2 n p_hat + z^2) p + n p_hat^2."""
  p_hat = correct / n
  roots = np.roots([n + z * z, -(2 * n * p_hat + z * z), n * p_hat * p_hat])
  return float(min(roots.real)), float(max(roots.real))


@pytest.mark.parametrize("correct, n, z", [(3, 64, 1.96), (40, 64, 1.96), (157, 256, 1.96), (81, 100, 1.0),
                                           (1, 7, 2.576), (255, 256, 1.96)])
def test_wilson_interval_solves_its_quadratic(correct, n, z):
  assert stats.wilson_interval(correct, n, z) == pytest.approx(_wilson_roots(correct, n, z), abs=1e-9)


def test_wilson_interval_covers_about_95_percent_exactly():
  # Exact coverage under Binomial(n, p): the probability of the counts whose interval holds p.
  for n, p in ((64, 0.3), (256, 0.6), (100, 0.05)):
    coverage = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                   if stats.wilson_interval(k, n)[0] <= p <= stats.wilson_interval(k, n)[1])
    assert 0.92 < coverage < 0.98, (n, p, coverage)


def test_wilson_interval_edges():
  assert stats.wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured: nothing known
  low, high = stats.wilson_interval(32, 64, z=1.0)
  wide_low, wide_high = stats.wilson_interval(32, 64)
  assert wide_low < low < 0.5 < high < wide_high
  for bad in ((-1, 4), (5, 4), (1, -1)):
    with pytest.raises(ValueError):
      stats.wilson_interval(*bad)


# ------------------------------------------------------------------------------------------------ bootstrap
def test_paired_bootstrap_cancels_what_the_problems_share():
  rng = np.random.default_rng(0)
  b = rng.random(300)  # scores that vary a lot from problem to problem
  a = b + 0.1  # the same problems, each 0.1 better
  result = stats.paired_bootstrap(a, b)
  assert set(result) == {"diff", "low", "high"}
  # Every resample of the same problems for both gives the difference 0.1: a paired interval has no width.
  assert result["diff"] == pytest.approx(0.1) and result["low"] == pytest.approx(0.1)
  assert result["high"] == pytest.approx(0.1)
  same = stats.paired_bootstrap([True, False, True], [True, False, True])
  assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}


def test_paired_bootstrap_width_matches_the_analytic_standard_error():
  rng = np.random.default_rng(1)
  a, b = rng.random(400) < 0.55, rng.random(400) < 0.45
  d = a.astype(float) - b.astype(float)
  standard_error = d.std() / math.sqrt(d.size)  # of the mean difference, resampling problems
  result = stats.paired_bootstrap(a, b, samples=4000, seed=3)
  assert result["diff"] == pytest.approx(d.mean())
  assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
  assert result["low"] < d.mean() < result["high"]


def test_paired_bootstrap_covers_a_known_difference():
  # Per problem a latent difficulty u; model a answers when u < 0.6, model b when u < 0.5, except that b's answer
  # flips on 10% of the problems: P(a) = 0.6, P(b) = 0.5 * 0.9 + 0.5 * 0.1 = 0.5, true difference 0.1.
  rng = np.random.default_rng(2)
  trials, covered = 200, 0
  for trial in range(trials):
    u, flip = rng.random(200), rng.random(200) < 0.1
    a, b = u < 0.6, (u < 0.5) ^ flip
    result = stats.paired_bootstrap(a, b, samples=1000, seed=trial)
    covered += result["low"] <= 0.1 <= result["high"]
  assert 0.89 <= covered / trials <= 0.99


def test_paired_bootstrap_is_deterministic_given_its_seed():
  rng = np.random.default_rng(4)
  a, b = rng.random(64) < 0.5, rng.random(64) < 0.4
  assert stats.paired_bootstrap(a, b, seed=7) == stats.paired_bootstrap(list(a), list(b), seed=7)
  assert stats.paired_bootstrap(a, b, seed=7) != stats.paired_bootstrap(a, b, seed=8)
  with pytest.raises(ValueError):
    stats.paired_bootstrap([1, 0], [1])
  with pytest.raises(ValueError):
    stats.paired_bootstrap([], [])


def test_paired_ratio_bootstrap():
  rng = np.random.default_rng(5)
  b = rng.random(100) + 0.5
  result = stats.paired_ratio_bootstrap(2 * b, b)
  assert result == pytest.approx({"ratio": 2.0, "low": 2.0, "high": 2.0})  # every resample: exactly twice
  a, b = rng.random(256) < 0.4, rng.random(256) < 0.5
  result = stats.paired_ratio_bootstrap(a, b)
  assert result["ratio"] == pytest.approx(a.mean() / b.mean())
  assert result["low"] < result["ratio"] < result["high"]
  assert stats.paired_ratio_bootstrap([1, 0], [0, 0]) == {"ratio": None, "low": None, "high": None}
  # One right answer of four for the reference: many resamples miss it, so the ratio has no upper bound.
  assert stats.paired_ratio_bootstrap([1, 1, 0, 0], [1, 0, 0, 0])["high"] is None


# ------------------------------------------------------------------------------------------------ t interval
@pytest.mark.parametrize("confidence, df, expected", [
    # Two-sided quantiles from printed t tables.
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 4, 2.7764), (0.95, 9, 2.2622), (0.95, 30, 2.0423),
    (0.90, 1, 6.3138), (0.99, 5, 4.0321)])
def test_t_quantile_matches_printed_tables(confidence, df, expected):
  assert stats.t_quantile(confidence, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_closed_forms():
  for confidence in (0.5, 0.8, 0.95, 0.999):
    # df = 1 (Cauchy): P(|T| <= t) = 2 arctan(t) / pi.  df = 2: P(|T| <= t) = t / sqrt(2 + t^2).
    assert stats.t_quantile(confidence, 1) == pytest.approx(math.tan(math.pi * confidence / 2), rel=1e-9)
    assert stats.t_quantile(confidence, 2) == pytest.approx(math.sqrt(2) * confidence / math.sqrt(1 - confidence ** 2),
                                                            rel=1e-9)


def test_t_quantile_matches_scipy():
  scipy_stats = pytest.importorskip("scipy.stats")
  for df in (1, 3, 6, 7, 12, 63, 200):
    for confidence in (0.9, 0.95, 0.99):
      assert stats.t_quantile(confidence, df) == pytest.approx(scipy_stats.t.ppf(0.5 + confidence / 2, df), rel=1e-8)


def test_mean_interval_hand_computed():
  # 1..5: mean 3, s = sqrt(2.5) = 1.581139, t(0.975, 4) = 2.776445: half width 2.776445 * 1.581139 / sqrt(5) = 1.963243.
  assert stats.mean_interval([1, 2, 3, 4, 5]) == pytest.approx((3.0, 1.036757, 4.963243), abs=1e-6)
  # Two seeds 0 and 1 at 95%: s = 0.707107, t(0.975, 1) = 12.706205: half width 12.706205 * 0.5 = 6.353102.
  assert stats.mean_interval([0.0, 1.0]) == pytest.approx((0.5, -5.853102, 6.853102), abs=1e-6)
  # 90%: t(0.95, 2) = 2.919986; values 0.2, 0.4, 0.6 have s = 0.2: half width 2.919986 * 0.2 / sqrt(3) = 0.337171.
  assert stats.mean_interval([0.2, 0.4, 0.6], confidence=0.9) == pytest.approx((0.4, 0.062829, 0.737171), abs=1e-6)
  assert stats.mean_interval([0.7]) == (0.7, 0.7, 0.7)  # one run: no spread to estimate
  with pytest.raises(ValueError):
    stats.mean_interval([])


def test_difference_verdict():
  assert stats.difference_verdict(0.01, 0.2) == "better"
  assert stats.difference_verdict(-0.2, -0.01) == "worse"
  assert stats.difference_verdict(-0.1, 0.1) == "not distinguishable"
  assert stats.difference_verdict(0.0, 0.2) == "not distinguishable"  # an end at 0 does not exclude 0
  assert stats.difference_verdict(-0.3, -0.1, better="higher", worse="lower") == "lower"
