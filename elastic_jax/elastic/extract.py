"""Zero-shot extraction: slice a sub-network out of the (importance-permuted) parent as a standalone ``HybridLM``.

Every tensor is sliced on every elastic axis it carries, found by its *logical* axis names (the same names the
sharding rules use; each axis' row in ``elastic.axes`` names its logical axis): ``embed`` (hidden channels:
embedding, every norm, every projection's input or output side, the LM head), ``mlp`` (neurons: up columns, down
rows), ``heads`` (query heads: q and o), ``ssm_heads`` (Mamba heads: z, x, dt, conv_x, A_log, D, dt_bias, norm,
out_proj), ``mamba_head_dim`` (channels of every kept Mamba head), ``expert`` (routed experts: router kernel
columns, e_score_correction_bias, both expert stacks), ``expert_mlp`` (every kept expert's neurons) and
``shared_mlp`` (the shared expert's neurons). B/C (``ssm_groups``, ``ssm_state``), KV heads
and the attention head dim are never touched. Blocks outside the kept depth are dropped and the rest renumbered in
pattern order.

The kept indices come from ``masks.kept_indices`` / ``masks.kept_blocks``, i.e. from the very prefix rule the masks
use, so the masked parent and the extracted child compute the same function (spec D-2).

Works on numpy arrays, JAX arrays, and under ``jax.eval_shape`` on ``jax.ShapeDtypeStruct`` trees (to size a
child without allocating it).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from elastic_jax.elastic import axes
from elastic_jax.elastic.masks import kept_blocks, kept_indices
from elastic_jax.elastic.space import Choice
from elastic_jax.model.config import ModelConfig
from elastic_jax.model.hybrid import param_logical_axes
from elastic_jax.train.sharding import DEFAULT_RULES, LogicalRules, param_shardings, shard_params, sharded_jit

Params = dict[str, Any]


def child_config(config: ModelConfig, choice: Choice, depth_order: Any = None) -> ModelConfig:
  """The config of the sub-network ``choice``: dropped blocks removed from the pattern, widths of the kept blocks.

  A kind whose kept blocks all have the same size gets the plain (homogeneous, HF-exportable) field; otherwise
  the ``*_per_layer`` tuple lists the kept blocks' sizes in pattern order.
  """
  choice.validate(config)
  kept = kept_blocks(choice.depth, depth_order, config.num_layers)
  specs = config.block_specs()
  changes: dict[str, Any] = {"pattern": "".join(config.pattern[i] for i in kept)}
  kept_set = set(kept.tolist())
  for axis in axes.AXES:
    if not axis.per_layer:
      if axis.name != "depth":  # depth is the pattern above
        changes[axis.config_field] = getattr(choice, axis.name)
      continue
    field, per_layer_field = axis.config_field, axis.per_layer_field
    kind_blocks = [spec.index for spec in specs if spec.kind == axis.kind]
    values = tuple(v for v, index in zip(getattr(choice, axis.name), kind_blocks) if index in kept_set)
    if len(set(values)) > 1:
      if per_layer_field is None:
        raise ValueError(f"{axis.name} differs between the kept {axis.kind} blocks ({list(values)}) but ModelConfig "
                         f"has no per-layer field for {field}; choose one size for every block.")
      changes[field], changes[per_layer_field] = max(values), values
    else:
      if per_layer_field is not None:
        changes[per_layer_field] = None
      if values:
        changes[field] = values[0]
      elif getattr(config, field) <= 0 and axes.present(config, axis):  # no block of this kind survives; any
        changes[field] = max(getattr(choice, axis.name))  # valid scalar will do
  return config.replace(**changes)


@functools.lru_cache(maxsize=16)
def _logical_axes(config: ModelConfig) -> dict[str, Any]:
  """Parameter path -> logical axis names, from the model's own declarations."""
  leaves = jax.tree_util.tree_flatten_with_path(param_logical_axes(config),
                                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
  return {_path_str(path): tuple(spec) for path, spec in leaves}


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _kept_units(config: ModelConfig, choice: Choice) -> dict[str, Any]:
  """The kept indices of each elastic logical axis: of the global ones, and per block (pattern index) of those it
  carries."""
  global_units = {axis.logical_axis: kept_indices(getattr(choice, axis.name), getattr(config, axis.config_field),
                                                  axis.groups(config))
                  for axis in axes.AXES if not axis.per_layer and axis.logical_axis}
  per_block: dict[int, dict[str, np.ndarray]] = {}
  for spec in config.block_specs():
    units = dict(global_units)
    for axis in axes.block_axes(spec.kind):
      units[axis.logical_axis] = kept_indices(getattr(choice, axis.name)[spec.kind_index],
                                              axis.block_size(config, spec), axis.groups(config))
    per_block[spec.index] = units
  return {"global": global_units, "blocks": per_block}


def _take(x: Any, axis: int, indices: np.ndarray) -> Any:
  """x restricted to ``indices`` along ``axis``: a slice when they are a prefix (no gather), else an index array."""
  if len(indices) == x.shape[axis]:
    return x
  where = (slice(None),) * axis
  if np.array_equal(indices, np.arange(len(indices))):
    return x[where + (slice(0, len(indices)),)]
  return x[where + (indices,)]


def _slice_leaf(x: Any, names: tuple[str | None, ...], units: Mapping[str, np.ndarray]) -> Any:
  for axis, name in enumerate(names):
    if name in units:
      x = _take(x, axis, units[name])
  if isinstance(x, np.ndarray) and x.base is not None:
    x = np.ascontiguousarray(x) if not x.flags.c_contiguous else x.copy()  # do not keep the parent alive
  return x


def extract_params(config: ModelConfig, params: Mapping[str, Any], choice: Choice,
                   depth_order: Any = None) -> Params:
  """The child's parameter tree (see ``extract``); traceable, so ``jax.eval_shape`` sizes it abstractly."""
  choice.validate(config)
  axes = _logical_axes(config)
  units = _kept_units(config, choice)
  kept = kept_blocks(choice.depth, depth_order, config.num_layers)
  global_units = units["global"]

  def slice_tree(tree: Mapping[str, Any], prefix: str, block_units: Mapping[str, np.ndarray]) -> Params:
    out: Params = {}
    for name, node in tree.items():
      path = f"{prefix}/{name}" if prefix else name
      if isinstance(node, Mapping):
        out[name] = slice_tree(node, path, block_units)
      else:
        if path not in axes:
          raise KeyError(f"param {path} is not part of HybridLM({config.pattern!r}); is this the parent's tree?")
        out[name] = _slice_leaf(node, axes[path], block_units)
    return out

  child: Params = {}
  for name in ("embed", "norm_f", "lm_head"):
    child[name] = slice_tree(params[name], name, global_units)
  for new_index, old_index in enumerate(kept.tolist()):
    name = f"layers_{old_index}"
    child[f"layers_{new_index}"] = slice_tree(params[name], name, units["blocks"][old_index])
  return child


def extract(config: ModelConfig, params: Mapping[str, Any], choice: Choice,
            depth_order: Any = None) -> tuple[ModelConfig, Params]:
  """Slices the sub-network ``choice`` out of ``params`` (already permuted into importance order).

  Args:
    config: the parent's config.
    params: the parent's parameter tree (numpy or JAX arrays).
    choice: the sub-network; validated against ``config``.
    depth_order: block indices, most important first (needed when ``choice.depth`` drops blocks).

  Returns:
    ``(child_config, child_params)``: a plain ``HybridLM(child_config)`` and its parameters, same array type and
    dtype as ``params``. Sliced numpy arrays are fresh copies (no view keeps the parent alive); tensors no axis
    shrinks (e.g. B/C projections at full width) are the parent's own arrays, shared rather than copied.
  """
  return child_config(config, choice, depth_order), extract_params(config, params, choice, depth_order)


def extract_sharded(config: ModelConfig, params: Mapping[str, Any], choice: Choice, depth_order: Any, mesh: Mesh,
                    rules: LogicalRules = DEFAULT_RULES) -> tuple[ModelConfig, Params]:
  """``extract`` as one jitted program under ``mesh``: the parent's params are read in their shardings and the
  child's are written straight into its own (``param_shardings`` of the child config), never gathered whole."""
  child = child_config(config, choice, depth_order)
  parent_shardings = param_shardings(config, mesh, rules)
  slice_child = sharded_jit(lambda tree: extract_params(config, tree, choice, depth_order), mesh, rules,
                            (parent_shardings,), param_shardings(child, mesh, rules))
  return child, slice_child(shard_params(params, parent_shardings))
