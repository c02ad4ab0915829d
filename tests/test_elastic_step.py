"""The elastic train step: one compile for all budgets, KD sanity, router learning, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params, small_config

from elastic_jax.elastic.param_count import choice_param_count
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.train.optim import OptimizerConfig, make_optimizer
from elastic_jax.elastic.deploy import choice_from_indices, deployed_choices, pinned_indices, router_argmax_choices
from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.space import Choice
from elastic_jax.model import HybridLM
from elastic_jax.train.elastic_step import (ElasticSetup, Pins, check_budget_probs, init_elastic_state,
                                            make_elastic_step)

CONFIG = small_config("M-*M-", hidden_size=32, intermediate_size=64, mamba_num_heads=4, n_groups=2)


def _space(**modes):
  return ElasticSpace.from_dict(dict(hidden=[16, 20, 24, 28, 32], mlp=[16, 24, 32, 40, 48, 56, 64],
                                     attention_heads=[2, 4], mamba_heads=[2, 4], mamba_head_dim=[4, 5, 6, 7, 8],
                                     depth=[4, 5], **modes), CONFIG)


def _setup(space=None, budgets=(1.0, 0.75, 0.5), total_steps=300, **kw):
  return ElasticSetup(CONFIG, space or _space(), budgets, depth_order=(0, 3, 1, 2, 4),
                      schedule=RouterSchedule(total_steps=total_steps), router_width=32, **kw)


def _optimizers(model_lr=1e-3, router_lr=5e-2, steps=300):
  tx = make_optimizer(OptimizerConfig(learning_rate=model_lr, warmup_steps=5), steps)
  router_tx = make_optimizer(OptimizerConfig(learning_rate=router_lr, warmup_steps=5, schedule="constant",
                                             weight_decay=0.0), steps)
  return tx, router_tx


def _tokens(seed, batch=8, length=17):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, CONFIG.vocab_size)


def test_one_compile_serves_every_budget_draw():
  setup = _setup()
  tx, router_tx = _optimizers()
  teacher = random_params(CONFIG, seed=0)
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, router_tx, seed=0)
  step = jax.jit(make_elastic_step(setup, tx, router_tx), donate_argnums=(0,))
  seen = set()
  for i in range(12):
    probs = [1 / 3] * 3 if i < 6 else [0.5, 0.3, 0.2]  # a stage change with the same shapes
    state, metrics = step(state, teacher, _tokens(i), jnp.asarray(probs))
    seen.add(tuple(np.asarray(metrics["samples_per_budget"]).astype(int)))
    assert np.isfinite(float(metrics["loss"]))
  assert len(seen) > 1  # the sampled budgets did change
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_kd_is_zero_and_gradients_vanish_when_student_is_teacher_at_full_size():
  full = ElasticSpace.from_dict({}, CONFIG)  # every axis at the parent's size only
  setup = _setup(space=full, budgets=(1.0,))
  tx, router_tx = _optimizers()
  params = random_params(CONFIG, seed=1)
  state = init_elastic_state(setup, params, tx, router_tx, seed=1)
  _, metrics = jax.jit(make_elastic_step(setup, tx, router_tx))(state, params, _tokens(1), jnp.ones(1))
  assert float(metrics["kd"]) <= 1e-6
  assert float(metrics["grad_norm"]) <= 1e-6
  assert float(metrics["router_loss"]) == 0.0


def test_router_learns_every_budget_within_three_percent():
  """A few hundred steps: each budget's deployed (argmax) choice lands within 3% of its parameter target.

  The same holds for seeds 2-8 with these settings (a tighter 1% dead zone than the 2% default, since the
  deployed argmax can sit a little outside the band the expected count was trained into).
  """
  setup = _setup(total_steps=300, dead_zone=0.01, stratified=True)
  tx, router_tx = _optimizers(model_lr=3e-4, router_lr=1e-2)
  teacher = random_params(CONFIG, seed=2)
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, router_tx, seed=2)
  step = jax.jit(make_elastic_step(setup, tx, router_tx), donate_argnums=(0,))
  probs = jnp.asarray([1 / 3] * 3)
  for i in range(300):
    state, metrics = step(state, teacher, _tokens(100 + i, batch=12, length=9), probs)
  choices = deployed_choices(setup, state.router_params)
  parent = setup.parent_params
  for budget, choice in zip(setup.budgets, choices):
    achieved = choice_param_count(CONFIG, choice, setup.depth_order) / parent
    assert abs(achieved / budget - 1) <= 0.03, (budget, achieved, choice)
  assert choices[0] == _full_choice(setup)  # the 100% budget deploys the parent


def _full_choice(setup):
  from elastic_jax.elastic.space import Choice  # pylint: disable=import-outside-toplevel
  return Choice.full(setup.config)


@pytest.mark.parametrize("budgets, message", [
    ((1.0, 1.5), r"budget 1.5 is outside \(0, 1\]"),
    ((0.0,), r"budget 0.0 is outside \(0, 1\]"),
    ((), "budgets is empty"),
])
def test_bad_budgets(budgets, message):
  with pytest.raises(ValueError, match=message):
    _setup(budgets=budgets)


def test_budget_probabilities_must_sum_to_one():
  with pytest.raises(ValueError, match=r"stage2.budget_probs \[0.5, 0.3, 0.3\] must be non-negative and sum to 1"):
    check_budget_probs([0.5, 0.3, 0.3], 3, "stage2.budget_probs")
  with pytest.raises(ValueError, match="has 2 entries but there are 3 budgets"):
    check_budget_probs([0.5, 0.5], 3)


def test_argmax_size_metric_is_the_argmax_childs_count_and_its_loss_reaches_the_router():
  """Reference: ``choice_param_count`` of the router's noise-free argmax choice."""
  setup = _setup(argmax_loss_weight=1.0)
  tx, router_tx = _optimizers()
  teacher = random_params(CONFIG, seed=0)
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, router_tx, seed=0)
  step = jax.jit(make_elastic_step(setup, tx, router_tx))
  for i in range(3):
    before = state.router_params
    state, metrics = step(state, teacher, _tokens(i), jnp.asarray([1 / 3] * 3))
  expected = [choice_param_count(CONFIG, c, setup.depth_order) / setup.parent_params
              for c in router_argmax_choices(setup, before)]  # the metric is computed before the step's update
  np.testing.assert_allclose(np.asarray(metrics["argmax_size_per_budget"]), expected, rtol=1e-5)

  # The argmax term alone moves the router: with KD and the sampled term switched off its gradient is non-zero
  # exactly when some deployed choice is outside the dead zone.
  from elastic_jax.elastic import router as router_lib  # pylint: disable=import-outside-toplevel
  logits = setup.router.apply({"params": state.router_params}, jnp.arange(3))

  def argmax_loss(router_params):
    weights = router_lib.argmax_weights(setup.router.apply({"params": router_params}, jnp.arange(3)), 2.0,
                                          setup.space)
    size = setup.expected_size(weights, np.asarray(setup.depth_order))
    return jnp.sum(router_lib.budget_loss(size, jnp.asarray(setup.target_sizes(), jnp.float32), 0.02)), size

  (loss, size), grads = jax.value_and_grad(argmax_loss, has_aux=True)(state.router_params)
  argmax = {name: jnp.argmax(l, axis=-1) for name, l in logits.items()}
  one_hot = router_lib.layout_for_space(
      {name: jax.nn.one_hot(i, logits[name].shape[-1]) for name, i in argmax.items()}, setup.space)
  np.testing.assert_allclose(size, setup.expected_size(one_hot, np.asarray(setup.depth_order)), rtol=1e-6)
  norm = float(optax.tree.norm(grads))
  assert (float(loss) > 0) == (norm > 0)


