"""The elastic axes: one row per axis, read by everything that handles an axis.

A row names the axis once. That name is the key of the axis in the search space (``ElasticSpace``), in a
sub-network (``Choice``), in permutation rankings (``Rankings``), in router logits, in configs and in reports. The
row also says where the axis lives in the model:

- ``kind``: the block kind whose blocks it shrinks ("mamba", "attention", "mlp"); ``None`` for the two global axes
  (hidden channels, depth).
- ``config_field`` / ``per_layer_field``: the ``ModelConfig`` field with the parent's size (also the ``BlockSpec``
  field for block axes that have a per-layer field) and the ``*_per_layer`` field a heterogeneous child lists its
  sizes in (``None``: every block of the kind has the same size, so choices of the axis are homogeneous).
- ``group_field``: the ``ModelConfig`` field counting the groups every kept count splits evenly over (Mamba groups,
  KV groups); a sub-network keeps the same prefix inside every group.
- ``logical_axis``: the logical axis name the model's parameters carry along this axis. Permutation reorders and
  extraction slices every tensor dimension that names it, and a block's mask for the axis is
  ``masks["layers_{i}"][logical_axis]``. For block axes it is the axis name itself where the model allows.
- ``count_arg``: the argument of its block kind's parameter-count formula (``elastic.param_count``) this axis'
  size feeds.
- ``prune_rank``: the order in which the pruning baseline (``elastic_jax.prune``) shrinks axes, smallest first.
- ``minimum``: the ``ModelConfig`` method giving the smallest size a block may keep on this axis, and why, when
  that is more than one group (routed experts: ``ModelConfig.min_routed_experts``); ``None``: one group.

MoE blocks have three axes: the routed experts kept (``moe_experts``; the router's kernel columns, its correction
bias and the expert stacks, ranked within each of the n_group expert groups), the routed experts' width
(``moe_expert_dim``: one neuron order shared by every expert of a block, as Mamba head channels are shared by every
head) and the shared expert's width (``moe_shared_dim``, its own row: the shared expert is an MLP of its own width,
and one row per width keeps masks, slicing and counting generic; an E block without shared expert has no such
axis).

Adding an axis is one row here plus its model code: the modules that apply its mask and name its logical axis, the
formula term in ``param_count`` and its importance score. Space, masks, permutation, extraction, parameter
counts, the router and reports pick the row up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from elastic_jax.model.config import BlockSpec, ModelConfig


@dataclasses.dataclass(frozen=True)
class ElasticAxis:
  """One elastic axis (see the module docstring for each field)."""

  name: str
  kind: str | None
  config_field: str
  per_layer_field: str | None = None
  group_field: str | None = None
  logical_axis: str | None = None
  count_arg: str | None = None
  prune_rank: int = 0
  # What one index of the axis is, and what one group is, in error messages.
  unit: str = "unit"
  group_unit: str = "group"
  minimum: str | None = None

  @property
  def per_layer(self) -> bool:
    """True for axes sized per block of their kind; False for hidden and depth."""
    return self.kind is not None

  @property
  def mode_field(self) -> str | None:
    """The ``ElasticSpace`` field that makes this axis homogeneous or heterogeneous (one per block kind)."""
    return f"{self.kind}_mode" if self.per_layer else None

  @property
  def mask_key(self) -> str:
    """Where the axis' mask sits: ``masks[mask_key]`` for global axes, ``masks["layers_{i}"][mask_key]`` else."""
    return self.logical_axis if self.per_layer else self.name

  def groups(self, config: ModelConfig) -> int:
    """Kept counts must be multiples of this: every group keeps the same number of its own units."""
    return getattr(config, self.group_field) if self.group_field else 1

  def group_rule(self, config: ModelConfig) -> str:
    return f"{self.group_field}={self.groups(config)}"

  def min_size(self, config: ModelConfig) -> tuple[int, str]:
    """The smallest size a sub-network may keep on this axis and the rule behind it (one group, unless the row
    names a ``ModelConfig`` method that says more)."""
    if self.minimum:
      return getattr(config, self.minimum)()
    return self.groups(config), (f"one {self.group_unit}" if self.group_field else f"one {self.unit}")

  def block_size(self, config: ModelConfig, spec: BlockSpec) -> int:
    """The parent's size of this block axis in block ``spec``: the ``BlockSpec`` width where the axis has a
    per-layer field, else the config's single value."""
    return getattr(spec if self.per_layer_field else config, self.config_field)

  def parent_sizes(self, config: ModelConfig) -> tuple[int, ...]:
    """The parent's size per block of this axis' kind (pattern order); one entry for global axes."""
    if not self.per_layer:
      return (getattr(config, self.config_field),)
    return tuple(self.block_size(config, spec) for spec in config.block_specs() if spec.kind == self.kind)


