"""Activation importance of every elastic axis, and the rankings that put each axis in importance order.

Calibration runs forward passes only (spec §4). The model sows, per block and per sample, ``mean_t |a|`` of

    ``hidden`` the block's normed input [d]         ``mlp``   the up-projection output [F] (D-3)
    ``heads``  per-head attention output [Hq, hd]    ``ssm``   the x slice of in_proj [H, P]
    ``expert`` a routed expert's output norm [E]    ``expert_mlp`` its up-projection output [E, I]
    ``shared_mlp`` the shared expert's up-projection output [S]

(for the routed experts a token not sent to an expert counts 0 there, so ``mean_t`` of the output norm is the
expert's routing frequency times its mean output norm over the tokens it gets)

into the "importance" collection. Here each statistic is squared, summed over samples and batches (fp32) and square
rooted; the axis scores derive from those aggregates:

    hidden channel   sum over blocks of the aggregated ``hidden`` statistic       [d]
    MLP neuron       aggregated ``mlp``                                            [F]   per MLP block
    attention head   L2 over head_dim of aggregated ``heads``                      [Hq]  per attention block
    Mamba channel    L2 over heads of aggregated ``ssm``                           [P]   per Mamba block
    Mamba head       L2 over channels of aggregated ``ssm``                        [H]   per Mamba block
    routed expert    aggregated ``expert``                                         [E]   per MoE block
    expert neuron    L2 over experts of aggregated ``expert_mlp``                  [I]   per MoE block
    shared neuron    aggregated ``shared_mlp``                                     [S]   per MoE block
    depth            iterative normalized logit MSE of removing blocks (below)

Mamba head scores use *all* channels. The spec's "L2 over the kept channels" comes from one-shot pruning
(Minitron-SSM), where the channel count is fixed before heads are scored. Here every budget keeps a different
channel prefix, and nesting needs one head order shared by all of them; scoring over all channels is the only
choice that favours no budget. The aggregated [H, P] matrix is kept (``mamba_activations``) for anyone who wants
head scores over a channel prefix.

Routed experts are scored by routing frequency x mean output norm (the expert's output before its routing weight):
an expert few tokens reach, or one whose output is small, changes the block's output least when dropped; the
routing weight is left out because dropping an expert renormalises the others' weights over the kept ones. Expert
neurons share one order per block (every expert keeps the same neuron prefix, so one ranking must serve them all);
the L2 over experts weighs each expert by how much of the data it sees.

Usage::

  importance = estimate_importance(config, params, batches)   # batches: iterable of int32 [b, l] token arrays
  order = rankings(importance, config)
  params = permute_params(config, params, order)               # elastic_jax.elastic.permute
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from tqdm.auto import tqdm

from elastic_jax.elastic import axes
from elastic_jax.model.config import ModelConfig
from elastic_jax.model.hybrid import HybridLM
from elastic_jax.train.sharding import (DEFAULT_RULES, LogicalRules, batch_sharding, host_to_global, make_mesh,
                                        param_shardings, replicated, shard_params, sharded_jit)

Array = jax.Array
Params = dict[str, Any]

# The statistics each block kind's mixer sows, by the name the model sows them under: their shape in a block.
_MIXER_STATISTICS: dict[str, dict[str, Callable[[ModelConfig, Any], tuple[int, ...]]]] = {
    "mlp": {"mlp": lambda config, spec: (spec.intermediate_size,)},
    "attention": {"heads": lambda config, spec: (spec.num_attention_heads, config.head_dim)},
    "mamba": {"ssm": lambda config, spec: (spec.mamba_num_heads, spec.mamba_head_dim)},
    "moe": {"expert": lambda config, spec: (spec.n_routed_experts,),
            "expert_mlp": lambda config, spec: (spec.n_routed_experts, spec.moe_intermediate_size),
            "shared_mlp": lambda config, spec: (spec.moe_shared_expert_intermediate_size,)},
}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim",
                                "mamba_activations", "depth_scores", "depth_order", "moe_experts", "moe_expert_dim",
                                "moe_shared_dim"],
                   meta_fields=["num_samples"])
@dataclasses.dataclass(frozen=True)
class Importance:
  """Importance scores per elastic axis (higher = more important); per-block entries keyed by block index.

  depth_scores[j] is the normalized logit MSE of the model with block j and every block removed before it removed,
  i.e. the cost at the moment j was removed; depth_order lists block indices most important first (the reverse
  removal order). Both are None when depth was not estimated.
  """

  hidden: np.ndarray  # [d]
  mlp: dict[int, np.ndarray]  # MLP block -> [F]
  attention_heads: dict[int, np.ndarray]  # attention block -> [Hq]
  mamba_heads: dict[int, np.ndarray]  # Mamba block -> [H]
  mamba_head_dim: dict[int, np.ndarray]  # Mamba block -> [P]
  mamba_activations: dict[int, np.ndarray]  # Mamba block -> [H, P] aggregated x statistic
  depth_scores: np.ndarray | None  # [num_layers]
  depth_order: np.ndarray | None  # [num_layers] block indices, most important first
  moe_experts: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # MoE block -> [E]
  moe_expert_dim: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # MoE block -> [I]
  moe_shared_dim: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # MoE block -> [S]
  num_samples: int = 0


class Rankings:
  """Permutation indices per elastic axis: ``order[new_position] = old_index``, most important first.

  ``Rankings(hidden=..., mlp=..., attention_heads=..., mamba_heads=..., mamba_head_dim=..., depth=None)``: one
  keyword per axis of the registry that reorders parameters (every axis with a logical axis; a block axis left out
  is empty, for a parent without such blocks), read back as attributes. Per-block entries are dicts keyed by block
  index. attention_heads, mamba_heads and moe_experts reorder heads / experts only within their KV group / Mamba
  group / expert group (each group's slice of positions holds that group's own). mamba_head_dim is shared by all
  heads of its block, moe_expert_dim by all experts of its block. depth is an order over blocks used by depth
  masks; blocks never move. A pytree whose leaves are the orders, in registry order.
  """

  __slots__ = ("_orders",)

  def __init__(self, *, depth: np.ndarray | None = None, **orders: Any):
    names = ranked_axis_names()
    if not axes.keys_fit(orders, names):
      raise TypeError(axes.rename_hint(orders, names, "Rankings() fields (depth aside)"))
    object.__setattr__(self, "_orders", {**{name: orders.get(name, {}) for name in names}, "depth": depth})

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_"):
      raise AttributeError(name)
    try:
      return self._orders[name]
    except KeyError:
      raise AttributeError(f"Rankings has no field {name!r}; fields are {list(self._orders)}.") from None

  def __setattr__(self, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

  def __repr__(self) -> str:
    return f"Rankings({', '.join(f'{k}={v!r}' for k, v in self._orders.items())})"

  def fields(self) -> dict[str, Any]:
    """Every order by field name (the ranked axes, then depth): ``Rankings(**r.fields())`` copies ``r``."""
    return dict(self._orders)

  @classmethod
  def identity(cls, config: ModelConfig) -> "Rankings":
    """The rankings that leave every axis in its current order."""
    orders: dict[str, Any] = {}
    for axis in ranked_axes():
      if axis.per_layer:
        orders[axis.name] = {s.index: np.arange(axis.block_size(config, s)) for s in config.block_specs()
                             if s.kind == axis.kind and axes.present(config, axis)}
      else:
        orders[axis.name] = np.arange(getattr(config, axis.config_field))
    return cls(**orders, depth=np.arange(config.num_layers))

  def to_json(self) -> dict[str, Any]:
    """Plain lists (block indices as string keys), as ``rankings.json`` stores them."""
    out: dict[str, Any] = {}
    for name, order in self._orders.items():
      if isinstance(order, dict):
        out[name] = {str(k): np.asarray(v).tolist() for k, v in order.items()}
      else:
        out[name] = None if order is None else np.asarray(order).tolist()
    return out

  @classmethod
  def from_json(cls, values: dict[str, Any], where: str = "rankings") -> "Rankings":
    """The inverse of ``to_json``. Keys that are not the axis names (a file written before the axis names were
    unified) raise a ``ValueError`` that says which key to rename."""
    names = ranked_axis_names()
    if not axes.keys_fit(values, (*names, "depth")):
      raise ValueError(axes.rename_hint(values, (*names, "depth"), where))
    orders = {}
    for axis in ranked_axes():
      value = values.get(axis.name, {})
      orders[axis.name] = ({int(k): np.asarray(v) for k, v in value.items()} if axis.per_layer
                           else np.asarray(value))
    return cls(**orders, depth=None if values["depth"] is None else np.asarray(values["depth"]))


def ranked_axes() -> tuple[axes.ElasticAxis, ...]:
  """The axes whose rankings reorder parameters (those with a logical axis), in registry order."""
  return tuple(a for a in axes.AXES if a.logical_axis)


def ranked_axis_names() -> tuple[str, ...]:
  return tuple(a.name for a in ranked_axes())


jax.tree_util.register_pytree_node(
    Rankings, lambda r: (tuple(r.fields().values()), tuple(r.fields())),
    lambda names, orders: Rankings(**dict(zip(names, orders))))


# ------------------------------------------------------------------------------------------------ statistics
def _zero_sums(config: ModelConfig) -> dict[str, dict[int, Array]]:
  """fp32 accumulators of Σ_samples stat²: {"hidden": {i: [d]}, statistic: {i: [...]}} (a block's entry absent
  where the statistic is empty, e.g. no shared expert)."""
  sums: dict[str, dict[int, Array]] = {"hidden": {}}
  sums.update({name: {} for stats in _MIXER_STATISTICS.values() for name in stats})
  for spec in config.block_specs():
    sums["hidden"][spec.index] = jnp.zeros((config.hidden_size,), jnp.float32)
    for name, shape_of in _MIXER_STATISTICS.get(spec.kind, {}).items():
      shape = shape_of(config, spec)
      if all(shape):
        sums[name][spec.index] = jnp.zeros(shape, jnp.float32)
  return sums


def _accumulate_statistics(config: ModelConfig, sums: dict[str, dict[int, Array]], params: Params,
                           tokens: Array) -> dict[str, dict[int, Array]]:
  """sums + Σ over this batch's samples of the squared per-sample statistics. Under a mesh the batch is split over
  the data-parallel devices and the sums over samples are reduced inside the program (replicated result)."""
  _, state = HybridLM(config).apply({"params": params}, tokens, mutable=["importance"])
  sown = state["importance"]

  def add(total: Array, per_sample: tuple[Array]) -> Array:  # flax sow stores a 1-tuple; per_sample [b, ...]
    return total + jnp.sum(jnp.square(per_sample[0].astype(jnp.float32)), axis=0)

  new = {name: dict(per_block) for name, per_block in sums.items()}
  for spec in config.block_specs():
    block = sown[f"layers_{spec.index}"]
    new["hidden"][spec.index] = add(sums["hidden"][spec.index], block["hidden"])
    for name in _MIXER_STATISTICS.get(spec.kind, {}):
      if spec.index in sums[name]:
        new[name][spec.index] = add(sums[name][spec.index], block["mixer"][name])
  return new


# ------------------------------------------------------------------------------------------------ depth
def _logits_with_blocks(config: ModelConfig, params: Params, tokens: Array, keep: Array) -> Array:
  """Logits [b, l, V] with block j skipped where keep[j] == 0; keep [num_layers] is an input, so one compile."""
  depth = jnp.broadcast_to(keep.astype(jnp.float32), (tokens.shape[0], config.num_layers))
  return HybridLM(config).apply({"params": params}, tokens, masks={"depth": depth})


def _removal_error(config: ModelConfig, params: Params, tokens: Array, reference: Array, keep: Array) -> Array:
  """Σ (reference − logits with the blocks of ``keep`` only)², reduced inside the program to one fp32 scalar."""
  return jnp.sum(jnp.square(reference - _logits_with_blocks(config, params, tokens, keep)))


@dataclasses.dataclass(frozen=True)
class CalibrationPrograms:
  """The calibration programs compiled for one mesh: params stay in their shardings, token batches are split over
  the data-parallel devices, and only sums and scalars (replicated) come back to the host, identical on every
  process."""

  place_params: Callable[[Params], Params]
  place_tokens: Callable[[np.ndarray], Array]
  accumulate: Callable
  logits: Callable
  removal_error: Callable
  energy: Callable


@functools.lru_cache(maxsize=8)
def calibration_programs(config: ModelConfig, mesh: Mesh | None, rules: LogicalRules | None) -> CalibrationPrograms:
  if mesh is None:  # one device: the default device, as a one-device mesh
    mesh = make_mesh((1,), devices=jax.devices()[:1])
  rules = DEFAULT_RULES if rules is None else rules
  params = param_shardings(config, mesh, rules)
  tokens = batch_sharding(mesh, rules)
  logits = nn.logical_to_mesh_sharding(PartitionSpec("batch", "length", "vocab"), mesh, rules)  # as the model's
  everywhere = replicated(mesh)
  return CalibrationPrograms(
      place_params=lambda tree: shard_params(tree, params),
      place_tokens=lambda batch: host_to_global(np.asarray(batch, np.int32), tokens),
      accumulate=sharded_jit(functools.partial(_accumulate_statistics, config), mesh, rules,
                             (everywhere, params, tokens), everywhere, donate_argnums=(0,)),
      logits=sharded_jit(functools.partial(_logits_with_blocks, config), mesh, rules,
                         (params, tokens, everywhere), logits),
      removal_error=sharded_jit(functools.partial(_removal_error, config), mesh, rules,
                                (params, tokens, logits, everywhere), everywhere),
      energy=sharded_jit(lambda reference: jnp.sum(jnp.square(reference)), mesh, rules, (logits,), everywhere))


def _depth_importance(config: ModelConfig, programs: CalibrationPrograms, params: Params, batches: list[Array],
                      progress: bool) -> tuple[np.ndarray, np.ndarray]:
  """Iterative block removal by normalized logit MSE against the full model (spec §4).

  Each step removes, on top of the blocks already removed, the block whose removal raises
  Σ(M_full − M_without)² / Σ M_full² the least (lowest index on ties). Returns (depth_scores [L], depth_order [L]).
  """
  num_layers = config.num_layers
  full = np.ones((num_layers,), np.float32)
  keep = full.copy()
  scores = np.zeros((num_layers,), np.float64)
  removal_order: list[int] = []
  reference_energy = 0.0  # Σ M_full², the same for every step
  for step in tqdm(range(num_layers), desc="depth importance", disable=not progress):
    candidates = np.flatnonzero(keep)
    errors = np.zeros((len(candidates),), np.float64)
    for tokens in batches:
      # Recomputed per step rather than held for all batches: at scale the full logits of a calibration set do not
      # fit in memory, and one extra forward per step is small next to one per candidate. They stay on the devices
      # in their shardings; only each candidate's summed error (a scalar) comes back.
      reference = programs.logits(params, tokens, full)
      if step == 0:
        reference_energy += float(programs.energy(reference))
      for c, block in enumerate(candidates):
        without = keep.copy()
        without[block] = 0.0
        errors[c] += float(programs.removal_error(params, tokens, reference, without))
    best = int(np.argmin(errors))  # first minimum: ties go to the lowest block index
    removed = int(candidates[best])
    keep[removed] = 0.0
    scores[removed] = errors[best] / max(reference_energy, np.finfo(np.float64).tiny)
    removal_order.append(removed)
  return scores, np.asarray(removal_order[::-1], np.int64)


# ------------------------------------------------------------------------------------------------ public API
def estimate_importance(config: ModelConfig, params: Params, batches: Iterable[Array | np.ndarray], *,
                        depth: bool = True, depth_batches: int | None = None, progress: bool = True,
                        mesh: Mesh | None = None, rules: LogicalRules | None = None) -> Importance:
  """Scores every elastic axis of ``params`` on calibration ``batches`` (int32 token arrays [b, l]).

  Every token of every sample counts (no padding mask). Batches may differ in shape (one compile per shape).
  depth: also run the iterative depth ranking, which costs about num_layers²/2 forwards per batch it uses;
  depth_batches limits it to the first that many batches (None: all). progress: show tqdm progress bars.
  mesh, rules: run every calibration program under this mesh (default: one device). ``params`` are placed in (or
  already live in) their shardings; each batch, the same on every process, is split over the data-parallel devices
  (its size must divide over them); only the statistics and the depth errors come back, identical on every process.
  """
  batches = [np.asarray(tokens) for tokens in batches]  # kept: the depth ranking passes over them many times
  if not batches:
    raise ValueError("estimate_importance needs at least one calibration batch of tokens [b, l].")
  for i, tokens in enumerate(batches):
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"calibration batch {i} must be integer tokens [b, l]; got {tokens.dtype} {tokens.shape}.")
  if depth and depth_batches is not None and depth_batches < 1:
    raise ValueError(f"depth_batches={depth_batches} must be >= 1 (or None for all batches), or pass depth=False.")

  programs = calibration_programs(config, mesh, rules)
  params = programs.place_params(params)
  placed = [programs.place_tokens(tokens) for tokens in batches]
  sums = _zero_sums(config)
  num_samples = 0
  for tokens in tqdm(placed, desc="importance statistics", disable=not progress):
    sums = programs.accumulate(sums, params, tokens)
    num_samples += tokens.shape[0]
  aggregated = jax.tree.map(lambda s: np.sqrt(np.asarray(s, np.float32)), sums)  # sqrt(Σ_samples stat²)

  hidden = np.sum(np.stack(list(aggregated["hidden"].values())), axis=0)
  attention_heads = {i: np.linalg.norm(a, axis=-1) for i, a in aggregated["heads"].items()}
  mamba_heads = {i: np.linalg.norm(a, axis=1) for i, a in aggregated["ssm"].items()}
  mamba_head_dim = {i: np.linalg.norm(a, axis=0) for i, a in aggregated["ssm"].items()}
  moe_expert_dim = {i: np.linalg.norm(a, axis=0) for i, a in aggregated["expert_mlp"].items()}

  depth_scores = depth_order = None
  if depth:
    depth_set = placed if depth_batches is None else placed[:depth_batches]
    depth_scores, depth_order = _depth_importance(config, programs, params, depth_set, progress)
  return Importance(hidden=hidden, mlp=dict(aggregated["mlp"]), attention_heads=attention_heads,
                    mamba_heads=mamba_heads, mamba_head_dim=mamba_head_dim,
                    mamba_activations=dict(aggregated["ssm"]), depth_scores=depth_scores, depth_order=depth_order,
                    moe_experts=dict(aggregated["expert"]), moe_expert_dim=moe_expert_dim,
                    moe_shared_dim=dict(aggregated["shared_mlp"]), num_samples=num_samples)


def descending_order(scores: np.ndarray) -> np.ndarray:
  """Indices by descending score; equal scores keep ascending index order (stable), so rankings are deterministic."""
  return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def descending_order_within_groups(scores: np.ndarray, num_groups: int) -> np.ndarray:
  """Like ``descending_order``, but each of ``num_groups`` contiguous groups is ranked in its own slice.

  Group g's positions [g*n, (g+1)*n) hold group g's own indices, so a prefix of every group is a valid nested mask
  and no head ever leaves its group.
  """
  scores = np.asarray(scores)
  size = scores.shape[0] // num_groups
  return np.concatenate([g * size + descending_order(scores[g * size:(g + 1) * size]) for g in range(num_groups)])


def rankings(importance: Importance, config: ModelConfig) -> Rankings:
  """Permutation indices that sort every axis of ``config`` by ``importance``, most important first.

  Mamba heads are ranked within each of the n_groups groups (spec §3), query heads within each KV group (D-1),
  routed experts within each of the n_group expert groups (group-limited routing picks groups by position).
  """
  orders: dict[str, Any] = {}
  for axis in ranked_axes():
    scores, groups = getattr(importance, axis.name), axis.groups(config)
    rank = descending_order if groups == 1 else functools.partial(descending_order_within_groups, num_groups=groups)
    if axis.per_layer:
      orders[axis.name] = {s.index: rank(scores[s.index]) for s in config.block_specs()
                           if s.kind == axis.kind and axes.present(config, axis)}
    else:
      orders[axis.name] = rank(scores)
  return Rankings(**orders, depth=None if importance.depth_order is None else np.asarray(importance.depth_order))