def test_deployed_choice_is_the_most_probable_within_the_dead_zone_when_the_argmax_misses():
  """Reference: brute force over every joint choice of the space (sum of logits, exact parameter count)."""
  import itertools  # pylint: disable=import-outside-toplevel
  setup = _setup()
  router_params = setup.router.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
  keys = iter(jax.random.split(jax.random.key(1), 64))
  router_params = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), router_params)  # spread logits
  logits = {n: np.asarray(l) for n, l in setup.router.apply({"params": router_params}, jnp.arange(3)).items()}
  names = sorted(logits)
  deployed, argmax = deployed_choices(setup, router_params), router_argmax_choices(setup, router_params)
  adjusted = 0
  for b, target in enumerate(setup.target_sizes()):
    best = None
    for picks in itertools.product(*(range(logits[n].shape[-1]) for n in names)):
      indices = {n: np.asarray([i]) for n, i in zip(names, picks)}
      score = sum(logits[n][b, 0, i] for n, i in zip(names, picks))
      choice = choice_from_indices(setup.config, setup.space, indices)
      fraction = choice_param_count(CONFIG, choice, setup.depth_order) / target
      if abs(fraction - 1) <= setup.dead_zone and (best is None or score > best[0]):
        best = (score, choice)
    argmax_fraction = choice_param_count(CONFIG, argmax[b], setup.depth_order) / target
    if abs(argmax_fraction - 1) <= setup.dead_zone:
      assert deployed[b] == argmax[b]
    else:
      adjusted += 1
      assert deployed[b] == best[1]
  assert adjusted  # the random router misses at least one target, so the search is exercised


