"""From a run's ``ml_collections`` config to the training engine's objects, with errors that name the bad key.

Layout of the training part of a config (see ``configs/tiny.py``)::

  config.elastic = dict(
      budgets=(1.0, 0.75, 0.5),                 # fractions of the parent's parameter count
      space=dict(hidden=[...], mlp=[...], ..., mlp_mode="homogeneous"),   # ElasticSpace.from_dict
      router=dict(width=256, hard=True, estimator="chosen",  # or "softmax" (straight-through Gumbel-softmax)
                  tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0, tau_decay="exponential"),
      kd_temperature=1.0, ce_weight=0.0, router_loss_weight=1.0, argmax_loss_weight=0.0, dead_zone=0.02,
      stratified=False,
      budget_metric="params",  # or "memory": weights + KV cache + SSM state at memory_context tokens
      memory_context=8192)
  config.stages = [dict(name="stage1", steps=..., batch_size=..., seq_len=..., budget_probs=[...]), ...]
  config.optimizer = dict(learning_rate=9e-5, warmup_steps=60, ...)        # OptimizerConfig
  config.router_optimizer = dict(learning_rate=1e-2, ...)                  # OptimizerConfig
  config.memory = dict(                                    # levers that trade compute for memory (all optional)
      remat=dict(mamba="none", attention="none", mlp="none"),  # per block kind: none | full | dots
      grad_accum_steps=1,      # micro-batches per step, for the elastic stages and parent pretraining
      teacher_dtype="float32")  # or "bfloat16": the frozen teacher stored and run in bf16
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model.config import ConfigError, ModelConfig
from elastic_jax.model.hybrid import RematPolicies, remat_policies
from elastic_jax.train.loop import Stage
from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config
from elastic_jax.train.elastic_step import TEACHER_DTYPES, ElasticSetup, check_grad_accum_steps

T = TypeVar("T")
_MEMORY_KEYS = ("remat", "grad_accum_steps", "teacher_dtype")
_ROUTER_KEYS = ("width", "hard", "estimator", "tau_start", "tau_end", "scale_start", "scale_end", "tau_decay")
_ELASTIC_KEYS = ("budgets", "space", "router", "kd_temperature", "ce_weight", "router_loss_weight",
                 "argmax_loss_weight", "dead_zone", "stratified", "budget_metric", "memory_context")


def plain(values: Any) -> dict[str, Any]:
  """A ConfigDict / mapping as a plain dict (None as empty)."""
  if values is None:
    return {}
  return dict(values.to_dict() if hasattr(values, "to_dict") else values)


def check_keys(values: Mapping[str, Any], known: Sequence[str], where: str) -> None:
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in {where}; known keys are {sorted(known)}.")


def dataclass_from(cls: type[T], values: Any, where: str, **defaults: Any) -> T:
  """``cls(**values)`` after rejecting keys ``cls`` does not have, naming ``where`` in the error."""
  values = plain(values)
  check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
  return cls(**{**defaults, **values})


def optimizers_from_config(config: Any) -> tuple[OptimizerConfig, OptimizerConfig]:
  model = dataclass_from(OptimizerConfig, config.get("optimizer"), "config.optimizer")
  router_defaults = dataclasses.asdict(default_router_optimizer_config())
  router = dataclass_from(OptimizerConfig, config.get("router_optimizer"), "config.router_optimizer",
                          **router_defaults)
  return model, router


def stages_from_config(config: Any) -> tuple[Stage, ...]:
  stages = config.get("stages")
  if not stages:
    raise ValueError("config.stages is empty: give at least one stage (name, steps, batch_size, seq_len, "
                     "budget_probs).")
  out = []
  for i, stage in enumerate(stages):
    values = plain(stage)
    values["budget_probs"] = tuple(float(p) for p in values.get("budget_probs", ()))
    out.append(dataclass_from(Stage, values, f"config.stages[{i}]"))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
  """``config.memory``: rematerialisation per block kind, gradient accumulation, the teacher's dtype."""

  remat: RematPolicies = ()
  grad_accum_steps: int = 1
  teacher_dtype: str = "float32"


def memory_from_config(config: Any) -> MemoryConfig:
  """Reads and validates ``config.memory`` (absent: no remat, no accumulation, fp32 teacher)."""
  memory = plain(config.get("memory"))
  check_keys(memory, _MEMORY_KEYS, "config.memory")
  remat = plain(memory.get("remat"))
  try:
    remat = remat_policies(remat)
  except ValueError as error:
    raise ValueError(f"config.memory.{error}") from None
  steps = memory.get("grad_accum_steps", 1)
  check_grad_accum_steps(steps, "config.memory.grad_accum_steps")
  teacher_dtype = memory.get("teacher_dtype", "float32")
  if teacher_dtype not in TEACHER_DTYPES:
    raise ValueError(f"config.memory.teacher_dtype={teacher_dtype!r} is not one of {TEACHER_DTYPES}.")
  return MemoryConfig(remat, steps, teacher_dtype)


