"""Wall-clock timing and the tiny model, shared by the benchmark scripts."""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import time
from collections.abc import Callable

import jax

from elastic_jax.model import ModelConfig


def tiny_config() -> ModelConfig:
  """The parent of ``configs/tiny.py`` (its ``model`` block)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return ModelConfig.from_dict(module.get_config().model)


def wall_seconds(fn: Callable[[], object], reps: int, warmup: bool = True,
                 statistic: Callable[[list[float]], float] = statistics.median) -> float:
  """Wall time of ``fn()`` over ``reps`` runs (after one warm-up run, which also compiles, by default): their median,
  or another ``statistic`` of the times, e.g. ``min`` for the run least disturbed by other jobs on a shared machine."""
  if warmup:
    jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistic(times)
