"""Nested (prefix) masks: the one place where a budget becomes the ``masks`` dict ``HybridLM`` consumes.

After the importance permutation, index order is importance order, so a sub-network keeps a *prefix* of every
axis: ``mask[i] = i < count``. Grouped axes keep the same prefix inside every group (spec §3): Mamba heads are
group-major (group g owns heads ``[g*H/G, (g+1)*H/G)``) and keep ``count/G`` heads per group; query heads keep
``count/Hkv`` heads per KV group (D-1). Depth keeps the ``count`` most important blocks of a depth ranking.

Counts may be Python ints or traced integer arrays, shaped ``[]`` (one budget), ``[b]`` (one budget per sample) or,
for per-layer axes, ``[b, n]`` with one column per block of that kind (pattern order). Masks always carry a leading
batch axis, so each row of a batch can run its own sub-network in one compiled program.

Soft masks weight the candidate masks: ``Σ_i w_i · mask(candidate_i)``. With ``w`` the router's probabilities this
is the "staircase" mask; with a one-hot ``w`` it is the hard mask of that candidate (and ``one_hot · p /
stop_gradient(p)`` gives the straight-through estimator) — all through the same prefix masks.

Masks dict (see ``HybridLM``): ``{"hidden": [b, d], "depth": [b, L], "layers_{i}": {"mlp": [b, F]} |
{"heads": [b, Hq]} | {"ssm_heads": [b, H], "mamba_head_dim": [b, P]} | {"expert": [b, E], "expert_mlp": [b, I],
"shared_mlp": [b, S]}}``, float32: each axis' mask sits where its registry row says (``ElasticAxis.mask_key``).
Routed experts are grouped like Mamba heads: n_group contiguous groups, each keeping ``count / n_group``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.elastic import axes
from elastic_jax.elastic.axes import ElasticAxis, kind_count
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model.config import BlockSpec, ModelConfig

Array = jax.Array
Masks = dict[str, Any]


# ---------------------------------------------------------------------------------------------------- primitives
def prefix_mask(count: Any, size: int, groups: int = 1) -> Array:
  """count [...] int -> mask [..., size] float32: the first ``count // groups`` units of each of ``groups``
  equal, contiguous groups (``groups=1``: ``arange(size) < count``)."""
  per_group = size // groups
  keep_per_group = jnp.asarray(count, jnp.int32) // groups
  within_group = jnp.arange(size, dtype=jnp.int32) % per_group
  return (within_group < keep_per_group[..., None]).astype(jnp.float32)


def weighted_prefix_mask(weights: Any, candidates: Sequence[int], size: int, groups: int = 1) -> Array:
  """weights [..., n_candidates] -> Σ_i weights[..., i] · prefix_mask(candidates[i]) as [..., size] float32."""
  table = prefix_mask(jnp.asarray(candidates, jnp.int32), size, groups)  # [n_candidates, size]
  return jnp.einsum("...c,cs->...s", jnp.asarray(weights, jnp.float32), table)


def depth_ranks(depth_order: Any, num_layers: int) -> Array:
  """depth_order [L] (block indices, most important first) -> rank [L]: block j's position in that order."""
  # The inverse permutation as a sort, not a scatter: libtpu's scatter emitter aborts on ``.at[order].set(arange)``.
  order = jnp.asarray(depth_order, jnp.int32).reshape(num_layers)
  return jnp.argsort(order, stable=True).astype(jnp.int32)


def depth_mask(count: Any, depth_order: Any, num_layers: int) -> Array:
  """count [...] -> mask [..., L] float32: 1 for the ``count`` blocks ranked highest in ``depth_order``."""
  ranks = depth_ranks(depth_order, num_layers)
  return (ranks < jnp.asarray(count, jnp.int32)[..., None]).astype(jnp.float32)


