"""The elastic search space (candidate sizes per axis) and one point in it, a ``Choice`` (one sub-network).

Axes (spec §3): hidden channels, MLP neurons, attention query heads, Mamba heads, Mamba head channels and depth
(the number of blocks kept, taken from the top of the depth ranking). Mamba groups, SSM state, B/C, KV heads and
the attention head dim are never elastic.

Granularity: Mamba head counts are multiples of ``n_groups`` (each group keeps the same number of its own heads)
and query head counts are multiples of ``num_key_value_heads`` (each KV group keeps the same number, D-1).

``homogeneous`` mode gives every block of a kind the same size; ``heterogeneous`` mode lets each block pick its
own candidate (the router then has one set of logits per block of that kind). Hidden and depth are global.

Candidates are stored in ascending order: a router's logit ``i`` always means the ``i``-th smallest size.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_jax.model.config import ModelConfig

MODES = ("homogeneous", "heterogeneous")
# Axis name -> (block kind it belongs to, or None for global axes; the ModelConfig/BlockSpec width it shrinks).
AXES: dict[str, tuple[str | None, str]] = {
    "hidden": (None, "hidden_size"),
    "mlp": ("mlp", "intermediate_size"),
    "attention_heads": ("attention", "num_attention_heads"),
    "mamba_heads": ("mamba", "mamba_num_heads"),
    "mamba_head_dim": ("mamba", "mamba_head_dim"),
    "depth": (None, "num_layers"),
}
PER_LAYER_AXES = ("mlp", "attention_heads", "mamba_heads", "mamba_head_dim")
# Which mode field governs each per-layer axis.
MODE_OF_AXIS = {"mlp": "mlp_mode", "attention_heads": "attention_mode", "mamba_heads": "mamba_mode",
                "mamba_head_dim": "mamba_mode"}


class SpaceError(ValueError):
  """An elastic search space or choice is invalid; the message names the field, the value and the rule."""


# ---------------------------------------------------------------------------------------------------- helpers
def kind_count(config: ModelConfig, kind: str) -> int:
  """Number of blocks of ``kind`` ("mamba" | "attention" | "mlp") in the pattern."""
  return sum(1 for spec in config.block_specs() if spec.kind == kind)


def parent_widths(config: ModelConfig, axis: str) -> tuple[int, ...]:
  """The parent's size of ``axis`` per block of its kind (pattern order); one entry for global axes."""
  kind, field = AXES[axis]
  if kind is None:
    return (config.hidden_size,) if axis == "hidden" else (config.num_layers,)
  return tuple(getattr(spec, field) for spec in config.block_specs() if spec.kind == kind)


def axis_granularity(config: ModelConfig, axis: str) -> int:
  """Sizes of ``axis`` must be multiples of this (whole Mamba groups / whole KV groups)."""
  return {"mamba_heads": config.n_groups, "attention_heads": config.num_key_value_heads}.get(axis, 1)


def _granularity_rule(config: ModelConfig, axis: str) -> str:
  if axis == "mamba_heads":
    return f"n_groups={config.n_groups}"
  return f"num_key_value_heads={config.num_key_value_heads}"


def _check_size(config: ModelConfig, axis: str, value: Any, what: str, limit: int, limit_name: str) -> None:
  """Raises SpaceError unless ``value`` is a positive int, a multiple of the axis granularity and <= limit."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise SpaceError(f"{what} {value!r} is not an integer.")
  if value <= 0:
    raise SpaceError(f"{what} {value} must be positive (use depth to remove whole blocks).")
  step = axis_granularity(config, axis)
  if value % step:
    raise SpaceError(f"{what} {value} is not a multiple of {_granularity_rule(config, axis)}.")
  if value > limit:
    raise SpaceError(f"{what} {value} is larger than the parent's {limit_name}={limit}.")


def _limit(config: ModelConfig, axis: str) -> tuple[int, str]:
  """The largest size every block of the axis' kind can take, and how to name it in messages."""
  widths = parent_widths(config, axis)
  field = AXES[axis][1]
  if len(set(widths)) > 1:
    return min(widths), f"smallest per-layer {field}"
  return widths[0], field


