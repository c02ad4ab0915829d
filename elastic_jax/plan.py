"""Will it fit? Memory and time of an elastic run per device, planned ahead of time on abstract shapes.

    python -m elastic_jax.plan --config configs/nano_v2_12b.py [--config.key=value ...] [--device v5p]
                               [--json] [--compile] [--mfu 0.4]

Nothing is loaded or allocated: the train state's shapes come from ``jax.eval_shape`` and its shardings from the
run's logical-axis rules over a ``jax.sharding.AbstractMesh`` of the configured shape, so a 12B plan for 128 chips
runs on a laptop in seconds. For every stage it prints, per device:

- student params, optimizer state (AdamW's two moments and its counters), the frozen teacher (in
  ``memory.teacher_dtype``) and the router (its params and optimizer state, with the step counter and PRNG key):
  shapes divided by the shard counts of their real ``NamedSharding`` (rounded up, as XLA pads uneven shards);
- gradients: the params' per-device bytes, twice with gradient accumulation (the running sum and the current
  micro-batch's gradients are both alive);
- activations of one micro-batch, from the analytical model below;

then their total against the device's HBM (times ``--usable_fraction``, for what the runtime reserves) with a
FITS / DOES NOT FIT verdict and the margin, the step's model FLOPs (``elastic_jax.train.flops``) and the time per
step at an assumed MFU.

Activation model (bytes per device of one micro-batch; every tensor is counted at its per-device shard size under
the rules table, e.g. ``[batch, length, embed]`` splits batch over the data-parallel axes and length over context):

    A = sum_b S_b + max(H, max_b W_b)
    S_b = I + {none: N_b, dots: D_b, full: 0}[remat policy of block b's kind]
    W_b = (N_b - S_b + I) + N_b + I
    H   = 5 [B, L, V] fp32 + [B, L, d] (fp32 + compute dtype)
    teacher phase: T = max_b N_b + [B, L, V] fp32;     activations = max(A, T)

where I is a block's input (the fp32 residual stream [B, L, d], kept for every block under every policy); N_b is
the sum of block b's forward intermediates (``_block_tensors``: projection outputs, masked and activated copies,
attention scores [B, Hq, L, L] in fp32 and probabilities in the compute dtype, the chunked SSD's per-chunk decay,
score and state tensors in fp32, the gated norm's fp32 temporaries); D_b is the part of N_b that the "dots" policy
saves (the outputs of the projections: matmuls without batch dimensions). S_b is what the backward pass keeps of
block b; W_b is the working set while block b is differentiated: what it recomputes, about as much again for the
gradients of those intermediates, and the residual stream's gradient. H is the loss at its peak: student and
teacher logits, the two log-softmaxes and the logits' gradient, plus the final norm's output. The teacher's forward
keeps nothing but its logits. Token ids, masks and router activations are small and not counted.

With a context axis of C > 1 devices that splits the sequence evenly, the model counts what the context-parallel
ops (``elastic_jax.ops.context_parallel``) keep: ring attention's one [L/C, L/C] block of scores per head at a time
and the per-hop accumulators and K/V blocks, the sharded SSD's all-gathered end states; otherwise attention's full
[L, L] score matrix per head. Mamba is counted with the chunked SSD (a fused kernel keeps less). ``--compile``
(when enough devices exist, e.g. virtual CPU devices) lowers and compiles the real train step and prints XLA's
memory analysis next to the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from elastic_jax.elastic.param_count import param_count
from elastic_jax.model import ModelConfig
from elastic_jax.model.config import BLOCK_KINDS, BlockSpec
from elastic_jax.ops.context_parallel import CONTEXT_AXIS
from elastic_jax.train import sharding as sharding_lib
from elastic_jax.train.config import (check_keys, elastic_setup_from_config, memory_from_config, optimizers_from_config,
                                     plain, stages_from_config)
from elastic_jax.train.flops import elastic_step_flops, forward_flops_per_token
from elastic_jax.train.loop import ShardedTraining, Stage, abstract_boxed_state, compiled_elastic_step
from elastic_jax.train.optim import make_optimizer
from elastic_jax.train.step import ElasticSetup

GB = 1e9
_EMBED = ("batch", "length", "embed")


# ------------------------------------------------------------------------------------------------ devices
@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator: its memory and its dense bf16 matmul peak (FLOP/s)."""

  description: str
  hbm_bytes: float
  peak_flops: float


