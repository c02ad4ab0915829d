"""Exact parameter counts (spec §2) for a config, for a sub-network ``Choice``, and in expectation for the router.

One formula per block kind, written over plain numbers so the same code counts Python ints (exact) and JAX
arrays (the router's differentiable expected count). Block kinds:

- Mamba:     d(2·d_inner + 2GN + H) + K(d_inner + 2GN) + (d_inner + 2GN) + 3H + d_inner + d_inner·d + d,
             d_inner = H·P
- attention: d·Hq·hd + 2·d·Hkv·hd + Hq·hd·d + d
- MLP:       2·d·F + d
- MoE:       d·E + E + E·2·c·I + 2·d·S + 2·d·L + d   (router and its correction bias, E routed experts of width I
             reading c = L or d dims, the shared expert of width S, the latent projections when L is set); E, I
             and S are the block's elastic sizes (``moe_experts``, ``moe_expert_dim``, ``moe_shared_dim``)
- embedding + LM head + final norm: 2·V·d + d

Active parameters (``active_param_count``) are those one token computes with: the same, with only the k =
num_experts_per_tok routed experts it is sent to in place of all E (router, shared expert and latent projections
always run).

Every term is a product of *distinct* axes (d, F, Hq, H, P, E, I, S), each appearing at most once, so for independent
per-axis distributions E[count] is the formula evaluated at each axis' expected size, and a block's expected
contribution is scaled by its probability of being kept. That is what ``expected_param_count`` computes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from elastic_jax.elastic import axes
from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.masks import weighted_depth_mask
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model.config import BlockSpec, ModelConfig

Array = jax.Array
Number = Any  # int | float | jax.Array: the formulas below work on any of them


# ---------------------------------------------------------------------------------------------------- formulas
def embedding_param_count(config: ModelConfig, hidden: Number) -> Number:
  """Token embedding [V, d] + LM head [d, V] (untied) + final norm [d]."""
  return 2 * config.vocab_size * hidden + hidden


def mamba_param_count(config: ModelConfig, hidden: Number, heads: Number, head_dim: Number) -> Number:
  """One Mamba-2 block, its pre-norm included; G, N and K are never elastic."""
  d_inner = heads * head_dim
  gn2 = 2 * config.n_groups * config.ssm_state_size
  return (hidden * (2 * d_inner + gn2 + heads)  # in_proj rows z | x | B | C | dt
          + config.conv_kernel * (d_inner + gn2) + (d_inner + gn2)  # depthwise conv kernel and bias over x | B | C
          + 3 * heads  # A_log, D, dt_bias
          + d_inner  # grouped gated norm weight
          + d_inner * hidden  # out_proj
          + hidden)  # block pre-norm


def attention_param_count(config: ModelConfig, hidden: Number, heads: Number) -> Number:
  """One GQA attention block (no biases, NoPE), its pre-norm included; KV heads and head dim are never elastic."""
  hd, hkv = config.head_dim, config.num_key_value_heads
  return hidden * heads * hd + 2 * hidden * hkv * hd + heads * hd * hidden + hidden


def mlp_param_count(hidden: Number, neurons: Number) -> Number:
  """One squared-ReLU MLP block (up, down, no gate, no biases), its pre-norm included."""
  return 2 * hidden * neurons + hidden


def moe_param_count(config: ModelConfig, hidden: Number, experts: Number, expert_width: Number,
                    shared_width: Number, *, active: bool = False) -> Number:
  """One MoE block of ``experts`` routed experts of ``expert_width`` neurons and a shared expert of
  ``shared_width`` (0: none), its pre-norm included; ``active``: with the num_experts_per_tok experts a token
  uses, not all (the router scores all of them)."""
  used = config.num_experts_per_tok if active else experts
  latent = config.moe_latent_size
  expert_input = hidden if latent is None else latent
  return (hidden * experts + experts  # router kernel, e_score_correction_bias
          + used * 2 * expert_input * expert_width  # routed experts' up and down projections
          + 2 * hidden * shared_width  # shared expert (0 when absent)
          + (0 if latent is None else 2 * hidden * latent)  # fc1 / fc2 latent projections
          + hidden)  # block pre-norm


# Each block kind's count formula; a block axis feeds the argument its registry row names (``count_arg``).
BLOCK_PARAM_COUNTS = {
    "mamba": mamba_param_count,
    "attention": attention_param_count,
    "mlp": lambda config, hidden, neurons: mlp_param_count(hidden, neurons),
    "moe": moe_param_count,
}
# The same per token: only MoE blocks differ (a token runs num_experts_per_tok of the routed experts).
BLOCK_ACTIVE_PARAM_COUNTS = {
    **BLOCK_PARAM_COUNTS,
    "moe": functools.partial(moe_param_count, active=True),
}


def _block_widths(spec: BlockSpec, widths: Mapping[str, list]) -> dict[str, Number]:
  """The formula arguments of one block: ``widths[axis][k]`` for each axis of its kind, k its index in that kind."""
  return {axis.count_arg: widths[axis.name][spec.kind_index] for axis in axes.block_axes(spec.kind)}


def _block_counts(config: ModelConfig, hidden: Number, widths: Mapping[str, list], formulas=None) -> list:
  """Per block (pattern order) the formula at ``hidden`` and the block's widths (``formulas``: by kind, default
  ``BLOCK_PARAM_COUNTS``)."""
  formulas = BLOCK_PARAM_COUNTS if formulas is None else formulas
  return [formulas[spec.kind](config, hidden, **_block_widths(spec, widths)) for spec in config.block_specs()]


def _parent_widths(config: ModelConfig) -> dict[str, list]:
  return {axis.name: list(axis.parent_sizes(config)) for axis in axes.block_axes()}


# ---------------------------------------------------------------------------------------------------- exact
def param_count(config: ModelConfig) -> int:
  """Exact number of parameters of ``HybridLM(config)`` (per-layer widths included)."""
  return int(embedding_param_count(config, config.hidden_size) + sum(_block_counts(config, config.hidden_size,
                                                                                   _parent_widths(config))))


def active_param_count(config: ModelConfig) -> int:
  """Exact number of parameters one token computes with (``param_count`` for models without MoE blocks)."""
  return int(embedding_param_count(config, config.hidden_size)
             + sum(_block_counts(config, config.hidden_size, _parent_widths(config), BLOCK_ACTIVE_PARAM_COUNTS)))


def choice_param_count(config: ModelConfig, choice: Choice, depth_order: Any = None, *, active: bool = False) -> int:
  """Exact parameter count of the sub-network ``choice`` of ``config`` (== that of its extracted child);
  ``active``: its ``active_param_count``.

  ``depth_order`` (block indices, most important first) is needed when ``choice.depth`` drops blocks: which kinds
  of blocks go depends on it.
  """
  child = child_config(config, choice, depth_order)
  return active_param_count(child) if active else param_count(child)


# ---------------------------------------------------------------------------------------------------- expected
def expected_sizes(config: ModelConfig, space: ElasticSpace, probs: Mapping[str, Any]) -> dict[str, Any]:
  """Per-axis expected sizes Σ_i π_i · candidate_i.

  Returns ``{"hidden": [...], "depth": absent, per-layer axis: list over blocks of that kind of [...]}`` where
  ``[...]`` is the probabilities' leading (batch) shape; axes absent from ``probs`` are at the parent's size.
  """
  unknown = sorted(set(probs) - set(axes.names()))
  if unknown:
    raise SpaceError(f"unknown axis name(s) {unknown} in probs; axes are {list(axes.names())}.")
  sizes: dict[str, Any] = {}
  for axis in ("hidden", *axes.block_axis_names()):
    parents = axes.get(axis).parent_sizes(config)
    if axis not in probs:
      sizes[axis] = parents[0] if axis == "hidden" else list(parents)
      continue
    p = jnp.asarray(probs[axis], jnp.float32)
    cands = jnp.asarray(space.candidates(axis), jnp.float32)
    if p.shape[-1] != cands.shape[0]:
      raise SpaceError(f"{axis} probs have {p.shape[-1]} entries on the last axis but the space has "
                       f"{cands.shape[0]} {axis} candidates {list(space.candidates(axis))}.")
    mean = p @ cands  # [...] or [..., n_blocks]
    if axis != "hidden" and space.mode(axis) == "heterogeneous":
      if p.ndim < 2 or p.shape[-2] not in (1, len(parents)):
        raise SpaceError(f"{axis} is heterogeneous: probs must be [..., {len(parents)} blocks, "
                         f"{cands.shape[0]} candidates], got {p.shape}.")
      sizes[axis] = [mean[..., k if p.shape[-2] > 1 else 0] for k in range(len(parents))]
    else:
      if p.ndim >= 3 and p.shape[-2] == 1:  # [b, 1, n_candidates]: a router's single row for the whole axis
        mean = mean[..., 0]
      sizes[axis] = mean if axis == "hidden" else [mean] * len(parents)
  return sizes


def expected_param_count(config: ModelConfig, space: ElasticSpace, probs: Mapping[str, Any],
                         depth_order: Any = None, *, active: bool = False) -> Array:
  """Differentiable expected parameter count under independent per-axis distributions over candidates.

  Args:
    config, space: the parent and its search space.
    probs: axis -> probabilities over that axis' candidates, ``[..., n_candidates]``; per-layer axes in
      heterogeneous mode take ``[..., n_blocks, n_candidates]`` (one distribution per block of that kind). Leading
      dims (e.g. a batch of budgets) are kept. Absent axes are at the parent's size.
    depth_order: block indices, most important first; required with ``depth`` probabilities. A block's expected
      contribution is scaled by its probability of being kept, Σ_i π_i · [rank(block) < depth_candidate_i].
    active: count the parameters a token computes with (``active_param_count``) instead of all.

  Returns:
    float32 ``[...]``. With one-hot probs it equals ``choice_param_count`` of that choice (same ``active``).
  """
  sizes = expected_sizes(config, space, probs)
  hidden = sizes["hidden"]
  blocks = _block_counts(config, hidden, sizes, BLOCK_ACTIVE_PARAM_COUNTS if active else None)
  if "depth" in probs:
    if depth_order is None:
      raise SpaceError("depth probabilities need depth_order (block indices, most important first).")
    p = jnp.asarray(probs["depth"], jnp.float32)
    if p.ndim >= 3 and p.shape[-2] == 1:  # [b, 1, n_candidates]: a router's single row
      p = p[..., 0, :]
    if p.shape[-1] != len(space.depth):
      raise SpaceError(f"depth probs have {p.shape[-1]} entries on the last axis but the space has "
                       f"{len(space.depth)} depth candidates {list(space.depth)}.")
    kept = weighted_depth_mask(p, space.depth, depth_order, config.num_layers)  # [..., L]
    blocks = [kept[..., j] * count for j, count in enumerate(blocks)]
  total = embedding_param_count(config, hidden)
  for count in blocks:
    total = total + count
  return jnp.asarray(total, jnp.float32)


# ---------------------------------------------------------------------------------------------------- memory
def attention_cache_bytes(config: ModelConfig, heads: Number = 0, *, context: int, cache_bytes: int = 2,
                          state_bytes: int = 4) -> Number:
  """K and V of one attention block, 2·context·Hkv·hd (never elastic; only depth removes it)."""
  del heads, state_bytes  # query heads keep nothing; attention keeps no fp32 state
  return 2 * context * config.num_key_value_heads * config.head_dim * cache_bytes


def mamba_cache_bytes(config: ModelConfig, heads: Number, head_dim: Number, *, context: int, cache_bytes: int = 2,
                      state_bytes: int = 4) -> Number:
  """The SSM state H·P·N (fp32) plus the conv window (K-1)·(H·P + 2GN) of one Mamba block (any context)."""
  del context
  d_inner = heads * head_dim
  conv = (config.conv_kernel - 1) * (d_inner + 2 * config.n_groups * config.ssm_state_size)
  return d_inner * config.ssm_state_size * state_bytes + conv * cache_bytes


# Each block kind's decode-time cache; arguments as in ``BLOCK_PARAM_COUNTS``. MLP and MoE blocks keep nothing.
BLOCK_CACHE_BYTES = {
    "mamba": mamba_cache_bytes,
    "attention": attention_cache_bytes,
    "mlp": lambda config, neurons=0, **_: 0,
    "moe": lambda config, **_: 0,
}


def block_cache_bytes(config: ModelConfig, kind: str, *, context: int, cache_bytes: int = 2, state_bytes: int = 4,
                      **widths: Number) -> Number:
  """Decode-time cache of one block of ``kind`` for one sequence of ``context`` tokens; ``widths`` by the count
  arguments of the kind's axes (``heads``, ``head_dim``...)."""
  return BLOCK_CACHE_BYTES[kind](config, **widths, context=context, cache_bytes=cache_bytes, state_bytes=state_bytes)