AXES: tuple[ElasticAxis, ...] = (
    ElasticAxis("hidden", None, "hidden_size", logical_axis="embed", count_arg="hidden", prune_rank=4,
                unit="hidden channel"),
    ElasticAxis("mlp", "mlp", "intermediate_size", "intermediate_size_per_layer", logical_axis="mlp",
                count_arg="neurons", prune_rank=0, unit="neuron"),
    ElasticAxis("attention_heads", "attention", "num_attention_heads", "num_attention_heads_per_layer",
                group_field="num_key_value_heads", logical_axis="heads", count_arg="heads", prune_rank=6,
                unit="query head", group_unit="KV group"),
    ElasticAxis("mamba_heads", "mamba", "mamba_num_heads", "mamba_num_heads_per_layer", group_field="n_groups",
                logical_axis="ssm_heads", count_arg="heads", prune_rank=3, unit="head", group_unit="group"),
    ElasticAxis("mamba_head_dim", "mamba", "mamba_head_dim", "mamba_head_dim_per_layer",
                logical_axis="mamba_head_dim", count_arg="head_dim", prune_rank=7, unit="channel"),
    ElasticAxis("moe_experts", "moe", "n_routed_experts", "n_routed_experts_per_layer", group_field="n_group",
                logical_axis="expert", count_arg="experts", prune_rank=5, unit="routed expert",
                group_unit="expert group", minimum="min_routed_experts"),
    ElasticAxis("moe_expert_dim", "moe", "moe_intermediate_size", "moe_intermediate_size_per_layer",
                logical_axis="expert_mlp", count_arg="expert_width", prune_rank=1, unit="expert neuron"),
    ElasticAxis("moe_shared_dim", "moe", "moe_shared_expert_intermediate_size",
                "moe_shared_expert_intermediate_size_per_layer", logical_axis="shared_mlp", count_arg="shared_width",
                prune_rank=2, unit="shared expert neuron"),
    ElasticAxis("depth", None, "num_layers", prune_rank=8, unit="block"),
)


# Every function below reads ``AXES`` when called, so a test may extend the registry for its duration.
def names() -> tuple[str, ...]:
  """Every axis name, in registry order."""
  return tuple(a.name for a in AXES)


def get(name: str) -> ElasticAxis:
  """The row of axis ``name``; a ``KeyError`` naming the axes otherwise."""
  for a in AXES:
    if a.name == name:
      return a
  raise KeyError(f"unknown elastic axis {name!r}; axes are {list(names())}.")


def block_axes(kind: str | None = None) -> tuple[ElasticAxis, ...]:
  """The per-layer axes (of block kind ``kind`` when given), in registry order."""
  return tuple(a for a in AXES if a.per_layer and (kind is None or a.kind == kind))


def block_axis_names() -> tuple[str, ...]:
  return tuple(a.name for a in block_axes())


def mode_fields() -> tuple[str, ...]:
  """The space's mode fields (one per block kind that has an axis), in registry order."""
  return tuple(dict.fromkeys(a.mode_field for a in block_axes()))


def by_logical_axis() -> dict[str, ElasticAxis]:
  """Logical parameter axis name -> the elastic axis that permutes and slices it."""
  return {a.logical_axis: a for a in AXES if a.logical_axis}


def kind_count(config: ModelConfig, kind: str) -> int:
  """Number of blocks of ``kind`` ("mamba" | "attention" | "mlp") in the pattern."""
  return sum(1 for spec in config.block_specs() if spec.kind == kind)


def present(config: ModelConfig, axis: ElasticAxis) -> bool:
  """Global axes always; block axes when the pattern has a block of their kind and those blocks have the axis (an
  E block's shared expert may be absent: width 0)."""
  return not axis.per_layer or (kind_count(config, axis.kind) > 0 and min(axis.parent_sizes(config)) > 0)


def keys_fit(found: Iterable[str], expected: Iterable[str]) -> bool:
  """Whether stored per-axis keys (a choice, rankings) can be read as ``expected``: no unknown key and every global
  axis there. Block axes may be absent (a file written before the axis existed); they are then empty, which only a
  parent without such blocks accepts."""
  found, expected = set(found), set(expected)
  return found <= expected and all(n in found for n in expected - {a.name for a in block_axes()})


def rename_hint(found: Iterable[str], expected: Iterable[str], what: str) -> str:
  """An error message for keys that do not match the axis names: which are unknown or missing, and, when one key
  replaces another, the rename that converts a file written before the axis names were unified."""
  found, expected = set(found), set(expected)
  unknown, missing = sorted(found - expected), sorted(expected - found)
  message = f"{what}: unknown {unknown}, missing {missing}; expected exactly {sorted(expected)}."
  if len(unknown) == len(missing) == 1:
    message += (f" Files written before the axis names were unified (elastic_jax.elastic.axes) name an axis "
                f"differently: rename the key {unknown[0]!r} to {missing[0]!r}.")
  return message