def elastic_setup_from_config(config: Any, model_config: ModelConfig, depth_order: Sequence[int],
                              total_steps: int) -> ElasticSetup:
  """Builds the ElasticSetup of ``config.elastic`` and ``config.memory``; the router schedule spans the whole run
  (D-4)."""
  elastic = plain(config.get("elastic"))
  check_keys(elastic, _ELASTIC_KEYS, "config.elastic")
  router = plain(elastic.pop("router", None))
  check_keys(router, _ROUTER_KEYS, "config.elastic.router")
  space = ElasticSpace.from_dict(plain(elastic.pop("space", None)), model_config)
  budgets = tuple(float(b) for b in elastic.pop("budgets", (1.0, 0.75, 0.5)))
  width, hard = router.pop("width", 256), router.pop("hard", True)
  estimator = router.pop("estimator", "chosen")
  schedule = RouterSchedule(total_steps=total_steps, **router)
  memory = memory_from_config(config)
  return ElasticSetup(model_config, space, budgets, tuple(int(i) for i in depth_order), schedule,
                      router_width=width, hard=hard, estimator=estimator,
                      grad_accum_steps=memory.grad_accum_steps, remat=memory.remat,
                      teacher_dtype=memory.teacher_dtype, **elastic)


def check_run_shapes(config: Any, mesh: Any, rules: Any) -> None:
  """Every batch size and sequence length of a run against its mesh (a ``Mesh`` or ``AbstractMesh``: only its axis
  sizes are read) and logical-axis ``rules``, before any phase runs.

  Batches (parent pretraining, calibration, each stage, evaluation) are split over the data-parallel devices (the
  mesh axes of the ``batch`` rule) and over the processes; with gradient accumulation each micro-batch is. Sequence
  lengths are split over the context axis. Raises ``ConfigError`` naming the first field that does not divide, e.g.
  ``config.stages[1].batch_size=6 is not divisible by the 4 data-parallel devices of mesh (4,)``.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]  # the mesh axes the batch rule splits rows over
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  data = 1
  for name in axes:
    data *= mesh.shape[name]
  context = mesh.shape.get("context", 1)
  processes = jax.process_count()
  shape = tuple(mesh.shape.values())
  while len(shape) > 1 and shape[-1] == 1:
    shape = shape[:-1]
  mesh_text = f"mesh {shape if len(shape) > 1 else f'({shape[0]},)'}"
  grad_accum = plain(config.get("memory")).get("grad_accum_steps", 1)
  grad_accum = grad_accum if isinstance(grad_accum, int) and grad_accum >= 1 else 1

  def batch(key: str, value: Any, micro: int = 1) -> None:
    value = int(value)
    if value % processes:
      raise ConfigError(f"{key}={value} is the global batch, split evenly over {processes} processes: make it a "
                       f"multiple of {processes}.")
    if micro > 1 and value % micro == 0 and (value // micro) % data:
      raise ConfigError(f"{key}={value} in {micro} micro-batches (config.memory.grad_accum_steps) gives "
                       f"{value // micro} rows per micro-batch, not divisible by the {data} data-parallel devices "
                       f"of {mesh_text}: make {key} a multiple of {micro * data}.")
    if value % data:
      raise ConfigError(f"{key}={value} is not divisible by the {data} data-parallel devices of {mesh_text}: make "
                       f"it a multiple of {data}.")

  def length(key: str, value: Any) -> None:
    value = int(value)
    if value % context:
      raise ConfigError(f"{key}={value} is not divisible by the {context} context-parallel devices of "
                       f"{mesh_text}: make it a multiple of {context}.")

  parent = plain(config.get("parent"))
  if not parent.get("hf_path"):
    batch("config.parent.batch_size", parent.get("batch_size", 16), grad_accum)
    length("config.parent.seq_len", parent.get("seq_len", 128))
  importance = plain(config.get("importance"))
  batch("config.importance.batch_size", importance.get("batch_size", 8))
  length("config.importance.seq_len", importance.get("seq_len", 256))
  for i, stage in enumerate(config.get("stages") or ()):
    stage = plain(stage)
    if "batch_size" in stage:
      batch(f"config.stages[{i}].batch_size", stage["batch_size"], grad_accum)
    if "seq_len" in stage:
      length(f"config.stages[{i}].seq_len", stage["seq_len"])
  evaluation = plain(config.get("eval"))
  batch("config.eval.batch_size", evaluation.get("batch_size", 8))
  batch("config.eval.decode_batch", evaluation.get("decode_batch", 16))
  length("config.eval.seq_len", evaluation.get("seq_len", 256))