def _host_memory_bytes() -> float:
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# Published per-chip / per-GPU figures (memory in GB = 1e9 bytes, as vendors quote it; bf16 dense peaks).
DEVICES: dict[str, Device] = {
    "v5p": Device("TPU v5p chip", 95 * GB, 459e12),
    "v5e": Device("TPU v5e chip", 16 * GB, 197e12),
    "v4": Device("TPU v4 chip", 32 * GB, 275e12),
    "h100": Device("NVIDIA H100 SXM 80GB", 80 * GB, 989e12),
    "h200": Device("NVIDIA H200 141GB", 141 * GB, 989e12),
    "a100": Device("NVIDIA A100 80GB", 80 * GB, 312e12),
    "cpu": Device("host CPU (this machine's RAM; nominal 1e11 FLOP/s)", _host_memory_bytes(), 1e11),
}


def device_spec(name: str) -> Device:
  if name not in DEVICES:
    raise ValueError(f"unknown device {name!r}; choose one of {sorted(DEVICES)} (--device or config.plan.device).")
  return DEVICES[name]


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class MemorySettings:
  """The run's memory levers (``config.memory``; defaults when the section or a key is absent)."""

  remat: tuple[tuple[str, str], ...]  # (block kind, policy) for every kind
  grad_accum_steps: int = 1
  teacher_dtype: str = "float32"

  def policy(self, kind: str) -> str:
    return dict(self.remat)[kind]


def memory_settings(config: Any) -> MemorySettings:
  """``config.memory`` as the training reads it (``memory_from_config``), with a policy for every block kind."""
  memory = memory_from_config(config)
  remat = dict(memory.remat)
  return MemorySettings(tuple((kind, remat.get(kind, "none")) for kind in BLOCK_KINDS.values()),
                        memory.grad_accum_steps, memory.teacher_dtype)


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Where the run is planned: the device kind, the mesh over ``num_devices`` of them, the rules and the MFU."""

  device_name: str
  device: Device
  mesh_shape: tuple[int, ...]  # one size per axis of ``sharding.MESH_AXES``
  rules: tuple
  mfu: float
  usable_fraction: float

  @property
  def num_devices(self) -> int:
    return int(np.prod(self.mesh_shape))

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(zip(sharding_lib.MESH_AXES, self.mesh_shape))

  def abstract_mesh(self) -> AbstractMesh:
    return AbstractMesh(self.mesh_shape, tuple(sharding_lib.MESH_AXES))


def hardware_from_config(config: Any, device: str | None = None, mfu: float | None = None,
                         usable_fraction: float = 0.9) -> Hardware:
  """The mesh (``config.mesh``), the device kind and count (``config.plan``: ``device``, ``num_devices``, ``mfu``).

  ``config.mesh.shape`` may name fewer axes than the mesh has (trailing axes get size 1) or be empty (every device
  on the data axis). Its product must equal ``config.plan.num_devices`` when that is given.
  """
  plan_cfg = plain(config.get("plan"))
  check_keys(plan_cfg, ("device", "num_devices", "mfu"), "config.plan")
  mesh_cfg = plain(config.get("mesh"))
  check_keys(mesh_cfg, ("shape", "rules"), "config.mesh")
  axes = tuple(sharding_lib.MESH_AXES)
  shape = tuple(int(n) for n in (mesh_cfg.get("shape") or ()))
  claimed = plan_cfg.get("num_devices")
  if len(shape) > len(axes):
    raise ValueError(f"config.mesh.shape={shape} has {len(shape)} axes but the mesh has {len(axes)} "
                     f"({', '.join(axes)}); give at most {len(axes)} sizes.")
  if any(n <= 0 for n in shape):
    raise ValueError(f"config.mesh.shape={shape} has a non-positive size; every axis needs at least 1 device.")
  if not shape:
    shape = (int(claimed) if claimed else 1,)
  if claimed is not None and int(np.prod(shape)) != int(claimed):
    raise ValueError(f"config.mesh.shape={shape} spans {int(np.prod(shape))} devices but config.plan.num_devices="
                     f"{claimed}; make the product of the mesh shape equal the device count.")
  shape = shape + (1,) * (len(axes) - len(shape))
  rules = sharding_lib.rules_from_config(mesh_cfg.get("rules"))
  name = device or plan_cfg.get("device") or "cpu"
  mfu = float(mfu if mfu is not None else plan_cfg.get("mfu", 0.4))
  if not 0.0 < mfu <= 1.0:
    raise ValueError(f"mfu={mfu} must be in (0, 1] (a fraction of the device's peak FLOP/s).")
  if not 0.0 < usable_fraction <= 1.0:
    raise ValueError(f"usable_fraction={usable_fraction} must be in (0, 1].")
  return Hardware(name, device_spec(name), shape, rules, mfu, usable_fraction)


# ------------------------------------------------------------------------------------------------ state bytes
def per_device_bytes(shape: Sequence[int], itemsize: int, spec: PartitionSpec, axis_sizes: Mapping[str, int]
                     ) -> int:
  """Bytes one device holds of an array of ``shape`` sharded by ``spec`` (uneven shards round up, as XLA pads)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  local = 1
  for dim, entry in zip(shape, entries):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    local *= math.ceil(dim / int(np.prod([axis_sizes[n] for n in names], dtype=np.int64)))
  return int(local) * int(itemsize)


