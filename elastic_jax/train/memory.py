"""The run's memory levers (``config.memory``), one type read by the train steps and by the planner.

Each lever trades compute or precision for memory and leaves the step's result unchanged (up to the teacher's
rounding in bf16): the student's rematerialisation per block kind, micro-batches per step (gradient accumulation),
and the frozen teacher's storage dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from elastic_jax.model.config import BLOCK_KINDS, ModelConfig
from elastic_jax.model.hybrid import REMAT_POLICIES, RematPolicies, remat_policies
from elastic_jax.train.config_checks import check_integer, check_keys, check_one_of, config_error

TEACHER_DTYPES = ("float32", "bfloat16")


def _not_a_dict(remat: Any) -> Exception:
  return config_error("memory.remat", f"{remat!r} is not a dict", "map block kinds to none, full or dots")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """``config.memory``; every value is checked here, and an error names its key (``memory.grad_accum_steps: ...``).

  remat: per block kind, what the backward pass recomputes (one of ``REMAT_POLICIES``); a dict or pairs, stored as
    the hashable sorted pairs of the kinds not set to "none" (``remat_policies``).
  grad_accum_steps: micro-batches per step, for the elastic stages and parent pretraining (1: no accumulation).
  teacher_dtype: "bfloat16" halves the teacher's memory: its params are stored and its forward computed in bf16
    (the logits stay fp32 for the KL); "float32" keeps them fp32 and computes in the model's compute dtype.
  """

  remat: RematPolicies = ()
  grad_accum_steps: int = 1
  teacher_dtype: str = "float32"

  def __post_init__(self):
    remat = self.remat
    if not isinstance(remat, Mapping):
      try:
        remat = dict(remat)
      except (TypeError, ValueError) as error:
        raise _not_a_dict(remat) from error
    check_keys(remat, list(BLOCK_KINDS.values()), "memory.remat")
    for kind, policy in remat.items():
      check_one_of(f"memory.remat.{kind}", policy, REMAT_POLICIES)
    check_integer("memory.grad_accum_steps", self.grad_accum_steps, 1)
    check_one_of("memory.teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
    object.__setattr__(self, "remat", remat_policies(remat))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> MemoryConfig:
    """The ``config.memory`` section (a plain dict; keys left out take their defaults)."""
    check_keys(values, [field.name for field in dataclasses.fields(cls)], "memory")
    if not isinstance(values.get("remat", {}), Mapping):  # the config's form is a dict; pairs are the stored form
      raise _not_a_dict(values["remat"])
    return cls(**values)

  def policy(self, kind: str) -> str:
    """The remat policy of block kind ``kind`` ("none" for a kind not listed)."""
    return dict(self.remat).get(kind, "none")

  def policies(self, pattern: str | None = None) -> dict[str, str]:
    """Every block kind's remat policy, in ``BLOCK_KINDS`` order (only the kinds in ``pattern`` when given)."""
    return {kind: self.policy(kind) for char, kind in BLOCK_KINDS.items() if pattern is None or char in pattern}

  def to_json(self) -> dict[str, Any]:
    """The levers as a run's record holds them (remat: only the kinds rematerialised)."""
    return {"remat": dict(self.remat), "grad_accum_steps": self.grad_accum_steps, "teacher_dtype": self.teacher_dtype}


def teacher_config(config: ModelConfig, teacher_dtype: str) -> ModelConfig:
  """The frozen teacher's model config: the model's compute dtype, lowered to bf16 when the teacher is stored in
  bf16 (``MemoryConfig.teacher_dtype``)."""
  return dataclasses.replace(config, dtype="bfloat16") if teacher_dtype == "bfloat16" else config
