"""The elastic search space (candidate sizes per axis) and one point in it, a ``Choice`` (one sub-network).

Axes (spec §3): hidden channels, MLP neurons, attention query heads, Mamba heads, Mamba head channels, MoE routed
experts, routed-expert neurons and shared-expert neurons, and depth (the number of blocks kept, taken from the top
of the depth ranking). Mamba groups, SSM state, B/C, KV heads, the attention head dim, num_experts_per_tok and the
MoE latent size are never elastic.

Granularity: Mamba head counts are multiples of ``n_groups`` (each group keeps the same number of its own heads),
query head counts multiples of ``num_key_value_heads`` (each KV group keeps the same number, D-1) and routed expert
counts multiples of ``n_group``, at least ``ModelConfig.min_routed_experts`` (group-limited routing scores a group
by its two best experts and draws num_experts_per_tok experts from topk_group groups).

``homogeneous`` mode gives every block of a kind the same size; ``heterogeneous`` mode lets each block pick its
own candidate (the router then has one set of logits per block of that kind). Hidden and depth are global.

Candidates are stored in ascending order: a router's logit ``i`` always means the ``i``-th smallest size.

Both classes are keyed by the axis registry (``elastic.axes``): a space has one candidate tuple per axis and one mode
per block kind, a choice one size (global axes) or one tuple of sizes (block axes) per axis, each readable as an
attribute (``space.mlp``, ``choice.mamba_head_dim``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_jax.elastic import axes
from elastic_jax.elastic.axes import ElasticAxis
from elastic_jax.model.config import ModelConfig

MODES = ("homogeneous", "heterogeneous")


class SpaceError(ValueError):
  """An elastic search space or choice is invalid; the message names the field, the value and the rule."""


# ---------------------------------------------------------------------------------------------------- helpers
def _check_size(config: ModelConfig, axis: ElasticAxis, value: Any, what: str, limit: int, limit_name: str) -> None:
  """Raises SpaceError unless ``value`` is a positive int, a multiple of the axis granularity and <= limit."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise SpaceError(f"{what} {value!r} is not an integer.")
  if value <= 0:
    raise SpaceError(f"{what} {value} must be positive (use depth to remove whole blocks).")
  if value % axis.groups(config):
    raise SpaceError(f"{what} {value} is not a multiple of {axis.group_rule(config)}.")
  minimum, rule = axis.min_size(config)
  if value < minimum:
    raise SpaceError(f"{what} {value} is below {minimum}, the fewest {axis.unit}s a {axis.kind} block can keep "
                     f"({rule}).")
  if value > limit:
    raise SpaceError(f"{what} {value} is larger than the parent's {limit_name}={limit}.")


def _limit(config: ModelConfig, axis: ElasticAxis) -> tuple[int, str]:
  """The largest size every block of the axis' kind can take, and how to name it in messages."""
  widths = axis.parent_sizes(config)
  if len(set(widths)) > 1:
    return min(widths), f"smallest per-layer {axis.config_field}"
  return widths[0], axis.config_field


def _absence(config: ModelConfig, axis: ElasticAxis) -> str:
  """Why a block axis is absent from ``config`` (see ``axes.present``), for messages."""
  if axes.kind_count(config, axis.kind) == 0:
    return f"pattern={config.pattern!r} has no {axis.kind} blocks"
  return f"the parent's {axis.kind} blocks have {axis.config_field}=0 (none)"