def state_bytes(setup: ElasticSetup, tx, router_tx, hardware: Hardware, teacher_dtype: str) -> dict[str, int]:
  """Per-device bytes of the train state's parts (student params, optimizer state, router incl. step and PRNG key)
  and of the frozen teacher, from the real shardings of the rules table over an abstract mesh."""
  boxed = abstract_boxed_state(setup, tx, router_tx)
  shardings = sharding_lib.logical_shardings(boxed, hardware.abstract_mesh(), hardware.rules)
  shapes = nn.meta.unbox(boxed)
  sizes = hardware.axis_sizes

  def total(tree_shapes, tree_shardings, dtype=None) -> int:
    leaves = jax.tree.map(
        lambda x, s: per_device_bytes(x.shape, jnp.dtype(dtype or x.dtype).itemsize, s.spec, sizes),
        tree_shapes, tree_shardings)
    return int(sum(jax.tree.leaves(leaves)))

  router = (total(shapes.router_params, shardings.router_params)
            + total(shapes.router_opt_state, shardings.router_opt_state)
            + total(shapes.step, shardings.step) + total(shapes.rng, shardings.rng))
  return {"params": total(shapes.params, shardings.params),
          "opt_state": total(shapes.opt_state, shardings.opt_state),
          "router": router,
          "teacher": total(shapes.params, shardings.params, dtype=teacher_dtype)}


# ------------------------------------------------------------------------------------------------ activations
@dataclasses.dataclass(frozen=True)
class _Tensor:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names
  itemsize: int
  saved_by_dots: bool = False  # a projection output: what the "dots" remat policy keeps


