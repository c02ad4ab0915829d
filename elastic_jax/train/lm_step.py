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
  model = HybridLM(config, remat=remat_policies(remat))

  def per_sample_loss(params, inputs: Array, targets: Array) -> Array:
    return cross_entropy(model.apply({"params": params}, inputs), targets)

  return make_supervised_step(per_sample_loss, tx, grad_accum_steps, "the LM step's batch")


def make_supervised_step(per_sample_loss: Callable[..., Array], tx: optax.GradientTransformation,
                         grad_accum_steps: int, what: str) -> Callable:
  """The step of any per-sequence loss: ``step(state, *extra, tokens [b, l+1]) -> (state, metrics)``.

  ``per_sample_loss(params, *extra, inputs [b', l], targets [b', l]) -> [b']`` scores one micro-batch; ``extra`` are
  the step's arguments between the state and the tokens (e.g. a frozen teacher's params), passed through as they
  are. The step splits the batch into ``grad_accum_steps`` micro-batches (``what`` names the batch in the error when
  b does not divide), accumulates the gradient of the global-batch mean and applies ``tx``; metrics: ``loss`` (that
  mean) and ``grad_norm``.
  """
  k = grad_accum_steps

  def step(state: TrainState, *args: Any) -> tuple[TrainState, dict[str, Array]]:
    *extra, tokens = args
    inputs, targets = split_batch(tokens)
    batch = inputs.shape[0]
    check_grad_accum(batch, k, what)

    def micro_loss(params, micro):
      micro_inputs, micro_targets = micro
      per_sample = per_sample_loss(params, *extra, micro_inputs, micro_targets)
      return jnp.sum(per_sample) / batch, ()  # this micro-batch's share of the global-batch mean

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    loss, grads, _ = accumulate_gradients(lambda micro: grad_fn(state.params, micro),
                                          (micro_batches(inputs, k), micro_batches(targets, k)), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step
