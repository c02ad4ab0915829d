"""Building blocks shared by the mixers: parameter declaration with logical axes, norms, causal conv.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``, ``ssm_heads``, ``vocab``...)
that one rules table maps onto mesh axes; the modules never name mesh axes themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from elastic_jax.ops import context_parallel

Array = jax.Array


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence[str],
          dtype) -> Array:
  """Declares a parameter with logical axis names (unboxed on read; plain arrays work in ``apply``)."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def record_importance(module: nn.Module, name: str, activation: Array) -> None:
  """Sows mean_t |activation| per sample ([b, l, *c] -> [b, *c]) into the "importance" collection.

  Only computed when that collection is mutable (calibration passes); otherwise the value is dead code under jit.
  """
  if module.is_mutable_collection("importance"):
    record_statistic(module, name, jnp.mean(jnp.abs(activation.astype(jnp.float32)), axis=1))


def record_statistic(module: nn.Module, name: str, per_sample: Array) -> None:
  """Sows an importance statistic already reduced to one value per sample ([b, *c]), when calibrating."""
  if module.is_mutable_collection("importance"):
    module.sow("importance", name, per_sample)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation; a no-op unless axis rules are active."""
  return nn.with_logical_constraint(x, tuple(axes))


def _masked_mean_square(x: Array, mask: Array | None) -> Array:
  """Mean of x² over the last axis, counting only active channels when a mask is given.

  Nested masks zero the inactive channels; averaging over the *active* count (not the full width) is what makes the
  masked parent compute exactly what the sliced child computes (spec decision D-2).
  """
  if mask is None:
    return jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  mask = jnp.broadcast_to(mask.astype(jnp.float32), x.shape)
  count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1e-6)
  return jnp.sum(jnp.square(x) * mask, axis=-1, keepdims=True) / count


def rms_norm(x: Array, scale: Array, eps: float, mask: Array | None = None) -> Array:
  """RMSNorm over the last axis, in fp32 (the weight multiply too); returns fp32.

  mask: optional channel mask broadcastable to x (1 active, 0 pruned; fractional for soft masks). Statistics use
  the active channels only and the output is zero in inactive ones.
  """
  x = x.astype(jnp.float32)
  out = x * jax.lax.rsqrt(_masked_mean_square(x, mask) + eps) * scale.astype(jnp.float32)
  return out if mask is None else out * mask


def gated_group_rms_norm(y: Array, gate: Array, scale: Array, n_groups: int, eps: float,
                         mask: Array | None = None) -> Array:
  """Mamba-2's output norm: ``y * silu(gate)``, then RMSNorm within each of ``n_groups`` head groups.

  y, gate: [..., H, P]; scale: [H, P]; mask: optional, broadcastable to [..., H, P] (head x channel mask).
  Heads are group-major (group g owns heads g*H/G ... (g+1)*H/G - 1), so a group is a contiguous block of H/G heads.
  Normalising per group, not over all of d_inner, is what the reference does (a single global RMS is the classic
  bug); with a mask, each group averages over its active (head, channel) pairs. Returns fp32.
  """
  h, p = y.shape[-2:]
  gated = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
  group_shape = (*gated.shape[:-2], n_groups, (h // n_groups) * p)
  grouped = gated.reshape(group_shape)
  group_mask = None if mask is None else jnp.broadcast_to(mask, gated.shape).reshape(group_shape)
  normed = (grouped * jax.lax.rsqrt(_masked_mean_square(grouped, group_mask) + eps)).reshape(gated.shape)
  out = normed * scale.astype(jnp.float32)
  return out if mask is None else out * mask


def causal_depthwise_conv(x: Array, kernel: Array, bias: Array, history: Array | None = None
                          ) -> tuple[Array, Array]:
  """Causal depthwise conv along axis 1 with a left window of ``K - 1`` past inputs.

  x: [b, l, *c]; kernel: [K, *c]; bias: [*c]; history: [b, K-1, *c] inputs preceding x (zeros at sequence start).
  Output tap k multiplies x[t - (K-1) + k]. Returns (conv(x) + bias, the last K-1 inputs, the next call's history).
  K is small (4), so K shifted multiply-adds beat a general convolution on every backend.
  """
  k = kernel.shape[0]
  if history is None:
    history = jnp.zeros((x.shape[0], k - 1, *x.shape[2:]), x.dtype)
  padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [b, K-1+l, *c]
  length = x.shape[1]
  out = bias.astype(x.dtype)
  for tap in range(k):
    out = out + padded[:, tap:tap + length] * kernel[tap].astype(x.dtype)
  return out, padded[:, length:]


def dtype_of(name: str):
  return jnp.dtype(name)


class Projection(nn.Module):
  """A bias-free linear map contracting the last ``len(in_axes)`` axes of x into ``out_shape``.

  The kernel is [*in_shape, *out_shape] with logical names ``in_axes + out_axes``; keeping head axes explicit
  (e.g. [d, H, P]) is what lets masks, permutations and shardings address heads directly.
  """

  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  stddev: float
  dtype: str = "float32"
  param_dtype: str = "float32"
  out_dtype: str | None = None  # default: dtype. Accumulation is fp32 either way.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_axes)
    shape = (*x.shape[x.ndim - n_in:], *self.out_shape)
    kernel = param(self, "kernel", nn.initializers.normal(self.stddev), shape, self.in_axes + self.out_axes,
                   dtype_of(self.param_dtype))
    compute = dtype_of(self.dtype)
    y = jnp.tensordot(x.astype(compute), kernel.astype(compute), axes=n_in, preferred_element_type=jnp.float32)
    return y.astype(dtype_of(self.out_dtype or self.dtype))


class Embedding(nn.Module):
  """Token embedding table [V, d] (untied from the LM head)."""

  vocab_size: int
  features: int
  stddev: float
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    table = param(self, "embedding", nn.initializers.normal(self.stddev), (self.vocab_size, self.features),
                  ("vocab", "embed"), dtype_of(self.param_dtype))
    # Gathered whole along ``embed`` for the lookup, as FSDP gathers any weight it computes with: the rows come out
    # split over the batch axes like the tokens, where a table split over the same devices as the batch would leave
    # the compiler no better plan than rematerialising the whole activation.
    table = constrain(table, ("vocab", None))
    return jnp.take(table, tokens, axis=0).astype(dtype_of(self.dtype))


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; computes in fp32 and returns ``dtype``."""

  eps: float
  axis_name: str = "embed"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                  dtype_of(self.param_dtype))
    return rms_norm(x, scale, self.eps, mask).astype(dtype_of(self.dtype))