def weighted_depth_mask(weights: Any, candidates: Sequence[int], depth_order: Any, num_layers: int) -> Array:
  """weights [..., n_candidates] -> Σ_i w_i · depth_mask(candidates[i]) [..., L]: P(block kept) under weights."""
  table = depth_mask(jnp.asarray(candidates, jnp.int32), depth_order, num_layers)  # [n_candidates, L]
  return jnp.einsum("...c,cl->...l", jnp.asarray(weights, jnp.float32), table)


# ---------------------------------------------------------------------------------------------------- checks
def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_counts(config: ModelConfig, axis: ElasticAxis, counts: Any, size: int, where: str) -> None:
  """Concrete counts only (traced ones cannot be inspected): in [0, size], whole groups, and none of them, but 0,
  below the axis' smallest size."""
  if not _is_concrete(counts):
    return
  values = np.asarray(counts)
  if not np.issubdtype(values.dtype, np.integer):
    raise SpaceError(f"{axis.name} counts for {where} must be integers, got dtype {values.dtype}.")
  if values.size and (values.min() < 0 or values.max() > size):
    raise SpaceError(f"{axis.name} count {int(values.max() if values.max() > size else values.min())} for {where} "
                     f"is outside [0, {size}].")
  step = axis.groups(config)
  if step > 1 and values.size and np.any(values % step):
    bad = int(values[values % step != 0].flat[0])
    raise SpaceError(f"{axis.name} count {bad} for {where} is not a multiple of {axis.group_rule(config)}.")
  minimum, rule = axis.min_size(config)
  short = values[(values > 0) & (values < minimum)] if values.size else values
  if short.size:
    raise SpaceError(f"{axis.name} count {int(short.flat[0])} for {where} is below {minimum}, the fewest "
                     f"{axis.unit}s a {axis.kind} block can keep ({rule}).")


def _check_depth_order(depth_order: Any, num_layers: int) -> None:
  if not _is_concrete(depth_order):
    return
  order = np.asarray(depth_order)
  if order.shape != (num_layers,) or sorted(order.tolist()) != list(range(num_layers)):
    raise SpaceError(f"depth_order must be a permutation of range(num_layers={num_layers}) (block indices, most "
                     f"important first), got {order.tolist()}.")


# ---------------------------------------------------------------------------------------------------- counts
def _batch_size(values: Sequence[Any], batch_size: int | None) -> int:
  sizes = {int(jnp.shape(v)[0]) for v in values if jnp.ndim(v) >= 1}
  if len(sizes) > 1:
    raise SpaceError(f"per-sample counts disagree on the batch size: {sorted(sizes)}.")
  if sizes:
    size = sizes.pop()
    if batch_size is not None and batch_size != size:
      raise SpaceError(f"batch_size={batch_size} but per-sample counts have batch size {size}.")
    return size
  return 1 if batch_size is None else batch_size


def _per_sample(count: Any, batch: int) -> Array:
  """[] or [b] -> [b] int32."""
  return jnp.broadcast_to(jnp.asarray(count, jnp.int32), (batch,))


