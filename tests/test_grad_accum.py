"""Gradient accumulation: k micro-batches compute the same step as one batch of the global size.

Reference: the same step with grad_accum_steps=1 (one forward/backward over the whole batch). SGD keeps the
comparison of updated params a comparison of gradients (AdamW's first step is about lr * sign(g)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params, small_config

from elastic_jax.data.random_tokens import RandomTokenBatches
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model import HybridLM
from elastic_jax.train.loop import Stage, train_elastic
from elastic_jax.train.elastic_step import ElasticSetup, init_elastic_state, make_elastic_step
from elastic_jax.train.lm_step import make_lm_step
from elastic_jax.train.memory import MemoryConfig
from elastic_jax.train.state import TrainState

CONFIG = small_config("M*-", hidden_size=32, intermediate_size=48)
SPACE = ElasticSpace.from_fractions(CONFIG, (0.5, 0.75, 1.0))
TOKENS = jax.random.randint(jax.random.key(7), (8, 9), 0, CONFIG.vocab_size)


def _setup(grad_accum_steps: int) -> ElasticSetup:
  # ce_weight and a full budget cover every term of the loss (KD, CE, router loss, full-budget anchor).
  return ElasticSetup(CONFIG, SPACE, (1.0, 0.75, 0.5), (0, 2, 1), RouterSchedule(total_steps=10), router_width=8,
                      ce_weight=0.3, stratified=True, memory=MemoryConfig(grad_accum_steps=grad_accum_steps))


def _assert_close(got, want, label):
  got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w), initial=0.0)) + 1e-9,
                               err_msg=f"{label} {jax.tree_util.keystr(path)}")


def test_elastic_step_with_four_micro_batches_equals_one_batch():
  teacher, student = random_params(CONFIG, seed=0), random_params(CONFIG, seed=1)
  tx, router_tx = optax.sgd(0.5), optax.sgd(0.5)
  results = {}
  for k in (1, 4):
    setup = _setup(k)
    state = init_elastic_state(setup, student, tx, router_tx, seed=5)
    results[k] = jax.jit(make_elastic_step(setup, tx, router_tx))(state, teacher, TOKENS,
                                                                  jnp.asarray([0.5, 0.25, 0.25]))
  (one, one_metrics), (four, four_metrics) = results[1], results[4]
  # Every budget was drawn: the micro-batches mix budgets exactly as the whole batch does.
  assert np.all(np.asarray(one_metrics["samples_per_budget"]) > 0)
  _assert_close(four_metrics, one_metrics, "metrics")
  _assert_close(four.params, one.params, "params")
  _assert_close(four.router_params, one.router_params, "router params")
  np.testing.assert_array_equal(four.rng, one.rng)
  # The step did move the params (so the comparison above compares gradients, not two copies of the input).
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one.params),
                                                             jax.tree.leaves(student))) > 1e-3


def test_lm_step_with_four_micro_batches_equals_one_batch():
  params = random_params(CONFIG, seed=2)
  tx = optax.sgd(0.5)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  one, one_metrics = jax.jit(make_lm_step(CONFIG, tx))(state, TOKENS)
  four, four_metrics = jax.jit(make_lm_step(CONFIG, tx, grad_accum_steps=4))(state, TOKENS)
  _assert_close(four_metrics, one_metrics, "metrics")
  _assert_close(four.params, one.params, "params")
  # The loss is the mean next-token cross-entropy of the whole batch (numpy log-softmax of the same logits).
  logits = np.asarray(HybridLM(CONFIG).apply({"params": params}, TOKENS[:, :-1]), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(TOKENS[:, 1:])[..., None], -1)
  np.testing.assert_allclose(float(four_metrics["loss"]), nll.mean(), rtol=1e-5)


def test_batch_not_divisible_by_micro_batches_is_refused(tmp_path):
  teacher = random_params(CONFIG, seed=0)
  with pytest.raises(ValueError, match=r"stage 'stage1': batch_size=6 is not divisible by grad_accum_steps=4"):
    train_elastic(_setup(4), (Stage("stage1", 1, 6, 8, (1 / 3, 1 / 3, 1 / 3)),), teacher, teacher,
                  lambda stage, index: RandomTokenBatches(0, stage.batch_size, stage.seq_len + 1, 64), tmp_path,
                  progress=False)
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by grad_accum_steps=4"):
    jax.eval_shape(make_lm_step(CONFIG, optax.sgd(0.1), grad_accum_steps=4),
                   TrainState(step=jnp.zeros((), jnp.int32), params=teacher, opt_state=(), rng=jnp.zeros(2)),
                   TOKENS[:6])
  with pytest.raises(ValueError, match=r"memory.grad_accum_steps: 0 must be an integer >= 1"):
    _setup(0)