# ---------------------------------------------------------------------------------------------------- space
@dataclasses.dataclass(frozen=True)
class ElasticSpace:
  """Candidate sizes per axis (ascending) and the per-layer mode of each block kind.

  An axis whose block kind is absent from the pattern has no candidates (empty tuple). Build with ``from_dict``
  (which fills omitted axes with the parent's size, i.e. not elastic) or ``from_fractions``; both validate.
  """

  hidden: tuple[int, ...]
  mlp: tuple[int, ...] = ()
  attention_heads: tuple[int, ...] = ()
  mamba_heads: tuple[int, ...] = ()
  mamba_head_dim: tuple[int, ...] = ()
  depth: tuple[int, ...] = ()
  mlp_mode: str = "homogeneous"
  attention_mode: str = "homogeneous"
  mamba_mode: str = "homogeneous"

  def __post_init__(self):
    for axis in AXES:
      value = getattr(self, axis)
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpaceError(f"{axis} must be a list of candidate sizes, got {value!r}.")
      object.__setattr__(self, axis, tuple(value))

  def candidates(self, axis: str) -> tuple[int, ...]:
    return getattr(self, axis)

  def mode(self, axis: str) -> str:
    """"homogeneous" or "heterogeneous" for a per-layer axis; global axes are always homogeneous."""
    return getattr(self, MODE_OF_AXIS[axis]) if axis in MODE_OF_AXIS else "homogeneous"

  def validate(self, config: ModelConfig) -> None:
    """Raises ``SpaceError`` naming the field when the space does not fit ``config``."""
    for name in ("mlp_mode", "attention_mode", "mamba_mode"):
      if getattr(self, name) not in MODES:
        raise SpaceError(f"{name}={getattr(self, name)!r} is not one of {MODES}.")
    for axis, (kind, _) in AXES.items():
      values = self.candidates(axis)
      present = kind is None or kind_count(config, kind) > 0
      if not present:
        if values:
          raise SpaceError(f"{axis} has candidates {list(values)} but pattern={config.pattern!r} has no {kind} "
                           "blocks; leave it empty.")
        continue
      if not values:
        raise SpaceError(f"{axis} candidate list is empty; give at least one size (the parent's size keeps the "
                         "axis fixed).")
      if axis == "depth":
        limit, limit_name = config.num_layers, "num_layers"
      else:
        limit, limit_name = _limit(config, axis)
      for value in values:
        _check_size(config, axis, value, f"{axis} candidate", limit, limit_name)
      if list(values) != sorted(set(values)):
        raise SpaceError(f"{axis} candidates {list(values)} must be strictly increasing (no duplicates).")

  # ------------------------------------------------------------------------------------------------ builders
  @classmethod
  def from_dict(cls, values: Mapping[str, Any], config: ModelConfig) -> "ElasticSpace":
    """Builds and validates a space from a mapping (JSON, ``ml_collections.ConfigDict``).

    Keys: the axes (lists of sizes, any order; duplicates are an error) and ``mlp_mode``/``attention_mode``/
    ``mamba_mode``. An omitted axis keeps the parent's size only (not elastic). Unknown keys are an error.
    """
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise SpaceError(f"unknown elastic space key(s) {unknown}; known keys are {sorted(known)}.")
    fields: dict[str, Any] = {}
    for axis, (kind, _) in AXES.items():
      if axis in values:
        raw = values[axis]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
          raise SpaceError(f"{axis} must be a list of candidate sizes, got {raw!r}.")
        if len(set(raw)) != len(raw):
          dup = next(v for v in raw if list(raw).count(v) > 1)
          raise SpaceError(f"{axis} candidate {dup!r} appears more than once.")
        try:
          fields[axis] = tuple(sorted(raw))
        except TypeError as err:
          raise SpaceError(f"{axis} candidates {list(raw)!r} must be integers.") from err
      elif kind is None or kind_count(config, kind) > 0:
        widths = parent_widths(config, axis)
        if len(set(widths)) > 1:
          raise SpaceError(f"{axis} candidates must be given explicitly: the parent's per-layer {AXES[axis][1]} "
                           f"differ ({list(widths)}), so there is no single full size to default to.")
        fields[axis] = (widths[0],)
    for name in ("mlp_mode", "attention_mode", "mamba_mode"):
      if name in values:
        fields[name] = values[name]
    space = cls(**fields)
    space.validate(config)
    return space

  @classmethod
  def from_fractions(cls, config: ModelConfig, fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
                     axes: Sequence[str] = ("hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim"),
                     **modes: str) -> "ElasticSpace":
    """A space whose candidates on ``axes`` are ``fraction * parent size``, rounded down to the axis granularity.

    Other axes keep the parent's size only. Fractions that round to zero or to the same size are dropped.
    """
    values: dict[str, Any] = dict(modes)
    for axis in axes:
      kind = AXES[axis][0]
      if kind is not None and kind_count(config, kind) == 0:
        continue
      parent = min(parent_widths(config, axis)) if axis != "depth" else config.num_layers
      step = axis_granularity(config, axis)
      sizes = {int(f * parent) // step * step for f in fractions}
      values[axis] = sorted(s for s in sizes if 0 < s <= parent)
    return cls.from_dict(values, config)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)