def masks_from_counts(config: ModelConfig, counts: Mapping[str, Any], depth_order: Any = None,
                      batch_size: int | None = None) -> Masks:
  """Per-axis kept counts -> the masks dict (binary, float32, leading batch axis).

  Args:
    config: the parent.
    counts: axis name (``hidden``, ``depth`` and the block axes: ``mlp``, ``attention_heads``, ``mamba_heads``...)
      -> count, a Python int or integer array ``[]`` / ``[b]``; per-layer axes also take ``[b, n]``, one column per
      block of that kind in pattern order. An absent axis gets no mask (stays full). Counts of grouped axes must be
      multiples of the group count (checked when concrete; traced counts round down per group).
    depth_order: block indices, most important first; required when ``depth`` is given.
    batch_size: the batch when every count is a scalar (default 1).

  Returns:
    ``{"hidden": [b, d], "depth": [b, L], "layers_{i}": {...}}`` with only the entries ``counts`` asks for.
  """
  unknown = sorted(set(counts) - set(axes.names()))
  if unknown:
    raise SpaceError(f"unknown axis name(s) {unknown} in counts; axes are {list(axes.names())}.")
  batch = _batch_size(list(counts.values()), batch_size)
  masks: Masks = {}
  if "hidden" in counts:
    _check_counts(config, axes.get("hidden"), counts["hidden"], config.hidden_size, "the model")
    masks["hidden"] = prefix_mask(_per_sample(counts["hidden"], batch), config.hidden_size)
  if "depth" in counts:
    if depth_order is None:
      raise SpaceError("a depth count needs depth_order (block indices, most important first).")
    _check_depth_order(depth_order, config.num_layers)
    _check_counts(config, axes.get("depth"), counts["depth"], config.num_layers, "the model")
    masks["depth"] = depth_mask(_per_sample(counts["depth"], batch), depth_order, config.num_layers)

  def layer_mask(axis: ElasticAxis, spec: BlockSpec) -> Array:
    count = counts[axis.name]
    count = jnp.asarray(count) if _is_concrete(count) else count
    if jnp.ndim(count) == 2:
      n = kind_count(config, spec.kind)
      if count.shape[1] != n:
        raise SpaceError(f"{axis.name} counts have {count.shape[1]} columns but pattern={config.pattern!r} has {n} "
                         f"{spec.kind} blocks.")
      count = count[:, spec.kind_index]
    elif jnp.ndim(count) > 2:
      raise SpaceError(f"{axis.name} counts must be shaped [], [b] or [b, n_blocks], got {jnp.shape(count)}.")
    size = axis.block_size(config, spec)
    _check_counts(config, axis, count, size, f"layers_{spec.index}")
    return prefix_mask(_per_sample(count, batch), size, axis.groups(config))

  _add_layer_masks(config, masks, counts, layer_mask)
  return masks


def choice_masks(config: ModelConfig, choices: Choice | Sequence[Choice], depth_order: Any = None) -> Masks:
  """One ``Choice`` (batch 1) or a list of choices (one per sample, batch = len) -> the masks dict.

  Every axis gets a mask; ``depth`` too whenever ``depth_order`` is given (so that the dict's structure, and with
  it a jitted forward's compilation, does not depend on the choices). Without ``depth_order`` every choice must
  keep all blocks.
  """
  choices = [choices] if isinstance(choices, Choice) else list(choices)
  for choice in choices:
    choice.validate(config)
  counts = {axis.name: np.asarray([choice.values(axis.name) for choice in choices], np.int32)
            for axis in axes.block_axes() if axes.present(config, axis)}
  counts["hidden"] = np.asarray([c.hidden for c in choices], np.int32)
  if depth_order is not None or any(c.depth < config.num_layers for c in choices):
    counts["depth"] = np.asarray([c.depth for c in choices], np.int32)
  return masks_from_counts(config, counts, depth_order)


