"""Losses, budget sampling and optimizer schedules against hand-computed references."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.train.loop import release_compiled_programs
from elastic_jax.train.losses import cross_entropy, forward_kl, mean_by_group
from elastic_jax.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from elastic_jax.train.sampling import sample_budgets


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 2, 3, 7)) * 2
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  got = forward_kl(jnp.asarray(s), jnp.asarray(t), temperature=temperature, token_mask=jnp.asarray(mask))
  lt, ls = _np_log_softmax(t / temperature), _np_log_softmax(s / temperature)
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  want = (kl * mask).sum(-1) / mask.sum(-1) * temperature ** 2
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_forward_kl_is_zero_for_equal_logits_and_positive_otherwise():
  logits = jax.random.normal(jax.random.key(0), (3, 4, 11)) * 5
  np.testing.assert_allclose(forward_kl(logits, logits), 0.0, atol=1e-6)
  assert (forward_kl(logits + jax.random.normal(jax.random.key(1), logits.shape), logits) > 0).all()


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 9))
  targets = rng.integers(0, 9, size=(2, 5))
  got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  want = -np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0].mean(-1)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mean_by_group():
  values = jnp.array([1.0, 2.0, 3.0, 10.0])
  means, counts = mean_by_group(values, jnp.array([0, 2, 0, 2]), 3)
  np.testing.assert_allclose(means, [2.0, 0.0, 6.0])
  np.testing.assert_allclose(counts, [2, 0, 2])


def test_budget_sampling_frequencies_and_determinism():
  probs = jnp.array([0.5, 0.3, 0.2])
  draw = jax.jit(sample_budgets, static_argnames=("batch_size", "stratified"))
  budgets = np.asarray(draw(jax.random.key(0), batch_size=20000, probs=probs))
  freq = np.bincount(budgets, minlength=3) / budgets.size
  np.testing.assert_allclose(freq, probs, atol=0.015)  # ~4 sigma at n = 20000
  np.testing.assert_array_equal(budgets, draw(jax.random.key(0), batch_size=20000, probs=probs))


@pytest.mark.parametrize("batch", [7, 16, 30])
def test_stratified_sampling_gives_floor_or_ceil_counts(batch):
  probs = np.array([0.5, 0.3, 0.2])
  for seed in range(5):
    budgets = np.asarray(sample_budgets(jax.random.key(seed), batch, jnp.asarray(probs), stratified=True))
    counts = np.bincount(budgets, minlength=3)
    assert counts.sum() == batch
    assert ((counts >= np.floor(probs * batch)) & (counts <= np.ceil(probs * batch))).all(), counts


def test_learning_rate_schedule_warmup_then_cosine():
  config = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", final_lr_ratio=0.1)
  lr = learning_rate_schedule(config, total_steps=110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], atol=1e-6)
  frac = 50 / 100
  np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), rtol=1e-5)
  np.testing.assert_allclose(lr(110), 0.1, rtol=1e-5)
  constant = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=4, schedule="constant"), 100)
  np.testing.assert_allclose([constant(2), constant(50)], [1.0, 2.0], rtol=1e-6)


def test_weight_decay_skips_vectors():
  config = OptimizerConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
  tx = make_optimizer(config, 10)
  params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["scale"], 0.0)


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "linear", r"schedule='linear' is not one of"),
    ("learning_rate", 0.0, r"learning_rate=0.0 must be > 0"),
    ("final_lr_ratio", 2.0, r"final_lr_ratio=2.0 must be in \[0, 1\]"),
])
def test_optimizer_config_errors(field, value, message):
  with pytest.raises(ValueError, match=message):
    OptimizerConfig(**{field: value})


@functools.partial(jax.jit, static_argnums=1)
def _scaled(x, factor):
  return jnp.cumsum(x @ x.T, axis=0) * factor


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts the process's memory mappings (Linux)")
def test_released_programs_give_back_their_memory_mappings():
  """A module-level jitted function keeps an executable per static argument, and each holds memory mappings of JIT
  code, counted here in /proc/self/maps: released, they are unmapped (the cause of a crash in long processes)."""
  def mappings():
    with open("/proc/self/maps", encoding="utf-8") as maps:
      return sum(1 for _ in maps)
  release_compiled_programs()
  before = mappings()
  for factor in range(40):
    _scaled(jnp.ones((8, 8)), factor).block_until_ready()
  grown = mappings()
  assert grown - before >= 40  # at least one mapping per kept executable
  release_compiled_programs()
  assert mappings() - before < (grown - before) / 2  # what stays: allocator arenas and the like
  np.testing.assert_allclose(_scaled(jnp.ones((2, 2)), 3), [[6, 6], [12, 12]])  # compiles again when called
