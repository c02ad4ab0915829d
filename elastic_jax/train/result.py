"""What the main job produced (``pipeline.run_pipeline``), typed: the parent and, for each budget, the elastic child
and the zero-shot pruned baseline of the same size, each in its shardings with its choice, size and folder.

The report (``eval.report.evaluate_and_report``) reads only this.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from jax.sharding import Mesh

from elastic_jax.data.pipeline import SourceConfig
from elastic_jax.data.tokenizer import Tokenizer
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig
from elastic_jax.train.sharding import LogicalRules

Params = Any


def member_name(budget: float) -> str:
  """A budget's folder and report label: 0.6 -> ``"60pct"``."""
  return f"{int(round(100 * budget))}pct"


@dataclasses.dataclass(frozen=True)
class ExtractedModel:
  """One model sliced from a trained or permuted parent, as saved in ``path``."""

  config: ModelConfig
  params: Params
  choice: Choice
  param_count: int
  path: str


@dataclasses.dataclass(frozen=True)
class FamilyMember:
  """One budget of the family: the router's deployed choice sliced from the trained student (``child``), and a
  choice of the same size sliced from the untrained permuted parent (``baseline``)."""

  budget: float  # the target fraction of the parent's parameter count
  child: ExtractedModel
  baseline: ExtractedModel

  @property
  def name(self) -> str:
    return member_name(self.budget)


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """Every model of a run, in its shardings on ``mesh``, and what the evaluation reads them with.

  parent: the permuted parent (importance order), the teacher of every child; ``config`` is its architecture.
  stale: the finished phases kept although the config changed since they ran (``reuse_stale``), each
    ``{"phase": name, "changes": ["key: old -> new", ...]}``.
  """

  workdir: str
  config: ModelConfig
  parent: Params
  members: tuple[FamilyMember, ...]
  source: SourceConfig
  tokenizer: Tokenizer
  mesh: Mesh
  rules: LogicalRules
  stale: tuple[Mapping[str, Any], ...] = ()

  @property
  def metrics_path(self) -> str:
    """The elastic training's log (``metrics.jsonl``): the report's loss curves."""
    return os.path.join(self.workdir, "elastic", "metrics.jsonl")

