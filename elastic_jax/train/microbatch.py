"""Gradient accumulation: one optimizer step over a global batch run as ``k`` micro-batches.

The global batch is split into k micro-batches run one after the other under ``lax.scan`` (micro-batch i takes rows
i, i+k, i+2k, ..., so every micro-batch keeps the batch's spread over the data-parallel devices), their gradients
are summed, and one optimizer update follows. A step function makes every random draw for the whole global batch
before the split and gives each micro-batch's loss as its share of the global mean, so k micro-batches compute the
same step as one batch of the global size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def check_grad_accum_steps(grad_accum_steps: Any, name: str = "grad_accum_steps") -> None:
  if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"{name}={grad_accum_steps!r} must be a positive integer (1 = no accumulation).")


def check_grad_accum(batch_size: int, grad_accum_steps: int, where: str) -> int:
  """The micro-batch size of ``batch_size`` rows split into ``grad_accum_steps`` micro-batches; ``where`` names the
  stage (or step) in the error when it does not divide."""
  check_grad_accum_steps(grad_accum_steps)
  if batch_size % grad_accum_steps:
    raise ValueError(f"{where}: batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum_steps}; "
                     "make the batch size a multiple of the number of micro-batches.")
  return batch_size // grad_accum_steps


def micro_batches(x: Array, k: int) -> Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch i holds rows i, i+k, i+2k, ... (strided, so that each micro-batch
  draws rows from every data-parallel shard of the batch rather than from a few devices)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def micro_rows(x: Array, index: Array, k: int) -> Array:
  """Rows of micro-batch ``index`` of a global-batch array [B, ...] -> [B/k, ...] (same split as ``micro_batches``)."""
  return jax.lax.dynamic_index_in_dim(x.reshape(x.shape[0] // k, k, *x.shape[1:]), index, axis=1, keepdims=False)


def merge_micro_batches(x: Array) -> Array:
  """Inverse of ``micro_batches``: [k, B/k, ...] -> [B, ...] in the global batch's row order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulate_gradients(value_and_grad_fn: Callable, xs: Any, grads_like: Any) -> tuple[Array, Any, Any]:
  """Sums ``value_and_grad_fn(x) -> ((loss, aux), grads)`` over micro-batches ``xs`` (leading axis k) with
  ``lax.scan``; returns (summed loss, summed grads, aux stacked [k, ...]).

  Sums are kept in at least fp32 whatever the params' dtype, and only one micro-batch's activations are alive at a
  time, which is the point of accumulating.
  """
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), grads_like)

  def body(carry, x):
    loss_sum, grad_sum = carry
    (loss, aux), grads = value_and_grad_fn(x)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), aux

  (loss, grads), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
  return loss, grads, aux