def _block_tensors(config: ModelConfig, spec: BlockSpec, b: int, l: int, context: int = 1) -> list[_Tensor]:
  """The forward intermediates of one block on a micro-batch of b sequences of l tokens (N_b's terms).

  ``context`` > 1 (a context axis that splits l evenly) counts the context-parallel paths of
  ``elastic_jax.ops.context_parallel``: ring attention holds one [l/C, l/C] score block per head at a time plus the
  per-hop softmax accumulators and K/V blocks the ring's scan keeps for its backward, and the sharded SSD the
  all-gathered [C, h, p, n] end states.
  """
  c = jnp.dtype(config.dtype).itemsize
  d, f32 = config.hidden_size, 4
  out = [_Tensor((b, l, d), _EMBED, f32),  # pre-norm output (fp32, masked)
         _Tensor((b, l, d), _EMBED, c),  # its cast to the compute dtype: the projections' input
         _Tensor((b, l, d), _EMBED, f32)]  # mixer output in fp32 (masked, depth-gated) before the residual add
  if spec.kind == "mlp":
    mlp = ("batch", "length", "mlp")
    shape = (b, l, spec.intermediate_size)
    out += [_Tensor(shape, mlp, c, True),  # up_proj output
            _Tensor(shape, mlp, c), _Tensor(shape, mlp, c),  # masked, relu^2
            _Tensor((b, l, d), _EMBED, c, True)]  # down_proj output
  elif spec.kind == "attention":
    hq, hkv, hd = spec.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_axes, kv_axes = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
    out += [_Tensor((b, l, hq, hd), q_axes, c, True),
            _Tensor((b, l, hkv, hd), kv_axes, c, True), _Tensor((b, l, hkv, hd), kv_axes, c, True)]
    if context > 1:  # ring attention: one [l/C, l/C] block of scores and of probabilities (fp32) at a time
      block, per_hop = math.ceil(l / context), ("batch", None, "heads", "head_dim")
      out += [_Tensor((b, hq, block, block), ("batch", "heads", None, None), f32)] * 2
      out += [_Tensor((b, l, hq, hd), per_hop, f32),  # the running accumulator, kept for each of the C hops
              _Tensor((b, l, hkv, hd), ("batch", None, "kv_heads", "head_dim"), c),  # the K and V blocks of
              _Tensor((b, l, hkv, hd), ("batch", None, "kv_heads", "head_dim"), c)]  # every hop
    else:  # the full core: every query against every key
      scores = ("batch", "heads", "length", None)
      out += [_Tensor((b, hq, l, l), scores, f32),  # masked scores
              _Tensor((b, hq, l, l), scores, c)]  # probabilities in the compute dtype (the PV matmul's operand)
    out += [_Tensor((b, l, hq, hd), q_axes, c), _Tensor((b, l, hq, hd), q_axes, c),  # core output, head-masked
            _Tensor((b, l, d), _EMBED, c, True)]  # o_proj output
  else:
    h, p = spec.mamba_num_heads, spec.mamba_head_dim
    g, n, q = config.n_groups, config.ssm_state_size, config.chunk_size
    heads, groups = ("batch", "length", "ssm_heads", "ssm_head_dim"), ("batch", "length", "ssm_groups", "ssm_state")
    per_head = ("batch", "length", "ssm_heads")
    chunks = math.ceil(l / q)
    out += [_Tensor((b, l, h, p), heads, c, True), _Tensor((b, l, h, p), heads, c, True),  # z, x
            _Tensor((b, l, g, n), groups, c, True), _Tensor((b, l, g, n), groups, c, True),  # B, C
            _Tensor((b, l, h), per_head, c, True)]  # dt
    out += [_Tensor((b, l, h, p), heads, c)] * 3  # x: conv output, SiLU output, channel-masked
    out += [_Tensor((b, l, g, n), groups, c)] * 4  # B and C: conv and SiLU outputs
    out += [_Tensor((b, l, h), per_head, f32)]  # dt after softplus, fp32
    # Chunked SSD, fp32: C.B^T scores per group, segment decays and weights per head ([q, q] per chunk = q per
    # token), decay-weighted x, chunk states and chunk-start states ([p, n] per head and chunk), y and y_from_start.
    out += [_Tensor((b, l, g, q), ("batch", "length", "ssm_groups", None), f32)]
    out += [_Tensor((b, l, h, q), ("batch", "length", "ssm_heads", None), f32)] * 2
    out += [_Tensor((b, l, h, p), heads, f32)]
    out += [_Tensor((b, chunks, h, p, n), ("batch", "length", "ssm_heads", "ssm_head_dim", "ssm_state"), f32)] * 2
    out += [_Tensor((b, l, h, p), heads, f32)] * 2
    if context > 1:  # every shard's end state, all-gathered
      out += [_Tensor((b, context, h, p, n), ("batch", None, "ssm_heads", "ssm_head_dim", "ssm_state"), f32)]
    out += [_Tensor((b, l, h, p), heads, f32)] * 2 + [_Tensor((b, l, h, p), heads, c)]  # gated norm: gated, normed
    out += [_Tensor((b, l, d), _EMBED, c, True)]  # out_proj output
  return out


def activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, settings: MemorySettings,
                     hardware: Hardware) -> dict[str, float]:
  """Per-device activation bytes of one micro-batch (the module docstring's formula), with its terms."""
  sizes, rules = hardware.axis_sizes, hardware.rules

  def nbytes(t: _Tensor) -> int:
    return per_device_bytes(t.shape, t.itemsize, nn.logical_to_mesh_axes(t.axes, rules), sizes)

  b, l, d, v = micro_batch, seq_len, config.hidden_size, config.vocab_size
  context = sizes.get(CONTEXT_AXIS, 1)
  context = context if context > 1 and l % context == 0 else 1  # else the model's single-device path runs
  block_input = nbytes(_Tensor((b, l, d), _EMBED, 4))
  saved_total, working_max, forward_max = 0, 0, 0
  for spec in config.block_specs():
    tensors = _block_tensors(config, spec, b, l, context)
    everything = sum(nbytes(t) for t in tensors)
    dots = sum(nbytes(t) for t in tensors if t.saved_by_dots)
    kept = {"none": everything, "dots": dots, "full": 0}[settings.policy(spec.kind)]
    saved_total += block_input + kept
    working_max = max(working_max, (everything - kept) + everything + block_input)
    forward_max = max(forward_max, everything)
  logits = nbytes(_Tensor((b, l, v), ("batch", "length", "vocab"), 4))
  head = 5 * logits + nbytes(_Tensor((b, l, d), _EMBED, 4)) + nbytes(
      _Tensor((b, l, d), _EMBED, jnp.dtype(config.dtype).itemsize))
  student = saved_total + max(head, working_max)
  teacher = forward_max + logits
  return {"total": float(max(student, teacher)), "saved_by_blocks": float(saved_total),
          "block_backward_working_set": float(working_max), "logits_and_loss": float(head),
          "teacher_forward": float(teacher)}


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class StagePlan:
  """One stage's per-device memory (bytes), FLOPs and time."""

  name: str
  batch_size: int
  seq_len: int
  micro_batch: int  # sequences per micro-batch (global)
  tokens_per_device: float  # tokens of one micro-batch on one device
  memory: dict[str, float]  # params, opt_state, teacher, router, gradients, activations, total
  activation_terms: dict[str, float]
  capacity: float  # usable HBM bytes per device
  flops_per_step: float
  seconds_per_step: float
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.capacity

  @property
  def margin(self) -> float:
    return self.capacity - self.memory["total"]


@dataclasses.dataclass
class Plan:
  name: str
  config: ModelConfig
  hardware: Hardware
  settings: MemorySettings
  stages: list[StagePlan]

  @property
  def fits(self) -> bool:
    return all(stage.fits for stage in self.stages)

  def to_json(self) -> dict[str, Any]:
    hw = self.hardware
    return {
        "config": self.name, "params": param_count(self.config),
        "device": {"name": hw.device_name, "description": hw.device.description, "hbm_bytes": hw.device.hbm_bytes,
                   "peak_flops": hw.device.peak_flops, "usable_fraction": hw.usable_fraction},
        "num_devices": hw.num_devices, "mesh": hw.axis_sizes, "mfu": hw.mfu,
        "memory_settings": {"remat": dict(self.settings.remat), "grad_accum_steps": self.settings.grad_accum_steps,
                            "teacher_dtype": self.settings.teacher_dtype},
        "fits": self.fits,
        "stages": [{"name": s.name, "batch_size": s.batch_size, "seq_len": s.seq_len, "micro_batch": s.micro_batch,
                    "tokens_per_device": s.tokens_per_device, "memory_bytes": s.memory,
                    "activation_terms_bytes": s.activation_terms, "capacity_bytes": s.capacity, "fits": s.fits,
                    "margin_bytes": s.margin, "flops_per_step": s.flops_per_step,
                    "seconds_per_step": s.seconds_per_step, "notes": s.notes} for s in self.stages],
    }


def _setup_and_optimizers(config: Any, model_config: ModelConfig, stages: Sequence[Stage]):
  total_steps = sum(stage.steps for stage in stages)
  setup = elastic_setup_from_config(config, model_config, range(model_config.num_layers), total_steps)
  optimizer, router_optimizer = optimizers_from_config(config)
  return setup, optimizer, router_optimizer, total_steps