# ---------------------------------------------------------------------------------------------------- weights
def masks_from_weights(config: ModelConfig, space: ElasticSpace, weights: Mapping[str, Any],
                       depth_order: Any = None) -> Masks:
  """Weights over each axis' candidates -> masks ``Σ_i w_i · mask(candidate_i)`` (soft, hard or straight-through).

  Args:
    config, space: the parent and its search space (candidates, ascending).
    weights: axis -> ``[b, n_candidates]``; per-layer axes may instead be ``[b, n_blocks, n_candidates]`` (one
      distribution per block of that kind, or ``[b, 1, n_candidates]`` shared by all). Probabilities give the
      soft "staircase" mask; one-hot rows give the exact binary mask of the chosen candidate. An absent axis gets
      no mask.
    depth_order: block indices, most important first; required when ``depth`` is weighted.
  """
  unknown = sorted(set(weights) - set(axes.names()))
  if unknown:
    raise SpaceError(f"unknown axis name(s) {unknown} in weights; axes are {list(axes.names())}.")
  for axis, w in weights.items():
    n = len(space.candidates(axis))
    if jnp.shape(w)[-1] != n:
      raise SpaceError(f"{axis} weights have {jnp.shape(w)[-1]} entries on the last axis but the space has {n} "
                       f"{axis} candidates {list(space.candidates(axis))}.")
  masks: Masks = {}
  for axis in ("hidden", "depth"):
    if axis in weights and jnp.ndim(weights[axis]) != 2 and jnp.shape(weights[axis])[1:-1] != (1,):
      raise SpaceError(f"{axis} weights must be [b, n_candidates] (or [b, 1, n_candidates]), got "
                       f"{jnp.shape(weights[axis])}.")
  if "hidden" in weights:
    w = jnp.reshape(weights["hidden"], (jnp.shape(weights["hidden"])[0], -1))
    masks["hidden"] = weighted_prefix_mask(w, space.hidden, config.hidden_size)
  if "depth" in weights:
    if depth_order is None:
      raise SpaceError("depth weights need depth_order (block indices, most important first).")
    _check_depth_order(depth_order, config.num_layers)
    w = jnp.reshape(weights["depth"], (jnp.shape(weights["depth"])[0], -1))
    masks["depth"] = weighted_depth_mask(w, space.depth, depth_order, config.num_layers)

  def layer_mask(axis: ElasticAxis, spec: BlockSpec) -> Array:
    w = weights[axis.name]
    if jnp.ndim(w) == 3:  # per block; a middle axis of 1 (a homogeneous router's output) serves every block
      n = kind_count(config, spec.kind)
      if w.shape[1] not in (1, n):
        raise SpaceError(f"{axis.name} weights have {w.shape[1]} rows per sample but pattern={config.pattern!r} "
                         f"has {n} {spec.kind} blocks (give 1 row to share it).")
      w = w[:, spec.kind_index if w.shape[1] > 1 else 0]
    elif jnp.ndim(w) != 2:
      raise SpaceError(f"{axis.name} weights must be [b, n_candidates] or [b, n_blocks, n_candidates], got "
                       f"{jnp.shape(w)}.")
    size = axis.block_size(config, spec)
    return weighted_prefix_mask(w, space.candidates(axis.name), size, axis.groups(config))

  _add_layer_masks(config, masks, weights, layer_mask)
  return masks


def _add_layer_masks(config: ModelConfig, masks: Masks, given: Mapping[str, Any], layer_mask) -> None:
  """Fills masks["layers_{i}"][axis.mask_key] with ``layer_mask(axis, spec)`` for every block axis named in
  ``given`` and every block of its kind."""
  for spec in config.block_specs():
    entry = {axis.mask_key: layer_mask(axis, spec) for axis in axes.block_axes(spec.kind) if axis.name in given}
    if entry:
      masks[f"layers_{spec.index}"] = entry


# ---------------------------------------------------------------------------------------------------- kept units
def kept_indices(count: int, size: int, groups: int = 1) -> np.ndarray:
  """The indices a prefix mask keeps, as a numpy array: what extraction slices (same rule as ``prefix_mask``)."""
  with jax.ensure_compile_time_eval():
    return np.flatnonzero(np.asarray(prefix_mask(count, size, groups)))


def kept_blocks(depth: int, depth_order: Any, num_layers: int) -> np.ndarray:
  """Pattern indices of the blocks a depth mask keeps, in pattern order (same rule as ``depth_mask``)."""
  if depth >= num_layers:
    return np.arange(num_layers)
  if depth_order is None:
    raise SpaceError(f"depth={depth} < num_layers={num_layers} needs depth_order (block indices, most important "
                     "first).")
  _check_depth_order(depth_order, num_layers)
  with jax.ensure_compile_time_eval():
    return np.flatnonzero(np.asarray(depth_mask(depth, np.asarray(depth_order), num_layers)))
