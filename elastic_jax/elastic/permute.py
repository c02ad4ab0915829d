"""Reorders the parent's weights so that index order == importance order on every elastic axis (spec §3).

After ``permute_params`` every budget's sub-network is a prefix of each axis (per group where groups exist), which
is what nested masks and extraction assume. The permutation is a reparametrisation: the permuted model computes
the same logits (hidden channels pass only through RMSNorms, which are permutation invariant; heads and neurons only
through sums).

Which tensors share an axis is read from the model's own logical axis names (``param_logical_axes``), so every
tensor that names an axis is permuted with it and a new tensor needs no entry here. Each axis' row in
``elastic.axes`` names the logical axis it ranks:

    ``embed``           rankings.hidden              embedding columns, every norm scale, every projection's d
                                                     side, the LM head's input side
    ``mlp``             rankings.mlp[i]              up_proj columns, down_proj rows
    ``heads``           rankings.attention_heads[i]  q_proj heads, o_proj heads (never k/v: ``kv_heads``)
    ``ssm_heads``       rankings.mamba_heads[i]      z/x/dt projections, conv_x, A_log, D, dt_bias, norm, out_proj
    ``mamba_head_dim``  rankings.mamba_head_dim[i]   z/x projections, conv_x, norm, out_proj (never B/C:
                                                     ``ssm_state``)
    ``expert``          rankings.moe_experts[i]      router kernel columns, e_score_correction_bias, both expert
                                                     stacks (within each of the n_group expert groups)
    ``expert_mlp``      rankings.moe_expert_dim[i]   every routed expert's up columns and down rows
    ``shared_mlp``      rankings.moe_shared_dim[i]   the shared expert's up columns and down rows

Depth is not a weight permutation: blocks stay in place and the depth order only drives depth masks.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from elastic_jax.elastic import axes
from elastic_jax.elastic.importance import Rankings
from elastic_jax.model.config import ModelConfig
from elastic_jax.model.hybrid import param_logical_axes
from elastic_jax.train.sharding import DEFAULT_RULES, LogicalRules, param_shardings, shard_params, sharded_jit

Params = dict[str, Any]


class RankingError(ValueError):
  """Rankings that are not valid permutations, or that would move a head out of its group."""


def check_rankings(config: ModelConfig, rankings: Rankings) -> None:
  """Raises ``RankingError`` unless every ranking is a permutation of its axis that respects the group structure.

  Mamba heads may only be reordered within their group (group g owns heads [g*H/G, (g+1)*H/G)); query heads only
  within their KV group (head h reads KV head h // (Hq/Hkv)); routed experts only within their expert group.
  Moving a head across groups would change which B/C group or KV head it reads, and an expert across groups which
  group it is chosen with, i.e. change the function.
  """
  _check_permutation("hidden", rankings.hidden, config.hidden_size)
  for axis in axes.block_axes():
    sizes = {spec.index: axis.block_size(config, spec) for spec in config.block_specs()
             if spec.kind == axis.kind and axes.present(config, axis)}
    given = getattr(rankings, axis.name)
    if set(given) != set(sizes):
      raise RankingError(f"rankings.{axis.name} has entries for blocks {sorted(given)} but pattern "
                         f"{config.pattern!r} needs exactly blocks {sorted(sizes)}.")
    for index, size in sizes.items():
      _check_permutation(f"{axis.name}[{index}]", given[index], size)
  for axis in axes.block_axes():
    if axis.group_field:
      for index, order in getattr(rankings, axis.name).items():
        _check_within_groups(f"{axis.kind} block {index}", axis.unit, axis.group_unit, order, axis.groups(config))
  if rankings.depth is not None:
    _check_permutation("depth", rankings.depth, config.num_layers)


def _check_permutation(name: str, order: Any, size: int) -> None:
  order = np.asarray(order)
  if order.shape != (size,) or not np.issubdtype(order.dtype, np.integer):
    raise RankingError(f"rankings.{name} must be integer indices of shape ({size},); got {order.dtype} "
                       f"{order.shape}.")
  if not np.array_equal(np.sort(order), np.arange(size)):
    raise RankingError(f"rankings.{name} is not a permutation of range({size}): "
                       f"missing {sorted(set(range(size)) - set(order.tolist()))}, repeated "
                       f"{sorted(int(v) for v, c in zip(*np.unique(order, return_counts=True)) if c > 1)}.")


def _check_within_groups(where: str, item: str, group: str, order: Any, num_groups: int) -> None:
  order = np.asarray(order)
  size = order.shape[0] // num_groups
  for position, index in enumerate(order.tolist()):
    if index // size != position // size:
      raise RankingError(
          f"{where}: the ranking puts {item} {index} ({group} {index // size}) at position {position} "
          f"({group} {position // size}); {item}s may only be reordered within their own {group} "
          f"({size} {item}s per {group}), so rank them per {group}.")


@functools.lru_cache(maxsize=None)
def _logical_axes(config: ModelConfig) -> dict[str, Any]:
  return param_logical_axes(config)


def permute_params(config: ModelConfig, params: Params, rankings: Rankings) -> Params:
  """Returns ``params`` with every elastic axis reordered by ``rankings`` (``new[..., k, ...] = old[..., order[k],
  ...]``); ``params`` itself is not modified.

  Pure indexing: works on numpy or jax arrays, and under ``jax.jit`` (rankings may then be traced; they are checked
  with ``check_rankings`` only when concrete, so check them before tracing).
  """
  if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(rankings)):
    check_rankings(config, rankings)
  ranked = axes.by_logical_axis()
  used: set[tuple[str, int]] = set()

  def permute(path: tuple[Any, ...], leaf: Any, spec: jax.sharding.PartitionSpec) -> Any:
    block = _block_index(path)
    for dim, name in enumerate(spec):
      axis = ranked.get(name)
      if axis is None:
        continue
      if axis.per_layer:
        order = getattr(rankings, axis.name)[block]
        used.add((axis.name, block))
      else:
        order = getattr(rankings, axis.name)
      leaf = leaf[(slice(None),) * dim + (order,)]
    return leaf

  permuted = jax.tree.map_with_path(permute, params, _logical_axes(config))
  # Every per-block ranking must have reordered some tensor; otherwise the model's axis names and the registry
  # have drifted apart and the permutation would be silently incomplete.
  for axis in axes.block_axes():
    for block in getattr(rankings, axis.name):
      if (axis.name, block) not in used:
        raise RankingError(f"rankings.{axis.name}[{block}] reordered no parameter: no tensor of layers_{block} "
                           f"names the logical axis {axis.logical_axis!r} it ranks.")
  return permuted


def permute_sharded(config: ModelConfig, params: Params, rankings: Rankings, mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> Params:
  """``permute_params`` as one jitted gather under ``mesh``: the params stay in their shardings
  (``param_shardings``), in and out, so no device ever holds more than its shard of either tree."""
  check_rankings(config, rankings)
  shardings = param_shardings(config, mesh, rules)
  permute = sharded_jit(lambda tree: permute_params(config, tree, rankings), mesh, rules, (shardings,), shardings)
  return permute(shard_params(params, shardings))


def _block_index(path: tuple[Any, ...]) -> int | None:
  """The block index of a parameter path (``layers_3/...`` -> 3); None outside blocks."""
  top = getattr(path[0], "key", None)
  if isinstance(top, str) and top.startswith("layers_"):
    return int(top[len("layers_"):])
  return None