def make_plan(config: Any, name: str = "config", device: str | None = None, mfu: float | None = None,
              usable_fraction: float = 0.9) -> Plan:
  """Plans every stage of a run config (``ml_collections.ConfigDict`` or mapping) without touching a device."""
  model_config = ModelConfig.from_dict(config.model)
  hardware = hardware_from_config(config, device, mfu, usable_fraction)
  settings = memory_settings(config)
  stages = stages_from_config(config)
  setup, optimizer, router_optimizer, total_steps = _setup_and_optimizers(config, model_config, stages)
  tx, router_tx = make_optimizer(optimizer, total_steps), make_optimizer(router_optimizer, total_steps)
  state = state_bytes(setup, tx, router_tx, hardware, settings.teacher_dtype)
  gradients = state["params"] * (2 if settings.grad_accum_steps > 1 else 1)
  sizes = hardware.axis_sizes
  batch_ways = math.prod(sizes[a] for a in _mesh_axes_of("batch", hardware.rules))
  length_ways = math.prod(sizes[a] for a in _mesh_axes_of("length", hardware.rules))
  plans = []
  for stage in stages:
    notes = []
    if stage.batch_size % settings.grad_accum_steps:
      raise ValueError(f"stage {stage.name!r}: batch_size={stage.batch_size} is not divisible by "
                       f"config.memory.grad_accum_steps={settings.grad_accum_steps}; make the batch size a multiple "
                       "of the number of micro-batches.")
    micro = stage.batch_size // settings.grad_accum_steps
    if micro % batch_ways:
      notes.append(f"micro-batch of {micro} sequences does not divide over the {batch_ways} data-parallel devices "
                   "(counted rounded up)")
    if stage.seq_len % length_ways:
      notes.append(f"seq_len {stage.seq_len} does not divide over context={length_ways} (counted rounded up)")
    activations = activation_bytes(model_config, micro, stage.seq_len, settings, hardware)
    memory = {"params": float(state["params"]), "opt_state": float(state["opt_state"]),
              "teacher": float(state["teacher"]), "router": float(state["router"]), "gradients": float(gradients),
              "activations": activations["total"]}
    memory["total"] = float(sum(memory.values()))
    terms = {k: v for k, v in activations.items() if k != "total"}
    flops = elastic_step_flops(model_config, stage.batch_size, stage.seq_len)
    seconds = flops / (hardware.num_devices * hardware.device.peak_flops * hardware.mfu)
    tokens = math.ceil(micro / batch_ways) * math.ceil(stage.seq_len / length_ways)
    plans.append(StagePlan(stage.name, stage.batch_size, stage.seq_len, micro, tokens, memory, terms,
                           hardware.device.hbm_bytes * hardware.usable_fraction, flops, seconds, notes))
  return Plan(name, model_config, hardware, settings, plans)


def _mesh_axes_of(logical: str, rules: Sequence) -> tuple[str, ...]:
  """The mesh axes the first rule for ``logical`` maps to (activations put batch and length there)."""
  for name, axes in rules:
    if name == logical:
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


# ------------------------------------------------------------------------------------------------ XLA's view
@dataclasses.dataclass
class JittedStep:
  """The elastic train step of a run config, jitted over a real mesh by the training loop's own
  ``compiled_elastic_step``, with the abstract teacher (in ``memory.teacher_dtype``) beside it."""

  training: ShardedTraining  # step (state donated), init, state shardings, abstract state, batch sharding
  setup: ElasticSetup
  abstract_teacher: Any  # the params' shapes in memory.teacher_dtype, sharded like the params
  replicated: Any

  def abstract_inputs(self, stage: Stage) -> tuple:
    """Every argument of the step for ``stage`` as shapes: (state, teacher, tokens [b, l+1], budget probs)."""
    tokens = jax.ShapeDtypeStruct((stage.batch_size, stage.seq_len + 1), jnp.int32,
                                  sharding=self.training.batch_sharding)
    probs = jax.ShapeDtypeStruct((len(self.setup.budgets),), jnp.float32, sharding=self.replicated)
    return self.training.abstract_state, self.abstract_teacher, tokens, probs

  def lower(self, stage: Stage):
    return self.training.step.lower(*self.abstract_inputs(stage))


