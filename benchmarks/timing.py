"""Wall-clock timing and the tiny model, shared by the benchmark scripts."""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

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
  return interleaved_seconds([fn], reps, warmup, statistic)[0]


def interleaved_seconds(fns: Sequence[Callable[[], object]], reps: int, warmup: bool = True,
                        statistic: Callable[[list[float]], float] = statistics.median) -> list[float]:
  """``wall_seconds`` of several functions, timed in ``reps`` rounds that call each of them once in turn, so that
  their times share the machine's load of the moment (for differences and ratios of them on a shared machine)."""
  if warmup:
    for fn in fns:
      jax.block_until_ready(fn())
  times: list[list[float]] = [[] for _ in fns]
  for _ in range(reps):
    for fn, spent in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      spent.append(time.perf_counter() - start)
  return [statistic(spent) for spent in times]
