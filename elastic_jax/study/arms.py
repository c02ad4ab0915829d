"""The study's arms, one table: what each trains, from what, on how many tokens.

T is the elastic run's training tokens (the sum over its curriculum's stages of steps x batch x sequence length),
and the smaller members are the budgets below 100% (n - 1 of them in a family of n with a full-size member).

  elastic               the elastic family from one run of T tokens: the main job with the config's curriculum
                        (stage 1 uniform over budgets, stage 2 long context weighted toward the full-size model)
  elastic_stage1_only   the same with stage 2 off: stage 1 lengthened by the routed stages' tokens, and a pinned
                        tail kept at stage 1's settings (batch, length, probabilities, task settings) for its
                        tokens (same T)
  elastic_uniform       the same with uniform budget probabilities in stage 2 (every stage after the first)
  sequential_equal      Minitron-style sequential compression: each smaller member's zero-shot pruned model (the
                        elastic arm's pruned baseline: same importance ranking, the size of the elastic child)
                        distilled alone from the same teacher (the permuted parent) on T / (n - 1) tokens, so
                        that all of them together spend T
  sequential_full       the same, T tokens each
  scratch               each smaller elastic child's architecture trained from random weights with the LM loss
                        (next-token cross-entropy) on T tokens, at the parent's pretraining learning rate

The standalone arms (sequential, scratch) read the elastic stages' own data streams (same seed, same stages' task
settings, batch sizes and sequence lengths, each stage's steps scaled by the arm's share of T), so every arm sees
the same documents in the same order, only more or fewer of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from elastic_jax.train.config_checks import config_error

Stages = list[dict[str, Any]]

ELASTIC, DISTILLED, SCRATCH = "elastic", "distilled", "scratch"


def same_curriculum(stages: Stages, where: str) -> Stages:
  del where
  return [dict(stage) for stage in stages]


def stage1_only(stages: Stages, where: str) -> Stages:
  """Stage 2 off: every routed stage after the first becomes more of stage 1 (same tokens, rounded to whole steps),
  and a pinned tail stays a pinned tail, at stage 1's batch, length, probabilities and task settings for the same
  tokens: only the long-context part is switched off, not the training of the deployed choices."""
  if len(stages) < 2:
    raise config_error(where, f"elastic_stage1_only compares stage 2 on and off, but stages has {len(stages)} stage",
                       "give stages a second stage or drop this arm")
  first = dict(stages[0])
  per_step = first["batch_size"] * first["seq_len"]
  routed = [stage for stage in stages if not stage.get("pinned", False)]
  pinned = [stage for stage in stages[1:] if stage.get("pinned", False)]
  # The tails read stage 1's task settings too (``tasks``), at their own position's data stream.
  first_tasks = 0 if first.get("tasks") is None else first["tasks"]
  tails = [dict(first, name=stage["name"], pinned=True, tasks=first_tasks,
                steps=max(1, round(stage_tokens([stage]) / per_step))) for stage in pinned]
  first["steps"] = max(1, round(stage_tokens(routed) / per_step))
  return [first, *tails]


def uniform_after_first(stages: Stages, where: str) -> Stages:
  """Stage 2 with uniform budget probabilities: every stage after the first (stage 2 and, when the curriculum has
  one, its pinned tail) samples the budgets uniformly; the first stage is unchanged."""
  if len(stages) < 2:
    raise config_error(where, f"elastic_uniform compares stage-2 sampling, but stages has {len(stages)} stage",
                       "give stages a second stage or drop this arm")
  later = [[float(p) for p in stage["budget_probs"]] for stage in stages[1:]]
  if all(max(probs) - min(probs) < 1e-9 for probs in later):
    raise config_error(where, f"elastic_uniform: the budget_probs of the stages after the first, {later}, are uniform "
                       "already, so this arm would repeat the elastic arm",
                       "weight stage 2 toward the full-size member, e.g. [0.5, 0.3, 0.2], or drop this arm")
  return [dict(stages[0]), *(dict(stage, budget_probs=[1.0 / len(probs)] * len(probs))
                             for stage, probs in zip(stages[1:], later))]


def stage_tokens(stages: Sequence[Mapping[str, Any]]) -> int:
  """Training tokens of a curriculum: steps x batch_size x seq_len, summed over its stages."""
  return sum(int(s["steps"]) * int(s["batch_size"]) * int(s["seq_len"]) for s in stages)


def scaled_stages(stages: Sequence[Mapping[str, Any]], share: float) -> Stages:
  """Each stage with ``share`` of its steps (rounded, at least one): the standalone arms' curricula."""
  return [dict(stage, steps=max(1, round(int(stage["steps"]) * share))) for stage in stages]


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of the study.

  kind: ``elastic`` (the main job, ``train.pipeline.run_pipeline``, with ``curriculum`` applied to the config's
    stages), ``distilled`` (each smaller member's pruned baseline distilled alone from the permuted parent) or
    ``scratch`` (each smaller elastic child's architecture trained from random weights, LM loss).
  token_share: for the standalone kinds, each member's share of T: ``equal`` (1 / (n - 1), all of them together T)
    or ``full`` (T each).
  """

  name: str
  kind: str
  description: str
  curriculum: Callable[[Stages, str], Stages] = same_curriculum
  token_share: str = "full"

  def member_share(self, smaller_members: int) -> float:
    return 1.0 / smaller_members if self.token_share == "equal" else 1.0


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("elastic", ELASTIC, "the elastic family from one run of T tokens (the config's curriculum)"),
    Arm("elastic_stage1_only", ELASTIC, "the elastic run with stage 2 off: stage 1 alone, lengthened to T tokens",
        curriculum=stage1_only),
    Arm("elastic_uniform", ELASTIC, "the elastic run with uniform budget probabilities in stage 2 (every stage "
        "after the first)", curriculum=uniform_after_first),
    Arm("sequential_equal", DISTILLED, "each smaller member pruned with the same ranking, then distilled alone from "
        "the same teacher on T/(n-1) tokens (equal total)", token_share="equal"),
    Arm("sequential_full", DISTILLED, "each smaller member pruned with the same ranking, then distilled alone from "
        "the same teacher on T tokens", token_share="full"),
    Arm("scratch", SCRATCH, "each smaller elastic child's architecture trained from random weights (LM loss) on T "
        "tokens", token_share="full"),
)}