def _memory_bytes(config: ModelConfig, hidden: Number, widths: Mapping[str, list], kept: Any, *, context: int,
                  param_bytes: int, cache_bytes: int) -> Number:
  """Weights plus caches at ``context``; ``kept[j]`` (1, 0 or a probability) scales block j."""
  counts = _block_counts(config, hidden, widths)
  total = embedding_param_count(config, hidden) * param_bytes
  for j, spec in enumerate(config.block_specs()):
    cache = block_cache_bytes(config, spec.kind, context=context, cache_bytes=cache_bytes,
                              **_block_widths(spec, widths))
    total = total + kept[j] * (counts[j] * param_bytes + cache)
  return total


def memory_bytes(config: ModelConfig, *, context: int, param_bytes: int = 2, cache_bytes: int = 2) -> int:
  """Deployment memory of ``HybridLM(config)`` serving one sequence of ``context`` tokens: weights + caches."""
  return int(_memory_bytes(config, config.hidden_size, _parent_widths(config), [1] * config.num_layers, context=context,
                           param_bytes=param_bytes, cache_bytes=cache_bytes))


def expected_memory_bytes(config: ModelConfig, space: ElasticSpace, probs: Mapping[str, Any], depth_order: Any = None,
                          *, context: int, param_bytes: int = 2, cache_bytes: int = 2) -> Array:
  """Differentiable expected deployment memory (weights + KV cache + SSM state at ``context``), the memory
  counterpart of ``expected_param_count`` (same arguments; every term still has each axis at most once)."""
  sizes = expected_sizes(config, space, probs)
  kept = [1.0] * config.num_layers
  if "depth" in probs:
    if depth_order is None:
      raise SpaceError("depth probabilities need depth_order (block indices, most important first).")
    mask = weighted_depth_mask(jnp.asarray(probs["depth"], jnp.float32), space.depth, depth_order,
                               config.num_layers)
    kept = [mask[..., j] for j in range(config.num_layers)]
  return jnp.asarray(_memory_bytes(config, sizes["hidden"], sizes, kept, context=context, param_bytes=param_bytes,
                                   cache_bytes=cache_bytes), jnp.float32)