def _hand_router_logits(router_params, weights: np.ndarray) -> dict[str, np.ndarray]:
  """The router's logits for budget input ``weights`` [n_budgets], computed in numpy from its params: Dense ->
  LeakyReLU (slope 0.01) -> Dense -> tanh, per axis, [1, num_choices] (homogeneous axes)."""
  out = {}
  for name, axis in router_params.items():
    h = weights @ np.asarray(axis["hidden"]["kernel"], np.float64) + np.asarray(axis["hidden"]["bias"])
    h = np.where(h >= 0, h, 0.01 * h)
    out[name] = np.tanh(h @ np.asarray(axis["logits"]["kernel"], np.float64) + np.asarray(axis["logits"]["bias"]))
  return out


def test_a_budget_between_trained_ones_deploys_the_interpolated_routers_best_choice_within_the_dead_zone():
  """Reference: the router evaluated by hand on the linear interpolation of the neighbouring budgets' one-hots, and
  a brute force over every joint choice (sum of logits, exact parameter count) for the 60% target."""
  import itertools  # pylint: disable=import-outside-toplevel
  from elastic_jax.elastic.deploy import interpolated_choice  # pylint: disable=import-outside-toplevel
  setup = _setup(dead_zone=0.03)
  router_params = setup.router.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
  keys = iter(jax.random.split(jax.random.key(2), 64))
  router_params = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), router_params)
  # A trained budget deploys exactly its deployed choice (its one-hot is the router's training input).
  for b, budget in enumerate(setup.budgets):
    assert interpolated_choice(setup, router_params, budget) == deployed_choices(setup, router_params)[b]
  budget = 0.6  # between 0.75 and 0.5: weight (0.6 - 0.5) / 0.25 = 0.4 on 0.75, 0.6 on 0.5
  logits = _hand_router_logits(router_params, np.asarray([0.0, 0.4, 0.6]))
  names = sorted(logits)
  target = budget * setup.parent_params
  best = None
  for picks in itertools.product(*(range(logits[n].shape[-1]) for n in names)):
    choice = choice_from_indices(setup.config, setup.space, {n: np.asarray([i]) for n, i in zip(names, picks)})
    score = sum(logits[n][i] for n, i in zip(names, picks))
    if abs(choice_param_count(CONFIG, choice, setup.depth_order) / target - 1) <= setup.dead_zone and (
        best is None or score > best[0]):
      best = (score, choice)
  assert best is not None
  chosen = interpolated_choice(setup, router_params, budget)
  assert chosen == best[1]
  assert abs(choice_param_count(CONFIG, chosen, setup.depth_order) / target - 1) <= setup.dead_zone
  with pytest.raises(ValueError, match=r"outside the trained range \[0.5, 1\]"):
    interpolated_choice(setup, router_params, 0.4)


