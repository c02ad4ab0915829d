"""Router: schedules, straight-through Gumbel-softmax, budget loss, anchor term."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.elastic.router import (Router, RouterAxis, RouterSchedule, budget_loss, deterministic_choice,
                                        full_choice_anchor, gumbel_softmax, route, router_param_fraction)

AXES = (RouterAxis("hidden", 3), RouterAxis("mlp", 4, num_layers=2), RouterAxis("depth", 2))


def test_schedules_hit_their_endpoints():
  s = RouterSchedule(total_steps=100)
  np.testing.assert_allclose([s.tau(0), s.tau(50), s.tau(100), s.tau(1000)],
                             [1.0, math.sqrt(0.05), 0.05, 0.05], rtol=1e-5)
  np.testing.assert_allclose([s.scale(0), s.scale(50), s.scale(100)], [1.0, 5.5, 10.0], rtol=1e-6)
  lin = RouterSchedule(total_steps=10, tau_decay="linear")
  np.testing.assert_allclose(lin.tau(5), 0.525, rtol=1e-6)
  with pytest.raises(ValueError, match="tau_decay='cosine' is not one of"):
    RouterSchedule(total_steps=10, tau_decay="cosine")


def test_router_shapes_and_separate_tree():
  router = Router(AXES, num_budgets=3, width=16)
  params = router.init(jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]
  assert set(params) == {"hidden", "mlp", "depth"}
  logits = router.apply({"params": params}, jnp.array([0, 2]))
  assert logits["hidden"].shape == (2, 1, 3) and logits["mlp"].shape == (2, 2, 4) and logits["depth"].shape == (2, 1, 2)
  assert router_param_fraction(params, 10_000_000) < 0.02


def test_gumbel_max_sampling_follows_softmax_of_scaled_logits():
  """Independent reference: the argmax of Gumbel-perturbed logits is distributed as softmax(scale * logits)."""
  logits = jnp.array([[[0.5, -0.3, 1.2, 0.0]]])
  counts = np.zeros(4)
  keys = jax.random.split(jax.random.key(0), 4000)
  idx = jax.vmap(lambda k: gumbel_softmax(k, logits, 1.0, 2.0).index[0, 0])(keys)
  counts = np.bincount(np.asarray(idx), minlength=4) / 4000
  np.testing.assert_allclose(counts, jax.nn.softmax(2.0 * logits[0, 0]), atol=0.03)


def test_straight_through_is_exactly_binary_forward_with_router_gradients():
  router = Router(AXES, num_budgets=3, width=16)
  params = router.init(jax.random.key(1), jnp.zeros((4,), jnp.int32))["params"]
  budgets = jnp.array([0, 1, 2, 1])
  sizes = jnp.array([2.0, 5.0, 8.0, 10.0])  # mlp candidate widths

  def masked_sum(p):
    sample = route(jax.random.key(2), router.apply({"params": p}, budgets), 0.5, 3.0)["mlp"]
    width = sizes[sample.index]  # [b, L]
    mask = (jnp.arange(10) < width[..., None]) * sample.st_weight[..., None]  # [b, L, 10]
    return jnp.sum(mask * jnp.arange(10.0)), mask

  (value, mask), grads = jax.value_and_grad(masked_sum, has_aux=True)(params)
  assert set(np.unique(np.asarray(mask)).tolist()) <= {0.0, 1.0}  # exactly binary in the forward pass
  assert float(jnp.abs(grads["mlp"]["logits"]["kernel"]).sum()) > 0  # the router learns through st_weight
  assert float(jnp.abs(grads["hidden"]["logits"]["kernel"]).sum()) == 0  # axes not used get no gradient


def test_budget_loss_dead_zone_and_direction():
  target = jnp.array(100.0)
  np.testing.assert_allclose(budget_loss(jnp.array([99.0, 101.5]), target), 0.0)
  np.testing.assert_allclose(budget_loss(jnp.array(110.0), target), 0.08, rtol=1e-5)
  assert float(jax.grad(lambda p: budget_loss(p, target))(120.0)) > 0  # too big: the gradient shrinks P
  assert float(jax.grad(lambda p: budget_loss(p, target))(80.0)) < 0  # too small: it grows P


def test_full_choice_anchor_prefers_the_full_choice():
  probs_far = {"mlp": jnp.array([[[0.7, 0.2, 0.1]]])}
  probs_near = {"mlp": jnp.array([[[0.1, 0.2, 0.7]]])}
  far = full_choice_anchor(probs_far, {"mlp": 2})
  near = full_choice_anchor(probs_near, {"mlp": 2})
  np.testing.assert_allclose(far, -np.log(0.1 + 1e-9), rtol=1e-6)
  assert float(near[0]) < float(far[0])


def test_deterministic_choice_is_argmax():
  logits = {"hidden": jnp.array([[[0.1, 2.0, -1.0]], [[3.0, 0.0, 0.0]]])}
  np.testing.assert_array_equal(deterministic_choice(logits)["hidden"], [[1], [0]])


def _nested_masks(weights: jax.Array, sizes: jax.Array, width: int) -> jax.Array:
  """Σ_c weight_c · prefix_mask(size_c): the mixture masks_from_weights builds, on one toy axis."""
  prefix = (jnp.arange(width)[None, :] < sizes[:, None]).astype(jnp.float32)  # [C, width]
  return weights @ prefix


def test_softmax_estimator_is_binary_forward_and_ignores_a_uniform_gain():
  """Independent reference: the gradient of the loss w.r.t. each candidate's prefix mask, by hand.

  The loss rewards the channels every candidate keeps (0..3, standing for a uniform gain) and channels 6..9 (real
  extra capacity). 'softmax' must give the relaxed sample's Jacobian times <dL/dmask, prefix_c>, in which the shared
  part cancels; 'chosen' only sees d loss / d(scale of the chosen mask), which here is the shared part alone.
  """
  from elastic_jax.elastic.router import AxisSample, candidate_weights  # pylint: disable=import-outside-toplevel
  from elastic_jax.elastic.space import ElasticSpace  # pylint: disable=import-outside-toplevel
  from conftest import small_config  # pylint: disable=import-outside-toplevel
  config = small_config("-")
  space = ElasticSpace.from_fractions(config, (1.0,))  # homogeneous layout: weights are [b, C]
  sizes = jnp.array([4.0, 6.0, 10.0])
  logits = jnp.array([[[0.3, 0.1, -0.2]]])
  gumbel = jnp.array([[[0.9, 0.0, 0.0]]])  # fixed noise: candidate 0 (the smallest) is sampled
  channel_value = jnp.concatenate([jnp.zeros(6), jnp.ones(4)])  # only channels 6..9 lower the loss

  def loss(logits, estimator):
    probs = jax.nn.softmax((logits + gumbel) / 0.5, axis=-1)
    index = jnp.argmax(probs, axis=-1)
    chosen = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
    sample = AxisSample(probs, index, chosen / jax.lax.stop_gradient(chosen))
    weights = candidate_weights({"mlp": sample}, space, estimator=estimator)["mlp"]  # [1, C]
    mask = _nested_masks(weights, sizes, 10)
    # Channels 0..3 (kept by every candidate) stand for the gain term; channels 6..9 for real extra capacity.
    return -jnp.sum(mask * channel_value) - 0.5 * jnp.sum(mask[..., :4]), mask

  for estimator in ("softmax", "chosen"):
    (_, mask), _ = jax.value_and_grad(loss, has_aux=True)(logits, estimator)
    np.testing.assert_array_equal(mask, (jnp.arange(10) < 4)[None].astype(jnp.float32))  # exactly binary

  grad = jax.grad(lambda l: loss(l, "softmax")[0])(logits)
  # By hand: dL/dmask = -channel_value - 0.5·[c < 4]; <., prefix_c> = (-2, -2, -6) for sizes (4, 6, 10).
  per_candidate = jnp.array([-2.0, -2.0, -6.0])
  probs = jax.nn.softmax((logits + gumbel) / 0.5, axis=-1)[0, 0]
  jacobian = (jnp.diag(probs) - jnp.outer(probs, probs)) / 0.5
  np.testing.assert_allclose(grad[0, 0], jacobian @ per_candidate, rtol=1e-5)
  assert float(grad[0, 0, 2]) < 0  # descent raises the logit of the candidate that keeps channels 6..9
  # Adding the same amount to every candidate (a uniform gain on the shared prefix) does not change the gradient.
  np.testing.assert_allclose(jacobian @ (per_candidate + 7.0), jacobian @ per_candidate, atol=1e-5)

  grad_chosen = jax.grad(lambda l: loss(l, "chosen")[0])(logits)
  # 'chosen' sees only <dL/dmask, prefix_0> = -2 through p_0: it reinforces the sampled smallest candidate.
  expected = (jnp.eye(3)[0] - probs) * -2.0 / 0.5
  np.testing.assert_allclose(grad_chosen[0, 0], expected, rtol=1e-5)
  with pytest.raises(ValueError, match="estimator='other' is not one of"):
    candidate_weights({"mlp": AxisSample(probs[None, None], jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))},
                      space, estimator="other")