def jit_elastic_step(config: Any, devices: Sequence[jax.Device] | None = None) -> JittedStep:
  """The training loop's elastic step for a run config (identity depth order: shapes do not depend on it) on the
  configured mesh over ``devices`` (default: the first ``num_devices`` devices)."""
  settings = memory_settings(config)
  hardware = hardware_from_config(config)
  devices = list(jax.devices()[:hardware.num_devices] if devices is None else devices)
  if len(devices) < hardware.num_devices:
    raise ValueError(f"the mesh {hardware.axis_sizes} needs {hardware.num_devices} devices but {len(devices)} "
                     f"exist; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={hardware.num_devices} "
                     "before starting Python, or change config.mesh.shape.")
  stages = stages_from_config(config)
  setup, optimizer, router_optimizer, total_steps = _setup_and_optimizers(config, ModelConfig.from_dict(config.model),
                                                                          stages)
  mesh = sharding_lib.make_mesh(hardware.mesh_shape, devices=devices[:hardware.num_devices])
  training = compiled_elastic_step(setup, optimizer, router_optimizer, total_steps, 0, mesh, hardware.rules)
  teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(settings.teacher_dtype),
                                                        sharding=x.sharding), training.abstract_state.params)
  return JittedStep(training, setup, teacher, sharding_lib.replicated(mesh))


def compiled_memory(config: Any, stage_index: int = 0) -> dict[str, float]:
  """Lowers and compiles the real elastic train step of stage ``stage_index`` on the configured mesh (needs that
  many devices; virtual CPU devices work) and returns XLA's memory analysis in bytes per device."""
  jitted = jit_elastic_step(config)
  analysis = jitted.lower(stages_from_config(config)[stage_index]).compile().memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {name: float(getattr(analysis, name)) for name in fields}
  out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                  + out["temp_size_in_bytes"])
  return out