# ---------------------------------------------------------------------------------------------------- choice
@dataclasses.dataclass(frozen=True)
class Choice:
  """One sub-network: a size per axis, per block of each kind (pattern order), and the number of blocks kept.

  ``mlp[i]`` is the neuron count of the i-th MLP block, ``attention_heads[i]`` the total query heads kept by the
  i-th attention block, ``mamba_heads[i]`` / ``mamba_head_dim[i]`` the heads and channels per head kept by the
  i-th Mamba block. ``depth`` counts blocks kept from the top of a depth ranking; the sizes of blocks it drops
  are ignored. Homogeneous choices repeat one value per kind.
  """

  hidden: int
  mlp: tuple[int, ...]
  attention_heads: tuple[int, ...]
  mamba_heads: tuple[int, ...]
  mamba_head_dim: tuple[int, ...]
  depth: int

  def __post_init__(self):
    for axis in PER_LAYER_AXES:
      value = getattr(self, axis)
      if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpaceError(f"Choice.{axis} must be a sequence with one size per block of its kind, got {value!r}.")
      object.__setattr__(self, axis, tuple(value))

  @classmethod
  def full(cls, config: ModelConfig) -> "Choice":
    """The parent itself: every axis at its full size, every block kept."""
    return cls(hidden=config.hidden_size, mlp=parent_widths(config, "mlp"),
               attention_heads=parent_widths(config, "attention_heads"),
               mamba_heads=parent_widths(config, "mamba_heads"),
               mamba_head_dim=parent_widths(config, "mamba_head_dim"), depth=config.num_layers)

  @classmethod
  def homogeneous(cls, config: ModelConfig, *, hidden: int | None = None, mlp: int | None = None,
                  attention_heads: int | None = None, mamba_heads: int | None = None,
                  mamba_head_dim: int | None = None, depth: int | None = None) -> "Choice":
    """One size per axis repeated over the blocks of its kind; omitted axes stay full."""
    full = cls.full(config)
    def repeat(axis: str, value: int | None) -> tuple[int, ...]:
      return getattr(full, axis) if value is None else (value,) * len(getattr(full, axis))
    choice = cls(hidden=full.hidden if hidden is None else hidden, mlp=repeat("mlp", mlp),
                 attention_heads=repeat("attention_heads", attention_heads),
                 mamba_heads=repeat("mamba_heads", mamba_heads),
                 mamba_head_dim=repeat("mamba_head_dim", mamba_head_dim),
                 depth=full.depth if depth is None else depth)
    choice.validate(config)
    return choice

  def values(self, axis: str) -> tuple[int, ...]:
    """The sizes of ``axis``: per block of its kind, or a 1-tuple for hidden and depth."""
    value = getattr(self, axis)
    return value if isinstance(value, tuple) else (value,)

  @property
  def is_homogeneous(self) -> bool:
    return all(len(set(getattr(self, axis))) <= 1 for axis in PER_LAYER_AXES)

  def validate(self, config: ModelConfig, space: ElasticSpace | None = None) -> None:
    """Raises ``SpaceError`` naming the field when this choice is not a sub-network of ``config`` (in ``space``)."""
    _check_size(config, "hidden", self.hidden, "Choice.hidden", config.hidden_size, "hidden_size")
    if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 1 <= self.depth <= config.num_layers:
      raise SpaceError(f"Choice.depth {self.depth!r} must be an integer in [1, num_layers={config.num_layers}].")
    for axis in PER_LAYER_AXES:
      kind, field = AXES[axis]
      values, parents = getattr(self, axis), parent_widths(config, axis)
      if len(values) != len(parents):
        raise SpaceError(f"Choice.{axis} has {len(values)} entries but pattern={config.pattern!r} has "
                         f"{len(parents)} {kind} blocks; give one size per {kind} block, in pattern order.")
      for i, (value, parent) in enumerate(zip(values, parents)):
        _check_size(config, axis, value, f"Choice.{axis}[{i}]", parent, field)
    if space is None:
      return
    for axis in AXES:
      allowed = space.candidates(axis)
      for i, value in enumerate(self.values(axis)):
        if value not in allowed:
          where = f"Choice.{axis}" + (f"[{i}]" if axis in PER_LAYER_AXES else "")
          raise SpaceError(f"{where} {value} is not a candidate of the space; {axis} candidates are "
                           f"{list(allowed)}.")
      if axis in PER_LAYER_AXES and space.mode(axis) == "homogeneous" and len(set(self.values(axis))) > 1:
        raise SpaceError(f"Choice.{axis} {list(self.values(axis))} differs between blocks but the space's "
                         f"{MODE_OF_AXIS[axis]} is 'homogeneous'; use one size for every block.")

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Choice":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    missing = sorted(known - set(values))
    if unknown or missing:
      raise SpaceError(f"Choice keys: unknown {unknown}, missing {missing}; expected exactly {sorted(known)}.")
    return cls(**values)
