"""The study's config: a run config of the main job (``train.config``: parent, data, elastic setup, curriculum,
evaluation; any task family and difficulty, any ``parent.hf_path``) plus one section of its own::

  config.study = dict(
      seeds=[0, 1, 2],   # every arm runs once per seed; the seed replaces config.seed (parent init, data order,
                         # calibration, budget draws, evaluation problems)
      arms=["elastic", "elastic_stage1_only", "elastic_uniform", "sequential_equal", "sequential_full", "scratch"],
  )

:func:`validate_study_config` checks all of it before any arm runs, the config of every arm included, and refuses a
mistake in one line naming the key (``study.arms[1]: 'sequential' is not one of ...``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import ml_collections

from elastic_jax.study.arms import ARMS, ELASTIC, Arm
from elastic_jax.train.config import plain, validate_run_config
from elastic_jax.train.config_checks import (check_integer, check_keys, check_one_of, check_sequence, config_error)

STUDY_DEFAULTS: dict[str, Any] = {"seeds": [0, 1, 2], "arms": list(ARMS)}
# Config sections that do not change what a run computes: left out of the arms' records.
_NOT_RECORDED = ("mesh", "checkpoint_every", "plan")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The validated study: the base run config (every default filled in), the seeds and the arms (in the table's
  order, ``elastic`` first: the other arms build on its parent, ranking and pruned baselines)."""

  run: ml_collections.ConfigDict
  seeds: tuple[int, ...]
  arms: tuple[str, ...]

  def arm(self, name: str) -> Arm:
    return ARMS[name]

  def arm_config(self, name: str, seed: int) -> ml_collections.ConfigDict:
    """The run config of arm ``name`` at ``seed``: the base config with that seed and, for the elastic arms, the
    arm's curriculum; validated, defaults filled in."""
    values = self.run.to_dict()
    values["seed"] = int(seed)
    arm = ARMS[name]
    if arm.kind == ELASTIC:
      values["stages"] = arm.curriculum([plain(stage) for stage in values["stages"]], "study.arms")
    return validate_run_config(ml_collections.ConfigDict(values))

  @property
  def smaller_budgets(self) -> tuple[float, ...]:
    return tuple(float(b) for b in self.run.elastic.budgets if float(b) < 1.0)


def recorded_values(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The values of an arm's run config that its results depend on (JSON-able), for the arm's phase record."""
  values = json.loads(json.dumps(cfg.to_dict(), default=list))
  return {key: value for key, value in values.items() if key not in _NOT_RECORDED}


def split_study_section(config: Any) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """(the run config without ``study``, the ``study`` section with its defaults)."""
  values = plain(config)
  study = values.pop("study", None)
  study = plain(study) if study is not None else {}
  check_keys(study, list(STUDY_DEFAULTS), "study")
  return ml_collections.ConfigDict(values), {**STUDY_DEFAULTS, **study}


def _distinct(key: str, values: Sequence[Any]) -> None:
  for i, value in enumerate(values):
    if value in values[:i]:
      raise config_error(f"{key}[{i}]", f"{value!r} repeats {key}[{list(values).index(value)}]",
                         "give each entry once")


def validate_study_config(config: Any) -> StudyConfig:
  """The whole study checked before any arm runs: the ``study`` section, the base run config
  (``validate_run_config``: keys, values, files, shapes against the mesh) and the config of every arm; raises
  ``ConfigError`` (``<key>: <what> (<fix>)``) at the first problem."""
  run, study = split_study_section(config)
  seeds = check_sequence("study.seeds", study["seeds"])
  if not seeds:
    raise config_error("study.seeds", "is empty", "give at least one seed, e.g. [0, 1, 2]")
  for i, seed in enumerate(seeds):
    check_integer(f"study.seeds[{i}]", seed, 0)
  _distinct("study.seeds", seeds)
  arms = check_sequence("study.arms", study["arms"])
  for i, name in enumerate(arms):
    check_one_of(f"study.arms[{i}]", name, list(ARMS))
  _distinct("study.arms", arms)
  if "elastic" not in arms:
    raise config_error("study.arms", f"{list(arms)} has no 'elastic'",
                       "every other arm is compared with the elastic family and reuses its parent: add 'elastic'")
  run = validate_run_config(run)
  ordered = tuple(name for name in ARMS if name in arms)
  result = StudyConfig(run, tuple(int(seed) for seed in seeds), ordered)
  if any(ARMS[name].kind != ELASTIC for name in ordered) and not result.smaller_budgets:
    standalone = [name for name in ordered if ARMS[name].kind != ELASTIC]
    raise config_error("study.arms", f"{', '.join(standalone)} compress the members below 100%, but "
                       f"elastic.budgets {list(run.elastic.budgets)} has none",
                       "add a budget below 1.0 or drop these arms")
  for name in ordered:  # every arm's own config (a curriculum it cannot build is refused here)
    result.arm_config(name, result.seeds[0])
  return result
