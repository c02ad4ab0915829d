"""Budget sampling inside the jitted step: one budget per sample, drawn from the step's PRNG key.

Drawing budgets on the device keeps the step free of host round-trips, and since budgets only change mask *values*,
one compiled program serves every draw (spec D-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sample_budgets(key: Array, batch_size: int, probs: Array, *, stratified: bool = False) -> Array:
  """Budget indices [batch_size] int32 with P(budget = i) = probs[i].

  stratified=False draws each sample independently. stratified=True uses systematic sampling: one uniform offset u,
  points (j + u) / batch_size through the inverse CDF, then a random permutation — every budget gets
  floor(p_i * b) or ceil(p_i * b) samples, which removes the batch-to-batch variance of the per-budget counts.
  """
  probs = jnp.asarray(probs, jnp.float32)
  probs = probs / jnp.sum(probs)
  if not stratified:
    return jax.random.choice(key, probs.shape[0], (batch_size,), p=probs).astype(jnp.int32)
  offset_key, perm_key = jax.random.split(key)
  points = (jnp.arange(batch_size, dtype=jnp.float32) + jax.random.uniform(offset_key)) / batch_size
  cdf = jnp.cumsum(probs)
  budgets = jnp.minimum(jnp.searchsorted(cdf, points, side="right"), probs.shape[0] - 1)
  return jax.random.permutation(perm_key, budgets).astype(jnp.int32)
