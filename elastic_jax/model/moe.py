"""Nemotron 3's mixture-of-experts block (pattern character ``E``), as transformers 5.23's ``NemotronHMoE`` computes it.

For the T tokens x [T, d] of a batch (E routed experts, k = num_experts_per_tok):

    scores  = sigmoid(x W_gate)                       [T, E], fp32
    choice  = scores + e_score_correction_bias        used to choose experts only, never as a weight
    groups  : the E experts form n_group groups of E / n_group; a group scores the sum of its two best choices, and
              only the experts of the topk_group best groups can be chosen
    top     = the k experts with the highest choice among those
    w       = scores[top], / (sum + 1e-20) when norm_topk_prob, x routed_scaling_factor
    y       = fc2(sum_j w_j expert_{top_j}(fc1(x))) + shared(x),   expert(u) = down(relu(up(u))^2)

fc1 / fc2 are the latent projections d -> moe_latent_size -> d when ``moe_latent_size`` is set (the experts then read
and write moe_latent_size dims), else the identity; ``shared`` is one relu^2 MLP of width
``moe_shared_expert_intermediate_size`` on x (absent when 0).

The experts run on the T·k (token, expert) assignments sorted by expert, as two grouped matmuls
(``ops.grouped_matmul``): static shapes (T·k rows whatever the routing), no token dropped, and a cost that grows with
k, not with the number of experts. ``dense_experts`` computes every expert for every token and weights the outputs by
the routing: the independent reference of the tests and of ``benchmarks/moe_forward.py``.

Parameters, with their logical axes (``expert`` for the expert axis; ``expert_mlp`` and ``shared_mlp`` for the
experts' and the shared MLP's neurons; ``moe_latent`` for the latent dims):

    gate/kernel [d, E], gate/e_score_correction_bias [E]
    experts/up_proj [E, c, I], experts/down_proj [E, I, c]        c = moe_latent_size or d
    shared_experts/up_proj/kernel [d, S], shared_experts/down_proj/kernel [S, d]
    fc1_latent_proj/kernel [d, L], fc2_latent_proj/kernel [L, d]  (with moe_latent_size)

``e_score_correction_bias`` is a buffer in transformers (updated by load balancing, not by gradients): here it only
chooses experts, so its gradient is zero.

Elastic masks (``masks`` of ``MoE``, one row per sample; ``elastic.axes`` rows ``moe_experts``, ``moe_expert_dim``,
``moe_shared_dim``):

    expert [b, E]      a dropped expert's choice is -inf *before* group scoring and top-k, so tokens choose among
                       the kept experts exactly as a child holding only those experts does (each group keeps the
                       same number, >= 2 when n_group > 1, so every group's two best are kept experts and group
                       scores match the child's); the chosen experts' weights are multiplied by their mask value
                       (1 in a hard mask, the straight-through gradient's path to the router)
    expert_mlp [b, I]  every routed expert's up-projection output (the same neuron prefix for all experts)
    shared_mlp [b, S]  the shared expert's up-projection output

Widths come from the block's ``BlockSpec`` (a heterogeneous child gives each E block its own).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from elastic_jax.model.config import BlockSpec, ModelConfig
from elastic_jax.model.layers import Projection, constrain, dtype_of, param, record_importance, record_statistic
from elastic_jax.ops import context_parallel as cp
from elastic_jax.ops.grouped_matmul import grouped_matmul

Array = jax.Array


# ---------------------------------------------------------------------------------------------------- routing
def route(config: ModelConfig, x: Array, kernel: Array, correction_bias: Array,
          expert_mask: Array | None = None) -> tuple[Array, Array]:
  """Top-k routing of tokens x [T, d]: (weights [T, k] fp32, expert indices [T, k] int32), in fp32 throughout.

  expert_mask: optional [T, E], > 0 for the experts a token may choose (see the module docstring)."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  scores = jax.nn.sigmoid(logits)
  choice = scores + jax.lax.stop_gradient(correction_bias.astype(jnp.float32))
  if expert_mask is not None:
    choice = jnp.where(expert_mask > 0, choice, -jnp.inf)
  if config.n_group > 1:
    tokens, experts = choice.shape
    grouped = choice.reshape(tokens, config.n_group, experts // config.n_group)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, n_group]
    best_groups = jax.lax.top_k(group_scores, config.topk_group)[1]
    allowed = jnp.any(best_groups[:, :, None] == jnp.arange(config.n_group), axis=1)  # [T, n_group]
    allowed = jnp.repeat(allowed, experts // config.n_group, axis=1)
    choice = jnp.where(allowed, choice, -jnp.inf)
  indices = jax.lax.top_k(jax.lax.stop_gradient(choice), config.num_experts_per_tok)[1]
  weights = jnp.take_along_axis(scores, indices, axis=1)
  if config.norm_topk_prob:
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
  if expert_mask is not None:
    weights = weights * jnp.take_along_axis(expert_mask.astype(jnp.float32), indices, axis=1)
  return weights * config.routed_scaling_factor, indices.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------- experts
def _relu2(x: Array) -> Array:
  return jnp.square(jax.nn.relu(x))


class ExpertRows(NamedTuple):
  """The T·k (token, expert) assignments in expert order, as ``sorted_experts`` computes them."""

  token: Array  # [T·k] int: the token of each row
  expert: Array  # [T·k] int: its expert
  hidden: Array  # [T·k, I] the up-projection output (masked)
  out: Array  # [T·k, c] fp32: the expert's output, before its routing weight


def sorted_experts(x: Array, up: Array, down: Array, weights: Array, indices: Array, *, impl: str = "auto",
                   dtype=jnp.float32, neuron_mask: Array | None = None, return_rows: bool = False
                   ) -> Array | tuple[Array, ExpertRows]:
  """sum_j weights[:, j] * expert_{indices[:, j]}(x) for x [T, c], up [E, c, I], down [E, I, c] -> [T, c] fp32.

  The T·k assignments are sorted by expert (stable), gathered into T·k rows, multiplied by two grouped matmuls
  (``impl``: see ``ops.grouped_matmul``) in ``dtype`` with fp32 accumulation, weighted, and summed back per token.
  neuron_mask: optional [T, I], multiplies each token's up-projection output. return_rows: also the rows.
  """
  tokens, k = indices.shape
  flat = indices.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # assignment positions, sorted by expert
  token_of = order // k
  group_sizes = jnp.zeros((up.shape[0],), jnp.int32).at[flat].add(1)
  rows = x.astype(dtype)[token_of]  # [T·k, c]
  with jax.named_scope("up_proj"):
    hidden = grouped_matmul(rows, up.astype(dtype), group_sizes, impl=impl).astype(dtype)
  if neuron_mask is not None:
    hidden = hidden * neuron_mask[token_of].astype(dtype)
  with jax.named_scope("down_proj"):
    expert_out = grouped_matmul(_relu2(hidden), down.astype(dtype), group_sizes, impl=impl)  # fp32
  out = expert_out * weights.reshape(-1)[order][:, None].astype(jnp.float32)
  # Back to assignment order (the inverse permutation), then the k assignments of each token summed.
  position = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y = jnp.sum(out[position].reshape(tokens, k, -1), axis=1)
  return (y, ExpertRows(token_of, flat[order], hidden, expert_out)) if return_rows else y


def expert_statistics(rows: ExpertRows, batch: int, length: int, experts: int, tokens: int | None = None
                      ) -> dict[str, Array]:
  """The routed experts' importance statistics per sample, for rows of ``batch`` x ``length`` tokens (sample-major):
  ``mean_t`` over a sample's tokens of each expert's output norm ([b, E]; 0 where a token does not use the expert,
  so this is routing frequency x mean output norm) and of its |up-projection output| ([b, E, I]). ``tokens``: the
  sample's length to average over when these rows hold only part of it (default ``length``)."""
  segment = rows.token // length * experts + rows.expert

  def mean(values: Array) -> Array:
    sums = jax.ops.segment_sum(values.astype(jnp.float32), segment, num_segments=batch * experts)
    return sums.reshape(batch, experts, *values.shape[1:]) / (tokens or length)

  return {"expert": mean(jnp.linalg.norm(rows.out, axis=-1)), "expert_mlp": mean(jnp.abs(rows.hidden))}


def routed_experts(x: Array, up: Array, down: Array, weights: Array, indices: Array, *, impl: str = "auto",
                   dtype=jnp.float32, neuron_mask: Array | None = None, statistics: bool = False
                   ) -> tuple[Array, dict[str, Array]]:
  """``sorted_experts`` on a batch of sequences: x [b, l, c], weights and indices [b, l, k], neuron_mask [b, I] ->
  (the weighted experts' sum [b, l, c] fp32, ``expert_statistics`` of the rows when ``statistics``, else {}).

  Under a mesh that splits the tokens (``context_parallel.active_token_split``: the batch over its data-parallel
  axes, the sequence over the context axis), every shard sorts and multiplies only its own tokens, against the
  experts' weights gathered whole (cast to ``dtype`` first); the compiler alone would run the sort and both grouped
  matmuls on every token on every device.
  """
  b, l, _ = x.shape
  up, down = up.astype(dtype), down.astype(dtype)

  def local(x, weights, indices, neuron_mask, up, down):
    lb, ll, c = x.shape
    mask = None if neuron_mask is None else jnp.repeat(neuron_mask, ll, axis=0)
    y, rows = sorted_experts(x.reshape(lb * ll, c), up, down, weights.reshape(lb * ll, -1),
                             indices.reshape(lb * ll, -1), impl=impl, dtype=dtype, neuron_mask=mask,
                             return_rows=True)
    stats = expert_statistics(rows, lb, ll, up.shape[0], tokens=l) if statistics else {}
    if statistics and ll < l:  # each context shard holds part of every sample's tokens
      stats = jax.tree.map(lambda v: jax.lax.psum(v, cp.CONTEXT_AXIS), stats)
    return y.reshape(lb, ll, c), stats

  split = cp.active_token_split(b, l)
  if split is None:
    return local(x, weights, indices, neuron_mask, up, down)
  tokens, samples = split.sequence_spec(3), PartitionSpec(split.batch_axes or None)
  stats_spec = {"expert": samples, "expert_mlp": samples} if statistics else {}
  mask_spec = None if neuron_mask is None else samples
  return split.shard_map(local, in_specs=(tokens, tokens, tokens, mask_spec, PartitionSpec(), PartitionSpec()),
                         out_specs=(tokens, stats_spec))(x, weights, indices, neuron_mask, up, down)


def dense_experts(x: Array, up: Array, down: Array, weights: Array, indices: Array, *, dtype=jnp.float32) -> Array:
  """The same as ``sorted_experts`` by computing every expert for every token ([T, E, I] work): the reference."""
  hidden = _relu2(jnp.einsum("tc,eci->tei", x.astype(dtype), up.astype(dtype),
                             preferred_element_type=jnp.float32).astype(dtype))
  out = jnp.einsum("tei,eic->tec", hidden, down.astype(dtype), preferred_element_type=jnp.float32)
  combine = jnp.sum(jax.nn.one_hot(indices, up.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
  return jnp.einsum("te,tec->tc", combine, out)


# ---------------------------------------------------------------------------------------------------- modules
class Router(nn.Module):
  """The gate's parameters: kernel [d, E] and e_score_correction_bias [E] (both fp32 in use)."""

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, x: Array, expert_mask: Array | None = None) -> tuple[Array, Array]:
    cfg, e = self.config, self.spec.n_routed_experts
    pdt = dtype_of(cfg.param_dtype)
    kernel = param(self, "kernel", nn.initializers.normal(cfg.initializer_range), (cfg.hidden_size, e),
                   ("embed", "expert"), pdt)
    bias = param(self, "e_score_correction_bias", nn.initializers.zeros, (e,), ("expert",), pdt)
    return route(cfg, x, kernel, bias, expert_mask)


class Experts(nn.Module):
  """The routed experts' stacked weights, up_proj [E, c, I] and down_proj [E, I, c], applied to routed tokens."""

  config: ModelConfig
  spec: BlockSpec
  input_axis: str  # "embed", or "moe_latent" behind the latent projection

  @nn.compact
  def __call__(self, x: Array, weights: Array, indices: Array, neuron_mask: Array | None = None,
               statistics: bool = False) -> tuple[Array, dict[str, Array]]:
    """x [b, l, c], weights and indices [b, l, k], neuron_mask [b, I] -> (the weighted sum of each token's experts
    [b, l, c] fp32, the importance statistics when ``statistics``), as ``routed_experts``."""
    cfg = self.config
    pdt = dtype_of(cfg.param_dtype)
    e, c, i = self.spec.n_routed_experts, cfg.expert_input_size, self.spec.moe_intermediate_size
    up = param(self, "up_proj", nn.initializers.normal(cfg.initializer_range), (e, c, i),
               ("expert", self.input_axis, "expert_mlp"), pdt)
    down = param(self, "down_proj", nn.initializers.normal(cfg.initializer_range / math.sqrt(cfg.num_layers)),
                 (e, i, c), ("expert", "expert_mlp", self.input_axis), pdt)
    return routed_experts(x, up, down, weights, indices, impl=cfg.moe_impl, dtype=dtype_of(cfg.dtype),
                          neuron_mask=neuron_mask, statistics=statistics)


class SharedExpert(nn.Module):
  """The shared expert: a relu^2 MLP of width ``moe_shared_expert_intermediate_size`` that every token goes through."""

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """u [b, l, d], mask [b, S] -> (output [b, l, d], the up-projection output [b, l, S] for importance)."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    up = Projection((self.spec.moe_shared_expert_intermediate_size,), ("embed",), ("shared_mlp",),
                    cfg.initializer_range, name="up_proj", **kw)(u)
    hidden = up if mask is None else up * mask[:, None, :].astype(up.dtype)
    hidden = constrain(_relu2(hidden), ("batch", "length", "shared_mlp"))
    return Projection((cfg.hidden_size,), ("shared_mlp",), ("embed",),
                      cfg.initializer_range / math.sqrt(cfg.num_layers), name="down_proj", **kw)(hidden), up


class MoE(nn.Module):
  """u [b, l, d] -> [b, l, d] in ``config.dtype``. Stateless per token (no decode cache). ``masks``: optional
  {"expert": [b, E], "expert_mlp": [b, I], "shared_mlp": [b, S]} (module docstring); hidden channels are masked
  around the block by ``Block``. Calibration passes sow the ``expert``, ``expert_mlp`` and ``shared_mlp``
  statistics (``elastic.importance``)."""

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array, masks: dict[str, Array] | None = None) -> Array:
    cfg, spec = self.config, self.spec
    masks = masks or {}
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    b, l, d = u.shape
    expert_mask = None if masks.get("expert") is None else jnp.repeat(masks["expert"], l, axis=0)
    with jax.named_scope("router"):
      weights, indices = Router(cfg, spec, name="gate")(u.reshape(b * l, d), expert_mask)
    routed_in = u
    latent = cfg.moe_latent_size is not None
    if latent:
      routed_in = Projection((cfg.moe_latent_size,), ("embed",), ("moe_latent",), cfg.initializer_range,
                             name="fc1_latent_proj", **kw)(u)
    statistics = self.is_mutable_collection("importance")
    with jax.named_scope("experts"):
      routed, stats = Experts(cfg, spec, "moe_latent" if latent else "embed", name="experts")(
          routed_in, weights.reshape(b, l, -1), indices.reshape(b, l, -1), masks.get("expert_mlp"), statistics)
    for name, value in stats.items():
      record_statistic(self, name, value)
    out = routed.astype(dtype_of(cfg.dtype))
    if latent:
      out = Projection((d,), ("moe_latent",), ("embed",), cfg.initializer_range / math.sqrt(cfg.num_layers),
                       name="fc2_latent_proj", **kw)(out)
    if spec.moe_shared_expert_intermediate_size:
      with jax.named_scope("shared_experts"):
        shared, up = SharedExpert(cfg, spec, name="shared_experts")(u, masks.get("shared_mlp"))
      record_importance(self, "shared_mlp", up)  # ranked like MLP neurons: the up-projection output (D-3)
      out = out + shared
    return out