def detect_device(device: jax.Device | None = None) -> str:
  """The ``DEVICES`` key of a JAX device from its ``device_kind`` (e.g. "NVIDIA H100 80GB HBM3" -> "h100")."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return "cpu"
  for pattern, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v5p", "v5p"), ("v5 lite", "v5e"),
                        ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4")):
    if pattern in kind:
      return name
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; pass the device name (one of "
                   f"{sorted(DEVICES)}) explicitly.")


# ------------------------------------------------------------------------------------------------ report
def format_bytes(x: float) -> str:
  """GB (1e9 bytes) from 0.1 GB up, MB below: the table stays readable for 12B and tiny runs alike."""
  return f"{x / GB:,.2f} GB" if abs(x) >= 0.1 * GB else f"{x / 1e6:,.2f} MB"


def format_plan(plan: Plan, compiled: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """The plan as a readable table (one column per stage)."""
  hw, s = plan.hardware, plan.settings
  flops_model = forward_flops_per_token(plan.config, plan.stages[0].seq_len)
  lines = [
      f"{plan.name}: {param_count(plan.config):,} params, pattern {plan.config.pattern} ({plan.config.num_layers} "
      f"blocks), params {plan.config.param_dtype}, compute {plan.config.dtype}",
      f"on {hw.num_devices} x {hw.device.description} ({format_bytes(hw.device.hbm_bytes)} each, "
      f"{hw.usable_fraction:.0%} usable = {format_bytes(hw.device.hbm_bytes * hw.usable_fraction)}), mesh "
      + " ".join(f"{k}={v}" for k, v in hw.axis_sizes.items()),
      f"memory: remat {', '.join(f'{k}={v}' for k, v in s.remat)}; grad_accum_steps {s.grad_accum_steps}; "
      f"teacher {s.teacher_dtype}",
      f"forward FLOPs per token at seq {plan.stages[0].seq_len}: "
      + ", ".join(f"{k} {v / 1e9:.3g} G" for k, v in flops_model.items()),
      "",
  ]
  width = max(14, *(len(st.name) + 2 for st in plan.stages))
  row = lambda label, values: f"{label:<34}" + "".join(f"{v:>{width}}" for v in values)
  stages = plan.stages
  lines.append(row("per device", [st.name for st in stages]))
  lines.append(row("  global batch x seq", [f"{st.batch_size} x {st.seq_len}" for st in stages]))
  lines.append(row("  micro-batch (global sequences)", [str(st.micro_batch) for st in stages]))
  lines.append(row("  tokens per device per micro-batch", [f"{st.tokens_per_device:,.0f}" for st in stages]))
  labels = {"params": "student params", "opt_state": "optimizer state (mu, nu)", "teacher": "teacher",
            "router": "router (+ step, PRNG)", "gradients": "gradients", "activations": "activations (micro-batch)"}
  for key, label in labels.items():
    lines.append(row(f"  {label}", [format_bytes(st.memory[key]) for st in stages]))
  terms = {"saved_by_blocks": "saved by the blocks", "block_backward_working_set": "one block's backward",
           "logits_and_loss": "logits and KD loss", "teacher_forward": "teacher forward (peak)"}
  for key, label in terms.items():
    lines.append(row(f"    {label}", [format_bytes(st.activation_terms[key]) for st in stages]))
  lines.append(row("  total", [format_bytes(st.memory["total"]) for st in stages]))
  lines.append(row("  usable HBM", [format_bytes(st.capacity) for st in stages]))
  lines.append(row("  verdict", ["FITS" if st.fits else "DOES NOT FIT" for st in stages]))
  lines.append(row("  margin", [format_bytes(st.margin) for st in stages]))
  if compiled:
    for key, label in (("temp_size_in_bytes", "XLA temp (compiled)"), ("total", "XLA total (args+out-alias+temp)")):
      lines.append(row(f"  {label}", [format_bytes(compiled[st.name][key]) if st.name in compiled else "-"
                                      for st in stages]))
  lines.append(row("model FLOPs per step", [f"{st.flops_per_step:.3e}" for st in stages]))
  lines.append(row(f"time per step at {hw.mfu:.0%} MFU", [f"{st.seconds_per_step:,.2f} s" for st in stages]))
  for st in stages:
    lines.extend(f"note ({st.name}): {note}" for note in st.notes)
  lines.append("")
  lines.append("FITS" if plan.fits else "DOES NOT FIT: see the stages marked above (raise grad_accum_steps, remat "
               "more block kinds, shard more: tensor/context axes, or use a device with more HBM).")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def _cli() -> None:
  """Defines the flags (only when run as a program: another CLI in the same process may own ``--config``) and runs."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flag = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                                lock_config=True)
  device = flags.DEFINE_string("device", None, f"Device kind, one of {sorted(DEVICES)} (default: "
                               "config.plan.device, else cpu).")
  mfu = flags.DEFINE_float("mfu", None, "Assumed model FLOP utilisation for the time per step (default: "
                           "config.plan.mfu, else 0.4).")
  usable = flags.DEFINE_float("usable_fraction", 0.9, "Fraction of the device's HBM the run may use (the rest is "
                              "the runtime's; on GPUs set XLA_PYTHON_CLIENT_MEM_FRACTION to match).")
  as_json = flags.DEFINE_bool("json", False, "Print the plan as JSON.")
  compile_ = flags.DEFINE_bool("compile", False, "Also lower and compile the real step of every stage (needs the "
                               "mesh's device count) and print XLA's memory analysis beside the estimate.")

  def main(argv: Sequence[str]) -> None:
    del argv
    cfg = config_flag.value
    if cfg is None:
      raise app.UsageError("--config is required, e.g. --config configs/nano_v2_12b.py")
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    plan = make_plan(cfg, name, device.value, mfu.value, usable.value)
    compiled = None
    if compile_.value and jax.device_count() < plan.hardware.num_devices:
      print(f"--compile skipped: the mesh needs {plan.hardware.num_devices} devices and {jax.device_count()} exist "
            f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={plan.hardware.num_devices}).",
            file=sys.stderr)
    elif compile_.value:
      compiled = {stage.name: compiled_memory(cfg, index) for index, stage in enumerate(plan.stages)}
    if as_json.value:
      out = plan.to_json()
      if compiled is not None:
        out["compiled"] = compiled
      print(json.dumps(out, indent=1))
    else:
      print(format_plan(plan, compiled))

  app.run(main)


if __name__ == "__main__":
  _cli()
