"""Memory budgets: deployment memory (weights + KV cache + SSM state) against the real cache arrays, expected
memory against exact children, and the elastic step driven by memory targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.param_count import expected_memory_bytes, memory_bytes, param_count
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.model import init_cache
from elastic_jax.train.optim import OptimizerConfig, make_optimizer
from elastic_jax.train.elastic_step import ElasticSetup, init_elastic_state, make_elastic_step

CONFIG = small_config("M-*M-", dtype="bfloat16")


@pytest.mark.parametrize("context", [1, 64, 1000])
def test_memory_equals_weights_plus_the_real_decode_cache(context):
  cache = init_cache(CONFIG, batch=1, max_len=context)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache)) - cache["position"].nbytes
  assert memory_bytes(CONFIG, context=context) == param_count(CONFIG) * 2 + cache_bytes


def test_expected_memory_of_a_one_hot_choice_is_the_child_memory():
  space = ElasticSpace.from_dict(dict(hidden=[16, 32], mlp=[24, 48], mamba_heads=[2, 4], mamba_head_dim=[4, 8],
                                      depth=[4, 5]), CONFIG)
  order = (0, 2, 1, 3, 4)
  rng = np.random.default_rng(0)
  for _ in range(10):
    picks = {axis: int(rng.integers(len(space.candidates(axis)))) for axis in
             ("hidden", "mlp", "mamba_heads", "mamba_head_dim", "depth")}
    sizes = {axis: space.candidates(axis)[i] for axis, i in picks.items()}
    choice = Choice.homogeneous(CONFIG, **sizes)
    probs = {axis: np.eye(len(space.candidates(axis)))[[i]] for axis, i in picks.items()}
    expected = float(expected_memory_bytes(CONFIG, space, probs, order, context=300)[0])
    assert expected == memory_bytes(child_config(CONFIG, choice, order), context=300)


def test_elastic_step_with_memory_targets_runs_and_reports_memory_fractions():
  space = ElasticSpace.from_dict(dict(hidden=[16, 32], mlp=[24, 48], mamba_heads=[2, 4], depth=[4, 5]), CONFIG)
  setup = ElasticSetup(CONFIG, space, (1.0, 0.6), (0, 2, 1, 3, 4), RouterSchedule(total_steps=10),
                       router_width=8, budget_metric="memory", memory_context=256)
  assert setup.parent_size == memory_bytes(CONFIG, context=256)
  tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1), 10)
  teacher = random_params(CONFIG)
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, tx, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (4, 9), 0, CONFIG.vocab_size)
  _, metrics = jax.jit(make_elastic_step(setup, tx, tx))(state, teacher, tokens, jnp.asarray([0.5, 0.5]))
  sizes = np.asarray(metrics["expected_size_per_budget"])
  assert np.isfinite(float(metrics["loss"])) and ((sizes >= 0) & (sizes <= 1.0 + 1e-6)).all()
  with pytest.raises(ValueError, match=r"budget_metric='flops' is not one of"):
    ElasticSetup(CONFIG, space, (1.0,), (0, 1, 2, 3, 4), RouterSchedule(total_steps=1), budget_metric="flops")