def test_a_parent_above_two_billion_parameters_traces():
  # Sizes enter the step as Python numbers; one above 2**31 (a 12B parent) must not be parsed as an int32 argument.
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.loop import abstract_boxed_state  # pylint: disable=import-outside-toplevel
  config = small_config("M-*", vocab_size=2 ** 20, hidden_size=1536)  # embedding + LM head: 3.2e9 parameters
  setup = ElasticSetup(config, ElasticSpace.from_fractions(config, (0.5, 1.0)), (1.0, 0.5), depth_order=(0, 2, 1),
                       schedule=RouterSchedule(total_steps=10), router_width=8)
  assert setup.parent_params > 2 ** 31
  tx, router_tx = _optimizers()
  state = nn.meta.unbox(abstract_boxed_state(setup, tx, router_tx))
  tokens = jax.ShapeDtypeStruct((2, 9), jnp.int32)
  probs = jax.ShapeDtypeStruct((2,), jnp.float32)
  _, metrics = jax.eval_shape(make_elastic_step(setup, tx, router_tx), state, state.params, tokens, probs)
  assert metrics["expected_size_per_budget"].shape == (2,)


def _numpy_kl(student_logits, teacher_logits):
  """Mean over tokens of KL(teacher || student), per sample, in float64."""
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  t, s = log_softmax(teacher_logits), log_softmax(student_logits)
  return (np.exp(t) * (t - s)).sum(-1).mean(-1)


def test_a_pinned_step_trains_each_budgets_pinned_choice_and_leaves_the_router_unchanged():
  setup = _setup()
  tx, router_tx = _optimizers()
  teacher = random_params(CONFIG, seed=0)
  student = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape, x.dtype), teacher)
  state = init_elastic_state(setup, student, tx, router_tx, seed=0)
  # Two choices the router is unlikely to sample at initialisation: the smallest and a mixed one.
  space = setup.space
  choices = [Choice.full(CONFIG),
             choice_from_indices(CONFIG, space, {"hidden": [2], "mlp": [3], "attention_heads": [0],
                                                 "mamba_heads": [1], "mamba_head_dim": [1], "depth": [1]}),
             choice_from_indices(CONFIG, space, {"hidden": [0], "mlp": [0], "attention_heads": [0],
                                                 "mamba_heads": [0], "mamba_head_dim": [0], "depth": [0]})]
  pins = Pins({k: jnp.asarray(v) for k, v in pinned_indices(setup, choices).items()}, jnp.asarray(True))
  step = jax.jit(make_elastic_step(setup, tx, router_tx))
  tokens = _tokens(3)
  inputs = np.asarray(tokens[:, :-1])
  teacher_logits = HybridLM(CONFIG).apply({"params": teacher}, inputs)
  for budget, choice in enumerate(choices):
    probs = jnp.asarray(np.eye(3)[budget], jnp.float32)  # every sample draws this budget
    new_state, metrics = step(state, teacher, tokens, probs, pins)
    # The step's KD is the extracted child's, computed by slicing, not masking.
    child_config, child_params = extract(CONFIG, jax.tree.map(np.asarray, student), choice, setup.depth_order)
    reference = _numpy_kl(HybridLM(child_config).apply({"params": child_params}, inputs), teacher_logits)
    np.testing.assert_allclose(float(metrics["kd_per_budget"][budget]), reference.mean(), rtol=1e-4, atol=1e-6)
    expected = choice_param_count(CONFIG, choice, setup.depth_order) / setup.parent_params
    np.testing.assert_allclose(float(metrics["expected_size_per_budget"][budget]), expected, rtol=1e-5)
    assert int(metrics["pinned"]) == 1
    for new, old in zip(jax.tree.leaves((new_state.router_params, new_state.router_opt_state)),
                        jax.tree.leaves((state.router_params, state.router_opt_state))):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    assert float(metrics["grad_norm"]) > 0  # the pinned sub-network does learn


def test_inactive_pins_change_nothing():
  setup = _setup()
  tx, router_tx = _optimizers()
  teacher = random_params(CONFIG, seed=0)
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, router_tx, seed=0)
  step = jax.jit(make_elastic_step(setup, tx, router_tx))
  probs = jnp.asarray([1 / 3] * 3)
  plain_state, plain_metrics = step(state, teacher, _tokens(4), probs)
  off_state, off_metrics = step(state, teacher, _tokens(4), probs, Pins.off(setup))
  assert int(off_metrics["pinned"]) == 0
  for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(off_state)):
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                             else a), np.asarray(jax.random.key_data(b)
                                             if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b))
  np.testing.assert_array_equal(np.asarray(plain_metrics["kd_per_budget"]), np.asarray(off_metrics["kd_per_budget"]))
