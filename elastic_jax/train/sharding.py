"""Mesh and logical-axis rules: the one table that maps the model's logical axis names onto mesh axes.

Modules name only logical axes (``embed``, ``mlp``, ``heads``, ``ssm_heads``, ``vocab``, ``batch``...). This table
decides where each goes on a ``(data, fsdp, tensor)`` mesh; a logical axis whose mesh axis is already used by an
earlier dimension of the same array falls through to the next matching rule (or stays unsharded), so activations
``[batch, length, embed]`` shard batch over (data, fsdp) while parameters ``[embed, mlp]`` shard embed over fsdp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("ssm_heads", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("ssm_head_dim", None),
    ("ssm_groups", None),
    ("ssm_state", None),
    ("conv", None),
)


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of ``shape`` over ``devices`` (default: all, on the data axis); the product of ``shape`` must equal the
  device count."""
  devices = list(jax.devices() if devices is None else devices)
  shape = (len(devices),) + (1,) * (len(axis_names) - 1) if shape is None else tuple(shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} axes but axis_names {tuple(axis_names)} has "
                     f"{len(axis_names)}.")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices but {len(devices)} are "
                     "available; make the product of the mesh shape equal the device count.")
  return Mesh(np.asarray(devices).reshape(tuple(shape)), tuple(axis_names))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """``NamedSharding`` for every leaf of a tree whose leaves may be ``nn.LogicallyPartitioned`` boxes (abstract or
  concrete); unboxed leaves (step counters, PRNG keys, router params) are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  """Token batches [batch, length] split over the data-parallel axes."""
  return nn.logical_to_mesh_sharding(PartitionSpec("batch", "length"), mesh, rules)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places a host/device param tree into its shardings (e.g. a checkpoint loaded on the host)."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)