def _sizes(value: Any, what: str) -> tuple:
  """A sequence of sizes as a tuple; SpaceError for a scalar or a string."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise SpaceError(f"{what} must be a list of candidate sizes, got {value!r}.")
  return tuple(value)


class _AxisRecord:
  """Frozen, hashable values keyed by name (in registry order), read as attributes."""

  __slots__ = ("_items",)

  def __init__(self, items: Mapping[str, Any]):
    object.__setattr__(self, "_items", tuple(items.items()))

  def __getattr__(self, name: str) -> Any:
    if name.startswith("_"):
      raise AttributeError(name)
    for key, value in self._items:
      if key == name:
        return value
    raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields are {[k for k, _ in self._items]}.")

  def __setattr__(self, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

  def __eq__(self, other: Any) -> bool:
    return type(self) is type(other) and self._items == other._items

  def __hash__(self) -> int:
    return hash((type(self).__name__, self._items))

  def __repr__(self) -> str:
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._items)})"

  def __reduce__(self):
    return _rebuild, (type(self), self._items)

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in self._items}


def _rebuild(cls: type, items: tuple) -> Any:
  record = object.__new__(cls)
  object.__setattr__(record, "_items", items)
  return record


def _check_fields(cls_name: str, given: Sequence[str], known: Sequence[str], required: Sequence[str] = ()) -> None:
  unknown = [k for k in given if k not in known]
  missing = [k for k in required if k not in given]
  if unknown or missing:
    raise TypeError(f"{cls_name}() got unknown field(s) {unknown} and lacks {missing}; fields are {list(known)}.")


# ---------------------------------------------------------------------------------------------------- space
class ElasticSpace(_AxisRecord):
  """Candidate sizes per axis (ascending) and the per-layer mode of each block kind.

  ``ElasticSpace(hidden=(...), mlp=(...), ..., mlp_mode="homogeneous")``: one keyword per axis of the registry
  (omitted: no candidates) and per mode field (omitted: "homogeneous"). An axis whose block kind is absent from
  the pattern has no candidates (empty tuple). Build with ``from_dict`` (which fills omitted axes with the parent's
  size, i.e. not elastic) or ``from_fractions``; both validate.
  """

  __slots__ = ()

  def __init__(self, **fields: Any):
    names, modes = axes.names(), axes.mode_fields()
    _check_fields("ElasticSpace", list(fields), (*names, *modes))
    items: dict[str, Any] = {axis: _sizes(fields.get(axis, ()), axis) for axis in names}
    items.update({mode: fields.get(mode, "homogeneous") for mode in modes})
    super().__init__(items)

  def candidates(self, axis: str) -> tuple[int, ...]:
    return getattr(self, axis)

  def mode(self, axis: str) -> str:
    """"homogeneous" or "heterogeneous" for a per-layer axis; global axes are always homogeneous."""
    field = axes.get(axis).mode_field
    return getattr(self, field) if field else "homogeneous"

  def validate(self, config: ModelConfig) -> None:
    """Raises ``SpaceError`` naming the field when the space does not fit ``config``."""
    for name in axes.mode_fields():
      if getattr(self, name) not in MODES:
        raise SpaceError(f"{name}={getattr(self, name)!r} is not one of {MODES}.")
    for axis in axes.AXES:
      values = self.candidates(axis.name)
      if not axes.present(config, axis):
        if values:
          raise SpaceError(f"{axis.name} has candidates {list(values)} but {_absence(config, axis)}; leave it "
                           "empty.")
        continue
      if not values:
        raise SpaceError(f"{axis.name} candidate list is empty; give at least one size (the parent's size keeps "
                         "the axis fixed).")
      limit, limit_name = _limit(config, axis)
      for value in values:
        _check_size(config, axis, value, f"{axis.name} candidate", limit, limit_name)
      if list(values) != sorted(set(values)):
        raise SpaceError(f"{axis.name} candidates {list(values)} must be strictly increasing (no duplicates).")

  # ------------------------------------------------------------------------------------------------ builders
  @classmethod
  def from_dict(cls, values: Mapping[str, Any], config: ModelConfig) -> "ElasticSpace":
    """Builds and validates a space from a mapping (JSON, ``ml_collections.ConfigDict``).

    Keys: the axes (lists of sizes, any order; duplicates are an error) and the mode fields (``mlp_mode``,
    ``attention_mode``, ``mamba_mode``). An omitted axis keeps the parent's size only (not elastic). Unknown keys
    are an error.
    """
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {*axes.names(), *axes.mode_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
      raise SpaceError(f"unknown elastic space key(s) {unknown}; known keys are {sorted(known)}.")
    fields: dict[str, Any] = {}
    for axis in axes.AXES:
      if axis.name in values:
        raw = _sizes(values[axis.name], axis.name)
        if len(set(raw)) != len(raw):
          dup = next(v for v in raw if raw.count(v) > 1)
          raise SpaceError(f"{axis.name} candidate {dup!r} appears more than once.")
        try:
          fields[axis.name] = tuple(sorted(raw))
        except TypeError as err:
          raise SpaceError(f"{axis.name} candidates {list(raw)!r} must be integers.") from err
      elif axes.present(config, axis):
        widths = axis.parent_sizes(config)
        if len(set(widths)) > 1:
          raise SpaceError(f"{axis.name} candidates must be given explicitly: the parent's per-layer "
                           f"{axis.config_field} differ ({list(widths)}), so there is no single full size to "
                           "default to.")
        fields[axis.name] = (widths[0],)
    for name in axes.mode_fields():
      if name in values:
        fields[name] = values[name]
    space = cls(**fields)
    space.validate(config)
    return space

  @classmethod
  def from_fractions(cls, config: ModelConfig, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                     axis_names: Sequence[str] | None = None, **modes: str) -> "ElasticSpace":
    """A space whose candidates on ``axis_names`` (default: every axis but depth) are ``fraction * parent size``,
    rounded down to the axis granularity.

    Other axes keep the parent's size only. Fractions that round below the axis' smallest size (``min_size``) or to
    the same size are dropped.
    """
    names = [a for a in axes.names() if a != "depth"] if axis_names is None else axis_names
    values: dict[str, Any] = dict(modes)
    for name in names:
      axis = axes.get(name)
      if not axes.present(config, axis):
        continue
      parent = min(axis.parent_sizes(config))
      step, minimum = axis.groups(config), axis.min_size(config)[0]
      sizes = {int(f * parent) // step * step for f in fractions}
      values[name] = sorted(s for s in sizes if minimum <= s <= parent)
    return cls.from_dict(values, config)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------------------------------------------- choice
class Choice(_AxisRecord):
  """One sub-network: a size per axis, per block of each kind (pattern order), and the number of blocks kept.

  ``Choice(hidden=..., mlp=(...), attention_heads=(...), mamba_heads=(...), mamba_head_dim=(...), depth=...)``,
  one keyword per axis of the registry (a block axis may be left out when the parent has no such blocks: it is
  then ``()``). ``mlp[i]`` is the neuron count of the i-th MLP block,
  ``attention_heads[i]`` the total query heads kept by the i-th attention block, ``mamba_heads[i]`` /
  ``mamba_head_dim[i]`` the heads and channels per head kept by the i-th Mamba block. ``depth`` counts blocks kept
  from the top of a depth ranking; the sizes of blocks it drops are ignored. Homogeneous choices repeat one value
  per kind.
  """

  __slots__ = ()

  def __init__(self, **sizes: Any):
    names = axes.names()
    _check_fields("Choice", list(sizes), names, [a.name for a in axes.AXES if not a.per_layer])
    items = {}
    for axis in axes.AXES:
      value = sizes.get(axis.name, ())
      if axis.per_layer:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
          raise SpaceError(f"Choice.{axis.name} must be a sequence with one size per block of its kind, got "
                           f"{value!r}.")
        value = tuple(value)
      items[axis.name] = value
    super().__init__(items)

  @classmethod
  def full(cls, config: ModelConfig) -> "Choice":
    """The parent itself: every axis at its full size, every block kept."""
    return cls(**{a.name: a.parent_sizes(config) if a.per_layer else a.parent_sizes(config)[0] for a in axes.AXES})

  @classmethod
  def homogeneous(cls, config: ModelConfig, **sizes: int | None) -> "Choice":
    """One size per axis (keyword per axis name) repeated over the blocks of its kind; omitted axes stay full."""
    _check_fields("Choice.homogeneous", list(sizes), axes.names())
    full = cls.full(config)
    fields = {}
    for axis in axes.AXES:
      value, parent = sizes.get(axis.name), getattr(full, axis.name)
      if value is None:
        fields[axis.name] = parent
      else:
        fields[axis.name] = (value,) * len(parent) if axis.per_layer else value
    choice = cls(**fields)
    choice.validate(config)
    return choice

  def values(self, axis: str) -> tuple[int, ...]:
    """The sizes of ``axis``: per block of its kind, or a 1-tuple for hidden and depth."""
    value = getattr(self, axis)
    return value if isinstance(value, tuple) else (value,)

  @property
  def is_homogeneous(self) -> bool:
    return all(len(set(getattr(self, axis))) <= 1 for axis in axes.block_axis_names())

  def validate(self, config: ModelConfig, space: ElasticSpace | None = None) -> None:
    """Raises ``SpaceError`` naming the field when this choice is not a sub-network of ``config`` (in ``space``)."""
    for axis in axes.AXES:
      value = getattr(self, axis.name)
      if axis.name == "depth":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= config.num_layers:
          raise SpaceError(f"Choice.depth {value!r} must be an integer in [1, num_layers={config.num_layers}].")
      elif not axis.per_layer:
        _check_size(config, axis, value, f"Choice.{axis.name}", getattr(config, axis.config_field),
                    axis.config_field)
      elif not axes.present(config, axis):
        if value not in ((), axis.parent_sizes(config)):
          raise SpaceError(f"Choice.{axis.name} is {list(value)} but {_absence(config, axis)}; leave it empty.")
      else:
        parents = axis.parent_sizes(config)
        if len(value) != len(parents):
          raise SpaceError(f"Choice.{axis.name} has {len(value)} entries but pattern={config.pattern!r} has "
                           f"{len(parents)} {axis.kind} blocks; give one size per {axis.kind} block, in pattern "
                           "order.")
        for i, (size, parent) in enumerate(zip(value, parents)):
          _check_size(config, axis, size, f"Choice.{axis.name}[{i}]", parent, axis.config_field)
    if space is None:
      return
    for axis in axes.AXES:
      allowed = space.candidates(axis.name)
      for i, value in enumerate(self.values(axis.name)):
        if value not in allowed:
          where = f"Choice.{axis.name}" + (f"[{i}]" if axis.per_layer else "")
          raise SpaceError(f"{where} {value} is not a candidate of the space; {axis.name} candidates are "
                           f"{list(allowed)}.")
      if axis.per_layer and space.mode(axis.name) == "homogeneous" and len(set(self.values(axis.name))) > 1:
        raise SpaceError(f"Choice.{axis.name} {list(self.values(axis.name))} differs between blocks but the "
                         f"space's {axis.mode_field} is 'homogeneous'; use one size for every block.")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Choice":
    """A choice from its ``to_dict`` (e.g. a run's ``deployed_choices.json``); the keys must be the axis names (block
    axes of kinds the parent lacks may be absent: a file written before those axes existed)."""
    if not axes.keys_fit(values, axes.names()):
      raise SpaceError(axes.rename_hint(values, axes.names(), "Choice keys"))
    return cls(**values)
