"""The programs we ship, as builders for ``elastic_jax.aot.compile``: ``fn(devices, **kwargs) -> jax.stages.Lowered``.

Each builds its program exactly as the run does (the training loop's jitted steps, the evaluation's ``generate``, the
SSD dispatch), over a mesh of the given (compile-only) devices, and lowers it on abstract inputs: nothing is
allocated. The mesh is active while the program traces, so that device-dependent choices (the SSD kernel) see the
target's devices rather than this machine's.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
ConfigSource = str | Mapping[str, Any]  # a config file's path, or a config as a plain dict


def load_config(config: ConfigSource, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A run config: a config file's ``get_config()`` (path relative to the repository root, or absolute) or a plain
  dict of one (``ConfigDict.to_dict()``, as it travels to a worker as JSON), then dotted-key overrides, e.g.
  ``{"mesh.shape": [4], "stages.0.batch_size": 8}``."""
  if isinstance(config, Mapping):
    config = ml_collections.ConfigDict(dict(config))
  else:
    file = pathlib.Path(config)
    file = file if file.is_absolute() else ROOT / file
    spec = importlib.util.spec_from_file_location(f"aot_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  for key, value in (overrides or {}).items():
    *parents, last = key.split(".")
    node = config
    for part in parents:
      node = node[int(part)] if part.isdigit() else node[part]
    if last.isdigit():
      node[int(last)] = value
    else:
      node[last] = tuple(value) if isinstance(value, list) else value
  return config


def _with_whole_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> ml_collections.ConfigDict:
  """A config without a mesh shape gets every target device on the data axis."""
  if not tuple(config.mesh.get("shape") or ()):
    config.mesh.shape = (len(devices),)
  return config


def elastic_step(devices: Sequence[jax.Device], *, config: ConfigSource, overrides: Mapping[str, Any] | None = None,
                 stage: int = 0) -> jax.stages.Lowered:
  """The elastic train step of stage ``stage`` of a run config (a file or a dict, see :func:`load_config`), as
  ``elastic_jax.plan`` jits it; a config without ``mesh.shape`` puts every target device on the data axis."""
  from elastic_jax import plan  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.config import stages_from_config  # pylint: disable=import-outside-toplevel

  run_config = _with_whole_mesh(load_config(config, overrides), devices)
  return plan.jit_elastic_step(run_config, devices).lower(stages_from_config(run_config)[stage])


def lm_step(devices: Sequence[jax.Device], *, config: ConfigSource, overrides: Mapping[str, Any] | None = None
            ) -> jax.stages.Lowered:
  """The parent's next-token train step (``config.parent``'s batch and length), as the pipeline jits it."""
  from elastic_jax import plan  # pylint: disable=import-outside-toplevel
  from elastic_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  from elastic_jax.train import sharding  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.config import memory_from_config  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.loop import compiled_lm_step  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.optim import OptimizerConfig  # pylint: disable=import-outside-toplevel

  run_config = _with_whole_mesh(load_config(config, overrides), devices)
  hardware = plan.hardware_from_config(run_config)
  mesh = sharding.make_mesh(hardware.mesh_shape, devices=list(devices)[:hardware.num_devices])
  parent = run_config.parent
  memory = memory_from_config(run_config)
  optimizer = OptimizerConfig(learning_rate=float(parent.get("learning_rate", 3e-3)),
                              warmup_steps=int(parent.get("warmup_steps", 50)), weight_decay=0.01)
  training = compiled_lm_step(ModelConfig.from_dict(run_config.model), optimizer, int(parent.pretrain_steps), mesh,
                              hardware.rules, grad_accum_steps=memory.grad_accum_steps, remat=memory.remat)
  tokens = jax.ShapeDtypeStruct((int(parent.batch_size), int(parent.seq_len) + 1), jnp.int32,
                                sharding=training.batch_sharding)
  return training.step.lower(training.abstract_state, tokens)


def generate(devices: Sequence[jax.Device], *, config: ConfigSource, overrides: Mapping[str, Any] | None = None,
             batch_size: int | None = None, prompt_len: int = 64, max_new_tokens: int | None = None
             ) -> jax.stages.Lowered:
  """The evaluation's cached generation (``elastic_jax.eval.generate.generate``) of the config's parent on one
  target device: params and prompts as they are during evaluation (``config.eval``'s decode batch and length)."""
  from elastic_jax.eval.generate import generate as generate_fn  # pylint: disable=import-outside-toplevel
  from elastic_jax.model import ModelConfig, param_shapes  # pylint: disable=import-outside-toplevel

  run_config = load_config(config, overrides)
  model_config = ModelConfig.from_dict(run_config.model)
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("data",))
  on_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device),
                        param_shapes(model_config))
  batch = int(batch_size or run_config.eval.decode_batch)
  prompts = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=on_device)
  with jax.set_mesh(mesh):
    return generate_fn.lower(model_config, params, prompts,
                             max_new_tokens=int(max_new_tokens or run_config.eval.max_new_tokens))