class CausalConv(nn.Module):
  """Depthwise causal conv along the sequence with bias; channels may be multi-axis (e.g. [H, P])."""

  kernel_size: int
  axes: tuple[str, ...]
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, history: Array | None = None,
               context: context_parallel.ContextParallelism | None = None) -> tuple[Array, Array]:
    """x [b, l, *c] -> (conv(x) + bias, the last K-1 inputs).

    context: the sequence is split over the mesh's context axis (no ``history``): each shard reads the K-1 inputs
    before it from its left neighbour (``context_parallel.causal_conv``).
    """
    channels = x.shape[2:]
    bound = self.kernel_size ** -0.5  # torch Conv1d's default range for a depthwise kernel (fan-in K)
    init = nn.initializers.uniform(2 * bound)
    shifted = lambda key, shape, dtype: init(key, shape, dtype) - jnp.asarray(bound, dtype)
    pdt = dtype_of(self.param_dtype)
    kernel = param(self, "kernel", shifted, (self.kernel_size, *channels), ("conv", *self.axes), pdt)
    bias = param(self, "bias", shifted, channels, self.axes, pdt)
    x = x.astype(dtype_of(self.dtype))
    if context is None:
      return causal_depthwise_conv(x, kernel, bias, history)
    if history is not None:
      raise ValueError("CausalConv: a decode history and a context-parallel split are exclusive; a cached call "
                       "continues one sequence on every device, so pass context=None with a history.")
    return (context_parallel.causal_conv(x, kernel, bias, causal_depthwise_conv, context),
            x[:, x.shape[1] - (self.kernel_size - 1):])
