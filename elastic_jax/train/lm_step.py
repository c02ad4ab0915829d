"""The plain next-token train step (parent pretraining, baselines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.model.hybrid import remat_policies
from elastic_jax.train.losses import cross_entropy
from elastic_jax.train.microbatch import accumulate_gradients, check_grad_accum, check_grad_accum_steps, micro_batches
from elastic_jax.train.state import TrainState

Array = jax.Array


def split_batch(tokens: Array) -> tuple[Array, Array]:
  """[b, l+1] token ids -> (inputs [b, l], next-token targets [b, l])."""
  return tokens[:, :-1], tokens[:, 1:]


def make_lm_step(config: ModelConfig, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                 remat: Any = ()) -> Callable:
  """Next-token cross-entropy training of one model: ``step(state, tokens [b, l+1]) -> (state, metrics)``.

  grad_accum_steps: micro-batches per step (b must divide by it); remat: per-block-kind rematerialisation
  (``remat_policies``), e.g. ``{"mamba": "full"}``.
  """
  check_grad_accum_steps(grad_accum_steps)
  k = grad_accum_steps
  model = HybridLM(config, remat=remat_policies(remat))

  def step(state: TrainState, tokens: Array) -> tuple[TrainState, dict[str, Array]]:
    inputs, targets = split_batch(tokens)
    batch = inputs.shape[0]
    check_grad_accum(batch, k, "the LM step's batch")

    def micro_loss(params, micro):
      micro_inputs, micro_targets = micro
      per_sample = cross_entropy(model.apply({"params": params}, micro_inputs), micro_targets)
      return jnp.sum(per_sample) / batch, ()  # this micro-batch's share of the global-batch mean

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    loss, grads, _ = accumulate_gradients(lambda micro: grad_fn(state.params, micro),
                                          (micro_batches(inputs, k), micro_batches(targets, k)), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