def _ssd_inputs(devices: Sequence[jax.Device], *, head_dim: int, state_size: int, chunk_size: int, dtype: str,
                batch: int, length: int | None, heads: int, groups: int):
  """(mesh over the first device, abstract SSD inputs on it): x, B, C in ``dtype``; dt, A, D fp32."""
  length = length or 2 * chunk_size
  mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("data",))
  on_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  f32, act = jnp.float32, jnp.dtype(dtype)
  shapes = {"x": ((batch, length, heads, head_dim), act), "dt": ((batch, length, heads), f32), "A": ((heads,), f32),
            "B": ((batch, length, groups, state_size), act), "C": ((batch, length, groups, state_size), act),
            "D": ((heads,), f32)}
  return mesh, {name: jax.ShapeDtypeStruct(shape, dt, sharding=on_device) for name, (shape, dt) in shapes.items()}


def ssd(devices: Sequence[jax.Device], *, head_dim: int, state_size: int, chunk_size: int, dtype: str = "bfloat16",
        batch: int = 1, length: int | None = None, heads: int = 2, groups: int = 1, impl: str = "auto",
        backward: bool = True) -> jax.stages.Lowered:
  """``ops.ssd.ssd`` (forward, and backward unless ``backward=False``) on one target device, dispatched under that
  device's mesh: ``impl="auto"`` picks the fused kernel where ``supports`` accepts the shape for this device."""
  from elastic_jax.ops.ssd import ssd as ssd_fn  # pylint: disable=import-outside-toplevel

  mesh, inputs = _ssd_inputs(devices, head_dim=head_dim, state_size=state_size, chunk_size=chunk_size, dtype=dtype,
                             batch=batch, length=length, heads=heads, groups=groups)

  def run(inputs):
    y, final_state = ssd_fn(**inputs, chunk_size=chunk_size, impl=impl)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final_state)

  with jax.set_mesh(mesh):
    return jax.jit(jax.grad(run) if backward else run).lower(inputs)


def ssd_pallas(devices: Sequence[jax.Device], *, head_dim: int, state_size: int, chunk_size: int,
               dtype: str = "bfloat16", batch: int = 1, length: int | None = None, heads: int = 2, groups: int = 1
               ) -> jax.stages.Lowered:
  """The fused kernel's forward (``elastic_jax_kernels.ssd.ssd_pallas``) on one target device, bypassing dispatch:
  compiles a shape even where ``supports`` refuses it (to see whether and how the compiler refuses it too)."""
  from elastic_jax_kernels.ssd import ssd_pallas as ssd_pallas_fn  # pylint: disable=import-outside-toplevel

  mesh, inputs = _ssd_inputs(devices, head_dim=head_dim, state_size=state_size, chunk_size=chunk_size, dtype=dtype,
                             batch=batch, length=length, heads=heads, groups=groups)
  with jax.set_mesh(mesh):
    return jax.jit(lambda inputs: ssd_pallas_fn(**inputs, chunk_size=chunk_size)).lower(inputs)


PROGRAMS = {"elastic_step": elastic_step, "lm_step": lm_step, "generate": generate, "ssd": ssd,
            "ssd_pallas": ssd_pallas}
