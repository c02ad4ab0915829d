"""Distillation of one standalone student from a frozen teacher: the train step of Minitron-style sequential
compression (a pruned model distilled alone), which the study (``elastic_jax.study``) sets against the elastic
family.

The student is any ``HybridLM`` config (e.g. a pruned child of the teacher), the teacher another; the loss is the
elastic step's (``losses.kd_loss``: forward KL at a temperature, optional CE), so the two arms differ only in what
they train, not in how a token is scored. Same sharded pattern as the LM and elastic steps: the state is donated, the
teacher and the batch are inputs in their own shardings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.model.hybrid import init_boxed_params, remat_policies
from elastic_jax.train.lm_step import make_supervised_step
from elastic_jax.train.loop import ShardedTraining, with_shardings
from elastic_jax.train.losses import kd_loss
from elastic_jax.train.microbatch import check_grad_accum_steps
from elastic_jax.train.optim import OptimizerConfig, make_optimizer
from elastic_jax.train.sharding import (DEFAULT_RULES, LogicalRules, batch_sharding, param_shardings, replicated,
                                        sharded_jit)
from elastic_jax.train.state import TrainState

Array = jax.Array
Params = Any


def make_kd_step(config: ModelConfig, teacher_config: ModelConfig, tx: optax.GradientTransformation, *,
                 temperature: float = 1.0, ce_weight: float = 0.0, grad_accum_steps: int = 1,
                 remat: Any = ()) -> Callable:
  """``step(state, teacher_params, tokens [b, l+1]) -> (state, metrics)``: the student (``config``) learns the
  frozen teacher's (``teacher_config``) next-token distributions on the batch.

  grad_accum_steps: micro-batches per step (b must divide by it); the teacher runs per micro-batch too. remat: the
  student's per-block-kind rematerialisation (``remat_policies``).
  """
  check_grad_accum_steps(grad_accum_steps)
  student, teacher = HybridLM(config, remat=remat_policies(remat)), HybridLM(teacher_config)

  def per_sample_loss(params, teacher_params: Params, inputs: Array, targets: Array) -> Array:
    teacher_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, inputs))
    return kd_loss(student.apply({"params": params}, inputs), teacher_logits, targets, temperature=temperature,
                   ce_weight=ce_weight)

  supervised = make_supervised_step(per_sample_loss, tx, grad_accum_steps, "the distillation step's batch")

  def step(state: TrainState, teacher_params: Params, tokens: Array) -> tuple[TrainState, dict[str, Array]]:
    state, metrics = supervised(state, teacher_params, tokens)
    return state, {"loss": metrics["loss"], "kd": metrics["loss"], "grad_norm": metrics["grad_norm"]}

  return step


def init_kd_state(params: Params, tx: optax.GradientTransformation) -> TrainState:
  """The student's train state from its starting weights (e.g. a pruned model), with a fresh optimizer state."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(0)))


@functools.lru_cache(maxsize=8)
def compiled_kd_step(config: ModelConfig, teacher_config: ModelConfig, optimizer: OptimizerConfig, total_steps: int,
                     mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, *, temperature: float = 1.0,
                     ce_weight: float = 0.0, grad_accum_steps: int = 1, remat: Any = ()) -> ShardedTraining:
  """The distillation step jitted over ``mesh``: ``step(state, teacher_params, tokens)``, the teacher's params in
  ``param_shardings(teacher_config)``; ``init(params)`` takes the student's starting params in their shardings and
  creates the optimizer state beside them. ``remat`` must be hashable (``remat_policies`` pairs)."""
  tx = make_optimizer(optimizer, total_steps)
  boxed_state = jax.eval_shape(lambda: init_kd_state(init_boxed_params(config, jax.random.key(0)), tx))
  state_shardings, abstract_state = with_shardings(boxed_state, mesh, rules)
  tokens = batch_sharding(mesh, rules)
  step = sharded_jit(make_kd_step(config, teacher_config, tx, temperature=temperature, ce_weight=ce_weight,
                                  grad_accum_steps=grad_accum_steps, remat=remat), mesh, rules,
                     in_shardings=(state_shardings, param_shardings(teacher_config, mesh, rules), tokens),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
  init = sharded_jit(lambda params: init_kd_state(params, tx), mesh, rules, in_shardings=(state_shardings.params,),
                     out_shardings=state_shardings)
  return ShardedTraining(step, init, state_shardings, abstract_state, tokens)
