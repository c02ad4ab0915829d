"""Mesh and logical-axis rules: the one table that maps the model's logical axis names onto mesh axes.

Modules name only logical axes (``embed``, ``mlp``, ``heads``, ``ssm_heads``, ``vocab``, ``batch``, ``length``...).
This table decides where each goes on a ``(data, fsdp, tensor, context, expert)`` mesh; a logical axis whose mesh axis
is already used by an earlier dimension of the same array falls through to the next matching rule (or stays
unsharded), so activations ``[batch, length, embed]`` shard batch over (data, fsdp, expert) and the sequence over
context, while parameters ``[embed, mlp]`` shard embed over fsdp. No parameter has a ``length`` axis, so the context
axis only splits activations (the context-parallel mixers exchange what crosses shard boundaries).

The expert axis splits the routed experts of MoE blocks (``[expert, embed, expert_mlp]``: each device holds
E / expert of them, with their AdamW moments) and, for everything else, acts as one more data-parallel axis: the
batch splits over it too, so no device idles outside the MoE blocks. Inside an MoE block the compiler (GSPMD) moves
what the sorted tokens and the sharded experts need; a mesh without MoE blocks should leave it at 1.

Every jitted program over the mesh goes through ``sharded_jit``: explicit in/out shardings, donation, and the
mesh and rules active while it traces, so the model's logical constraints resolve to this mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context", "expert")
LogicalRules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("ssm_heads", "tensor"),
    ("length", "context"),
    ("head_dim", None),
    ("mamba_head_dim", None),
    ("ssm_groups", None),
    ("ssm_state", None),
    ("conv", None),
    # MoE blocks: the routed experts over the expert axis, the shared expert is an MLP (its neurons over tensor, like
    # mlp); the experts' neurons and the latent dims stay whole.
    ("shared_mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", None),
    ("moe_latent", None),
)


def rules_from_config(rules: Any) -> LogicalRules:
  """``config.mesh.rules`` -> a rules table: (logical name, mesh axis, axes or None) pairs with lists made tuples;
  empty gives ``DEFAULT_RULES``."""
  if not rules:
    return DEFAULT_RULES
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def make_mesh(shape: Sequence[int] | None = None, axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh of ``shape`` over ``devices`` (default: all, on the data axis).

  ``shape`` may name fewer axes than ``axis_names``: the trailing ones get size 1, so ``(2, 4)`` or ``(2, 2, 2)``
  mean (data, fsdp[, tensor]) with no context or expert parallelism. The product of ``shape`` must equal the device
  count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (len(devices),) if shape is None else tuple(int(n) for n in shape)
  if len(shape) > len(axis_names):
    raise ValueError(f"mesh shape {shape} has {len(shape)} axes but the mesh has only {len(axis_names)} "
                     f"({', '.join(axis_names)}); give at most {len(axis_names)} sizes.")
  if any(n <= 0 for n in shape):
    raise ValueError(f"mesh shape {shape} has a non-positive size; every axis needs at least 1 device.")
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices but {len(devices)} are "
                     "available; make the product of the mesh shape equal the device count.")
  shape = shape + (1,) * (len(axis_names) - len(shape))
  return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """``NamedSharding`` for every leaf of a tree whose leaves may be ``nn.LogicallyPartitioned`` boxes (abstract or
  concrete); unboxed leaves (step counters, PRNG keys, router params) are replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_shardings(config: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """``NamedSharding`` of every parameter of ``HybridLM(config)``, from the model's logical axis names (no
  allocation): where the run's params live, whatever phase made them.

  A dimension its mesh axes do not divide (a child's 80 hidden channels over 3 devices, say) stays whole on each of
  them: jitted programs take and return only evenly divided arrays.
  """
  from elastic_jax.model.hybrid import param_logical_axes, param_shapes  # pylint: disable=import-outside-toplevel
  shardings = nn.logical_to_mesh_sharding(param_logical_axes(config), mesh, rules)
  return jax.tree.map(divisible_sharding, param_shapes(config), shardings)


def divisible_sharding(shape: Any, sharding: NamedSharding) -> NamedSharding:
  """``sharding`` for an array of ``shape`` (a shape or anything with ``.shape``), with the mesh axes of every
  dimension they do not divide dropped."""
  shape = tuple(getattr(shape, "shape", shape))
  spec = []
  for size, axes in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    devices = int(np.prod([sharding.mesh.shape[name] for name in names])) if names else 1
    spec.append(axes if size % devices == 0 else None)
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def host_to_global(value: Any, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole (same values everywhere), placed as one global array in
  ``sharding``: each process copies only the parts its own devices hold."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
  """Token batches [batch, length + 1] split over the data-parallel axes.

  The token axis stays whole: a batch holds one token more than the model's inputs (next-token targets), which
  would not divide over the context axis; the model's own constraints split the ``length`` activations.
  """
  return nn.logical_to_mesh_sharding(PartitionSpec("batch", None), mesh, rules)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places a host/device param tree into its shardings (e.g. a checkpoint loaded on the host).

  Host (numpy) leaves go straight to their shards; nothing is first gathered on one device.
  """
  return jax.device_put(params, shardings)


def sharded_jit(fn: Callable, mesh: Mesh, rules: LogicalRules, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = ()) -> Callable:
  """``jax.jit(fn)`` with explicit shardings, run with ``mesh`` and the logical-axis ``rules`` active.

  The mesh and rules must be active while ``fn`` traces, so that the model's logical activation constraints resolve
  to this mesh; the returned callable activates them around every call, and so does ``run.lower`` (ahead-of-time
  lowering); ``run.jitted`` is the bare jitted function. Used for train steps and for the initialisers that create
  params and optimizer state directly in their shardings (``out_shardings``), never materialised on one device
  first.
  """
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

  def run(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return jitted.lower(*args)

  run.jitted, run.lower = jitted, lower
  return run
