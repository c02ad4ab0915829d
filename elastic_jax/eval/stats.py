"""How sure a measured number is: intervals for accuracies, for paired differences between two models on the same
problems, and for a mean over seeds.

- :func:`wilson_interval`: the Wilson score interval of a proportion (an accuracy of ``correct`` out of ``n``). Unlike
  the normal approximation p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a point at 0 or n.
- :func:`paired_bootstrap`: the difference of two models' mean scores over the *same* problems, with a percentile
  interval from resampling problems (one set of resampled indices for both models, so that what the problems have in
  common cancels out). :func:`paired_ratio_bootstrap`: the same for the ratio of the means (how much of a reference
  model's accuracy another keeps).
- :func:`mean_interval`: the mean of a few runs (seeds) with its Student-t interval.
- :func:`difference_verdict`: one word from an interval of a difference: above 0, below 0, or containing it.

numpy only: the t quantile is computed here from the closed form of the t distribution for integer degrees of
freedom (Abramowitz & Stegun 26.7.3-4), so that nothing depends on scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NOT_DISTINGUISHABLE = "not distinguishable"
# Resampled problem indices held at once by the bootstrap (samples x n): a few MB, whatever the number of problems.
_BLOCK_ELEMENTS = 1 << 20


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """The Wilson score interval of the proportion ``correct / n``: the p for which ``(correct/n - p)^2 <= z^2 p (1 - p)
  / n``. ``z = 1.96`` gives 95%. With ``n = 0`` nothing is known: (0, 1).

  Returns:
    (low, high), both in [0, 1].
  """
  if n < 0 or not 0 <= correct <= n:
    raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct}, n={n}.")
  if n == 0:
    return 0.0, 1.0
  p = correct / n
  shrink = 1 + z * z / n
  center = (p + z * z / (2 * n)) / shrink
  half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # The bounds are exactly 0 at correct = 0 and 1 at correct = n; rounding must not push them past.
  return max(0.0, center - half), min(1.0, center + half)


def _paired_columns(a: Sequence[bool | float], b: Sequence[bool | float]) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.size != b.size:
    raise ValueError(f"a paired bootstrap needs one score per problem for both models: {a.size} vs {b.size}.")
  if a.size == 0:
    raise ValueError("a paired bootstrap needs at least one problem.")
  return a, b


def _resampled_sums(columns: np.ndarray, samples: int, seed: int) -> np.ndarray:
  """columns [n, k] -> [samples, k]: the column sums over ``samples`` resamples of the n rows with replacement, every
  column resampled at the same row indices. Deterministic given ``seed``."""
  if samples < 1:
    raise ValueError(f"samples={samples} must be >= 1.")
  n = columns.shape[0]
  rng = np.random.default_rng(seed)
  block = max(1, _BLOCK_ELEMENTS // n)
  sums = []
  for start in range(0, samples, block):
    indices = rng.integers(0, n, size=(min(block, samples - start), n))
    sums.append(columns[indices].sum(axis=1))
  return np.concatenate(sums)


def paired_bootstrap(a: Sequence[bool | float], b: Sequence[bool | float], *, samples: int = 2000,
                     seed: int = 0) -> dict:
  """mean(a) - mean(b) over the same problems, with the 95% percentile interval of a paired bootstrap.

  Args:
    a, b: one score per problem for each model (e.g. correct or not), in the same problem order.
    samples: bootstrap resamples; each draws len(a) problem indices with replacement and takes the difference of the
      two models' means over those same problems.
    seed: the resampling's seed (the result is a function of the inputs and the seed).

  Returns:
    {"diff": mean(a) - mean(b), "low": 2.5th percentile, "high": 97.5th percentile of the resampled differences}.
  """
  a, b = _paired_columns(a, b)
  diffs = _resampled_sums((a - b)[:, None], samples, seed)[:, 0] / a.size
  low, high = np.percentile(diffs, [2.5, 97.5])
  return {"diff": float(a.mean() - b.mean()), "low": float(low), "high": float(high)}


def paired_ratio_bootstrap(a: Sequence[bool | float], b: Sequence[bool | float], *, samples: int = 2000,
                           seed: int = 0) -> dict:
  """mean(a) / mean(b) over the same problems (e.g. the share of a reference model's accuracy another keeps), with
  the 95% percentile interval of the same paired bootstrap as :func:`paired_bootstrap`.

  Returns:
    {"ratio", "low", "high"}; ``ratio`` is None when mean(b) is 0, and ``high`` None (unbounded) when more than 2.5%
    of the resamples have mean(b) = 0.
  """
  a, b = _paired_columns(a, b)
  if not b.any():
    return {"ratio": None, "low": None, "high": None}
  sums = _resampled_sums(np.stack([a, b], axis=1), samples, seed)
  ratios = np.full(samples, np.inf)
  np.divide(sums[:, 0], sums[:, 1], out=ratios, where=sums[:, 1] != 0)
  low, high = np.sort(ratios)[[_percentile_rank(samples, 2.5), _percentile_rank(samples, 97.5)]]
  return {"ratio": float(a.mean() / b.mean()), "low": float(low), "high": None if np.isinf(high) else float(high)}


def _percentile_rank(count: int, percent: float) -> int:
  """The index in a sorted sample of ``count`` values of its ``percent``-th percentile, taken at a sample value
  (nearest rank: interpolating would mix in an unbounded value)."""
  return min(count - 1, max(0, math.ceil(percent / 100 * count) - 1))


def _t_two_sided_mass(theta: float, df: int) -> float:
  """P(|T| <= sqrt(df) tan(theta)) for T ~ Student t with integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3-4)."""
  sin, cos = math.sin(theta), math.cos(theta)
  cos2 = cos * cos
  if df % 2 == 0:  # sin(theta) [1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)]
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
      term *= (2 * k - 1) / (2 * k) * cos2
      total += term
    return sin * total
  # odd: 2/pi [theta + sin(theta) (cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(df-2))]
  if df == 1:
    return 2 * theta / math.pi
  term = cos
  total = cos
  for k in range(1, (df - 1) // 2):
    term *= (2 * k) / (2 * k + 1) * cos2
    total += term
  return 2 / math.pi * (theta + sin * total)


def t_quantile(confidence: float, df: int) -> float:
  """The t such that P(|T| <= t) = ``confidence`` for Student's t with ``df`` degrees of freedom (e.g. 12.706 for
  0.95 and df = 1): bisection on the angle theta = arctan(t / sqrt(df)), over which the mass rises from 0 to 1."""
  if not 0 < confidence < 1 or df < 1:
    raise ValueError(f"t_quantile needs 0 < confidence < 1 and df >= 1, got {confidence} and {df}.")
  low, high = 0.0, math.pi / 2
  for _ in range(100):
    middle = (low + high) / 2
    if _t_two_sided_mass(middle, df) < confidence:
      low = middle
    else:
      high = middle
  return math.sqrt(df) * math.tan((low + high) / 2)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
  """The mean of ``values`` (e.g. one accuracy per seed) and its Student-t interval: mean +- t * s / sqrt(n), s the
  sample standard deviation (n - 1 in the denominator), t the two-sided ``confidence`` quantile with n - 1 degrees
  of freedom.

  With one value no spread can be estimated: the interval is (mean, mean), which says "one run", not "certain".

  Returns:
    (mean, low, high).
  """
  values = np.asarray(values, np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("mean_interval needs at least one value.")
  mean = float(values.mean())
  if values.size == 1:
    return mean, mean, mean
  half = t_quantile(confidence, values.size - 1) * float(values.std(ddof=1)) / math.sqrt(values.size)
  return mean, mean - half, mean + half


def difference_verdict(low: float, high: float, better: str = "better", worse: str = "worse") -> str:
  """``better`` when the interval [low, high] of a difference (a - b) lies above 0, ``worse`` when it lies below 0,
  ``"not distinguishable"`` when it contains 0 (an end at exactly 0 included)."""
  if low > 0:
    return better
  if high < 0:
    return worse
  return NOT_DISTINGUISHABLE
