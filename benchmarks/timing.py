"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], reps: int, warmup: bool = True) -> float:
  """Median wall time of ``fn()`` over ``reps`` runs (after one warm-up run, which also compiles, by default)."""
  if warmup:
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)
